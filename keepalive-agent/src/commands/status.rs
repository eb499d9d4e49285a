//! `keepalive-agent status`: what is attached where, the policy in force and its source, and
//! the counters per rule, read from the pins and the state file into a [`Snapshot`] (printed
//! as a table, or serialised with `--json`).

use std::{fmt::Write as _, path::Path};

use crate::{cli::StatusArgs, snapshot::Snapshot};

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
    if !status.missing.is_empty() {
        let _ = writeln!(out, "enforcement missing: {}", status.missing.join("; "));
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
}
