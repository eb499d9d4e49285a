//! A plot: two panels of horizontal bars, the connection rate's ratio to no program (loopback
//! and veth) and the program time per connection.

use std::fmt::Write as _;

use crate::{results::Results, samples::paired_ratio};

const WIDTH: f64 = 760.0;
const LABEL: f64 = 175.0;
const BAR: f64 = 16.0;
const PLOT: f64 = WIDTH - LABEL - 90.0;

/// One bar of `len` pixels at `y` with its label and its value.
fn bar(b: &mut String, y: f64, label: &str, len: f64, colour: &str, value: &str) {
    let _ = writeln!(b, r#"<text x="10" y="{:.0}">{label}</text>"#, y + 12.0);
    let _ = writeln!(
        b,
        r#"<rect x="{LABEL}" y="{y:.0}" width="{len:.1}" height="{BAR}" fill="{colour}"/>"#
    );
    let _ = writeln!(
        b,
        r#"<text x="{:.1}" y="{:.0}">{value}</text>"#,
        LABEL + len + 6.0,
        y + 12.0
    );
}

/// The rate panel from `y`; returns where it ends.
fn rate_panel(b: &mut String, results: &Results, mut y: f64) -> f64 {
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
            let ratio = paired_ratio(rows, row.name, "none").median();
            let len = (ratio / 1.1).clamp(0.0, 1.0) * PLOT;
            y += BAR + 4.0;
            let name = format!("{} ({label})", row.name);
            bar(b, y, &name, len, colour, &format!("{ratio:.3}"));
        }
    }
    let one = LABEL + PLOT / 1.1;
    let _ = writeln!(
        b,
        r##"<line x1="{one:.1}" y1="44" x2="{one:.1}" y2="{:.0}" stroke="#999" stroke-dasharray="4"/>"##,
        y + BAR
    );
    y
}

/// The program-time panel from `y`; returns where it ends.
fn program_panel(b: &mut String, results: &Results, mut y: f64) -> f64 {
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
        y += BAR + 4.0;
        bar(
            b,
            y,
            row.name,
            ns / top * PLOT,
            "#ee6677",
            &format!("{ns:.0} ns"),
        );
    }
    y
}

pub(super) fn svg(results: &Results) -> String {
    let mut body = String::new();
    let y = rate_panel(&mut body, results, 30.0);
    let y = program_panel(&mut body, results, y + 50.0);
    let height = y + 40.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}
