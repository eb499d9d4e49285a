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
    let holder = crate::instance::holder(&pins.root);
    let running = holder.is_some()
        || state
            .as_ref()
            .is_some_and(|state| crate::state::alive(state.pid));
    let links = pins.pinned_links();
    if links.is_empty() {
        let records = PinnedMaps::open(&pins.maps())
            .and_then(|maps| maps.records())
            .map_or(0, |records| records.len());
        let missing: Vec<String> = state
            .as_ref()
            .filter(|_| running)
            .map(|state| state.faults.clone())
            .unwrap_or_default();
        return Ok(json!({
            "pins": pins.root,
            "attached": [],
            "records": records,
            "agent_running": running,
            "missing": missing,
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
    let missing = missing(&links, &by_id, cgroup2_mount, state.as_ref(), running);
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
            .map(|rule| rule_json(rule, &maps))
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    Ok(json!({
        "pins": pins.root,
        "agent_running": running,
        "agent_pid": holder.or(state.as_ref().map(|state| state.pid)),
        "missing": missing,
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

/// A rule with its counters.
fn rule_json(rule: &crate::state::RuleState, maps: &PinnedMaps) -> anyhow::Result<Value> {
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
        "containers": rule.containers,
        "counters": counts,
    }))
}

/// Where enforcement is missing: pinned links the kernel no longer has attached (checked
/// here), and what the running agent found missing and has not put back yet.
fn missing(
    links: &[(String, u64, std::path::PathBuf)],
    by_id: &std::collections::HashMap<u64, std::path::PathBuf>,
    mount: &Path,
    state: Option<&State>,
    running: bool,
) -> Vec<String> {
    let mut missing: Vec<String> = links
        .iter()
        .filter_map(|(kind, id, pin)| {
            let attached = crate::bpffs::open_pinned(pin)
                .and_then(|link| crate::bpffs::cgroup_link_info(std::os::fd::AsFd::as_fd(&link)))
                .is_ok_and(|info| info.cgroup_id == *id);
            if attached {
                return None;
            }
            let cgroup = by_id.get(id).map_or_else(
                || format!("cgroup id {id}"),
                |path| format!("/{}", path.strip_prefix(mount).unwrap_or(path).display()),
            );
            Some(format!("{kind} at {cgroup}: link detached"))
        })
        .collect();
    if running && let Some(state) = state {
        missing.extend(state.faults.iter().cloned());
    }
    missing.sort();
    missing.dedup();
    missing
}

/// The status as a table for people.
pub fn table(status: &Value) -> String {
    let mut out = String::new();
    let attached = status["attached"].as_array().cloned().unwrap_or_default();
    let missing: Vec<&str> = status["missing"]
        .as_array()
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !missing.is_empty() {
        let _ = writeln!(out, "enforcement missing: {}", missing.join("; "));
    }
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
    rules_table(&mut out, status);
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

/// The rules and their counters, one line each.
fn rules_table(out: &mut String, status: &Value) {
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
    for rule in status["rules"].as_array().into_iter().flatten() {
        if let Some(containers) = rule["containers"].as_str() {
            let _ = writeln!(
                out,
                "rule {:?} selects containers: {containers}",
                rule["name"].as_str().unwrap_or("?")
            );
        }
    }
}
