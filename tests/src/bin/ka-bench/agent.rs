//! The agent itself: how soon a policy change reaches new connections, how long the binary
//! takes to start, and its memory.

use std::time::{Duration, Instant};

use keepalive_agent::Values;
use keepalive_common::Stage;
use keepalive_tests::{AgentPlaces, Netns, Placement, TempDir, TestCgroup, Workload, enforce};

use crate::{Bench, policies, samples::Samples};

/// From `Enforcer::apply` to the first new connection carrying the new values (µs).
pub(crate) fn update_latency(bench: &Bench) -> Samples {
    bench.progress.step("policy update latency");
    let lo = Netns::new();
    let cgroup = TestCgroup::new();
    let mut enforcer = keepalive_tests::load_enforcer(Stage::Full);
    enforcer
        .apply(&enforce(Values::default(), &[&cgroup]))
        .unwrap();
    let mut samples = Samples::default();
    for i in 0..bench.settings.updates {
        let idle = 100 + u32::try_from(i).unwrap();
        let watch = Workload::spawn(
            &bench.probe,
            &["watch", "127.0.0.1:0", &idle.to_string()],
            Placement::new(&cgroup, &lo),
        );
        watch.expect("listening");
        let start = monotonic_ns();
        let values = Values {
            idle_secs: idle,
            ..Values::default()
        };
        enforcer.apply(&enforce(values, &[&cgroup])).unwrap();
        let seen: f64 = watch.expect("seen")[0].parse().unwrap();
        samples.0.push((seen - start) / 1e3);
    }
    samples
}

/// Start-up time (ms) and resident memory once attached (KiB) of the agent binary, with the
/// default policy or a policy file of `rules` rules.
pub(crate) fn startups(bench: &Bench, rules: Option<usize>) -> (Samples, Samples) {
    let what = rules.map_or("default policy".into(), |n| format!("{n}-rule policy"));
    bench.progress.step(&format!("agent start-up, {what}"));
    let cgroup = TestCgroup::new();
    let config = rules.map(|rules| {
        let dir = TempDir::new();
        let text = policies::realistic_toml(rules, &cgroup.scope());
        let path = dir.write("policy.toml", &text, 0o644);
        (dir, path)
    });
    let mut args = vec![
        "run".to_string(),
        "--cgroup".into(),
        cgroup.cgroup().name.clone(),
        "--no-existing".into(),
    ];
    if let Some((_, path)) = &config {
        args.extend(["--config".into(), path.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut startup, mut rss) = (Samples::default(), Samples::default());
    for _ in 0..bench.settings.starts {
        let start = Instant::now();
        let places = AgentPlaces::new();
        let mut agent = places.spawn(&bench.agent, &args);
        agent.expect_log("attached", Duration::from_secs(30));
        startup.0.push(start.elapsed().as_secs_f64() * 1e3);
        rss.0.push(vm_rss_kib(agent.pid()));
        assert_eq!(
            agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)),
            Some(0)
        );
    }
    (startup, rss)
}

pub(crate) fn vm_rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn monotonic_ns() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    now.tv_sec as f64 * 1e9 + now.tv_nsec as f64
}
