//! Host programs the tests drive, installed from Debian packages when missing.

use std::process::Command;

use anyhow::bail;

use crate::cmd::{run_status, which};

/// (command, Debian package) pairs the privileged tests need.
pub(crate) const TEST_COMMANDS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("nft", "nftables"),
    ("python3", "python3"),
];

/// Installs the packages of missing commands with apt-get (as root), or says what to install.
pub(crate) fn ensure(commands: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = commands
        .iter()
        .filter(|(command, _)| which(command).is_none())
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if which("apt-get").is_none() {
        bail!(
            "missing programs for the tests: install the packages providing {} (Debian names: {})",
            commands
                .iter()
                .filter(|(command, _)| which(command).is_none())
                .map(|(command, _)| *command)
                .collect::<Vec<_>>()
                .join(", "),
            missing.join(", ")
        );
    }
    eprintln!("xtask: installing Debian packages {}", missing.join(" "));
    run_status(Command::new("apt-get").args(["update", "-qq"]))?;
    run_status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
