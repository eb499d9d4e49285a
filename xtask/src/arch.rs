//! The CPU architectures the agent is built, packaged and tested for, and each one's names in
//! the tools that need them (Rust, Debian, RPM, OCI, qemu).

use std::process::Command;

use anyhow::bail;

use crate::{packages, toolchain};

/// x86-64 or arm64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub(crate) const ALL: [Self; 2] = [Self::X86_64, Self::Aarch64];

    /// The architecture this xtask runs on.
    pub(crate) fn host() -> anyhow::Result<Self> {
        match std::env::consts::ARCH {
            "x86_64" => Ok(Self::X86_64),
            "aarch64" => Ok(Self::Aarch64),
            other => bail!("xtask builds on x86_64 and aarch64 hosts, not {other}"),
        }
    }

    /// `amd64`/`x86_64` or `arm64`/`aarch64`, as users write it.
    pub(crate) fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "amd64" | "x86_64" | "x86-64" => Ok(Self::X86_64),
            "arm64" | "aarch64" => Ok(Self::Aarch64),
            other => bail!("--arch {other}: use amd64 (x86_64) or arm64 (aarch64)"),
        }
    }

    /// Rust's and RPM's name (`uname -m`).
    pub(crate) const fn uname(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// Debian's and OCI's name.
    pub(crate) const fn debian(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// The Rust target of the static agent: musl links everything in (static-pie).
    pub(crate) fn musl_target(self) -> String {
        format!("{}-unknown-linux-musl", self.uname())
    }

    /// The `strip` that reads this architecture's binaries, and the Debian package it comes
    /// from: the host's own, or binutils' cross `<arch>-linux-gnu-strip`.
    pub(crate) fn strip(self) -> anyhow::Result<(&'static str, &'static str)> {
        if self == Self::host()? {
            return Ok(("strip", "binutils"));
        }
        Ok(match self {
            Self::X86_64 => ("x86_64-linux-gnu-strip", "binutils-x86-64-linux-gnu"),
            Self::Aarch64 => ("aarch64-linux-gnu-strip", "binutils-aarch64-linux-gnu"),
        })
    }

    /// Makes `cargo` (the pinned host toolchain's) build static musl binaries of this
    /// architecture: installs the target's standard library and musl-tools (should a dependency
    /// compile C) when missing, passes `--target`, and for another architecture than the host's
    /// links with rust-lld, which needs no cross C toolchain (Debian has no aarch64 musl gcc;
    /// no dependency of the agent compiles C for the target). Returns the target.
    pub(crate) fn static_target(self, cargo: &mut Command) -> anyhow::Result<String> {
        packages::ensure(packages::STATIC)?;
        let target = self.musl_target();
        toolchain::ensure_target(toolchain::HOST, &target)?;
        cargo.args(["--target", &target]);
        if self != Self::host()? {
            let triple = target.to_uppercase().replace('-', "_");
            cargo.env(format!("CARGO_TARGET_{triple}_LINKER"), "rust-lld");
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::Arch;

    #[test]
    fn every_spelling_of_each_architecture() {
        for arch in Arch::ALL {
            assert_eq!(Arch::parse(arch.uname()).ok(), Some(arch));
            assert_eq!(Arch::parse(arch.debian()).ok(), Some(arch));
        }
        assert!(Arch::parse("riscv64").is_err());
    }
}
