//! Every figure of one run, measured in order.

use crate::{
    Bench, Settings, agent, existing, program_cost, rates,
    samples::{Row, Samples},
    scale, steady, variants,
};

#[derive(Debug)]
pub(crate) struct Results {
    pub(crate) settings: Settings,
    pub(crate) kernel: String,
    /// Online CPUs of the machine.
    pub(crate) cpus: usize,
    /// Connections per second over loopback (connect, accept, close both).
    pub(crate) loopback: Vec<Row>,
    /// Connections per second across a veth pair between two namespaces (connect, close).
    pub(crate) veth: Vec<Row>,
    /// Program run time per connection, both ends, all callbacks (ns, bpf_stats).
    pub(crate) program_ns: Vec<Row>,
    /// Program runs per connection.
    pub(crate) runs_per_conn: f64,
    /// Program run time per one-byte request and answer on one connection (ns), with and
    /// without `ends`.
    pub(crate) exchange_ns: Vec<Row>,
    /// From `Enforcer::apply` to the first connection carrying the new policy (µs).
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
    pub(crate) scale: Vec<scale::ScaleRow>,
    /// Start-up sweep and new-cgroup coverage with established connections elsewhere.
    pub(crate) existing: Vec<existing::ExistingRow>,
    /// What the agent costs a host where nothing changes.
    pub(crate) steady: Vec<steady::SteadyRow>,
}

pub(crate) fn run(bench: &Bench) -> Results {
    bench.progress.step("loading the variants");
    let variants = variants::all();
    if let Some(floor) = variants.iter().find(|variant| variant.name == "floor") {
        crate::floor::check(bench, &floor.cgroup);
    }
    let (loopback, veth) = rates::connection_rates(bench, &variants);
    let (program_ns, runs_per_conn) = program_cost::program_cost(bench, &variants);
    let exchange_ns = program_cost::exchange_cost(bench, &variants);
    drop(variants);
    let update_latency_us = agent::update_latency(bench);
    let (startup_ms, rss_kib) = agent::startups(bench, None);
    let (startup_10k_ms, rss_10k_kib) = agent::startups(bench, Some(10_000));
    Results {
        settings: bench.settings,
        kernel: keepalive_common::host::check()
            .map(|host| host.kernel_release)
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        loopback,
        veth,
        program_ns,
        runs_per_conn,
        exchange_ns,
        update_latency_us,
        startup_ms,
        startup_10k_ms,
        rss_kib,
        rss_10k_kib,
        scale: scale::cgroup_scale(bench),
        existing: existing::existing_scale(bench),
        steady: steady::steady_state(bench),
    }
}
