//! `keepalive-agent status`: what is attached where, the policy in force and its source, and
//! the counters per rule, read from the pins and the state file (a table, or `--json`).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use keepalive_common::{Outcome, Stat};
use serde_json::{Value, json};

use crate::{bpffs::PinDir, cli::StatusArgs, enforcer::PinnedMaps, state::State};

/// The status as JSON (the table is rendered from it).
pub fn collect(args: &StatusArgs, cgroup2_mount: &Path) -> anyhow::Result<Value> {
    let pins = PinDir::at(&args.places.bpffs);
    let state = State::read(&args.places.state_dir);
    let running = state
        .as_ref()
        .is_some_and(|state| crate::state::alive(state.pid));
    let links = pins.pinned_links();
    if links.is_empty() {
        let records = PinnedMaps::open(&pins.maps())
            .and_then(|maps| maps.records())
            .map_or(0, |records| records.len());
        return Ok(json!({
            "pins": pins.root,
            "attached": [],
            "records": records,
            "agent_running": running,
        }));
    }
    let by_id = crate::cgroup::by_id(cgroup2_mount);
    let mut attached: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (kind, id, _) in &links {
        attached.entry(*id).or_default().push(kind.clone());
    }
    let attached: Vec<Value> = attached
        .into_iter()
        .map(|(id, programs)| {
            let path = by_id.get(&id).map(|path| {
                format!(
                    "/{}",
                    path.strip_prefix(cgroup2_mount).unwrap_or(path).display()
                )
            });
            json!({"cgroup": path, "id": id, "programs": programs})
        })
        .collect();
    let maps = PinnedMaps::open(&pins.maps())?;
    let counters = maps.counters()?;
    let global: serde_json::Map<String, Value> = Stat::ALL
        .iter()
        .map(|stat| (stat.name().to_string(), json!(counters.get(*stat))))
        .collect();
    let rules: Vec<Value> = match &state {
        Some(state) => state
            .rules
            .iter()
            .map(|rule| {
                let outcomes = maps.outcomes(rule.slot)?;
                let mut counts: serde_json::Map<String, Value> = Outcome::ALL
                    .iter()
                    .map(|outcome| (outcome.name().to_string(), json!(outcomes.get(*outcome))))
                    .collect();
                counts.insert("seen".into(), json!(outcomes.seen()));
                Ok(json!({
                    "slot": rule.slot,
                    "name": rule.name,
                    "line": rule.line,
                    "action": rule.action,
                    "counters": counts,
                }))
            })
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    Ok(json!({
        "pins": pins.root,
        "agent_running": running,
        "agent_pid": state.as_ref().map(|state| state.pid),
        "policy": state.as_ref().map(|state| json!({
            "source": state.source,
            "generation": state.generation,
            "applied_at": state.applied_at,
            "scopes": state.scopes,
            "reloads_succeeded": state.reloads_succeeded,
            "reloads_failed": state.reloads_failed,
        })),
        "missing_features": state.as_ref().map(|state| state.missing_features.clone()).unwrap_or_default(),
        "attached": attached,
        "records": maps.records()?.len(),
        "counters": global,
        "rules": rules,
    }))
}

/// The status as a table for people.
pub fn table(status: &Value) -> String {
    let mut out = String::new();
    let attached = status["attached"].as_array().cloned().unwrap_or_default();
    if attached.is_empty() {
        let _ = writeln!(
            out,
            "nothing attached (no pinned links under {})",
            status["pins"].as_str().unwrap_or("?")
        );
        return out;
    }
    let agent = match (
        status["agent_running"].as_bool(),
        status["agent_pid"].as_u64(),
    ) {
        (Some(true), Some(pid)) => format!("agent pid {pid} running"),
        (_, Some(pid)) => {
            format!("agent pid {pid} not running; enforcement continues from the pins")
        }
        _ => "no agent state".into(),
    };
    let _ = writeln!(
        out,
        "pins: {}; {agent}",
        status["pins"].as_str().unwrap_or("?")
    );
    if let Some(policy) = status["policy"].as_object() {
        let _ = writeln!(
            out,
            "policy: {} (generation {}, enforced in {}; reloads: {} ok, {} refused)",
            policy["source"].as_str().unwrap_or("?"),
            policy["generation"],
            policy["scopes"]
                .as_array()
                .map(|scopes| scopes
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            policy["reloads_succeeded"],
            policy["reloads_failed"],
        );
    }
    for missing in status["missing_features"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "kernel: no {} (needs Linux {}; {}): {}",
            missing["feature"].as_str().unwrap_or("?"),
            missing["since"].as_str().unwrap_or("?"),
            missing["reason"].as_str().unwrap_or("?"),
            missing["effect"].as_str().unwrap_or("?"),
        );
    }
    let _ = writeln!(out, "\n{:<48} {:>10}  PROGRAMS", "CGROUP", "ID");
    for entry in &attached {
        let programs: Vec<&str> = entry["programs"]
            .as_array()
            .map(|list| list.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<48} {:>10}  {}",
            entry["cgroup"].as_str().unwrap_or("(removed)"),
            entry["id"].to_string(),
            programs.join(", ")
        );
    }
    let columns = [
        "seen",
        "set",
        "kept",
        "capped",
        "compliant",
        "exempted",
        "audited",
        "failed",
        "overridden",
    ];
    let _ = write!(out, "\n{:<4} {:<28}", "SLOT", "RULE");
    for column in columns {
        let _ = write!(out, " {:>10}", column.to_uppercase());
    }
    out.push('\n');
    for rule in status["rules"].as_array().cloned().unwrap_or_default() {
        let _ = write!(
            out,
            "{:<4} {:<28}",
            rule["slot"].to_string(),
            rule["name"].as_str().unwrap_or("?")
        );
        for column in columns {
            let _ = write!(out, " {:>10}", rule["counters"][column].to_string());
        }
        out.push('\n');
    }
    let counters: Vec<String> = status["counters"]
        .as_object()
        .map(|counters| {
            counters
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(out, "\n{}", counters.join(" "));
    out
}
