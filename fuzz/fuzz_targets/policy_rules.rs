//! Structured policies, straight to the compiler: rules over a small cgroup tree with CIDRs,
//! port ranges, directions and modes drawn by the fuzzer, so it explores rule combinations
//! the text format would rarely reach. Compiled tables must agree with the reference model.
#![no_main]

use arbitrary::Arbitrary;
use keepalive_agent::{
    Action, CgroupPath, Mode, Policy, Rule, Values,
    policy::{Cidr, Direction, PortRange},
};
use libfuzzer_sys::fuzz_target;

mod agree;

const CGROUPS: [&str; 5] = ["/", "/a", "/a/b", "/c", "/a/b/d"];

#[derive(Debug, Arbitrary)]
struct Spec {
    scopes: Vec<u8>,
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Arbitrary)]
struct RuleSpec {
    cgroup: Option<u8>,
    remote: Vec<(u128, u8)>,
    remote_ports: Vec<(u16, u16)>,
    local_ports: Vec<(u16, u16)>,
    direction: Option<bool>,
    mode: u8,
    idle: u16,
}

fn cgroup(index: u8) -> Option<CgroupPath> {
    CgroupPath::parse(CGROUPS[usize::from(index) % CGROUPS.len()]).ok()
}

fn ranges(pairs: &[(u16, u16)]) -> Vec<PortRange> {
    pairs
        .iter()
        .take(4)
        .map(|&(a, b)| PortRange {
            first: a.min(b).max(1),
            last: a.max(b).max(1),
        })
        .collect()
}

fn policy(spec: &Spec) -> Policy {
    let mut scopes: Vec<CgroupPath> = spec
        .scopes
        .iter()
        .take(3)
        .filter_map(|&i| cgroup(i))
        .collect();
    if scopes.is_empty() {
        scopes.push(CgroupPath::root());
    }
    let rules = spec
        .rules
        .iter()
        .take(24)
        .enumerate()
        .map(|(i, rule)| Rule {
            cgroup: rule.cgroup.and_then(cgroup),
            remote: rule
                .remote
                .iter()
                .take(4)
                .map(|&(bits, len)| {
                    let len = len % 129;
                    let mut cidr = Cidr { bits, len };
                    cidr.bits &= cidr.mask();
                    cidr
                })
                .collect(),
            remote_ports: ranges(&rule.remote_ports),
            local_ports: ranges(&rule.local_ports),
            direction: rule.direction.map(Direction::from_outbound),
            ..Rule::new(
                format!("rule {}", i + 1),
                Action {
                    mode: Mode::ALL[usize::from(rule.mode) % Mode::ALL.len()],
                    values: Values {
                        idle_secs: u32::from(rule.idle % 32767) + 1,
                        ..Values::default()
                    },
                    lock: rule.mode & 0x80 != 0,
                },
            )
        })
        .collect();
    Policy {
        scopes,
        default: Action::enforce(Values::default()),
        rules,
        existing: false,
        annotations: None,
    }
}

fuzz_target!(|spec: Spec| {
    agree::check(&policy(&spec));
});
