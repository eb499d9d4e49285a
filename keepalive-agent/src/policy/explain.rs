//! The precedence walk, traced: [`Policy::decide`] is [`Policy::walk`] with a visitor that
//! records nothing, and `explain` is the same walk with one that records each candidate's keys.

use super::{Connection, Decision, Policy, Rule, mapped};

/// How each match key of one rule compared with a connection: `None` where the rule has no
/// such key (it matches anything).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyChecks {
    pub remote: Option<bool>,
    pub remote_port: Option<bool>,
    pub local_port: Option<bool>,
    pub direction: Option<bool>,
}

impl KeyChecks {
    /// Whether every key the rule has matched.
    pub fn matched(&self) -> bool {
        [
            self.remote,
            self.remote_port,
            self.local_port,
            self.direction,
        ]
        .into_iter()
        .all(|check| check.unwrap_or(true))
    }
}

impl Rule {
    /// Compares every key besides the cgroup with `conn`.
    pub fn check(&self, conn: &Connection) -> KeyChecks {
        let remote = mapped(conn.remote);
        let any = |present: bool, hit: &dyn Fn() -> bool| present.then(hit);
        KeyChecks {
            remote: any(!self.remote.is_empty(), &|| {
                self.remote.iter().any(|cidr| cidr.contains_addr(remote))
            }),
            remote_port: any(!self.remote_ports.is_empty(), &|| {
                self.remote_ports
                    .iter()
                    .any(|range| range.contains(conn.remote_port))
            }),
            local_port: any(!self.local_ports.is_empty(), &|| {
                self.local_ports
                    .iter()
                    .any(|range| range.contains(conn.local_port))
            }),
            direction: self.direction.map(|direction| direction == conn.direction),
        }
    }
}

/// One candidate the walk looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Index into `Policy::rules`.
    pub rule: usize,
    pub checks: KeyChecks,
}

/// What the walk did for one connection: the candidates it looked at, in order (the last one
/// decides when the decision is a rule), and the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub decision: Decision,
    pub steps: Vec<Step>,
}

impl Policy {
    /// The precedence walk (see [`Policy::decide`]): `visit` sees each candidate looked at, in
    /// order, with its keys compared; the walk stops at the first that matches.
    pub fn walk(&self, conn: &Connection, mut visit: impl FnMut(Step)) -> Decision {
        if !self.in_scope(&conn.cgroup) {
            return Decision::Outside;
        }
        for rule in self.candidates(&conn.cgroup) {
            let checks = self.rules[rule].check(conn);
            visit(Step { rule, checks });
            if checks.matched() {
                return Decision::Rule(rule);
            }
        }
        Decision::Default
    }

    /// [`Policy::decide`] with the candidates it looked at.
    pub fn trace(&self, conn: &Connection) -> Trace {
        let mut steps = Vec::new();
        let decision = self.walk(conn, |step| steps.push(step));
        Trace { decision, steps }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::{CgroupPath, Direction, file};

    fn example() -> Policy {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.toml");
        file::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    fn conn(cgroup: &str, direction: Direction, remote: &str, local_port: u16) -> Connection {
        let (addr, port) = remote.rsplit_once(':').unwrap_or((remote, "0"));
        Connection {
            cgroup: CgroupPath::parse(cgroup).unwrap_or_else(|e| panic!("{e}")),
            direction,
            remote: addr
                .trim_matches(['[', ']'])
                .parse()
                .unwrap_or_else(|e| panic!("{remote}: {e}")),
            remote_port: port.parse().unwrap_or(0),
            local_port,
        }
    }

    #[test]
    fn the_trace_ends_at_the_decision_and_agrees_with_decide() {
        let policy = example();
        let cases = [
            conn(
                "/system.slice/payments.service",
                Direction::Outbound,
                "10.20.1.2:5432",
                40000,
            ),
            conn(
                "/system.slice/payments.service",
                Direction::Outbound,
                "203.0.113.9:443",
                40000,
            ),
            conn("/", Direction::Inbound, "198.51.100.1:50000", 22),
            conn(
                "/system.slice/batch.service",
                Direction::Outbound,
                "[::1]:1",
                1,
            ),
            conn("/x", Direction::Outbound, "192.0.2.1:80", 1),
        ];
        for case in &cases {
            let trace = policy.trace(case);
            assert_eq!(trace.decision, policy.decide(case), "{case:?}");
            match trace.decision {
                Decision::Rule(i) => {
                    let last = trace.steps.last().copied();
                    assert_eq!(last.map(|step| step.rule), Some(i));
                    assert!(last.is_some_and(|step| step.checks.matched()));
                    let before = &trace.steps[..trace.steps.len() - 1];
                    assert!(before.iter().all(|step| !step.checks.matched()));
                }
                _ => assert!(trace.steps.iter().all(|step| !step.checks.matched())),
            }
        }
    }

    #[test]
    fn checks_name_each_key_that_failed() {
        let policy = example();
        let nat = policy
            .rules
            .iter()
            .position(|rule| rule.name == "nat-gateway")
            .unwrap_or(usize::MAX);
        let inbound = conn("/", Direction::Inbound, "203.0.113.9:443", 1);
        let checks = policy.rules[nat].check(&inbound);
        assert_eq!(
            checks,
            KeyChecks {
                remote: Some(true),
                direction: Some(false),
                ..KeyChecks::default()
            }
        );
    }
}
