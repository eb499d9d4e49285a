//! Builds `keepalive-ebpf` for the BPF target with the pinned nightly (aya-build runs
//! `rustup run <nightly> cargo build -Z build-std=core ...`); the agent embeds the object.
//! Also records the git commit the agent is built from, for `--version`.

use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow, bail};
use aya_build::{Package, Toolchain};
use keepalive_common::toolchain::EBPF_NIGHTLY;

fn main() -> anyhow::Result<()> {
    commit();
    preflight()?;
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "keepalive-ebpf")
        .ok_or_else(|| anyhow!("the keepalive-ebpf package is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Package::default()
        }],
        Toolchain::Custom(EBPF_NIGHTLY),
    )
}

/// A plain `cargo build` without xtask: say what is missing and how to get it, rather than
/// let the nested eBPF build fail deep in its output.
fn preflight() -> anyhow::Result<()> {
    // aya-build's own switch for builds that do not need the program (it then embeds none).
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        return Ok(());
    }
    let fix = "`cargo xtask build` (or `cargo xtask run`, `cargo xtask test`) installs the pinned \
               toolchains and bpf-linker, then builds";
    let components = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_NIGHTLY,
        ])
        .output();
    let has_rust_src = components.as_ref().is_ok_and(|out| {
        out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|line| line.starts_with("rust-src"))
    });
    if !has_rust_src {
        bail!(
            "the eBPF program is built with {EBPF_NIGHTLY} and its rust-src component, which \
             are not installed (or rustup is missing): {fix}"
        );
    }
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("bpf-linker").is_file())
    });
    if !on_path {
        bail!("the eBPF program is linked with bpf-linker, which is not on PATH: {fix}");
    }
    Ok(())
}

/// `KEEPALIVE_AGENT_COMMIT`: the commit of the checkout (`git rev-parse`), or what the
/// environment says (a build from a tarball, which has no `.git`), or `unknown`.
fn commit() {
    println!("cargo::rerun-if-env-changed=KEEPALIVE_AGENT_COMMIT");
    let commit = std::env::var("KEEPALIVE_AGENT_COMMIT")
        .ok()
        .filter(|commit| !commit.is_empty())
        .or_else(|| {
            // Rebuild when HEAD moves: a checkout changes HEAD, a commit the branch's ref.
            for path in ["HEAD", "refs/heads", "packed-refs"] {
                if let Some(file) = git(&["rev-parse", "--git-path", path]) {
                    // Relative to the package's directory, where git ran.
                    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
                    if file.exists() {
                        println!("cargo::rerun-if-changed={}", file.display());
                    }
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo::rustc-env=KEEPALIVE_AGENT_COMMIT={commit}");
}

/// The trimmed output of `git ARGS` in the package's directory, if it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}
