//! Connection rates, loopback and across a veth pair. Variants are interleaved: every round
//! runs each of them once, the order rotated from round to round, so drift on a noisy machine
//! spreads over all of them.

use std::time::Duration;

use keepalive_tests::{Netns, Veth, Workload};

use crate::{
    Bench, Settings,
    samples::{Row, Samples, rotated},
    variants::Variant,
};

/// The CPU the measured workload runs on; the benchmark itself and the veth sink use the other.
pub(crate) const WORKLOAD_CPU: usize = 1;
const SINK_CPU: usize = 0;

/// One empty row per variant.
pub(crate) fn rows<'a>(variants: impl IntoIterator<Item = &'a Variant>) -> Vec<Row> {
    variants
        .into_iter()
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

pub(crate) fn round_timeout(settings: Settings) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(settings.conns)
}

/// Connections per second of each variant: (loopback, veth).
pub(crate) fn connection_rates(bench: &Bench, variants: &[Variant]) -> (Vec<Row>, Vec<Row>) {
    let settings = bench.settings;
    let lo = Netns::new();
    let (client, server) = (Netns::new(), Netns::new());
    let link = Veth::link(&client, &server);
    // One sink per variant, in the variant's cgroup, so both ends are treated alike.
    let sinks: Vec<(Workload, String)> = variants
        .iter()
        .map(|variant| {
            let sink = Workload::spawn(
                &bench.probe,
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
        bench
            .progress
            .round("connection rate", round, settings.rounds);
        for i in rotated(variants.len(), round) {
            let variant = &variants[i];
            let looped = Workload::spawn(
                &bench.probe,
                &["loop", "127.0.0.1:0", &count],
                variant.place(&lo, WORKLOAD_CPU),
            );
            loopback[i].samples.0.push(rate(
                &looped.expect_within("looped", round_timeout(settings)),
            ));
            let dialed = Workload::spawn(
                &bench.probe,
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
