//! Realistic policies of a given size, for the cost of rules.
//!
//! A mix a fleet would write: CIDR rules for partner networks and NAT gateways, remote-port
//! rules for databases and brokers, local-port exemptions, direction-specific rules. The
//! benchmark's loopback connections match none of them until the last rule (127.0.0.0/8), so
//! every lookup is done and the last rule applies: the most expensive decision there is.

use keepalive_agent::{
    Action, CgroupPath, Mode, Policy, Rule, Values,
    policy::{Cidr, Direction, PortRange},
};

fn rule(i: usize) -> Rule {
    Rule::new(
        format!("rule {}", i + 1),
        Action::enforce(Values {
            idle_secs: 30 + u32::try_from(i % 200).unwrap_or(0),
            ..Values::default()
        }),
    )
}

fn cidr(text: &str) -> Cidr {
    Cidr::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

/// `rules` rules (at least 1) for `scope`; the last one matches loopback.
pub(crate) fn realistic(rules: usize, scope: CgroupPath) -> Policy {
    let mut list: Vec<Rule> = (0..rules.saturating_sub(1))
        .map(|i| {
            let mut r = rule(i);
            // The first three rules are one of each kind of match key, so that a small policy
            // already does every lookup a large one does; then the mix repeats every 20.
            let kind = match i {
                0 => 0,
                1 => 16,
                2 => 18,
                _ => i % 20,
            };
            match kind {
                // Most rules: a network (a /24 of 10/8, or a /48 of fd00::/8).
                0..=13 => {
                    r.remote = vec![cidr(&format!("10.{}.{}.0/24", (i / 256) % 256, i % 256))]
                }
                14 | 15 => r.remote = vec![cidr(&format!("fd00:{:x}::/48", i))],
                // Some: a service port, outbound.
                16 | 17 => {
                    let port = u16::try_from(5000 + (i % 64)).unwrap_or(5000);
                    r.remote_ports = vec![PortRange {
                        first: port,
                        last: port,
                    }];
                    r.direction = Some(Direction::Outbound);
                }
                // A few: exempt a local port range.
                _ => {
                    let first = u16::try_from(20_000 + (i % 32) * 10).unwrap_or(20_000);
                    r.local_ports = vec![PortRange {
                        first,
                        last: first + 9,
                    }];
                    r.action.mode = Mode::Exempt;
                }
            }
            r
        })
        .collect();
    let mut last = rule(list.len());
    last.remote = vec![cidr("127.0.0.0/8")];
    list.push(last);
    Policy {
        scopes: vec![scope],
        default: Action::enforce(Values::default()),
        rules: list,
        existing: false,
        annotations: None,
    }
}

/// The TOML text of `realistic(rules, scope)`, for the agent binary.
pub(crate) fn realistic_toml(rules: usize, scope: &CgroupPath) -> String {
    use std::fmt::Write as _;
    let policy = realistic(rules, scope.clone());
    let mut text = format!("[agent]\ncgroups = [\"{scope}\"]\nexisting = false\n");
    for rule in &policy.rules {
        let _ = writeln!(
            text,
            "[[rule]]\nidle = \"{}s\"",
            rule.action.values.idle_secs
        );
        if !rule.remote.is_empty() {
            let _ = writeln!(text, "remote = \"{}\"", rule.remote[0]);
        }
        if let Some(port) = rule.remote_ports.first() {
            let _ = writeln!(text, "remote_port = \"{port}\"");
        }
        if let Some(port) = rule.local_ports.first() {
            let _ = writeln!(text, "local_port = \"{port}\"");
        }
        if let Some(direction) = rule.direction {
            let _ = writeln!(text, "direction = \"{}\"", direction.name());
        }
        if rule.action.mode != Mode::Enforce {
            let _ = writeln!(text, "mode = \"{}\"", rule.action.mode.name());
        }
    }
    text
}
