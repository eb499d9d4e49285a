//! `keepalive-agent status`: what is attached where, the policy in force and its source, and
//! the counters per rule, read from the pins and the state file into a [`Snapshot`] (printed
//! as a table, or serialised with `--json`).

use std::{fmt::Write as _, path::Path};

use crate::{cli::StatusArgs, status::Snapshot};

/// The status, from the pins and the state file.
pub fn collect(args: &StatusArgs, cgroup2_mount: &Path) -> anyhow::Result<Snapshot> {
    Snapshot::from_pins(&args.places.bpffs, &args.places.state_dir, cgroup2_mount)
}

/// The status as JSON.
pub fn json(status: &Snapshot) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(status)? + "\n")
}

/// The status as a table for people.
pub fn table(status: &Snapshot) -> String {
    let mut out = String::new();
    if !status.faults.is_empty() {
        let _ = writeln!(out, "enforcement missing: {}", status.faults.join("; "));
    }
    if status.attached.is_empty() {
        let _ = writeln!(
            out,
            "nothing attached (no pinned links under {})",
            status.pins.display()
        );
        return out;
    }
    let agent = match (status.agent_running, status.agent_pid) {
        (true, Some(pid)) => format!("agent pid {pid} running"),
        (false, Some(pid)) => {
            format!("agent pid {pid} not running; enforcement continues from the pins")
        }
        (_, None) => "no agent state".into(),
    };
    let _ = writeln!(out, "pins: {}; {agent}", status.pins.display());
    if let Some(policy) = &status.policy {
        let _ = writeln!(
            out,
            "policy: {} (generation {}, enforced in {}; reloads: {} ok, {} refused)",
            policy.source,
            policy.generation,
            policy.scopes.join(", "),
            policy.reloads_succeeded,
            policy.reloads_failed,
        );
    }
    for missing in &status.missing_features {
        let _ = writeln!(
            out,
            "kernel: no {} (needs Linux {}; {}): {}",
            missing.feature, missing.since, missing.reason, missing.effect,
        );
    }
    let _ = writeln!(out, "\n{:<48} {:>10}  PROGRAMS", "CGROUP", "ID");
    for entry in &status.attached {
        let _ = writeln!(
            out,
            "{:<48} {:>10}  {}",
            entry.cgroup.as_deref().unwrap_or("(removed)"),
            entry.id,
            entry.programs.join(", ")
        );
    }
    rules_table(&mut out, status);
    if let Some(counters) = &status.counters {
        let counters: Vec<String> = keepalive_common::Stat::ALL
            .iter()
            .map(|stat| format!("{}={}", stat.name(), counters.get(*stat)))
            .collect();
        let _ = writeln!(out, "\n{}", counters.join(" "));
    }
    out
}

/// The rules and their counters, one line each.
fn rules_table(out: &mut String, status: &Snapshot) {
    let columns = keepalive_common::Outcome::ALL;
    let _ = write!(out, "\n{:<4} {:<28} {:>10}", "SLOT", "RULE", "SEEN");
    for column in columns {
        let _ = write!(out, " {:>10}", column.name().to_uppercase());
    }
    out.push('\n');
    for rule in &status.rules {
        let _ = write!(
            out,
            "{:<4} {:<28} {:>10}",
            rule.slot,
            rule.name,
            rule.counters.seen()
        );
        for column in columns {
            let _ = write!(out, " {:>10}", rule.counters.get(column));
        }
        out.push('\n');
    }
    for rule in &status.rules {
        if let Some(containers) = &rule.containers {
            let _ = writeln!(out, "rule {:?} selects {containers}", rule.name);
        }
    }
    ends_table(out, status);
}

/// How the rules' connections ended (`ends = true` in the policy), where any did.
fn ends_table(out: &mut String, status: &Snapshot) {
    let ends = keepalive_common::ends::End::ALL;
    if status
        .rules
        .iter()
        .all(|rule| rule.ends.0.iter().all(|n| *n == 0))
    {
        return;
    }
    let _ = write!(out, "\n{:<4} {:<28}", "SLOT", "RULE");
    for end in ends {
        let _ = write!(out, " {:>10}", end.name().to_uppercase());
    }
    out.push('\n');
    for rule in &status.rules {
        let _ = write!(out, "{:<4} {:<28}", rule.slot, rule.name);
        for end in ends {
            let _ = write!(out, " {:>10}", rule.ends.get(end));
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

    use super::*;
    use crate::{
        enforcer::Outcomes,
        status::{Attachment, PolicyInForce, RuleCounters},
    };

    fn snapshot() -> Snapshot {
        let mut outcomes = Outcomes::default();
        outcomes.0[keepalive_common::Outcome::Set as usize] = 2;
        Snapshot {
            pins: "/sys/fs/bpf/keepalive-agent".into(),
            agent_running: true,
            agent_pid: Some(42),
            faults: Vec::new(),
            policy: Some(PolicyInForce {
                source: "/etc/keepalive-agent/policy.toml".into(),
                generation: 3,
                applied_at: 1,
                scopes: vec!["/system.slice".into()],
                reloads_succeeded: 2,
                reloads_failed: 1,
            }),
            missing_features: Vec::new(),
            attached: vec![Attachment {
                cgroup: Some("/system.slice".into()),
                id: 7,
                programs: vec!["setsockopt".into(), "sockops".into()],
            }],
            records: 1,
            counters: Some(crate::enforcer::Counters::default()),
            rules: vec![RuleCounters {
                containers: None,
                slot: 0,
                name: "default".into(),
                line: 0,
                action: "enforce".into(),
                counters: outcomes,
                ends: crate::enforcer::Ends([5, 1, 0, 0]),
            }],
            agent: None,
        }
    }

    #[test]
    fn json_has_the_keys_scripts_read() {
        let json: serde_json::Value = serde_json::from_str(&json(&snapshot()).unwrap()).unwrap();
        assert_eq!(json["agent_running"], true);
        assert_eq!(json["agent_pid"], 42);
        assert_eq!(json["attached"][0]["cgroup"], "/system.slice");
        assert_eq!(
            json["attached"][0]["programs"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(json["records"], 1);
        assert_eq!(json["policy"]["reloads_failed"], 1);
        assert_eq!(json["rules"][0]["name"], "default");
        assert_eq!(json["rules"][0]["counters"]["set"], 2);
        assert_eq!(json["rules"][0]["counters"]["seen"], 2);
        assert_eq!(json["counters"]["err_getsockopt"], 0);
        assert_eq!(json["rules"][0]["ends"]["reset"], 1);
    }

    #[test]
    fn the_table_names_the_cgroup_the_policy_and_the_rule() {
        let table = table(&snapshot());
        assert!(table.contains("agent pid 42 running"), "{table}");
        assert!(
            table.contains("generation 3, enforced in /system.slice"),
            "{table}"
        );
        assert!(table.contains("/system.slice") && table.contains("setsockopt, sockops"));
        let rule = table.lines().find(|line| line.starts_with("0 ")).unwrap();
        assert_eq!(
            rule.split_whitespace().collect::<Vec<_>>()[..4],
            ["0", "default", "2", "2"]
        );
        let ends = table.lines().rfind(|line| line.starts_with("0 ")).unwrap();
        assert_eq!(
            ends.split_whitespace().collect::<Vec<_>>(),
            ["0", "default", "5", "1", "0", "0"],
            "{table}"
        );
    }
}
