//! Program run time per connection, from the kernel's BPF statistics (BPF_ENABLE_STATS, on
//! only while measuring), for every variant that has a program; and per request and answer on
//! one connection, where following ends runs the program at every segment.

use keepalive_agent::enforcer::enable_run_time_stats;
use keepalive_tests::{Netns, Workload};

use crate::{
    Bench,
    rates::{WORKLOAD_CPU, round_timeout, rows},
    samples::{Row, rotated},
    variants::Variant,
};

/// Nanoseconds per connection of each variant with a program (both ends, every callback), and
/// program runs per connection.
pub(crate) fn program_cost(bench: &Bench, variants: &[Variant]) -> (Vec<Row>, f64) {
    let measured: Vec<&Variant> = variants.iter().filter(|v| v.program.is_some()).collect();
    let mut runs = 0.0;
    let rows = per_unit(
        bench,
        &measured,
        "program time",
        ["loop", "looped"],
        |variant, n| {
            if variant.name == "agent" {
                runs = n;
            }
        },
    );
    (rows, runs)
}

/// The variants whose cost per exchange is measured: without and with `ends`.
const EXCHANGING: [&str; 2] = ["agent", "ends-on"];

/// Nanoseconds per one-byte request and answer (both sockets, every segment's callback) over
/// one loopback connection of `settings.conns` exchanges.
pub(crate) fn exchange_cost(bench: &Bench, variants: &[Variant]) -> Vec<Row> {
    let measured: Vec<&Variant> = variants
        .iter()
        .filter(|v| EXCHANGING.contains(&v.name))
        .collect();
    let what = "program time per exchange";
    per_unit(bench, &measured, what, ["chatter", "chattered"], |_, _| {})
}

/// Per round, each of `measured` running `ka-probe MODE 127.0.0.1:0 CONNS` (it reports `DONE`
/// when finished) in a fresh loopback namespace: the program's run time per unit (connection
/// or exchange); `runs` is told each variant's program runs per unit.
fn per_unit(
    bench: &Bench,
    measured: &[&Variant],
    what: &str,
    [mode, done]: [&str; 2],
    mut runs: impl FnMut(&Variant, f64),
) -> Vec<Row> {
    let settings = bench.settings;
    let lo = Netns::new();
    let _stats = enable_run_time_stats().expect("BPF_ENABLE_STATS");
    let mut rows = rows(measured.iter().copied());
    let count = settings.conns.to_string();
    let units = settings.conns as f64;
    for round in 0..settings.rounds {
        bench.progress.round(what, round, settings.rounds);
        for i in rotated(measured.len(), round) {
            let variant = measured[i];
            let program = variant.program.as_ref().unwrap();
            let (time_before, count_before) = program.stats();
            let workload = Workload::spawn(
                &bench.probe,
                &[mode, "127.0.0.1:0", &count],
                variant.place(&lo, WORKLOAD_CPU),
            );
            workload.expect_within(done, round_timeout(settings));
            let (time_after, count_after) = program.stats();
            let nanos = (time_after - time_before).as_nanos() as f64;
            rows[i].samples.0.push(nanos / units);
            runs(variant, (count_after - count_before) as f64 / units);
        }
    }
    rows
}
