//! What the agent costs a host where nothing changes: its CPU over a quiet period and its
//! memory, at 10, 1,000 and 10,000 followed cgroups, without and with 100,000 established
//! connections (in one of them, so the missing-keepalive gauge counts them); its start-up to
//! every cgroup attached; how soon one more cgroup is covered there.

use std::time::{Duration, Instant};

use keepalive_tests::{AgentPlaces, Netns, TestCgroup, cpu_time};

use crate::{
    Bench,
    agent::vm_rss_kib,
    existing::{hold, logged_within, raise_nofile},
};

/// One number of followed cgroups and of established connections.
#[derive(Debug, Clone)]
pub(crate) struct SteadyRow {
    pub(crate) cgroups: usize,
    pub(crate) connections: usize,
    /// From exec to the `policy applied` line, every cgroup attached (ms).
    pub(crate) startup_ms: f64,
    /// The agent's CPU time over the quiet period, as a share of one core (%).
    pub(crate) cpu_percent: f64,
    pub(crate) rss_kib: f64,
    /// From mkdir of one more matching cgroup to its `attached` line (ms).
    pub(crate) coverage_ms: f64,
    /// Whether the kernel took the link watch (else every attachment is asked every 500 ms).
    pub(crate) link_watch: bool,
}

const LONG: Duration = Duration::from_secs(300);

pub(crate) fn steady_state(bench: &Bench) -> Vec<SteadyRow> {
    raise_nofile();
    let settings = bench.settings;
    let mut rows = Vec::new();
    for &connections in settings.steady_connections {
        for &cgroups in settings.steady_cgroups {
            rows.push(step(bench, cgroups, connections));
        }
    }
    rows
}

fn step(bench: &Bench, cgroups: usize, connections: usize) -> SteadyRow {
    bench.progress.step(&format!(
        "steady state: {cgroups} cgroups, {connections} connections"
    ));
    let root = TestCgroup::new();
    let children: Vec<TestCgroup> = (0..cgroups)
        .map(|i| root.child(&format!("c-{i}")))
        .collect();
    let netns = Netns::new();
    netns.set_sysctl("net/ipv4/ip_local_port_range", "1024 65000");
    let holders = hold(
        bench,
        &children[0],
        &netns,
        connections,
        connections.div_ceil(100),
    );
    let places = AgentPlaces::new();
    let start = Instant::now();
    // Idle 300 s: the start-up sweep gives the held connections keepalive, and with the
    // default 60 s their 200,000 sockets would all send a probe at the end of the quiet
    // period, in softirq time the kernel may charge to whichever task it interrupts, and
    // while the next cgroup is being covered. The agent's own work is the same either way.
    let agent = places.spawn(
        &bench.agent,
        &[
            "run",
            "--cgroup",
            &format!("{}/c-*", root.scope()),
            "--idle",
            "300",
        ],
    );
    let mut link_watch = true;
    loop {
        let line = agent
            .try_line_within(LONG)
            .unwrap_or_else(|| panic!("no `policy applied` from the agent"));
        link_watch &= !line.contains("lacks link-watch");
        if line.contains("policy applied") {
            break;
        }
    }
    let startup_ms = start.elapsed().as_secs_f64() * 1e3;
    let line = logged_within(&agent, "existing connections", LONG);
    assert!(line.is_some(), "the start-up sweep never ended");
    // Start-up's allocations and first gauge settle before the quiet period.
    let quiet = bench.settings.quiet;
    std::thread::sleep(quiet.min(Duration::from_secs(2)));
    let before = cpu_time(agent.pid());
    std::thread::sleep(quiet);
    let cpu = cpu_time(agent.pid()) - before;
    let cpu_percent = 100.0 * cpu.as_secs_f64() / quiet.as_secs_f64();
    let rss_kib = vm_rss_kib(agent.pid());
    let added = Instant::now();
    let extra = root.child("c-new");
    agent.expect_log("attached", LONG);
    let coverage_ms = added.elapsed().as_secs_f64() * 1e3;
    drop(agent);
    drop(places);
    drop(holders);
    drop(extra);
    bench.progress.step(&format!(
        "steady state: {cgroups} cgroups, {connections} connections: start-up {startup_ms:.0} ms, \
         CPU {cpu_percent:.3}% of a core, RSS {:.1} MiB, one more covered in {coverage_ms:.1} ms, \
         link watch {link_watch}",
        rss_kib / 1024.0
    ));
    SteadyRow {
        cgroups,
        connections,
        startup_ms,
        cpu_percent,
        rss_kib,
        coverage_ms,
        link_watch,
    }
}
