//! The table: one section per kind of figure.

use std::{fmt::Write as _, time::Duration};

use super::{spread, targets::targets};
use crate::{
    results::Results,
    samples::{Row, Samples, paired_ratio},
    steady::SteadyRow,
};

pub(crate) fn markdown(results: &Results, took: Duration, note: Option<&str>) -> String {
    let mut md = String::new();
    header(&mut md, results, took, note);
    target_table(&mut md, results);
    rates(&mut md, results);
    program_time(&mut md, results);
    agent(&mut md, results);
    scale(&mut md, results);
    existing(&mut md, results);
    steady(&mut md, results);
    md
}

fn header(w: &mut String, results: &Results, took: Duration, note: Option<&str>) {
    let s = results.settings;
    let _ = writeln!(w, "# keepalive-agent benchmark\n");
    if s.quick {
        let _ = writeln!(
            w,
            "**Quick run: checks that every step works; its figures mean nothing.**\n"
        );
    }
    let _ = writeln!(
        w,
        "Linux {}, {} CPUs; {} rounds of {} connections per variant, interleaved; medians \
         (min..max). A ratio is the median over rounds of (variant / base) within the same \
         round, so drift of the machine between rounds cancels out. Wall time: {:.0} s \
         ({:.1} min).\n",
        results.kernel,
        results.cpus,
        s.rounds,
        s.conns,
        took.as_secs_f64(),
        took.as_secs_f64() / 60.0
    );
    if let Some(note) = note {
        let _ = writeln!(w, "{note}\n");
    }
}

fn target_table(w: &mut String, results: &Results) {
    write_targets(w, targets(results));
}

fn write_targets(w: &mut String, targets: Vec<super::targets::Target>) {
    let _ = writeln!(
        w,
        "## Targets\n\n| target | ratio, median (min..max) | bound | result |\n|---|---:|---:|---|"
    );
    for target in targets {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} |",
            target.what,
            spread(&target.ratio, 3),
            target.bound,
            if target.pass { "pass" } else { "**fail**" }
        );
    }
    let _ = writeln!(w);
}

fn rates(w: &mut String, results: &Results) {
    let _ = writeln!(w, "## Connection rate\n");
    let _ = writeln!(
        w,
        "| variant | what | loopback conn/s | ratio | veth conn/s | ratio |\n|---|---|---:|---:|---:|---:|"
    );
    for (lo, veth) in results.loopback.iter().zip(&results.veth) {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            lo.name,
            lo.what,
            spread(&lo.samples, 0),
            spread(&paired_ratio(&results.loopback, lo.name, "none"), 3),
            spread(&veth.samples, 0),
            spread(&paired_ratio(&results.veth, veth.name, "none"), 3),
        );
    }
}

fn program_time(w: &mut String, results: &Results) {
    program_table(w, &results.program_ns, results.runs_per_conn);
    exchange_table(w, &results.exchange_ns);
}

fn exchange_table(w: &mut String, exchange_ns: &[Row]) {
    let _ = writeln!(
        w,
        "\n## Program time per exchange\n\nbpf_stats `run_time_ns` / exchanges: one loopback \
         connection carrying one-byte requests and answers (TCP_NODELAY), both sockets. With \
         `ends`, the program runs as each segment goes out.\n\n| variant | ns per exchange \
         |\n|---|---:|"
    );
    for row in exchange_ns {
        let _ = writeln!(w, "| {} | {} |", row.name, spread(&row.samples, 1));
    }
}

fn program_table(w: &mut String, program_ns: &[Row], runs_per_conn: f64) {
    let _ = writeln!(
        w,
        "\n## Program time per connection\n\nbpf_stats `run_time_ns` / connections: both ends of a \
         loopback connection, all {:.0} program runs of each. `floor` is a hand-assembled \
         program with no policy that only sets the four options.\n",
        runs_per_conn
    );
    let _ = writeln!(
        w,
        "| variant | ns per connection | ratio to floor |\n|---|---:|---:|"
    );
    for row in program_ns {
        let _ = writeln!(
            w,
            "| {} | {} | {} |",
            row.name,
            spread(&row.samples, 0),
            spread(&paired_ratio(program_ns, row.name, "floor"), 3)
        );
    }
}

fn agent(w: &mut String, results: &Results) {
    let mib = |kib: &Samples| Samples(kib.0.iter().map(|kib| kib / 1024.0).collect());
    let lines = [
        (
            "policy update: `Enforcer::apply` to the first connection carrying it (µs)",
            results.update_latency_us.clone(),
        ),
        (
            "start-up: exec to the `attached` log line (ms)",
            results.startup_ms.clone(),
        ),
        (
            "start-up with a 10,000-rule policy file (ms)",
            results.startup_10k_ms.clone(),
        ),
        ("resident memory once attached (MiB)", mib(&results.rss_kib)),
        (
            "resident memory with 10,000 rules (MiB)",
            mib(&results.rss_10k_kib),
        ),
    ];
    let _ = writeln!(
        w,
        "\n## Agent\n\n| measure | median (min..max) |\n|---|---:|"
    );
    for (what, samples) in lines {
        let _ = writeln!(w, "| {what} | {} |", spread(&samples, 1));
    }
}

fn scale(w: &mut String, results: &Results) {
    let _ = writeln!(
        w,
        "\n## Scale with followed cgroups\n\nThe agent follows a pattern matching N cgroups. \
         Program time per loopback connection in one of them; time from creating one more \
         matching cgroup to the agent's `attached` line; agent memory.\n"
    );
    let _ = writeln!(
        w,
        "| cgroups | ns per connection | new cgroup covered after (ms) | agent RSS (MiB) |\n|---:|---:|---:|---:|"
    );
    for row in &results.scale {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {:.1} |",
            row.cgroups,
            spread(&row.program_ns, 0),
            spread(&row.coverage_ms, 1),
            row.rss_kib / 1024.0
        );
    }
}

fn existing(w: &mut String, results: &Results) {
    let _ = writeln!(
        w,
        "\n## Existing connections\n\nEstablished loopback connections (both ends local) spread \
         over processes in one cgroup the agent follows (`root/c-*`). Start-up sweep by each \
         path (`run --existing-via`): `iterator`, the TCP iterator program applying the policy \
         in the kernel (Linux 5.15+), and `descriptors`, the socket list plus pidfd_getfd per \
         socket; from the `policy applied` line to the `existing connections` line, a fresh \
         agent each. Then the time from creating one more matching cgroup to its `attached` \
         line, with those connections elsewhere.\n"
    );
    let _ = writeln!(
        w,
        "| connections elsewhere | processes | path | sockets swept | start-up sweep (s) | sweep (connections/s) | new cgroup covered after (ms) |\n|---:|---:|---|---:|---:|---:|---:|"
    );
    for row in &results.existing {
        for sweep in &row.sweeps {
            let rate = match row.sweep_rate(sweep.via) {
                Some(rate) if row.connections > 0 => format!("{rate:.0}"),
                _ => "-".to_string(),
            };
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {:.2} | {rate} | {} |",
                row.connections,
                row.processes,
                sweep.via,
                sweep.swept_sockets,
                sweep.sweep_s,
                spread(&row.coverage_ms, 1)
            );
        }
    }
}

/// `ka-bench --program`: the per-connection program time alone, with its targets.
pub(crate) fn program_only(
    program_ns: &[Row],
    runs_per_conn: f64,
    exchange_ns: &[Row],
    kernel: &str,
) -> String {
    let mut md = format!("# Program time\n\nKernel {kernel}.\n\n");
    write_targets(&mut md, super::targets::program_targets(program_ns));
    program_table(&mut md, program_ns, runs_per_conn);
    exchange_table(&mut md, exchange_ns);
    md
}

/// `ka-bench --steady`: the steady-state rows alone, with their targets.
pub(crate) fn steady_only(rows: &[SteadyRow], quiet: Duration, kernel: &str) -> String {
    let mut md = format!("# Steady state\n\nKernel {kernel}.\n\n");
    write_targets(&mut md, super::targets::steady_targets(rows));
    steady_table(&mut md, rows, quiet);
    md
}

fn steady(w: &mut String, results: &Results) {
    steady_table(w, &results.steady, results.settings.quiet);
}

fn steady_table(w: &mut String, rows: &[SteadyRow], quiet: Duration) {
    let quiet = quiet.as_secs();
    let _ = writeln!(
        w,
        "\n## Steady state\n\nThe release agent follows `root/c-*`, N cgroups (idle 300 s, so \
         that no keepalive probe of the held connections falls in the window), with established \
         loopback connections held in one of them. Start-up: exec to `policy applied` (every \
         cgroup attached). Then, after its start-up sweep, {quiet} s in which nothing changes: its \
         CPU time (all threads, /proc/PID/stat) as a share of one core, and its RSS. Last, one \
         more matching cgroup, to its `attached` line. Links: a sock_ops link per cgroup and, from \
         6.1, one lock link at `root`. Link watch: whether the agent has a host-wide signal of \
         changed links (the fentry/kprobe count of detaches, or where the kernel refuses both a \
         link iterator's count of the agent's attached links, read every 800 ms); without it \
         every attachment is asked every 500 ms.\n"
    );
    let _ = writeln!(
        w,
        "| cgroups | connections | start-up (ms) | CPU (% of a core) | RSS (MiB) | new cgroup covered after (ms) | link watch |\n|---:|---:|---:|---:|---:|---:|---|"
    );
    for row in rows {
        let _ = writeln!(
            w,
            "| {} | {} | {:.0} | {:.3} | {:.1} | {:.1} | {} |",
            row.cgroups,
            row.connections,
            row.startup_ms,
            row.cpu_percent,
            row.rss_kib / 1024.0,
            row.coverage_ms,
            if row.link_watch { "yes" } else { "no" }
        );
    }
}
