//! Existing connections at scale, by both paths: the iterator program in the kernel (where it
//! loads) and descriptors (the agent reads each namespace's socket list and updates each
//! socket through pidfd_getfd). Established connections, spread over many processes, sit in one
//! cgroup the agent follows: how fast the start-up sweep goes by each path, then how soon a new
//! matching cgroup is covered with them elsewhere.

use std::time::{Duration, Instant};

use keepalive_tests::{AgentPlaces, Netns, Placement, TestCgroup, Workload};

use crate::{Bench, samples::Samples};

/// One number of established connections.
#[derive(Debug, Clone)]
pub(crate) struct ExistingRow {
    pub(crate) connections: usize,
    pub(crate) processes: usize,
    /// The start-up sweep by each path this kernel offers, the iterator first.
    pub(crate) sweeps: Vec<PathSweep>,
    /// From mkdir of a new matching cgroup to its `attached` line (ms).
    pub(crate) coverage_ms: Samples,
}

/// One start-up sweep.
#[derive(Debug, Clone)]
pub(crate) struct PathSweep {
    /// `iterator` or `descriptors` (`run --existing-via`).
    pub(crate) via: &'static str,
    /// Sockets the sweep went through (both ends of each connection).
    pub(crate) swept_sockets: u64,
    /// From the agent's `policy applied` line to its `existing connections` line (s).
    pub(crate) sweep_s: f64,
}

impl ExistingRow {
    /// Connections per second of the start-up sweep by `via`.
    pub(crate) fn sweep_rate(&self, via: &str) -> Option<f64> {
        let sweep = self.sweeps.iter().find(|sweep| sweep.via == via)?;
        Some(self.connections as f64 / sweep.sweep_s)
    }
}

const LONG: Duration = Duration::from_secs(300);

pub(crate) fn existing_scale(bench: &Bench) -> Vec<ExistingRow> {
    raise_nofile();
    bench
        .settings
        .existing_steps
        .iter()
        .map(|&(connections, processes)| step(bench, connections, processes))
        .collect()
}

fn step(bench: &Bench, connections: usize, processes: usize) -> ExistingRow {
    bench.progress.step(&format!(
        "existing connections: {connections} across {processes} processes"
    ));
    let root = TestCgroup::new();
    let busy = root.child("c-busy");
    let netns = Netns::new();
    netns.set_sysctl("net/ipv4/ip_local_port_range", "1024 65000");
    let holders = hold(bench, &busy, &netns, connections, processes);
    let pattern = format!("{}/c-*", root.scope());
    let mut sweeps = Vec::new();
    for via in paths() {
        bench
            .progress
            .step(&format!("existing connections: start-up sweep via {via}"));
        let (agent, sweep) = start_and_sweep(bench, &pattern, via);
        drop(agent);
        sweeps.push(sweep);
    }
    // The default path (the iterator where it loads) while new cgroups come.
    let ((agent, places), _sweep) = start_and_sweep(bench, &pattern, "auto");
    let sweep_s = sweeps.first().map_or(1.0, |sweep| sweep.sweep_s);
    let mut coverage_ms = Samples::default();
    let mut extra = Vec::new();
    // Each new cgroup sets off a sweep of every connection followed: a few samples only.
    for k in 0..bench.settings.starts.min(3) {
        let start = Instant::now();
        extra.push(root.child(&format!("c-new-{k}")));
        agent.expect_log("attached", LONG);
        coverage_ms.0.push(start.elapsed().as_secs_f64() * 1e3);
        // The sweep the new cgroup set off finishes before the next one.
        let wait = Duration::from_secs(10).max(Duration::from_secs_f64(3.0 * sweep_s));
        let _swept = logged_within(&agent, "existing connections", wait);
    }
    drop(agent);
    drop(places);
    drop(holders);
    drop(extra);
    ExistingRow {
        connections,
        processes,
        sweeps,
        coverage_ms,
    }
}

/// The paths this kernel offers, the iterator first.
fn paths() -> Vec<&'static str> {
    if keepalive_tests::kernel_offers_iterator() {
        vec!["iterator", "descriptors"]
    } else {
        vec!["descriptors"]
    }
}

/// An agent following `pattern` with `run --existing-via via`, after its start-up sweep, and
/// its places (dropped after it).
fn start_and_sweep(
    bench: &Bench,
    pattern: &str,
    via: &'static str,
) -> ((Workload, AgentPlaces), PathSweep) {
    let places = AgentPlaces::new();
    let agent = places.spawn(
        &bench.agent,
        &["run", "--cgroup", pattern, "--existing-via", via],
    );
    agent.expect_log("policy applied", LONG);
    let applied = Instant::now();
    let line = agent.expect_log("existing connections", LONG);
    let sweep_s = applied.elapsed().as_secs_f64();
    let swept_sockets = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("connections="))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"));
    assert!(
        via == "auto" || line.contains(via),
        "asked for {via}, swept otherwise: {line}"
    );
    (
        (agent, places),
        PathSweep {
            via,
            swept_sockets,
            sweep_s,
        },
    )
}

/// The next log line containing `text`, if one comes within `timeout`.
pub(crate) fn logged_within(agent: &Workload, text: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let line = agent.try_line_within(left)?;
        if line.contains(text) {
            return Some(line);
        }
    }
}

/// `connections` established connections (both ends in the same process) over `processes`
/// `ka-probe hold` processes in `cgroup`.
pub(crate) fn hold(
    bench: &Bench,
    cgroup: &TestCgroup,
    netns: &Netns,
    connections: usize,
    processes: usize,
) -> Vec<Workload> {
    if connections == 0 {
        return Vec::new();
    }
    let each = connections.div_ceil(processes).to_string();
    let holders: Vec<Workload> = (0..processes)
        .map(|_| {
            Workload::spawn(
                &bench.probe,
                &["hold", "127.0.0.1:0", &each],
                Placement::new(cgroup, netns),
            )
        })
        .collect();
    for holder in &holders {
        holder.expect_within("holding", LONG);
    }
    holders
}

/// The descriptor limit up to its hard limit: a pipe or two per holder process.
pub(crate) fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls with a struct of the right type.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        }
    }
}
