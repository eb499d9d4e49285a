//! Existing connections at scale, informational: today's path (the agent reads each
//! namespace's socket list and updates each socket through pidfd_getfd). Established
//! connections, spread over many processes, sit in one cgroup the agent follows: how fast the
//! start-up sweep goes, then how soon a new matching cgroup is covered with them elsewhere.

use std::time::{Duration, Instant};

use keepalive_tests::{AgentPlaces, Netns, Placement, TestCgroup, Workload};

use crate::{Bench, samples::Samples};

/// One number of established connections.
#[derive(Debug, Clone)]
pub(crate) struct ExistingRow {
    pub(crate) connections: usize,
    pub(crate) processes: usize,
    /// Sockets the start-up sweep went through (both ends of each connection).
    pub(crate) swept_sockets: u64,
    /// From the agent's `policy applied` line to its `existing connections` line (s).
    pub(crate) sweep_s: f64,
    /// From mkdir of a new matching cgroup to its `attached` line (ms).
    pub(crate) coverage_ms: Samples,
}

impl ExistingRow {
    /// Connections per second of the start-up sweep.
    pub(crate) fn sweep_rate(&self) -> f64 {
        self.connections as f64 / self.sweep_s
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
    let places = AgentPlaces::new();
    let agent = places.spawn(&bench.agent, &["run", "--cgroup", &pattern]);
    agent.expect_log("policy applied", LONG);
    let applied = Instant::now();
    let sweep = agent.expect_log("existing connections", LONG);
    let sweep_s = applied.elapsed().as_secs_f64();
    let swept_sockets = sweep
        .split_whitespace()
        .find_map(|word| word.strip_prefix("connections="))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count in {sweep}"));
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
    drop(holders);
    drop(extra);
    ExistingRow {
        connections,
        processes,
        swept_sockets,
        sweep_s,
        coverage_ms,
    }
}

/// The next log line containing `text`, if one comes within `timeout`.
fn logged_within(agent: &Workload, text: &str, timeout: Duration) -> Option<String> {
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
fn hold(
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
fn raise_nofile() {
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
