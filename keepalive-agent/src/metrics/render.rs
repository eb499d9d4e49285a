//! The exposition text, read fresh from the pinned maps at each scrape.

use std::{collections::BTreeMap, fmt::Write as _};

use keepalive_common::{Outcome, Stat};

use super::Shared;
use crate::{
    enforcer::{Outcomes, PinnedMaps},
    state::State,
};

/// Prometheus label values escape `\`, `"` and newlines.
fn label(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// `# HELP` and `# TYPE` of a family.
fn family(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}");
    let _ = writeln!(w, "# TYPE {name} {kind}");
}

/// The exposition text.
pub fn render(shared: &Shared, maps_dir: &std::path::Path) -> anyhow::Result<String> {
    let telemetry = {
        let telemetry = shared
            .lock()
            .map_err(|_| anyhow::anyhow!("telemetry lock poisoned"))?;
        Snapshot {
            state: telemetry.state.clone(),
            attached: telemetry.attached,
            programs: telemetry.programs.clone(),
            faults: telemetry.faults.len(),
            healed: telemetry.healed,
            overflows: telemetry.watch_overflows,
            last_reload_ok: telemetry.last_reload_ok,
        }
    };
    let mut out = String::new();
    let w = &mut out;
    family(
        w,
        "keepalive_build_info",
        "gauge",
        "The agent's version (always 1).",
    );
    let _ = writeln!(
        w,
        "keepalive_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    family(
        w,
        "keepalive_up",
        "gauge",
        "Whether the agent has a policy in force.",
    );
    let _ = writeln!(w, "keepalive_up {}", u8::from(telemetry.state.is_some()));
    let Some(state) = &telemetry.state else {
        return Ok(out);
    };
    kernel_features(w, state);
    let maps = PinnedMaps::open(maps_dir)?;
    rules(w, state, &maps)?;
    program_counters(w, &maps)?;
    agent(w, &telemetry, state);
    programs(w, &telemetry.programs);
    Ok(out)
}

/// What the endpoint copies out of the shared telemetry (the lock is not held while maps are
/// read).
struct Snapshot {
    state: Option<State>,
    attached: usize,
    programs: Vec<u32>,
    faults: usize,
    healed: u64,
    overflows: u64,
    last_reload_ok: bool,
}

/// Per rule: each counter slot once. Rules past the last slot share it; their counts are one
/// series with `rule="shared"`, not one copy per rule.
fn rules(w: &mut String, state: &State, maps: &PinnedMaps) -> anyhow::Result<()> {
    let named: Vec<(String, Outcomes)> = series(state)
        .into_iter()
        .map(|(slot, name)| Ok((name, maps.outcomes(slot)?)))
        .collect::<anyhow::Result<_>>()?;
    family(
        w,
        "keepalive_connections_total",
        "counter",
        "Connections decided, by rule and outcome (rules past the counted limit share rule=\"shared\").",
    );
    for (name, outcomes) in &named {
        for outcome in Outcome::ALL
            .into_iter()
            .filter(|outcome| *outcome != Outcome::Overridden)
        {
            let _ = writeln!(
                w,
                "keepalive_connections_total{{rule=\"{name}\",outcome=\"{}\"}} {}",
                outcome.name(),
                outcomes.get(outcome)
            );
        }
    }
    family(
        w,
        "keepalive_app_setsockopt_overridden_total",
        "counter",
        "Application setsockopt calls the lock overrode (audit: would have), by rule.",
    );
    for (name, outcomes) in &named {
        let _ = writeln!(
            w,
            "keepalive_app_setsockopt_overridden_total{{rule=\"{name}\"}} {}",
            outcomes.get(Outcome::Overridden)
        );
    }
    Ok(())
}

/// The `rule` label of each counter slot: the rule's name, or `shared` for the slot rules
/// past the counted limit share.
fn series(state: &State) -> BTreeMap<u32, String> {
    let mut slots: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for rule in &state.rules {
        slots.entry(rule.slot).or_default().push(&rule.name);
    }
    slots
        .into_iter()
        .map(|(slot, names)| {
            let name = match names.as_slice() {
                [one] => label(one),
                _ => "shared".to_string(),
            };
            (slot, name)
        })
        .collect()
}

fn program_counters(w: &mut String, maps: &PinnedMaps) -> anyhow::Result<()> {
    let counters = maps.counters()?;
    family(
        w,
        "keepalive_setsockopt_errors_total",
        "counter",
        "Failed bpf_setsockopt or bpf_getsockopt calls, by option.",
    );
    for stat in Stat::ALL
        .into_iter()
        .filter(|stat| stat.name().starts_with("err_"))
    {
        let option = stat.name().trim_start_matches("err_");
        let _ = writeln!(
            w,
            "keepalive_setsockopt_errors_total{{option=\"{option}\"}} {}",
            counters.get(stat)
        );
    }
    family(
        w,
        "keepalive_program_events_total",
        "counter",
        "Program events: callbacks left to a more specific cgroup, sockets of unconfigured attachments, application setsockopt calls seen.",
    );
    for stat in [Stat::Deferred, Stat::Unconfigured, Stat::AppSetsockopt] {
        let _ = writeln!(
            w,
            "keepalive_program_events_total{{event=\"{}\"}} {}",
            stat.name(),
            counters.get(stat)
        );
    }
    Ok(())
}

/// `keepalive_kernel_feature{feature}`: 0 for an optional part this kernel lacks.
fn kernel_features(w: &mut String, state: &State) {
    family(
        w,
        "keepalive_kernel_feature",
        "gauge",
        "Whether an optional part of the agent works on this kernel (0: it lacks it; \
         `keepalive-agent status` says what follows).",
    );
    for feature in crate::enforcer::features::OPTIONAL {
        let missing = crate::enforcer::features::lacks(&state.missing_features, feature);
        let _ = writeln!(
            w,
            "keepalive_kernel_feature{{feature=\"{feature}\"}} {}",
            u8::from(!missing)
        );
    }
}

fn agent(w: &mut String, telemetry: &Snapshot, state: &State) {
    family(
        w,
        "keepalive_reloads_total",
        "counter",
        "Policy reloads, by result.",
    );
    let _ = writeln!(
        w,
        "keepalive_reloads_total{{result=\"success\"}} {}",
        state.reloads_succeeded
    );
    let _ = writeln!(
        w,
        "keepalive_reloads_total{{result=\"failure\"}} {}",
        state.reloads_failed
    );
    let gauges: [(&str, &str, String); 6] = [
        (
            "keepalive_last_reload_success",
            "Whether the last reload applied (1) or was refused (0); 1 before any.",
            u8::from(telemetry.last_reload_ok).to_string(),
        ),
        (
            "keepalive_last_reload_success_timestamp_seconds",
            "When the policy in force was applied (seconds since the epoch).",
            state.applied_at.to_string(),
        ),
        (
            "keepalive_policy_generation",
            "Generation of the policy in force.",
            state.generation.to_string(),
        ),
        (
            "keepalive_policy_rules",
            "Rules of the policy in force.",
            state.rules.len().saturating_sub(1).to_string(),
        ),
        (
            "keepalive_attached_cgroups",
            "Cgroups the sock_ops program is attached to.",
            telemetry.attached.to_string(),
        ),
        (
            "keepalive_enforcement_missing",
            "Attachments the agent believes in that the kernel lacks (not ready while above 0).",
            telemetry.faults.to_string(),
        ),
    ];
    for (name, help, value) in gauges {
        family(w, name, "gauge", help);
        let _ = writeln!(w, "{name} {value}");
    }
    family(
        w,
        "keepalive_reattached_total",
        "counter",
        "Attachments removed by someone else (link detached, pin removed, program replaced) and put back.",
    );
    let _ = writeln!(w, "keepalive_reattached_total {}", telemetry.healed);
    family(
        w,
        "keepalive_cgroup_watch_overflows_total",
        "counter",
        "Times the cgroup watch lost events (inotify queue overflow) and the tree was scanned again.",
    );
    let _ = writeln!(
        w,
        "keepalive_cgroup_watch_overflows_total {}",
        telemetry.overflows
    );
}

/// The kernel's accounting of the agent's programs, by program name (the id changes with
/// every start, so it is no label).
fn programs(w: &mut String, ids: &[u32]) {
    let ours: Vec<(String, u64, f64)> = aya::programs::loaded_programs()
        .flatten()
        .filter(|program| ids.contains(&program.id()))
        .filter_map(|program| {
            let name = program.name_as_str()?.to_string();
            Some((name, program.run_count(), program.run_time().as_secs_f64()))
        })
        .collect();
    family(
        w,
        "keepalive_program_runs_total",
        "counter",
        "Runs of the agent's programs (kernel accounting; needs --program-stats).",
    );
    for (name, runs, _) in &ours {
        let _ = writeln!(
            w,
            "keepalive_program_runs_total{{program=\"{name}\"}} {runs}"
        );
    }
    family(
        w,
        "keepalive_program_run_seconds_total",
        "counter",
        "Time in the agent's programs (kernel accounting; needs --program-stats).",
    );
    for (name, _, seconds) in &ours {
        let _ = writeln!(
            w,
            "keepalive_program_run_seconds_total{{program=\"{name}\"}} {seconds}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, Policy, Rule, Values};

    #[test]
    fn rules_sharing_the_last_slot_are_one_series() {
        let limit = keepalive_common::limits::COUNTED_SLOTS as usize;
        let mut policy = Policy::enforce(Values::default(), vec![crate::CgroupPath::root()]);
        policy.rules = (0..limit + 5)
            .map(|i| Rule {
                name: format!("r{i}"),
                line: 0,
                cgroup: None,
                remote: Vec::new(),
                remote_ports: Vec::new(),
                local_ports: Vec::new(),
                direction: None,
                containers: None,
                action: Action::enforce(Values::default()),
            })
            .collect();
        let series = series(&State::new(&policy, "test", 1));
        assert_eq!(series.len(), limit, "one series per slot");
        assert_eq!(series.get(&0).map(String::as_str), Some("default"));
        assert_eq!(series.get(&1).map(String::as_str), Some("r0"));
        let last = u32::try_from(limit - 1).unwrap_or(0);
        assert_eq!(series.get(&last).map(String::as_str), Some("shared"));
    }
}
