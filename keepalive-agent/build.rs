//! Builds `keepalive-ebpf` for the BPF target with the pinned nightly (aya-build runs
//! `rustup run <nightly> cargo build -Z build-std=core ...`); the agent embeds the object.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Keep in step with `xtask/src/toolchain.rs`, which installs it.
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-01";

fn main() -> anyhow::Result<()> {
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
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
