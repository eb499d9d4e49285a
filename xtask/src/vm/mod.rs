//! The kernel matrix: the privileged integration suite inside qemu guests booting Debian's
//! 5.10, 6.1 and 6.12 kernels, with pure cgroup v2 at /sys/fs/cgroup (see `vm/guest.sh`).

mod debian;
mod guest;
mod suite;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use self::debian::Kernel;
pub(crate) use self::debian::MATRIX;
use crate::packages;

/// What a guest may take before it is stopped: the suite takes about 5 minutes under emulation.
const SUITE_DEADLINE: Duration = Duration::from_secs(25 * 60);
const COMMAND_DEADLINE: Duration = Duration::from_secs(10 * 60);

/// What the guests need on the host.
pub(crate) const PACKAGES: &[packages::Need] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("depmod", "kmod"),
    ("xz", "xz-utils"),
];

/// Where the tests run: this host, or guests of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Targets {
    pub(crate) host: bool,
    pub(crate) kernels: Vec<Kernel>,
}

/// `host`, a kernel of the matrix (`5.10`, `6.1`, `6.12`) or `all` (the three), any number.
pub(crate) fn targets(names: &[String]) -> anyhow::Result<Targets> {
    let mut targets = Targets {
        host: false,
        kernels: Vec::new(),
    };
    for name in names {
        match name.as_str() {
            "host" => targets.host = true,
            "all" => targets.kernels.extend(MATRIX),
            other => match MATRIX.iter().find(|kernel| kernel.name == other) {
                Some(kernel) => targets.kernels.push(*kernel),
                None => bail!(
                    "--kernel {other}: not a kernel of the matrix; use host, all, or one of {}",
                    MATRIX
                        .iter()
                        .map(|kernel| kernel.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }
    targets.kernels.dedup();
    Ok(targets)
}

/// One guest's run of the suite.
#[derive(Debug)]
struct Report {
    kernel: Kernel,
    release: String,
    version: String,
    boot_secs: String,
    suite_secs: u64,
    counts: suite::Counts,
    failed_binaries: Vec<String>,
    features: String,
    ok: bool,
}

/// Runs the integration suite (`only`: just these test binaries) in a guest of each kernel.
pub(crate) fn test_matrix(
    workspace: &Path,
    cargo: impl Fn() -> anyhow::Result<Command>,
    agent: &Path,
    kernels: &[Kernel],
    only: &[String],
    libtest_args: &[String],
) -> anyhow::Result<()> {
    packages::ensure(PACKAGES)?;
    let binaries = test_binaries(cargo()?)?;
    let mut selected = Vec::new();
    for (name, binary) in binaries {
        if !only.is_empty() && !only.contains(&name) {
            continue;
        }
        if let Some(reason) = suite::host_only(&name) {
            eprintln!("xtask: not in the guests: {name}: {reason}");
            continue;
        }
        selected.push((name, binary));
    }
    let cache = crate::toolchain::cache_dir()?.join("kernels");
    let mut reports = Vec::new();
    for kernel in kernels {
        let unpacked = debian::fetch(*kernel, &cache)?;
        eprintln!(
            "xtask: kernel {} ({} {}): {} test binaries in a guest",
            kernel.name,
            unpacked.release,
            unpacked.version,
            selected.len()
        );
        let out = vm_dir(workspace).join(kernel.name);
        let script = suite::script(&selected, agent, libtest_args);
        let outcome = guest::run(&unpacked, &out, workspace, &script, SUITE_DEADLINE)?;
        let (runs, counts) = suite::results(&outcome.out);
        let failed_binaries: Vec<String> = selected
            .iter()
            .filter(|(name, _)| !runs.iter().any(|(ran, rc, _)| ran == name && *rc == 0))
            .map(|(name, _)| name.clone())
            .collect();
        reports.push(Report {
            kernel: *kernel,
            release: unpacked.release,
            version: unpacked.version,
            boot_secs: read(&outcome.out, "boot-seconds"),
            suite_secs: runs.iter().map(|(_, _, secs)| secs).sum(),
            counts,
            features: read(&outcome.out, "features"),
            ok: outcome.status == Some(0) && failed_binaries.is_empty(),
            failed_binaries,
        });
        eprintln!(
            "xtask: kernel {} guest done in {} s",
            kernel.name,
            outcome.wall.as_secs()
        );
    }
    print_summary(&reports);
    if let Some(failed) = reports.iter().find(|report| !report.ok) {
        bail!(
            "the suite failed on kernel {} ({}): {}",
            failed.kernel.name,
            failed.release,
            if failed.failed_binaries.is_empty() {
                "the guest did not report".to_owned()
            } else {
                failed.failed_binaries.join(", ")
            }
        );
    }
    Ok(())
}

#[expect(
    clippy::print_stdout,
    reason = "the matrix's result table is the command's output"
)]
fn print_summary(reports: &[Report]) {
    println!("{}", summary(reports));
}

fn summary(reports: &[Report]) -> String {
    let mut text = String::from(
        "\nkernel matrix\n| kernel | release (Debian package) | boot s | suite s | passed | failed | \
         ignored | kernel features |\n|---|---|---:|---:|---:|---:|---:|---|\n",
    );
    let (mut passed, mut failed) = (0, 0);
    for report in reports {
        let _ = writeln!(
            text,
            "| {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
            report.kernel.name,
            report.release,
            report.version,
            report.boot_secs,
            report.suite_secs,
            report.counts.passed,
            report.counts.failed,
            report.counts.ignored,
            report.features,
        );
        passed += report.counts.passed;
        failed += report.counts.failed;
    }
    for (name, reason) in suite::HOST_ONLY {
        let _ = writeln!(text, "not run in the guests: {name}: {reason}");
    }
    let _ = write!(text, "kernel matrix: {passed} passed, {failed} failed");
    text
}

/// Boots `kernel` and runs `command` (bash) in the workspace inside it; fails unless it exits 0.
pub(crate) fn run_command(workspace: &Path, kernel: Kernel, command: &str) -> anyhow::Result<()> {
    packages::ensure(PACKAGES)?;
    let cache = crate::toolchain::cache_dir()?.join("kernels");
    let unpacked = debian::fetch(kernel, &cache)?;
    let out = vm_dir(workspace).join(format!("{}-command", kernel.name));
    let outcome = guest::run(&unpacked, &out, workspace, command, COMMAND_DEADLINE)?;
    match outcome.status {
        Some(0) => Ok(()),
        Some(status) => bail!(
            "the command exited {status} in the {} guest",
            unpacked.release
        ),
        None => bail!(
            "the {} guest did not report an exit status",
            unpacked.release
        ),
    }
}

/// The integration test binaries (tests/tests/*.rs), built, by name.
fn test_binaries(mut cargo: Command) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = cargo
        .args([
            "test",
            "--locked",
            "--no-run",
            "--package",
            "keepalive-tests",
        ])
        .args(["--tests", "--message-format=json-render-diagnostics"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot build the test binaries")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let target = &message["target"];
        let is_test = target["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|kind| kind == "test"));
        if let (true, Some(name), Some(path)) = (
            is_test,
            target["name"].as_str(),
            message["executable"].as_str(),
        ) {
            binaries.push((name.to_owned(), PathBuf::from(path)));
        }
    }
    binaries.sort();
    if binaries.is_empty() {
        bail!("cargo built no integration test binaries");
    }
    Ok(binaries)
}

fn vm_dir(workspace: &Path) -> PathBuf {
    crate::target_dir(workspace).join("vm")
}

fn read(out: &Path, name: &str) -> String {
    std::fs::read_to_string(out.join(name))
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}
