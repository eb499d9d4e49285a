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
    let settings = bench.settings;
    let lo = Netns::new();
    let _stats = enable_run_time_stats().expect("BPF_ENABLE_STATS");
    let measured: Vec<&Variant> = variants.iter().filter(|v| v.program.is_some()).collect();
    let mut rows = rows(measured.iter().copied());
    let mut runs = 0.0;
    let count = settings.conns.to_string();
    for round in 0..settings.rounds {
        bench.progress.round("program time", round, settings.rounds);
        for i in rotated(measured.len(), round) {
            let variant = measured[i];
            let program = variant.program.as_ref().unwrap();
            let (time_before, count_before) = program.stats();
            let looped = Workload::spawn(
                &bench.probe,
                &["loop", "127.0.0.1:0", &count],
                variant.place(&lo, WORKLOAD_CPU),
            );
            looped.expect_within("looped", round_timeout(settings));
            let (time_after, count_after) = program.stats();
            let conns = settings.conns as f64;
            let nanos = (time_after - time_before).as_nanos() as f64;
            rows[i].samples.0.push(nanos / conns);
            if variant.name == "agent" {
                runs = (count_after - count_before) as f64 / conns;
            }
        }
    }
    (rows, runs)
}

/// The variants whose cost per exchange is measured: without and with `ends`.
const EXCHANGING: [&str; 2] = ["agent", "ends-on"];

/// Nanoseconds per one-byte request and answer (both sockets, every segment's callback) over
/// one loopback connection of `settings.conns` exchanges.
pub(crate) fn exchange_cost(bench: &Bench, variants: &[Variant]) -> Vec<Row> {
    let settings = bench.settings;
    let lo = Netns::new();
    let _stats = enable_run_time_stats().expect("BPF_ENABLE_STATS");
    let measured: Vec<&Variant> = variants
        .iter()
        .filter(|v| EXCHANGING.contains(&v.name))
        .collect();
    let mut rows = rows(measured.iter().copied());
    let count = settings.conns.to_string();
    for round in 0..settings.rounds {
        bench
            .progress
            .round("program time per exchange", round, settings.rounds);
        for i in rotated(measured.len(), round) {
            let variant = measured[i];
            let program = variant.program.as_ref().unwrap();
            let (time_before, _) = program.stats();
            let chatted = Workload::spawn(
                &bench.probe,
                &["chatter", "127.0.0.1:0", &count],
                variant.place(&lo, WORKLOAD_CPU),
            );
            chatted.expect_within("chattered", round_timeout(settings));
            let (time_after, _) = program.stats();
            let nanos = (time_after - time_before).as_nanos() as f64;
            rows[i].samples.0.push(nanos / settings.conns as f64);
        }
    }
    rows
}
