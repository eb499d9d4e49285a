//! The measurements. Variants are interleaved: every round runs each of them once, the order
//! rotated from round to round, so drift on a noisy machine spreads over all of them.

use std::time::{Duration, Instant};

use keepalive_agent::{Values, enforcer::enable_run_time_stats};
use keepalive_common::Stage;
use keepalive_tests::enforce;
use keepalive_tests::{Netns, Placement, TestCgroup, Veth, Workload};

use crate::{Paths, Settings, policies, variants::Variant};

/// The CPU the measured workload runs on; the benchmark itself and the veth sink use the other.
const WORKLOAD_CPU: usize = 1;
const SINK_CPU: usize = 0;

/// Measured values of one quantity.
#[derive(Debug, Clone, Default)]
pub(crate) struct Samples(pub(crate) Vec<f64>);

impl Samples {
    pub(crate) fn median(&self) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        }
    }

    pub(crate) fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub(crate) fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// One variant's figures.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) name: &'static str,
    pub(crate) what: &'static str,
    pub(crate) samples: Samples,
}

#[derive(Debug)]
pub(crate) struct Results {
    pub(crate) settings: Settings,
    pub(crate) kernel: String,
    /// Connections per second over loopback (connect, accept, close both).
    pub(crate) loopback: Vec<Row>,
    /// Connections per second across a veth pair between two namespaces (connect, close).
    pub(crate) veth: Vec<Row>,
    /// Program run time per connection, both ends, all callbacks (ns, bpf_stats).
    pub(crate) program_ns: Vec<Row>,
    /// Program runs per connection.
    pub(crate) runs_per_conn: f64,
    /// From `set_policy` to the first connection carrying the new policy (µs).
    pub(crate) update_latency_us: Samples,
    /// From exec to the `attached` log line (ms).
    pub(crate) startup_ms: Samples,
    /// The same with a policy file of 10,000 rules (ms).
    pub(crate) startup_10k_ms: Samples,
    /// Agent resident memory once attached (KiB).
    pub(crate) rss_kib: Samples,
    /// The same with 10,000 rules (KiB).
    pub(crate) rss_10k_kib: Samples,
    /// Cost, coverage and memory as the followed cgroups grow.
    pub(crate) scale: Vec<crate::scale::ScaleRow>,
}

pub(crate) fn run(paths: &Paths, settings: Settings) -> Results {
    let default = Values::default();
    let variants = vec![
        Variant::none(),
        Variant::stage(
            "attached",
            "program returning at once: the floor of any sock_ops program",
            &default,
            Stage::Attached,
        ),
        Variant::stage(
            "lookup",
            "program finding the policy, setting nothing",
            &default,
            Stage::Lookup,
        ),
        Variant::stage(
            "tcp-values",
            "program setting the TCP values, not SO_KEEPALIVE",
            &default,
            Stage::TcpValues,
        ),
        Variant::agent("agent", "keepalive-agent, default policy", &default),
        Variant::policy(
            "rules-1",
            "1 rule (loopback matches it)",
            Stage::Full,
            |scope| policies::realistic(1, scope),
        ),
        Variant::policy(
            "rules-4",
            "4 rules: one of each kind of match key, the last matches",
            Stage::Full,
            |scope| policies::realistic(4, scope),
        ),
        Variant::policy(
            "rules-100",
            "100 realistic rules, the last matches",
            Stage::Full,
            |scope| policies::realistic(100, scope),
        ),
        Variant::policy(
            "rules-10k",
            "10,000 realistic rules, the last matches",
            Stage::Full,
            |scope| policies::realistic(10_000, scope),
        ),
        Variant::libkeepalive(),
    ];
    let (loopback, veth) = connection_rates(paths, settings, &variants);
    let (program_ns, runs_per_conn) = program_cost(paths, settings, &variants);
    let (startup_ms, rss_kib) = agent_startups(paths, settings, None);
    let (startup_10k_ms, rss_10k_kib) = agent_startups(paths, settings, Some(10_000));
    Results {
        settings,
        kernel: keepalive_common::host::check()
            .map(|host| host.kernel_release)
            .unwrap_or_default(),
        loopback,
        veth,
        program_ns,
        runs_per_conn,
        update_latency_us: update_latency(paths, settings),
        startup_ms,
        startup_10k_ms,
        rss_kib,
        rss_10k_kib,
        scale: crate::scale::cgroup_scale(paths, settings),
    }
}

fn rows(variants: &[Variant]) -> Vec<Row> {
    variants
        .iter()
        .map(|variant| Row {
            name: variant.name,
            what: variant.what,
            samples: Samples::default(),
        })
        .collect()
}

/// `(count, nanos)` from a `looped`/`dialed` line, as connections per second.
fn rate(words: &[String]) -> f64 {
    let count: f64 = words[0].parse().unwrap();
    let nanos: f64 = words[1].parse().unwrap();
    count / (nanos / 1e9)
}

fn round_timeout(settings: Settings) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(settings.conns)
}

fn connection_rates(
    paths: &Paths,
    settings: Settings,
    variants: &[Variant],
) -> (Vec<Row>, Vec<Row>) {
    let lo = Netns::new();
    let (client, server) = (Netns::new(), Netns::new());
    let link = Veth::link(&client, &server);
    // One sink per variant, in the variant's cgroup, so both ends are treated alike.
    let sinks: Vec<(Workload, String)> = variants
        .iter()
        .map(|variant| {
            let sink = Workload::spawn(
                &paths.probe,
                &["sink", "0.0.0.0:0"],
                variant.place(&server, SINK_CPU),
            );
            let port = sink.expect("listening").remove(0);
            (sink, format!("{}:{port}", link.b_v4))
        })
        .collect();

    let (mut loopback, mut veth) = (rows(variants), rows(variants));
    let count = settings.conns.to_string();
    for round in 0..settings.rounds {
        for i in rotated(variants.len(), round) {
            let variant = &variants[i];
            let looped = Workload::spawn(
                &paths.probe,
                &["loop", "127.0.0.1:0", &count],
                variant.place(&lo, WORKLOAD_CPU),
            );
            loopback[i].samples.0.push(rate(
                &looped.expect_within("looped", round_timeout(settings)),
            ));
            let dialed = Workload::spawn(
                &paths.probe,
                &["dial", &sinks[i].1, &count],
                variant.place(&client, WORKLOAD_CPU),
            );
            veth[i].samples.0.push(rate(
                &dialed.expect_within("dialed", round_timeout(settings)),
            ));
        }
    }
    (loopback, veth)
}

fn program_cost(paths: &Paths, settings: Settings, variants: &[Variant]) -> (Vec<Row>, f64) {
    let lo = Netns::new();
    let _stats = enable_run_time_stats().expect("BPF_ENABLE_STATS");
    let measured: Vec<&Variant> = variants.iter().filter(|v| v.enforcer.is_some()).collect();
    let mut rows: Vec<Row> = measured
        .iter()
        .map(|variant| Row {
            name: variant.name,
            what: variant.what,
            samples: Samples::default(),
        })
        .collect();
    let mut runs = 0.0;
    let count = settings.conns.to_string();
    for round in 0..settings.rounds {
        for i in rotated(measured.len(), round) {
            let variant = measured[i];
            let enforcer = variant.enforcer.as_ref().unwrap();
            let before = enforcer.program_stats().unwrap();
            let looped = Workload::spawn(
                &paths.probe,
                &["loop", "127.0.0.1:0", &count],
                variant.place(&lo, WORKLOAD_CPU),
            );
            looped.expect_within("looped", round_timeout(settings));
            let after = enforcer.program_stats().unwrap();
            let conns = settings.conns as f64;
            let nanos = (after.run_time - before.run_time).as_nanos() as f64;
            rows[i].samples.0.push(nanos / conns);
            runs = (after.run_count - before.run_count) as f64 / conns;
        }
    }
    (rows, runs)
}

fn update_latency(paths: &Paths, settings: Settings) -> Samples {
    let lo = Netns::new();
    let variant = Variant::agent("latency", "", &Values::default());
    let mut enforcer = variant.enforcer.unwrap();
    let mut samples = Samples::default();
    for i in 0..settings.updates {
        let idle = 100 + u32::try_from(i).unwrap();
        let watch = Workload::spawn(
            &paths.probe,
            &["watch", "127.0.0.1:0", &idle.to_string()],
            Placement::new(&variant.cgroup, &lo),
        );
        watch.expect("listening");
        let start = monotonic_ns();
        enforcer
            .apply(&enforce(
                Values {
                    idle_secs: idle,
                    ..Values::default()
                },
                &[&variant.cgroup],
            ))
            .unwrap();
        let seen: f64 = watch.expect("seen")[0].parse().unwrap();
        samples.0.push((seen - start) / 1e3);
    }
    samples
}

/// Start-up time (ms) and resident memory once attached (KiB) of the agent binary, with the
/// default policy or a policy file of `rules` rules.
fn agent_startups(paths: &Paths, settings: Settings, rules: Option<usize>) -> (Samples, Samples) {
    let cgroup = TestCgroup::new();
    let config = rules.map(|rules| {
        let dir = keepalive_tests::TempDir::new();
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
    if let Some(config) = &config {
        args.extend(["--config".into(), config.1.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut startup, mut rss) = (Samples::default(), Samples::default());
    for _ in 0..settings.starts {
        let start = Instant::now();
        let places = keepalive_tests::AgentPlaces::new();
        let mut agent = places.spawn(&paths.agent, &args);
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

/// `0..n` starting at `round % n`.
fn rotated(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + round) % n)
}
