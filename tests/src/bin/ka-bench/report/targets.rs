//! The targets the figures are held to (issue 12), each a ratio within this run, checked here
//! and marked pass or fail in the report, not in timed tests.

use crate::{
    results::Results,
    samples::{Row, Samples, paired_ratio},
    steady::SteadyRow,
};

/// One target and what this run measured.
#[derive(Debug)]
pub(crate) struct Target {
    pub(super) what: String,
    /// `≤ 1.15`, `≥ 0.98`, ...
    pub(super) bound: String,
    /// Per round ratios.
    pub(super) ratio: Samples,
    pub(super) pass: bool,
}

fn at_most(what: impl Into<String>, ratio: Samples, limit: f64) -> Target {
    let pass = ratio.median() <= limit;
    Target {
        what: what.into(),
        bound: format!("≤ {limit:.2}"),
        ratio,
        pass,
    }
}

fn at_least(what: impl Into<String>, ratio: Samples, limit: f64) -> Target {
    let pass = ratio.median() >= limit;
    Target {
        what: what.into(),
        bound: format!("≥ {limit:.2}"),
        ratio,
        pass,
    }
}

pub(super) fn targets(results: &Results) -> Vec<Target> {
    let loopback = |base| paired_ratio(&results.loopback, "agent", base);
    let mut targets = program_targets(&results.program_ns);
    targets.extend([
        at_least(
            "loopback connection rate, agent / no program",
            loopback("none"),
            0.98,
        ),
        at_least(
            "loopback connection rate, agent / libkeepalive",
            loopback("libkeepalive"),
            1.0,
        ),
        at_least(
            "loopback connection rate, agent / application setting the options",
            loopback("app-sets"),
            1.0,
        ),
    ]);
    // The worst step: a new cgroup covered whatever the host holds.
    if let Some(worst) = results
        .existing
        .iter()
        .map(|row| row.coverage_ms.median())
        .max_by(f64::total_cmp)
    {
        targets.push(at_most(
            "new cgroup covered (ms) / 20 ms, with the most connections elsewhere",
            Samples(vec![worst / 20.0]),
            1.0,
        ));
    }
    // The largest step the in-kernel path swept.
    if let Some(rate) = results
        .existing
        .iter()
        .rev()
        .find_map(|row| row.sweep_rate("iterator").filter(|_| row.connections > 0))
    {
        targets.push(at_least(
            "start-up sweep on the in-kernel path, connections/s / 100,000",
            Samples(vec![rate / 100_000.0]),
            1.0,
        ));
    }
    targets.extend(steady_targets(&results.steady));
    targets
}

/// The per-connection program time's targets.
pub(crate) fn program_targets(program_ns: &[Row]) -> Vec<Target> {
    vec![at_most(
        "agent's program time / the policy-free floor program's",
        paired_ratio(program_ns, "agent", "floor"),
        1.10,
    )]
}

/// Issue 25's budget for an agent with nothing to do, by followed cgroups: CPU (% of a core)
/// and RSS (MiB), whatever the connections.
const STEADY_BUDGET: [(usize, f64, f64); 2] = [(1000, 0.2, 32.0), (10_000, 0.5, 64.0)];

pub(crate) fn steady_targets(rows: &[SteadyRow]) -> Vec<Target> {
    let mut targets = Vec::new();
    for row in rows {
        let Some(&(_, cpu, mib)) = STEADY_BUDGET.iter().find(|(n, _, _)| *n == row.cgroups) else {
            continue;
        };
        let at = |what: &str| {
            format!(
                "{what}, {} cgroups, {} connections",
                row.cgroups, row.connections
            )
        };
        targets.push(at_most(
            at(&format!("idle CPU (% of a core) / {cpu}")),
            Samples(vec![row.cpu_percent / cpu]),
            1.0,
        ));
        targets.push(at_most(
            at(&format!("RSS (MiB) / {mib}")),
            Samples(vec![row.rss_kib / 1024.0 / mib]),
            1.0,
        ));
        if row.cgroups == 10_000 {
            targets.push(at_most(
                at("start-up to all attached (ms) / 5,000"),
                Samples(vec![row.startup_ms / 5000.0]),
                1.0,
            ));
            targets.push(at_most(
                at("new cgroup covered (ms) / 20"),
                Samples(vec![row.coverage_ms / 20.0]),
                1.0,
            ));
        }
    }
    targets
}
