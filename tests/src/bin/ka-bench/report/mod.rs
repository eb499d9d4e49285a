//! The table (markdown), its machine-readable twin (JSON), a plot (SVG), and the targets the
//! figures are held to.

mod json;
mod markdown;
mod svg;
mod targets;

use std::{fs, path::Path, time::Duration};

pub(crate) use markdown::{markdown, program_only, steady_only};

use crate::{results::Results, samples::Samples};

/// `median (min..max)`.
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

pub(crate) fn write(results: &Results, took: Duration, markdown: &str, dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    };
    write("bench.md", markdown);
    write("bench.json", &format!("{:#}\n", json::json(results, took)));
    write("bench.svg", &svg::svg(results));
}
