//! Host programs and libraries the tests and the benchmark use, installed from Debian packages
//! when missing.

use std::{path::Path, process::Command};

use anyhow::bail;

use crate::cmd::{run_status, which};

/// What is needed and the Debian package that provides it: a command looked up on PATH, or an
/// absolute path that must exist.
pub(crate) type Need = (&'static str, &'static str);

/// What the privileged tests drive. The quick benchmark run among them uses libkeepalive too.
pub(crate) const TEST: &[Need] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("nft", "nftables"),
    ("python3", "python3"),
    ("bpftool", "bpftool"),
    // promtool checks the metrics endpoint's output.
    ("promtool", "prometheus"),
    // The LD_PRELOAD peer the benchmark compares against.
    ("/usr/lib/libkeepalive.so", "libkeepalive0"),
];

fn present(what: &str) -> bool {
    if what.starts_with('/') {
        Path::new(what).exists()
    } else {
        which(what).is_some()
    }
}

/// Installs the packages of what is missing with apt-get (as root), or says what to install.
pub(crate) fn ensure(needs: &[Need]) -> anyhow::Result<()> {
    let missing: Vec<Need> = needs
        .iter()
        .copied()
        .filter(|(what, _)| !present(what))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    packages.dedup();
    if which("apt-get").is_none() {
        let what: Vec<&str> = missing.iter().map(|(what, _)| *what).collect();
        bail!(
            "missing {}: install the packages that provide them (Debian names: {})",
            what.join(", "),
            packages.join(", ")
        );
    }
    eprintln!("xtask: installing Debian packages {}", packages.join(" "));
    run_status(Command::new("apt-get").args(["update", "-qq"]))?;
    run_status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
