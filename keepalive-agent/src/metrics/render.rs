//! The exposition text (Prometheus text format 0.0.4, through prometheus-client), rendered
//! from a [`Snapshot`] the endpoint takes at each scrape.
//!
//! Counters are named without `_total` here: the encoder appends it, to the samples and to
//! their `# HELP`/`# TYPE` lines. A new metric is a field of the snapshot and one call below.

use std::{collections::BTreeMap, fmt};

use keepalive_common::{Outcome, Stat, ends::End};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::Shared;
use crate::{
    ends::summary::IDLE_BUCKETS,
    status::{PolicyInForce, RuleCounters, Snapshot},
};

/// The label set of exemplars, which the histograms have none of.
type NoLabels = [(&'static str, &'static str); 0];

/// The `Content-Type` of the exposition text.
pub(super) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The exposition text, from the agent's telemetry and the pinned maps.
pub fn render(shared: &Shared, maps_dir: &std::path::Path) -> anyhow::Result<String> {
    // The lock is not held while the maps are read.
    let telemetry = shared
        .lock()
        .map_err(|_| anyhow::anyhow!("telemetry lock poisoned"))?
        .clone();
    exposition(Snapshot::from_agent(&telemetry, maps_dir)?)
}

/// The exposition text of a snapshot.
fn exposition(snapshot: Snapshot) -> anyhow::Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition(snapshot)));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The snapshot as metric families, in a fixed order.
#[derive(Debug)]
struct Exposition(Snapshot);

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let snapshot = &self.0;
        let w = &mut encoder;
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        gauges(
            w,
            "keepalive_build_info",
            "The agent's version (always 1).",
            [(version, 1)],
        )?;
        gauge(
            w,
            "keepalive_up",
            "Whether the agent has a policy in force.",
            u64::from(snapshot.policy.is_some()),
        )?;
        let Some(policy) = &snapshot.policy else {
            return Ok(());
        };
        kernel_features(w, snapshot)?;
        rules(w, &snapshot.rules)?;
        failures(w, snapshot)?;
        program_counters(w, snapshot)?;
        agent(w, snapshot, policy)?;
        without_keepalive(w, snapshot)
    }
}

/// The policy's history and the agent's own figures.
fn agent(
    w: &mut DescriptorEncoder<'_>,
    snapshot: &Snapshot,
    policy: &PolicyInForce,
) -> fmt::Result {
    counters(
        w,
        "keepalive_reloads",
        "Policy reloads, by result.",
        [
            ([("result", "success")], policy.reloads_succeeded),
            ([("result", "failure")], policy.reloads_failed),
        ],
    )?;
    let agent = snapshot.agent.clone().unwrap_or_default();
    gauge(
        w,
        "keepalive_last_reload_success",
        "Whether the last reload applied (1) or was refused (0); 1 before any.",
        u64::from(agent.last_reload_ok),
    )?;
    gauge(
        w,
        "keepalive_last_reload_success_timestamp_seconds",
        "When the policy in force was applied (seconds since the epoch).",
        policy.applied_at,
    )?;
    gauge(
        w,
        "keepalive_policy_generation",
        "Generation of the policy in force.",
        u64::from(policy.generation),
    )?;
    gauge(
        w,
        "keepalive_policy_rules",
        "Rules of the policy in force.",
        count(snapshot.rules.len().saturating_sub(1)),
    )?;
    gauge(
        w,
        "keepalive_attached_cgroups",
        "Cgroups the sock_ops program is attached to.",
        count(agent.attached_cgroups),
    )?;
    gauge(
        w,
        "keepalive_enforcement_missing",
        "Attachments the agent believes in that the kernel lacks (not ready while above 0).",
        count(snapshot.faults.len()),
    )?;
    counter(
        w,
        "keepalive_reattached",
        "Attachments removed by someone else (link detached, pin removed, program replaced) and put back.",
        agent.healed,
    )?;
    counter(
        w,
        "keepalive_cgroup_watch_overflows",
        "Times the cgroup watch lost events (inotify queue overflow) and the tree was scanned again.",
        agent.watch_overflows,
    )?;
    counter(
        w,
        "keepalive_annotations_refused",
        "Pods whose keepalive annotations the policy refused (malformed, not allowed or out of bounds): they keep what the policy gives them.",
        agent.annotations_refused,
    )?;
    // By program name: the id changes with every start, so it is no label.
    let program = |program: &crate::status::ProgramRuns| [("program", program.name.clone())];
    counters(
        w,
        "keepalive_program_runs",
        "Runs of the agent's programs (kernel accounting; needs --program-stats).",
        agent.programs.iter().map(|p| (program(p), p.runs)),
    )?;
    counters(
        w,
        "keepalive_program_run_seconds",
        "Time in the agent's programs (kernel accounting; needs --program-stats).",
        agent.programs.iter().map(|p| (program(p), p.seconds)),
    )
}

/// The last count of [`crate::without_keepalive`], per enforced scope.
fn without_keepalive(w: &mut DescriptorEncoder<'_>, snapshot: &Snapshot) -> fmt::Result {
    let Some(counts) = snapshot
        .agent
        .as_ref()
        .and_then(|agent| agent.without_keepalive.as_ref())
    else {
        return Ok(());
    };
    let scope = |scope: &String| [("scope", scope.clone())];
    gauges(
        w,
        "keepalive_connections_without_keepalive",
        "Established connections with no keepalive timer (and no data in flight), by enforced scope; counted every --missing-interval.",
        counts
            .iter()
            .map(|(name, count)| (scope(name), count.without_keepalive)),
    )?;
    gauges(
        w,
        "keepalive_connections_established",
        "Established connections by enforced scope, at the last count of those without keepalive.",
        counts
            .iter()
            .map(|(name, count)| (scope(name), count.established)),
    )
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// `keepalive_kernel_feature{feature}`: 0 for an optional part this kernel lacks.
fn kernel_features(w: &mut DescriptorEncoder<'_>, snapshot: &Snapshot) -> fmt::Result {
    let features = crate::enforcer::features::OPTIONAL.iter().map(|&feature| {
        let missing = crate::enforcer::features::lacks(&snapshot.missing_features, feature);
        ([("feature", feature)], u64::from(!missing))
    });
    gauges(
        w,
        "keepalive_kernel_feature",
        "Whether an optional part of the agent works on this kernel (0: it lacks it; \
         `keepalive-agent status` says what follows).",
        features,
    )
}

/// Per rule: each counter slot once. Rules past the last slot share it; their counts are one
/// series with `rule="shared"`, not one copy per rule.
fn rules(w: &mut DescriptorEncoder<'_>, rules: &[RuleCounters]) -> fmt::Result {
    let named = series(rules);
    let decided = named.iter().flat_map(|(name, rule)| {
        Outcome::ALL
            .into_iter()
            .filter(|outcome| *outcome != Outcome::Overridden)
            .map(move |outcome| {
                (
                    [("rule", name.as_str()), ("outcome", outcome.name())],
                    rule.counters.get(outcome),
                )
            })
    });
    counters(
        w,
        "keepalive_connections",
        "Connections decided, by rule and outcome (rules past the counted limit share rule=\"shared\").",
        decided,
    )?;
    counters(
        w,
        "keepalive_connections_closed",
        "Connections that ended, by rule and how: closed (FIN or the process's own abort), reset (by the peer or a middlebox), keepalive (a dead peer found), timeout (retransmissions or TCP_USER_TIMEOUT ran out). Counts the connections of rules with ends = true.",
        named.iter().flat_map(|(name, rule)| {
            End::ALL.into_iter().map(move |end| {
                (
                    [("rule", name.as_str()), ("outcome", end.name())],
                    rule.ends.get(end),
                )
            })
        }),
    )?;
    counters(
        w,
        "keepalive_app_setsockopt_overridden",
        "Application setsockopt calls the lock overrode (audit: would have), by rule.",
        named.iter().map(|(name, rule)| {
            (
                [("rule", name.as_str())],
                rule.counters.get(Outcome::Overridden),
            )
        }),
    )
}

/// The `rule` label of each counter slot, in slot order: the rule's name, or `shared` for the
/// slot rules past the counted limit share.
fn series(rules: &[RuleCounters]) -> Vec<(String, &RuleCounters)> {
    let mut slots: BTreeMap<u32, Vec<&RuleCounters>> = BTreeMap::new();
    for rule in rules {
        slots.entry(rule.slot).or_default().push(rule);
    }
    slots
        .into_values()
        .filter_map(|sharing| match sharing.as_slice() {
            [one] => Some((one.name.clone(), *one)),
            [first, ..] => Some(("shared".to_string(), *first)),
            [] => None,
        })
        .collect()
}

/// The failures' silences, per rule: a histogram of seconds.
fn failures(w: &mut DescriptorEncoder<'_>, snapshot: &Snapshot) -> fmt::Result {
    let mut family = w.encode_descriptor(
        "keepalive_failure_idle_seconds",
        "How long connections had been silent (nothing received) before they failed: before the reset, the first unanswered segment, or keepalive's verdict; by rule.",
        None,
        MetricType::Histogram,
    )?;
    let Some(agent) = &snapshot.agent else {
        return Ok(());
    };
    for (name, rule) in series(&snapshot.rules) {
        let Some(histogram) = agent.failures.idle.get(&rule.slot) else {
            continue;
        };
        // The encoder adds the +Inf bucket (the count).
        let buckets: Vec<(f64, u64)> = IDLE_BUCKETS
            .iter()
            .copied()
            .zip(histogram.counts.iter().copied())
            .collect();
        family
            .encode_family(&[("rule", name.as_str())])?
            .encode_histogram::<NoLabels>(histogram.sum, histogram.count, &buckets, None)?;
    }
    Ok(())
}

fn program_counters(w: &mut DescriptorEncoder<'_>, snapshot: &Snapshot) -> fmt::Result {
    let counters_of = snapshot.counters.unwrap_or_default();
    counters(
        w,
        "keepalive_setsockopt_errors",
        "Failed bpf_setsockopt or bpf_getsockopt calls, by option; option=\"getsockopt\" also counts failures to allocate socket storage.",
        Stat::ALL.into_iter().filter_map(|stat| {
            let option = stat.name().strip_prefix("err_")?;
            Some(([("option", option)], counters_of.get(stat)))
        }),
    )?;
    counters(
        w,
        "keepalive_program_events",
        "Program events: callbacks left to a more specific cgroup, sockets of unconfigured attachments, application setsockopt calls seen.",
        [Stat::Deferred, Stat::Unconfigured, Stat::AppSetsockopt]
            .into_iter()
            .map(|stat| ([("event", stat.name())], counters_of.get(stat))),
    )
}

/// A counter family (`name` without `_total`, which the encoder appends) with one sample per
/// label set.
fn counters<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeCounterValue>(
    w: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = w.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter without labels.
fn counter(w: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let family = w.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(family)
}

/// A gauge family with one sample per label set.
fn gauges<L: EncodeLabelSet>(
    w: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = w.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge without labels.
fn gauge(w: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let family = w.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(family)
}

#[cfg(test)]
mod tests;
