//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/`, each for a bounded time. Not part of
//! `cargo xtask test` (CI): a fuzzer finds things by running long, and a finding needs a human.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};

use crate::{
    cmd::run_status,
    toolchain::{self, NIGHTLY, Toolchain},
};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The targets, and the directories of the repository that seed each one's corpus.
const TARGETS: &[(&str, &[&str])] = &[
    ("policy_file", &["examples", "tests/corpus/bad-policies"]),
    ("policy_rules", &[]),
];

pub(crate) fn run(
    workspace: &Path,
    toolchain: &Toolchain,
    seconds: u32,
    only: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(name) = only {
        ensure!(
            TARGETS.iter().any(|(target, _)| *target == name),
            "no fuzz target {name}; there are: {}",
            TARGETS
                .iter()
                .map(|(t, _)| *t)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let cargo_fuzz = ensure_cargo_fuzz()?;
    let mut path = vec![cargo_fuzz];
    path.extend(std::env::split_paths(&toolchain.path()?));
    let path = std::env::join_paths(path).context("PATH")?;
    let mut crashed = Vec::new();
    for (target, seeds) in TARGETS
        .iter()
        .filter(|(target, _)| only.is_none_or(|name| name == *target))
    {
        let corpus = workspace.join("fuzz").join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let status = toolchain::rustup_run(NIGHTLY, "cargo")
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .args(seeds.iter().map(|dir| workspace.join(dir)))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(workspace)
            .env("PATH", &path)
            .status()
            .context("cannot run cargo fuzz")?;
        if !status.success() {
            crashed.push(*target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "{} found a failing input; it is under fuzz/artifacts/<target>/ (`cargo fuzz fmt` \
             shows it). Make it a regression test beside the code it broke, then fix the code.",
            crashed.join(" and ")
        );
    }
    Ok(())
}

/// cargo-fuzz, built once into the cache.
fn ensure_cargo_fuzz() -> anyhow::Result<PathBuf> {
    let root = toolchain::cache_dir()?.join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin");
    if bin.join("cargo-fuzz").exists() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: building cargo-fuzz {CARGO_FUZZ_VERSION} into {} (once)",
        root.display()
    );
    run_status(
        toolchain::rustup_run(toolchain::HOST, "cargo")
            .args(["install", "cargo-fuzz", "--locked", "--version"])
            .arg(CARGO_FUZZ_VERSION)
            .arg("--root")
            .arg(&root)
            .env("CARGO_TARGET_DIR", root.join("build")),
    )
    .context("cannot build cargo-fuzz")?;
    let _ignored = std::fs::remove_dir_all(root.join("build"));
    Ok(bin)
}
