//! The scan's report: a table for people, or JSON lines (one object per connection, then one
//! `{"summary": ...}` object) for tools.

use std::{collections::BTreeMap, io};

use serde_json::{Value, json};

use super::{Entry, Report};
use crate::existing::diag::{TIMER_KEEPALIVE, TIMER_OFF, TIMER_PROBE0, TIMER_RETRANSMIT};

/// The connections of one cgroup (or container).
#[derive(Debug, Default, Clone, Copy)]
struct Group {
    connections: u64,
    without_keepalive: u64,
    /// Connections whose options could not be read.
    unknown: u64,
    /// Connections the policy would change (set or cap a value they do not have).
    would_change: u64,
    /// Connections audit mode counts (enforce would change them).
    audited: u64,
}

impl Group {
    fn add(&mut self, entry: &Entry) {
        self.connections += 1;
        match &entry.options {
            Ok(options) if !options.keepalive => self.without_keepalive += 1,
            Ok(_) => {}
            Err(_) => self.unknown += 1,
        }
        self.would_change += u64::from(entry.verdict.changes == Some(true));
        self.audited += u64::from(entry.verdict.action == "audited");
    }

    fn json(&self) -> Value {
        json!({
            "connections": self.connections,
            "without_keepalive": self.without_keepalive,
            "unknown": self.unknown,
            "would_change": self.would_change,
            "audited": self.audited,
        })
    }
}

/// The summary's key of an entry: its container, else its cgroup.
fn group_key(entry: &Entry) -> (String, Option<String>) {
    let cgroup = entry
        .cgroup
        .as_ref()
        .map_or_else(|| "(gone)".to_string(), ToString::to_string);
    (cgroup, entry.container.as_ref().map(|c| c.name.clone()))
}

fn groups(report: &Report) -> (BTreeMap<(String, Option<String>), Group>, Group) {
    let mut groups: BTreeMap<(String, Option<String>), Group> = BTreeMap::new();
    let mut total = Group::default();
    for entry in &report.entries {
        groups.entry(group_key(entry)).or_default().add(entry);
        total.add(entry);
    }
    (groups, total)
}

fn timer(timer: u8) -> &'static str {
    match timer {
        TIMER_OFF => "off",
        TIMER_RETRANSMIT => "retransmit",
        TIMER_KEEPALIVE => "keepalive",
        TIMER_PROBE0 => "probe0",
        _ => "other",
    }
}

/// One connection as a JSON object.
fn entry_json(entry: &Entry) -> Value {
    let options = entry.options.as_ref().ok();
    json!({
        "local": entry.local.to_string(),
        "remote": entry.remote.to_string(),
        "netns": entry.netns,
        "direction": entry.direction.name(),
        "pid": entry.pid,
        "fd": entry.fd,
        "comm": entry.comm,
        "cgroup": entry.cgroup.as_ref().map(ToString::to_string),
        "container": entry.container.as_ref().map(|c| c.name.clone()),
        "labels": entry.container.as_ref().map(|c| c.labels.clone()),
        "keepalive": options.map(|o| o.keepalive),
        "idle": options.map(|o| o.idle_secs),
        "interval": options.map(|o| o.interval_secs),
        "count": options.map(|o| o.count),
        "user_timeout": options.map(|o| o.user_timeout_ms),
        "unreadable": entry.options.as_ref().err(),
        "timer": timer(entry.timer),
        "rule": entry.verdict.rule,
        "mode": entry.verdict.mode.map(crate::policy::Mode::name),
        "action": entry.verdict.action,
        "changes": entry.verdict.changes,
    })
}

/// The summary object.
fn summary_json(report: &Report) -> Value {
    let (groups, total) = groups(report);
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|((cgroup, container), group)| {
            let mut value = group.json();
            value["cgroup"] = json!(cgroup);
            value["container"] = json!(container);
            value
        })
        .collect();
    let mut summary = total.json();
    summary["policy"] = json!(report.policy);
    summary["notes"] = json!(report.notes);
    summary["namespaces"] = json!(report.namespaces);
    summary["skipped_namespaces"] = json!(report.skipped);
    summary["hidden_processes"] = json!(report.hidden_processes);
    summary["groups"] = json!(groups);
    json!({ "summary": summary })
}

/// JSON lines: each connection, then the summary.
pub fn json_lines(report: &Report, out: &mut impl io::Write) -> io::Result<()> {
    for entry in &report.entries {
        serde_json::to_writer(&mut *out, &entry_json(entry))?;
        out.write_all(b"\n")?;
    }
    serde_json::to_writer(&mut *out, &summary_json(report))?;
    out.write_all(b"\n")
}

/// `on 60/5/3`, `on 60/5/3 ut 30000ms`, `off`, or `?`.
fn keepalive(entry: &Entry) -> String {
    match &entry.options {
        Ok(options) if options.keepalive => {
            let mut text = format!(
                "on {}/{}/{}",
                options.idle_secs, options.interval_secs, options.count
            );
            if options.user_timeout_ms != 0 {
                text.push_str(&format!(" ut {}ms", options.user_timeout_ms));
            }
            text
        }
        Ok(_) => "off".into(),
        Err(_) => "?".into(),
    }
}

/// The table: one line per connection, then the summary per cgroup.
pub fn table(report: &Report, out: &mut impl io::Write) -> io::Result<()> {
    writeln!(out, "policy: {}", report.policy)?;
    for note in &report.notes {
        writeln!(out, "note: {note}")?;
    }
    writeln!(
        out,
        "{:<10} {:<40} {:<40} {:>7} {:<15} {:<14} {:<20} {:<10} CGROUP",
        "NETNS", "LOCAL", "REMOTE", "PID", "COMM", "KEEPALIVE", "RULE", "ACTION"
    )?;
    for entry in &report.entries {
        writeln!(
            out,
            "{:<10} {:<40} {:<40} {:>7} {:<15} {:<14} {:<20} {:<10} {}",
            entry.netns,
            entry.local.to_string(),
            entry.remote.to_string(),
            entry.pid.map_or_else(|| "-".into(), |pid| pid.to_string()),
            entry.comm.as_deref().unwrap_or("-"),
            keepalive(entry),
            entry.verdict.rule.as_deref().unwrap_or("-"),
            entry.verdict.action,
            entry.container.as_ref().map_or_else(
                || group_key(entry).0,
                |container| format!("{} ({})", group_key(entry).0, container.name)
            ),
        )?;
    }
    let (groups, total) = groups(report);
    writeln!(
        out,
        "\n{:>11} {:>17} {:>12} {:>8} {:>8}  CGROUP",
        "CONNECTIONS", "WITHOUT-KEEPALIVE", "WOULD-CHANGE", "AUDITED", "UNKNOWN"
    )?;
    let row = |out: &mut dyn io::Write, group: &Group, name: &str| {
        writeln!(
            out,
            "{:>11} {:>17} {:>12} {:>8} {:>8}  {name}",
            group.connections,
            group.without_keepalive,
            group.would_change,
            group.audited,
            group.unknown
        )
    };
    for ((cgroup, container), group) in &groups {
        let name = match container {
            Some(container) => format!("{cgroup} ({container})"),
            None => cgroup.clone(),
        };
        row(out, group, &name)?;
    }
    row(out, &total, "(all)")?;
    writeln!(out, "network namespaces read: {}", report.namespaces)?;
    for skipped in &report.skipped {
        writeln!(out, "not read: {skipped}")?;
    }
    if report.hidden_processes > 0 {
        writeln!(
            out,
            "processes not looked at: {} (reading their namespaces and descriptors was refused: \
             run scan as root, with CAP_SYS_PTRACE)",
            report.hidden_processes
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        commands::scan::judge::{Options, Verdict},
        policy::{CgroupPath, Direction, Mode},
    };

    fn entry(keepalive: Option<bool>, action: &'static str, changes: Option<bool>) -> Entry {
        Entry {
            local: "127.0.0.1:40000".parse().unwrap_or_else(|e| panic!("{e}")),
            remote: "[::1]:5432".parse().unwrap_or_else(|e| panic!("{e}")),
            netns: 4026531840,
            direction: Direction::Outbound,
            pid: Some(42),
            fd: Some(7),
            comm: Some("psql".into()),
            cgroup: Some(CgroupPath::parse("/db").unwrap_or_else(|e| panic!("{e}"))),
            container: None,
            timer: TIMER_OFF,
            options: keepalive
                .map(|on| Options {
                    keepalive: on,
                    idle_secs: 60,
                    interval_secs: 5,
                    count: 3,
                    user_timeout_ms: 0,
                })
                .ok_or_else(|| "pidfd_getfd: EPERM".to_string()),
            verdict: Verdict {
                rule: Some("default".into()),
                mode: Some(Mode::Fill),
                action,
                changes,
            },
        }
    }

    #[test]
    fn json_lines_are_the_entries_then_the_summary() {
        let report = Report {
            entries: vec![
                entry(Some(true), "kept", Some(false)),
                entry(Some(false), "set", Some(true)),
                entry(None, "unknown", None),
            ],
            policy: "p.toml".into(),
            ..Report::default()
        };
        let mut out = Vec::new();
        json_lines(&report, &mut out).unwrap_or_else(|e| panic!("{e}"));
        let lines: Vec<Value> = String::from_utf8_lossy(&out)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        assert_eq!(lines.len(), 4);
        for key in [
            "local",
            "remote",
            "netns",
            "pid",
            "comm",
            "cgroup",
            "container",
            "labels",
            "keepalive",
            "idle",
            "interval",
            "count",
            "user_timeout",
            "rule",
            "action",
        ] {
            assert!(lines[0].get(key).is_some(), "no {key} in {}", lines[0]);
        }
        assert_eq!(lines[0]["remote"], "[::1]:5432");
        assert_eq!(lines[2]["keepalive"], Value::Null);
        let summary = &lines[3]["summary"];
        assert_eq!(
            (
                &summary["connections"],
                &summary["without_keepalive"],
                &summary["would_change"],
                &summary["unknown"]
            ),
            (&json!(3), &json!(1), &json!(1), &json!(1))
        );
        assert_eq!(summary["groups"][0]["cgroup"], "/db");
    }
}
