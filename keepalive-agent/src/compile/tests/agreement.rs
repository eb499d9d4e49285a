//! Random policies and connections: the compiled tables, read by the kernel's lookup code,
//! must agree with the reference model.

use proptest::prelude::*;

use super::{attach_points, path};
use crate::{
    compile::compile,
    policy::{Action, Cidr, Connection, Direction, Mode, Policy, PortRange, Rule, Values},
};

const CGROUPS: [&str; 6] = ["/", "/a", "/a/b", "/a/b/x", "/c", "/d"];
const CIDRS: [&str; 8] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "0.0.0.0/0",
    "fd00::/8",
    "fd00:1::/32",
    "::/0",
    "192.0.2.7",
];
const ADDRS: [&str; 8] = [
    "10.1.2.3",
    "10.1.9.9",
    "10.200.0.1",
    "::ffff:10.1.2.3",
    "fd00:1::5",
    "fd00:2::5",
    "192.0.2.7",
    "2001:db8::1",
];

fn port_range() -> impl Strategy<Value = PortRange> {
    (1u16..70, 0u16..20).prop_map(|(first, span)| PortRange {
        first,
        last: first.saturating_add(span),
    })
}

fn any_rule() -> impl Strategy<Value = Rule> {
    (
        prop::option::of(prop::sample::select(&CGROUPS[1..])),
        prop::collection::vec(prop::sample::select(&CIDRS[..]), 0..3),
        prop::collection::vec(port_range(), 0..2),
        prop::collection::vec(port_range(), 0..2),
        prop::option::of(prop::bool::ANY),
        prop::sample::select(&Mode::ALL[..]),
        1u32..100,
        prop::bool::ANY,
    )
        .prop_map(
            |(cgroup, remote, remote_ports, local_ports, outbound, mode, idle, lock)| Rule {
                cgroup: cgroup.map(path),
                remote: remote
                    .iter()
                    .map(|c| Cidr::parse(c).unwrap_or_else(|e| panic!("{e}")))
                    .collect(),
                remote_ports,
                local_ports,
                direction: outbound.map(Direction::from_outbound),
                ..Rule::new(
                    String::new(),
                    Action {
                        mode,
                        values: Values {
                            idle_secs: idle,
                            ..Values::default()
                        },
                        lock,
                        ends: false,
                    },
                )
            },
        )
}

fn any_policy() -> impl Strategy<Value = Policy> {
    (
        prop::collection::vec(any_rule(), 0..8),
        prop::sample::select(vec![vec!["/"], vec!["/a"], vec!["/a/b", "/c"], vec!["/c"]]),
    )
        .prop_map(|(mut rules, scopes)| {
            for (i, rule) in rules.iter_mut().enumerate() {
                rule.name = format!("rule {}", i + 1);
            }
            Policy {
                scopes: scopes.into_iter().map(path).collect(),
                default: Action::enforce(Values::default()),
                rules,
                existing: true,
                annotations: None,
            }
        })
}

fn any_connection() -> impl Strategy<Value = Connection> {
    (
        prop::sample::select(&CGROUPS[..]),
        prop::bool::ANY,
        prop::sample::select(&ADDRS[..]),
        1u16..90,
        1u16..90,
    )
        .prop_map(
            |(cgroup, outbound, remote, remote_port, local_port)| Connection {
                cgroup: path(cgroup),
                direction: Direction::from_outbound(outbound),
                remote: remote.parse().unwrap_or_else(|e| panic!("{e}")),
                remote_port,
                local_port,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn compiled_tables_agree_with_the_reference_model(
        policy in any_policy(),
        conns in prop::collection::vec(any_connection(), 1..12),
    ) {
        let tables = compile(&policy, &attach_points(&policy), 3).unwrap_or_else(|e| panic!("{e}"));
        for conn in &conns {
            prop_assert_eq!(
                tables.decide(conn),
                policy.record_for(conn),
                "connection {:?}", conn
            );
        }
    }
}
