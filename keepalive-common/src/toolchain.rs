//! The pinned toolchains, in one place: `cargo xtask` installs them and builds with them, and
//! `keepalive-agent/build.rs` builds the eBPF crate with [`EBPF_NIGHTLY`].
//!
//! xtask itself builds with whatever stable the user has (its minimum is the workspace's
//! `rust-version` for xtask: see `xtask/Cargo.toml`); everything else is built by xtask with
//! these.

/// The host toolchain of the workspace (the agent, the tests): aya 0.16 needs 1.98 or newer.
/// Installed with the `minimal` profile plus [`HOST_COMPONENTS`].
pub const HOST: &str = "1.99.0";

/// Components of [`HOST`] that `cargo xtask lint` needs.
pub const HOST_COMPONENTS: &[&str] = &["clippy", "rustfmt"];

/// The nightly that builds the eBPF crate (`-Z build-std=core` for bpfel-unknown-none) and the
/// fuzz targets. It moves together with bpf-linker, which is built against its LLVM.
pub const EBPF_NIGHTLY: &str = "nightly-2026-10-01";

/// Components of [`EBPF_NIGHTLY`]: the standard library's source for `-Z build-std`, and
/// clippy for the eBPF crate.
pub const EBPF_NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];
