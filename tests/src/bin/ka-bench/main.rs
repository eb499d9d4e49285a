//! `cargo xtask bench`: what enforcement costs, against no program and against the LD_PRELOAD
//! peer libkeepalive, measured in one run with the variants interleaved.
//!
//! ```text
//! ka-bench --agent PATH --out DIR [--quick]
//! ```
//! Prints a table and writes `DIR/bench.md`, `DIR/bench.json` and `DIR/bench.svg`.
#![expect(clippy::print_stdout, reason = "the table is the benchmark's output")]
#![expect(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark that cannot run panics with the reason"
)]

mod measure;
mod policies;
mod report;
mod scale;
mod variants;

use std::path::PathBuf;

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Connections per timed round.
    pub(crate) conns: u64,
    /// Rounds per variant; each round runs every variant once, in a rotated order.
    pub(crate) rounds: usize,
    /// Policy changes timed for the update latency.
    pub(crate) updates: usize,
    /// Agent start-ups timed (also: new cgroups timed per scale step).
    pub(crate) starts: usize,
    /// Numbers of followed cgroups for the scale table.
    pub(crate) cgroup_steps: &'static [usize],
}

impl Settings {
    const FULL: Self = Self {
        conns: 10_000,
        rounds: 31,
        updates: 21,
        starts: 7,
        cgroup_steps: &[1, 100, 1000],
    };
    /// Checks that every step works, in seconds; its figures mean nothing.
    const QUICK: Self = Self {
        conns: 300,
        rounds: 2,
        updates: 3,
        starts: 2,
        cgroup_steps: &[1, 3],
    };
}

#[derive(Debug)]
pub(crate) struct Paths {
    pub(crate) probe: PathBuf,
    pub(crate) agent: PathBuf,
    pub(crate) out: PathBuf,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut agent, mut out, mut settings) = (None, None, Settings::FULL);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--out" => out = args.next().map(PathBuf::from),
            "--quick" => settings = Settings::QUICK,
            other => panic!(
                "unknown argument {other:?}; usage: ka-bench --agent PATH --out DIR [--quick]"
            ),
        }
    }
    let paths = Paths {
        probe: keepalive_tests::probe_bin(),
        agent: agent.expect("--agent PATH (target/release/keepalive-agent)"),
        out: out.expect("--out DIR"),
    };
    keepalive_tests::require_host();
    let stats = StatsSysctl::off();
    let started = std::time::Instant::now();
    let results = measure::run(&paths, settings);
    let table = report::markdown(&results, started.elapsed(), stats.note());
    drop(stats);
    println!("{table}");
    report::write(&results, &table, &paths.out);
    println!("written to {}", paths.out.display());
}

/// `kernel.bpf_stats_enabled`: left on, every program run of every variant pays for two clock
/// reads, which skews the connection rates. Off for the run (the ns figures use
/// BPF_ENABLE_STATS, scoped to their measurement), then restored.
struct StatsSysctl {
    was_on: bool,
}

impl StatsSysctl {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn off() -> Self {
        let was_on = std::fs::read_to_string(Self::PATH).is_ok_and(|value| value.trim() == "1");
        if was_on {
            std::fs::write(Self::PATH, "0").expect("turn kernel.bpf_stats_enabled off");
        }
        Self { was_on }
    }

    fn note(&self) -> Option<&'static str> {
        self.was_on.then_some(
            "kernel.bpf_stats_enabled was 1: set to 0 for the run and restored afterwards.",
        )
    }
}

impl Drop for StatsSysctl {
    fn drop(&mut self) {
        if self.was_on {
            let _ignored = std::fs::write(Self::PATH, "1");
        }
    }
}
