use std::net::IpAddr;

use keepalive_common::{DIM_REMOTE, OUTBOUND};

use super::*;
use crate::policy::{Action, Cidr, Connection, Direction, Mode, PortRange, Rule, Values};

fn path(text: &str) -> CgroupPath {
    CgroupPath::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

/// `rules` over the whole hierarchy, the built-in values as the default.
fn at_root(rules: Vec<Rule>) -> Policy {
    Policy {
        rules,
        ..Policy::enforce(Values::default(), vec![CgroupPath::root()])
    }
}

/// The attachments the agent makes for `policy`: enforced cgroups, and rule cgroups inside them
/// (all assumed to exist).
fn attach_points(policy: &Policy) -> Vec<CgroupPath> {
    crate::plan::named_attach_points(policy)
}

#[test]
fn port_ranges_split_into_exact_disjoint_prefixes() {
    for (first, last) in [
        (1, 1),
        (1, 65535),
        (22, 22),
        (8000, 8999),
        (1024, 65535),
        (3, 17),
        (65535, 65535),
    ] {
        let prefixes = port_prefixes(PortRange { first, last });
        let mut covered = vec![false; 65536];
        for (bits, len) in &prefixes {
            let size = 1u32 << (16 - u32::from(*len));
            for port in u32::from(*bits)..u32::from(*bits) + size {
                assert!(
                    !covered[port as usize],
                    "{first}-{last}: {port} covered twice"
                );
                covered[port as usize] = true;
            }
        }
        for port in 0..65536u32 {
            let inside = (u32::from(first)..=u32::from(last)).contains(&port);
            assert_eq!(
                covered[port as usize], inside,
                "{first}-{last}: port {port}"
            );
        }
    }
    assert_eq!(
        port_prefixes(PortRange {
            first: 1024,
            last: 65535
        })
        .len(),
        6
    );
}

fn rule(cgroup: Option<&str>, remote: &[&str], remote_ports: &[(u16, u16)], idle: u32) -> Rule {
    Rule {
        cgroup: cgroup.map(path),
        remote: remote
            .iter()
            .map(|c| Cidr::parse(c).unwrap_or_else(|e| panic!("{e}")))
            .collect(),
        remote_ports: remote_ports
            .iter()
            .map(|&(first, last)| PortRange { first, last })
            .collect(),
        ..Rule::new(
            format!("r{idle}"),
            Action::enforce(Values {
                idle_secs: idle,
                ..Values::default()
            }),
        )
    }
}

fn conn(cgroup: &str, remote: &str, remote_port: u16) -> Connection {
    Connection {
        cgroup: path(cgroup),
        direction: Direction::Outbound,
        remote: remote.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}")),
        remote_port,
        local_port: 40000,
    }
}

#[test]
fn nested_cidrs_and_ports_pick_the_first_rule_in_file_order() {
    let policy = at_root(vec![
        rule(None, &["10.1.0.0/16"], &[(5432, 5432)], 11),
        rule(None, &["10.0.0.0/8"], &[], 12),
        rule(None, &["10.1.2.0/24", "fd00::/8"], &[(1, 65535)], 13),
        rule(Some("/app"), &[], &[(443, 443)], 14),
    ]);
    let tables = compile(&policy, &attach_points(&policy), 7).unwrap_or_else(|e| panic!("{e}"));
    let idle = |c: &Connection| tables.decide(c).map(|r| r.idle_secs);
    assert_eq!(idle(&conn("/", "10.1.2.3", 5432)), Some(11));
    assert_eq!(
        idle(&conn("/", "10.1.2.3", 80)),
        Some(12),
        "rule 2 comes before rule 3"
    );
    assert_eq!(idle(&conn("/", "fd00::1", 80)), Some(13));
    assert_eq!(
        idle(&conn("/", "::ffff:10.9.9.9", 80)),
        Some(12),
        "mapped IPv4"
    );
    assert_eq!(idle(&conn("/", "192.0.2.1", 80)), Some(60), "the default");
    assert_eq!(
        idle(&conn("/app/x", "192.0.2.1", 443)),
        Some(14),
        "cgroup rule first"
    );
    assert_eq!(
        idle(&conn("/app", "10.1.2.3", 5432)),
        Some(11),
        "then the global rules"
    );
    for c in [conn("/", "10.1.2.3", 5432), conn("/app/x", "fd00::9", 443)] {
        assert_eq!(tables.decide(&c), policy.record_for(&c));
    }
}

#[test]
fn a_policy_without_rules_needs_no_lookups() {
    let policy = Policy::enforce(Values::default(), vec![CgroupPath::root()]);
    let tables = compile(&policy, &attach_points(&policy), 1).unwrap_or_else(|e| panic!("{e}"));
    let record = tables.attachments[&CgroupPath::root()];
    assert_eq!(record.groups, 0, "nothing to look up: the fast path");
    assert_eq!(record.fallback, policy.default.record(0));
    assert!(tables.addr.is_empty() && tables.ports.is_empty() && tables.decisions.is_empty());
}

#[test]
fn a_catch_all_rule_becomes_the_fallback_of_its_cgroup() {
    let mut exempt = rule(Some("/legacy"), &[], &[], 1);
    exempt.action.mode = Mode::Exempt;
    let policy = at_root(vec![exempt, rule(None, &["10.0.0.0/8"], &[], 2)]);
    let tables = compile(&policy, &attach_points(&policy), 1).unwrap_or_else(|e| panic!("{e}"));
    let legacy = tables.attachments[&path("/legacy")];
    assert_eq!(legacy.groups, 0, "nothing to look up below a catch-all");
    assert_eq!(legacy.fallback.mode(), Some(Mode::Exempt));
    assert_eq!(legacy.fallback.slot, 1);
    assert!(tables.attachments[&CgroupPath::root()].has_group(DIM_REMOTE, OUTBOUND));
}

#[test]
fn attachments_with_the_same_rules_share_a_ruleset_and_generations_do_not_collide() {
    let policy = Policy {
        scopes: vec![path("/a"), path("/b")],
        default: Action::enforce(Values::default()),
        rules: vec![rule(None, &["10.0.0.0/8"], &[], 2)],
        existing: true,
        annotations: None,
    };
    let one = compile(&policy, &attach_points(&policy), 1).unwrap_or_else(|e| panic!("{e}"));
    let two = compile(&policy, &attach_points(&policy), 2).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        one.attachments[&path("/a")].ruleset,
        one.attachments[&path("/b")].ruleset
    );
    assert_ne!(
        one.attachments[&path("/a")].ruleset,
        two.attachments[&path("/a")].ruleset
    );
    assert_eq!(
        one.addr.len(),
        2,
        "10/8 once per direction, for both attachments"
    );
}

#[test]
fn ten_thousand_cidr_rules_stay_within_the_limits() {
    let rules: Vec<Rule> = (0..10_000u32)
        .map(|i| {
            let cidr = format!("10.{}.{}.0/24", i / 256, i % 256);
            let mut r = rule(None, &[cidr.as_str()], &[], 10 + i % 100);
            r.name = format!("r{i}");
            r
        })
        .collect();
    let policy = at_root(rules);
    let tables = compile(&policy, &attach_points(&policy), 1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        tables.addr.len(),
        20_000,
        "one entry per CIDR and direction"
    );
    assert!(
        tables.decisions.is_empty(),
        "single-key rules need no combinations"
    );
    let c = conn("/x", "10.3.4.5", 80);
    assert_eq!(tables.decide(&c), policy.record_for(&c));
}

#[test]
fn too_many_combinations_are_refused_with_the_limit() {
    // In one group (remote + remote_port): 600 rules with a network and any port, 600 with any
    // network and one port. Every network class meets every port class: 600 x 600 x 2
    // directions.
    let by_address = (0..600u16).map(|i| {
        let cidr = format!("10.{}.{}.0/24", i / 256, i % 256);
        rule(None, &[cidr.as_str()], &[(1, 65535)], 10)
    });
    let by_port = (0..600u16).map(|i| rule(None, &["0.0.0.0/0"], &[(1000 + i, 1000 + i)], 10));
    let rules: Vec<Rule> = by_address
        .chain(by_port)
        .enumerate()
        .map(|(i, mut r)| {
            r.name = format!("r{i}");
            r
        })
        .collect();
    let policy = at_root(rules);
    let error = compile(&policy, &attach_points(&policy), 1)
        .err()
        .map(|e| e.to_string());
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("decision entries") && e.contains("262144")),
        "{error:?}"
    );
}

#[test]
fn a_mixed_ten_thousand_rule_policy_stays_small() {
    // CIDR rules, port rules and local-port rules, as a fleet writes them: separate groups,
    // no cross product.
    let rules: Vec<Rule> = (0..10_000u32)
        .map(|i| {
            let mut r = match i % 4 {
                0 | 1 => {
                    let cidr = format!("10.{}.{}.0/24", i / 256 % 256, i % 256);
                    rule(None, &[cidr.as_str()], &[], 10)
                }
                2 => {
                    let port = u16::try_from(5000 + i % 500).unwrap_or(5000);
                    rule(None, &[], &[(port, port)], 11)
                }
                _ => {
                    let mut r = rule(None, &[], &[], 12);
                    let port = u16::try_from(20_000 + i % 300).unwrap_or(20_000);
                    r.local_ports = vec![PortRange {
                        first: port,
                        last: port,
                    }];
                    r
                }
            };
            r.name = format!("r{i}");
            r
        })
        .collect();
    let policy = at_root(rules);
    let tables = compile(&policy, &attach_points(&policy), 1).unwrap_or_else(|e| panic!("{e}"));
    assert!(tables.decisions.is_empty());
    let entries = tables.addr.len() + tables.ports.len();
    assert!(entries < 30_000, "{entries}");
    for c in [
        conn("/x", "10.3.4.5", 80),
        conn("/x", "192.0.2.1", 5007),
        conn("/", "192.0.2.1", 9),
    ] {
        assert_eq!(tables.decide(&c), policy.record_for(&c));
    }
}

mod agreement;
