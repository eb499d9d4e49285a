//! The table (markdown), its machine-readable twin (JSON) and a plot (SVG).

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use serde_json::{Value, json};

use crate::measure::{Results, Row, Samples};

pub(crate) fn markdown(results: &Results, took: Duration, note: Option<&str>) -> String {
    let s = results.settings;
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# keepalive-agent benchmark\n");
    let _ = writeln!(
        w,
        "Linux {}; {} rounds of {} connections per variant, interleaved; medians (min..max). \
         A ratio is the median over rounds of (variant / `none`) within the same round, so \
         drift of the machine between rounds cancels out. Took {:.0} s.\n",
        results.kernel,
        s.rounds,
        s.conns,
        took.as_secs_f64()
    );
    if let Some(note) = note {
        let _ = writeln!(w, "{note}\n");
    }
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
            spread(&paired_ratio(&results.loopback, lo), 3),
            spread(&veth.samples, 0),
            spread(&paired_ratio(&results.veth, veth), 3),
        );
    }
    let _ = writeln!(
        w,
        "\n## Program time per connection\n\nbpf_stats `run_time_ns` / connections: both ends of a \
         loopback connection, all {:.0} program runs of each.\n",
        results.runs_per_conn
    );
    let _ = writeln!(w, "| variant | ns per connection |\n|---|---:|");
    for row in &results.program_ns {
        let _ = writeln!(w, "| {} | {} |", row.name, spread(&row.samples, 0));
    }
    let _ = writeln!(
        w,
        "\n## Agent\n\n| measure | median (min..max) |\n|---|---:|"
    );
    let _ = writeln!(
        w,
        "| policy update: `Enforcer::apply` to the first connection carrying it (µs) | {} |",
        spread(&results.update_latency_us, 1)
    );
    let _ = writeln!(
        w,
        "| start-up: exec to the `attached` log line (ms) | {} |",
        spread(&results.startup_ms, 1)
    );
    let _ = writeln!(
        w,
        "| start-up with a 10,000-rule policy file (ms) | {} |",
        spread(&results.startup_10k_ms, 1)
    );
    let mib = |kib: &Samples| Samples(kib.0.iter().map(|kib| kib / 1024.0).collect());
    let _ = writeln!(
        w,
        "| resident memory once attached (MiB) | {} |",
        spread(&mib(&results.rss_kib), 1)
    );
    let _ = writeln!(
        w,
        "| resident memory with 10,000 rules (MiB) | {} |",
        spread(&mib(&results.rss_10k_kib), 1)
    );
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
    md
}

/// Per round, `row`'s rate over the `none` rate measured in the same round.
fn paired_ratio(rows: &[Row], row: &Row) -> Samples {
    let Some(none) = rows.iter().find(|row| row.name == "none") else {
        return Samples(Vec::new());
    };
    Samples(
        row.samples
            .0
            .iter()
            .zip(&none.samples.0)
            .map(|(rate, base)| rate / base)
            .collect(),
    )
}

fn spread(samples: &Samples, decimals: usize) -> String {
    format!(
        "{:.*} ({:.*}..{:.*})",
        decimals,
        samples.median(),
        decimals,
        samples.min(),
        decimals,
        samples.max()
    )
}

fn json(results: &Results) -> Value {
    let rows = |rows: &[Row]| -> Value {
        rows.iter()
            .map(|row| {
                let ratios = paired_ratio(rows, row);
                json!({
                    "variant": row.name,
                    "what": row.what,
                    "median": row.samples.median(),
                    "ratio_to_none": ratios.median(),
                    "ratio_samples": ratios.0,
                    "samples": row.samples.0,
                })
            })
            .collect()
    };
    let samples = |s: &Samples| json!({ "median": s.median(), "samples": s.0 });
    json!({
        "kernel": results.kernel,
        "rounds": results.settings.rounds,
        "connections_per_round": results.settings.conns,
        "loopback_conn_per_s": rows(&results.loopback),
        "veth_conn_per_s": rows(&results.veth),
        "program_ns_per_conn": results.program_ns.iter().map(|row| json!({
            "variant": row.name,
            "median": row.samples.median(),
            "samples": row.samples.0,
        })).collect::<Value>(),
        "program_runs_per_conn": results.runs_per_conn,
        "policy_update_latency_us": samples(&results.update_latency_us),
        "agent_startup_ms": samples(&results.startup_ms),
        "agent_rss_kib": samples(&results.rss_kib),
        "agent_startup_10k_rules_ms": samples(&results.startup_10k_ms),
        "agent_rss_10k_rules_kib": samples(&results.rss_10k_kib),
        "cgroup_scale": results.scale.iter().map(|row| json!({
            "cgroups": row.cgroups,
            "program_ns_per_conn": samples(&row.program_ns),
            "new_cgroup_covered_ms": samples(&row.coverage_ms),
            "agent_rss_kib": row.rss_kib,
        })).collect::<Value>(),
    })
}

/// Two panels of horizontal bars: rate ratio to `none` (loopback and veth), and program ns.
fn svg(results: &Results) -> String {
    const WIDTH: f64 = 760.0;
    const LABEL: f64 = 175.0;
    const BAR: f64 = 16.0;
    let plot = WIDTH - LABEL - 90.0;
    let mut out = String::new();
    let mut y = 30.0;
    let mut body = String::new();
    let b = &mut body;
    let _ = writeln!(
        b,
        r#"<text x="10" y="{y}" font-weight="bold">Connection rate, ratio to no program (median)</text>"#
    );
    y += 14.0;
    for (rows, colour, label) in [
        (&results.loopback, "#4477aa", "loopback"),
        (&results.veth, "#66ccee", "veth"),
    ] {
        for row in rows.iter() {
            let ratio = paired_ratio(rows, row).median();
            let len = (ratio / 1.1).clamp(0.0, 1.0) * plot;
            y += BAR + 4.0;
            let _ = writeln!(
                b,
                r#"<text x="10" y="{:.0}">{} ({label})</text>"#,
                y + 12.0,
                row.name
            );
            let _ = writeln!(
                b,
                r#"<rect x="{LABEL}" y="{y:.0}" width="{len:.1}" height="{BAR}" fill="{colour}"/>"#
            );
            let _ = writeln!(
                b,
                r#"<text x="{:.1}" y="{:.0}">{ratio:.3}</text>"#,
                LABEL + len + 6.0,
                y + 12.0
            );
        }
    }
    let one = LABEL + plot / 1.1;
    let _ = writeln!(
        b,
        r##"<line x1="{one:.1}" y1="44" x2="{one:.1}" y2="{:.0}" stroke="#999" stroke-dasharray="4"/>"##,
        y + BAR
    );
    y += 50.0;
    let _ = writeln!(
        b,
        r#"<text x="10" y="{y:.0}" font-weight="bold">Program time per connection, ns (bpf_stats, median)</text>"#
    );
    y += 14.0;
    let top = results
        .program_ns
        .iter()
        .map(|row| row.samples.max())
        .fold(1.0, f64::max);
    for row in &results.program_ns {
        let ns = row.samples.median();
        let len = ns / top * plot;
        y += BAR + 4.0;
        let _ = writeln!(b, r#"<text x="10" y="{:.0}">{}</text>"#, y + 12.0, row.name);
        let _ = writeln!(
            b,
            r##"<rect x="{LABEL}" y="{y:.0}" width="{len:.1}" height="{BAR}" fill="#ee6677"/>"##
        );
        let _ = writeln!(
            b,
            r#"<text x="{:.1}" y="{:.0}">{ns:.0} ns</text>"#,
            LABEL + len + 6.0,
            y + 12.0
        );
    }
    let height = y + 40.0;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

pub(crate) fn write(results: &Results, markdown: &str, dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    };
    write("bench.md", markdown);
    write("bench.json", &format!("{:#}\n", json(results)));
    write("bench.svg", &svg(results));
}
