//! Scale with the number of cgroups the agent follows: program cost per connection, how soon a
//! new matching cgroup is covered, and the agent's memory.

use std::time::{Duration, Instant};

use keepalive_agent::{Policy, Values, enforcer::enable_run_time_stats};
use keepalive_common::Stage;
use keepalive_tests::{AgentPlaces, Netns, Placement, TestCgroup, Workload, load_enforcer};

use crate::{Bench, agent::vm_rss_kib, rates::WORKLOAD_CPU, samples::Samples};

/// One number of followed cgroups.
#[derive(Debug, Clone)]
pub(crate) struct ScaleRow {
    pub(crate) cgroups: usize,
    /// Program time per loopback connection in one of them (ns, bpf_stats).
    pub(crate) program_ns: Samples,
    /// From mkdir of one more matching cgroup to the agent's `attached` line (ms).
    pub(crate) coverage_ms: Samples,
    /// Agent resident memory with them all attached (KiB).
    pub(crate) rss_kib: f64,
}

pub(crate) fn cgroup_scale(bench: &Bench) -> Vec<ScaleRow> {
    bench
        .settings
        .cgroup_steps
        .iter()
        .map(|&n| {
            bench.progress.step(&format!("scale: {n} followed cgroups"));
            let root = TestCgroup::new();
            let children: Vec<TestCgroup> = (0..n).map(|i| root.child(&format!("c-{i}"))).collect();
            let pattern = format!("{}/c-*", root.scope());
            let program_ns = program_ns(bench, &pattern, &children);
            let (coverage_ms, rss_kib) = coverage(bench, &root, &pattern, n);
            ScaleRow {
                cgroups: n,
                program_ns,
                coverage_ms,
                rss_kib,
            }
        })
        .collect()
}

/// Program cost, with the library: one attachment per child, connections in the first.
fn program_ns(bench: &Bench, pattern: &str, children: &[TestCgroup]) -> Samples {
    let settings = bench.settings;
    let netns = Netns::new();
    let mut enforcer = load_enforcer(Stage::Full);
    let scope = keepalive_agent::CgroupPath::parse(pattern).unwrap_or_else(|e| panic!("{e}"));
    enforcer
        .apply(&Policy::enforce(Values::default(), vec![scope]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(enforcer.attachments().count(), children.len());
    let _stats = enable_run_time_stats().unwrap_or_else(|e| panic!("{e}"));
    let count = settings.conns.to_string();
    let mut samples = Samples::default();
    for _ in 0..settings.rounds {
        let before = enforcer.program_stats().unwrap_or_else(|e| panic!("{e}"));
        let place = Placement {
            cpu: Some(WORKLOAD_CPU),
            ..Placement::new(&children[0], &netns)
        };
        Workload::spawn(&bench.probe, &["loop", "127.0.0.1:0", &count], place)
            .expect_within("looped", Duration::from_secs(120));
        let after = enforcer.program_stats().unwrap_or_else(|e| panic!("{e}"));
        let nanos = (after.run_time - before.run_time).as_nanos() as f64;
        samples.0.push(nanos / settings.conns as f64);
    }
    samples
}

/// With the agent binary following `pattern` (`n` cgroups): the time from creating one more
/// matching cgroup to its `attached` line (ms), and the agent's memory (KiB).
fn coverage(bench: &Bench, root: &TestCgroup, pattern: &str, n: usize) -> (Samples, f64) {
    let places = AgentPlaces::new();
    let agent = places.spawn(&bench.agent, &["run", "--cgroup", pattern, "--no-existing"]);
    for _ in 0..n {
        agent.expect_log("attached", Duration::from_secs(60));
    }
    agent.expect_log("policy applied", Duration::from_secs(60));
    let rss_kib = vm_rss_kib(agent.pid());
    let mut coverage_ms = Samples::default();
    let mut extra = Vec::new();
    for k in 0..bench.settings.starts {
        let start = Instant::now();
        extra.push(root.child(&format!("c-new-{k}")));
        agent.expect_log("attached", Duration::from_secs(10));
        coverage_ms.0.push(start.elapsed().as_secs_f64() * 1e3);
    }
    // The agent goes before the cgroups it follows.
    drop(agent);
    drop(extra);
    (coverage_ms, rss_kib)
}
