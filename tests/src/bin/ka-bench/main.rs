//! `cargo xtask bench`: what enforcement costs, against no program, against a policy-free
//! program that only sets the four options (the floor for this job), against the LD_PRELOAD
//! peer libkeepalive and against the application setting the options itself, measured in one
//! run with the variants interleaved.
//!
//! ```text
//! ka-bench --agent PATH --out DIR [--quick] [--steady]
//! ```
//! `--steady`: only the steady-state rows (an idle agent at scale) and their targets, written
//! to `DIR/steady.md`; for a kernel of the matrix too (`cargo xtask vm --kernel K -- ...`).
//! Progress lines go to stderr; the table to stdout and `DIR/bench.md`, with `DIR/bench.json`
//! and `DIR/bench.svg`.
#![expect(clippy::print_stdout, reason = "the table is the benchmark's output")]
#![expect(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark that cannot run panics with the reason"
)]

mod agent;
mod existing;
mod floor;
mod policies;
mod program_cost;
mod progress;
mod rates;
mod report;
mod results;
mod samples;
mod scale;
mod stats_sysctl;
mod steady;
mod variants;

use std::path::PathBuf;

use crate::{progress::Progress, stats_sysctl::StatsSysctl};

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
    /// Established connections elsewhere, and the processes holding them (informational).
    pub(crate) existing_steps: &'static [(usize, usize)],
    /// Followed cgroups, and established connections, for the steady-state table.
    pub(crate) steady_cgroups: &'static [usize],
    pub(crate) steady_connections: &'static [usize],
    /// How long the agent is watched doing nothing, per steady-state step.
    pub(crate) quiet: std::time::Duration,
    /// Whether this is the plumbing check, whose figures mean nothing.
    pub(crate) quick: bool,
}

impl Settings {
    const FULL: Self = Self {
        conns: 10_000,
        rounds: 31,
        updates: 21,
        starts: 7,
        cgroup_steps: &[1, 100, 1000],
        existing_steps: &[(0, 0), (10_000, 1000), (16_000, 1000), (100_000, 1000)],
        steady_cgroups: &[10, 1000, 10_000],
        steady_connections: &[0, 100_000],
        quiet: std::time::Duration::from_secs(60),
        quick: false,
    };
    /// Checks that every step works, in well under a minute; its figures mean nothing.
    const QUICK: Self = Self {
        conns: 300,
        rounds: 2,
        updates: 3,
        starts: 2,
        cgroup_steps: &[1, 3],
        existing_steps: &[(0, 0), (200, 10)],
        steady_cgroups: &[3],
        steady_connections: &[0, 200],
        quiet: std::time::Duration::from_secs(1),
        quick: true,
    };
}

/// Everything a measurement needs: the binaries, the settings, the progress reporter.
#[derive(Debug)]
pub(crate) struct Bench {
    /// The `ka-probe` workload.
    pub(crate) probe: PathBuf,
    /// The agent binary.
    pub(crate) agent: PathBuf,
    pub(crate) settings: Settings,
    pub(crate) progress: Progress,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut agent, mut out, mut settings) = (None, None, Settings::FULL);
    let (mut steady_alone, mut program_alone) = (false, false);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--out" => out = args.next().map(PathBuf::from),
            "--quick" => settings = Settings::QUICK,
            "--steady" => steady_alone = true,
            "--program" => program_alone = true,
            other => panic!(
                "unknown argument {other:?}; usage: ka-bench --agent PATH --out DIR [--quick] \
                 [--steady | --program]"
            ),
        }
    }
    let out = out.expect("--out DIR");
    let bench = Bench {
        probe: keepalive_tests::probe_bin(),
        agent: agent.expect("--agent PATH (target/release/keepalive-agent)"),
        settings,
        progress: Progress::start(),
    };
    let host = keepalive_tests::require_host();
    if steady_alone {
        let rows = steady::steady_state(&bench);
        let table = report::steady_only(&rows, settings.quiet, &host.kernel_release);
        println!("{table}");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("steady.md"), &table).unwrap();
        return;
    }
    if program_alone {
        let variants = variants::all();
        let (rows, runs) = program_cost::program_cost(&bench, &variants);
        let exchanges = program_cost::exchange_cost(&bench, &variants);
        let table = report::program_only(&rows, runs, &exchanges, &host.kernel_release);
        println!("{table}");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("program.md"), &table).unwrap();
        return;
    }
    let stats = StatsSysctl::off();
    let results = results::run(&bench);
    let took = bench.progress.elapsed();
    let table = report::markdown(&results, took, stats.note());
    drop(stats);
    println!("{table}");
    report::write(&results, took, &table, &out);
    println!("written to {}", out.display());
    bench.progress.step(&format!(
        "done: total wall time {:.0} s",
        took.as_secs_f64()
    ));
}
