//! The pinned toolchains (`keepalive_common::toolchain`): the host stable that builds the
//! workspace, a dated nightly with rust-src for the eBPF crate, and bpf-linker built against
//! that nightly's own LLVM (the host's LLVM is rarely the right major version).
//!
//! xtask runs on whatever stable the user has; it installs these with rustup itself, so
//! nothing depends on rustup's auto-install (off with `RUSTUP_AUTO_INSTALL=0`).
//!
//! The nightly and the bpf-linker release move together: bpf-linker's default LLVM feature
//! (llvm-23 for 0.13) must be the LLVM major of the nightly.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
pub(crate) use keepalive_common::toolchain::{EBPF_NIGHTLY as NIGHTLY, HOST};
use keepalive_common::toolchain::{EBPF_NIGHTLY_COMPONENTS, HOST_COMPONENTS};

use crate::cmd::run_status;

const NIGHTLY_LLVM_MAJOR: &str = "23";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What `cargo` needs on PATH to build the agent.
#[derive(Debug)]
pub(crate) struct Toolchain {
    bpf_linker_dir: PathBuf,
}

impl Toolchain {
    /// Installs whatever is missing; a second call finds everything in place.
    pub(crate) fn ensure() -> anyhow::Result<Self> {
        if which::which("rustup").is_err() {
            bail!(
                "rustup is not installed: the workspace is built with pinned toolchains \
                 ({HOST} and {NIGHTLY}) that rustup installs; get it from https://rustup.rs"
            );
        }
        ensure_installed(HOST, HOST_COMPONENTS, "builds the agent and the tests")?;
        ensure_installed(NIGHTLY, EBPF_NIGHTLY_COMPONENTS, "builds the eBPF crate")?;
        let bpf_linker_dir = ensure_bpf_linker()?;
        crate::packages::ensure(crate::packages::BUILD)?;
        Ok(Self { bpf_linker_dir })
    }

    /// PATH with the pinned bpf-linker first.
    pub(crate) fn path(&self) -> anyhow::Result<OsString> {
        let mut dirs = vec![self.bpf_linker_dir.clone()];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::env::join_paths(dirs).context("PATH")
    }
}

/// `rustup run <toolchain> <program>`: that toolchain whatever the environment says (cargo
/// sets `RUSTUP_TOOLCHAIN` and `CARGO` to the stable that runs xtask).
pub(crate) fn rustup_run(toolchain: &str, program: &str) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", toolchain, program])
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    command
}

/// Installs `toolchain` (minimal profile) with `components` unless all are there already.
fn ensure_installed(toolchain: &str, components: &[&str], what: &str) -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .context("rustup component list")?;
    let listed = String::from_utf8_lossy(&installed.stdout);
    let has = |name: &str| listed.lines().any(|line| line.starts_with(name));
    if installed.status.success() && components.iter().all(|component| has(component)) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing {toolchain} with {} ({what})",
        components.join(", ")
    );
    run_status(
        Command::new("rustup")
            .args(["toolchain", "install", toolchain, "--profile", "minimal"])
            .arg("--component")
            .arg(components.join(",")),
    )
}

/// Adds the standard library for `target` to `toolchain` unless it is there already.
pub(crate) fn ensure_target(toolchain: &str, target: &str) -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed", "--toolchain", toolchain])
        .output()
        .context("rustup target list")?;
    if installed.status.success()
        && String::from_utf8_lossy(&installed.stdout)
            .lines()
            .any(|line| line.trim() == target)
    {
        return Ok(());
    }
    eprintln!("xtask: adding the {target} target to {toolchain} (the static agent of the image)");
    run_status(Command::new("rustup").args(["target", "add", target, "--toolchain", toolchain]))
}

/// `$XDG_CACHE_HOME/keepalive-agent` (or `~/.cache/keepalive-agent`): outlives `cargo clean`
/// and is shared by every checkout on the machine.
pub(crate) fn cache_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?,
        )
        .join(".cache"),
    };
    Ok(base.join("keepalive-agent"))
}

fn ensure_bpf_linker() -> anyhow::Result<PathBuf> {
    let root = cache_dir()?.join(format!("bpf-linker-{BPF_LINKER_VERSION}-{NIGHTLY}"));
    let bin_dir = root.join("bin");
    let llvm_lib = root.join("llvm").join("lib");
    // The binary finds libLLVM through its RUNPATH (llvm/lib), so it also runs outside rustup.
    link_nightly_llvm(&llvm_lib)?;
    if works(&bin_dir.join("bpf-linker")) {
        return Ok(bin_dir);
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {NIGHTLY}'s LLVM into {} \
         (once; about a minute)",
        root.display()
    );
    run_status(
        rustup_run(HOST, "cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--root",
            ])
            .arg(&root)
            .env("LLVM_PREFIX", root.join("llvm"))
            .env("CARGO_TARGET_DIR", root.join("build")),
    )
    .context("cannot build bpf-linker")?;
    let _ignored = fs::remove_dir_all(root.join("build"));
    ensure!(
        works(&bin_dir.join("bpf-linker")),
        "the bpf-linker just built does not run"
    );
    Ok(bin_dir)
}

fn works(bpf_linker: &Path) -> bool {
    Command::new(bpf_linker)
        .arg("--version")
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        })
}

/// `llvm/lib/libLLVM.so` and `llvm/lib/<soname>` pointing at the nightly's libLLVM.
fn link_nightly_llvm(llvm_lib: &Path) -> anyhow::Result<()> {
    let sysroot = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .output()
        .context("rustc --print sysroot")?;
    ensure!(
        sysroot.status.success(),
        "rustc +{NIGHTLY} --print sysroot failed"
    );
    let lib = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib");
    let libllvm = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&format!("libLLVM.so.{NIGHTLY_LLVM_MAJOR}")))
        })
        .with_context(|| {
            format!(
                "{NIGHTLY} ships no libLLVM.so.{NIGHTLY_LLVM_MAJOR}* in {}",
                lib.display()
            )
        })?;
    fs::create_dir_all(llvm_lib)
        .with_context(|| format!("cannot create {}", llvm_lib.display()))?;
    let soname = libllvm.file_name().context("libLLVM has no file name")?;
    for link in [llvm_lib.join("libLLVM.so"), llvm_lib.join(soname)] {
        if fs::read_link(&link).is_ok_and(|target| target == libllvm) {
            continue;
        }
        let _ignored = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), libllvm.display()))?;
    }
    Ok(())
}

/// A cargo subcommand from the crate registry, `cargo install --locked`ed at a pinned version
/// into the cache (once; `<cache>/<crate>-<version>/bin/<crate>`), built with the pinned host
/// toolchain. Returns the binary's path.
pub(crate) fn ensure_cargo_tool(krate: &str, version: &str, what: &str) -> anyhow::Result<PathBuf> {
    let root = cache_dir()?.join(format!("{krate}-{version}"));
    let binary = root.join("bin").join(krate);
    let installed = |binary: &Path| {
        Command::new(binary)
            .arg("--version")
            .output()
            .is_ok_and(|out| {
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains(version)
            })
    };
    if installed(&binary) {
        return Ok(binary);
    }
    eprintln!(
        "xtask: building {krate} {version} into {} ({what}; once)",
        root.display()
    );
    run_status(
        rustup_run(HOST, "cargo")
            .args(["install", krate, "--locked", "--version", version, "--root"])
            .arg(&root)
            .env("CARGO_TARGET_DIR", root.join("build")),
    )
    .with_context(|| format!("cannot build {krate}"))?;
    let _ignored = fs::remove_dir_all(root.join("build"));
    ensure!(installed(&binary), "the {krate} just built does not run");
    Ok(binary)
}
