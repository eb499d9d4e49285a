//! The kernel matrix: the privileged integration suite inside qemu guests booting Debian's
//! 5.10, 6.1 and 6.12 kernels, with pure cgroup v2 at /sys/fs/cgroup (see `vm/guest.sh`); and
//! the systemd guests: Debian 12's kernel booting systemd as PID 1 (the host root's 252, then
//! bookworm-backports' 254), where the `systemd` tests install the .deb and drive its unit.

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
use self::guest::{Init, Systemd};
use crate::{arch::Arch, packages};

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

/// The systemd guest's kernel: Debian 12's, as the systemd of the host root (252) is.
const SYSTEMD_KERNEL: Kernel = MATRIX[1];

/// The suite's module (tests/tests/suite/systemd.rs) that runs in the systemd guest, and only
/// there.
const SYSTEMD_TESTS: &str = "systemd";

/// Where the tests run: this host, guests of the matrix, the systemd guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Targets {
    pub(crate) host: bool,
    pub(crate) kernels: Vec<Kernel>,
    pub(crate) systemd: bool,
}

/// `host`, a kernel of the matrix (`5.10`, `6.1`, `6.12`, `arm64-5.10`, `arm64-6.1`,
/// `arm64-6.12`), `systemd`, `amd64` or `arm64` (that architecture's three kernels), or `all`
/// (the six kernels and systemd), any number.
pub(crate) fn targets(names: &[String]) -> anyhow::Result<Targets> {
    let mut targets = Targets {
        host: false,
        kernels: Vec::new(),
        systemd: false,
    };
    let of = |arch: Arch| {
        MATRIX
            .iter()
            .copied()
            .filter(move |kernel| kernel.arch == arch)
    };
    for name in names {
        match name.as_str() {
            "host" => targets.host = true,
            "systemd" => targets.systemd = true,
            "all" => {
                targets.kernels.extend(MATRIX);
                targets.systemd = true;
            }
            "amd64" => targets.kernels.extend(of(Arch::X86_64)),
            "arm64" => targets.kernels.extend(of(Arch::Aarch64)),
            other => match MATRIX.iter().find(|kernel| kernel.name == other) {
                Some(kernel) => targets.kernels.push(*kernel),
                None => bail!(
                    "--kernel {other}: not a kernel of the matrix; use host, all, amd64, arm64, \
                     systemd, or one of {}",
                    MATRIX
                        .iter()
                        .map(|kernel| kernel.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }
    let mut seen = Vec::new();
    targets.kernels.retain(|kernel| {
        let new = !seen.contains(kernel);
        seen.push(*kernel);
        new
    });
    Ok(targets)
}

/// The suite's modules that run in the guests of one architecture's kernels, and its agent.
#[derive(Debug)]
struct Suite {
    selected: Vec<suite::Run>,
    /// The agent, and the packages where they are tested there.
    env: Vec<(&'static str, PathBuf)>,
}

impl Suite {
    /// Its variables as [`suite::script`] takes them.
    fn env(&self) -> Vec<(&str, &Path)> {
        self.env
            .iter()
            .map(|(name, value)| (*name, value.as_path()))
            .collect()
    }
}

/// One guest's run of the suite.
#[derive(Debug)]
struct Report {
    kernel: Kernel,
    init: Init,
    /// `uname -m` in the guest.
    machine: String,
    release: String,
    version: String,
    boot_secs: String,
    suite_secs: u64,
    counts: suite::Counts,
    failed_modules: Vec<String>,
    features: String,
    ok: bool,
}

/// The guests' part of `cargo xtask test`.
pub(crate) struct Matrix<'a> {
    pub(crate) workspace: &'a Path,
    /// Just these modules of the suite (all when empty).
    pub(crate) only: &'a [String],
    /// libtest's arguments for each module's run.
    pub(crate) libtest_args: &'a [String],
    /// `cargo xtask dist` for an architecture: its guests run the packages' agent, the systemd
    /// guests install the .deb, another architecture's guests install both packages.
    pub(crate) dist: &'a dyn Fn(Arch) -> anyhow::Result<crate::dist::Packages>,
}

/// Runs the integration suite in a guest of each kernel, then the systemd tests in the systemd
/// guest when `systemd`.
pub(crate) fn test_matrix(
    matrix: &Matrix<'_>,
    cargo: impl Fn() -> anyhow::Result<Command>,
    kernels: &[Kernel],
    systemd: bool,
) -> anyhow::Result<()> {
    packages::ensure(PACKAGES)?;
    let host = Arch::host()?;
    let modules = crate::suite::modules(matrix.workspace)?;
    let selected_modules = crate::suite::select(matrix.only, &modules)?;
    let mut suites: Vec<(Arch, Suite)> = Vec::new();
    let mut systemd_tests = Vec::new();
    for arch in Arch::ALL {
        let wanted = kernels.iter().any(|kernel| kernel.arch == arch);
        if !wanted && !(systemd && arch == host) {
            continue;
        }
        if arch != host {
            packages::ensure(&[(guest::qemu_program(arch), "qemu-system-arm")])?;
        }
        // The guests test what ships: the packages' static release agent.
        let packages = (matrix.dist)(arch)?;
        let env = vec![
            ("KEEPALIVE_AGENT_BIN", packages.agent),
            ("KA_AGENT_DEB", packages.deb),
            ("KA_AGENT_RPM", packages.rpm),
        ];
        let binary = suite_binary(cargo()?, arch)?;
        let (package_tests, package_filters) = suite::FOREIGN_PACKAGE_TESTS;
        let mut selected: Vec<suite::Run> = Vec::new();
        for name in &modules {
            let mut args = crate::suite::only(name, &modules);
            let name = name.clone();
            if name == SYSTEMD_TESTS {
                if arch == host {
                    systemd_tests.push((name, binary.clone(), args));
                }
                continue;
            }
            if !selected_modules.contains(&name) {
                continue;
            }
            if arch != host && name == package_tests {
                args.extend(package_filters.iter().map(|filter| (*filter).to_owned()));
                selected.push((name, binary.clone(), args));
                continue;
            }
            let skipped = suite::host_only(&name).or_else(|| {
                (arch != host)
                    .then(|| suite::same_on_every_architecture(&name))
                    .flatten()
            });
            if let Some(reason) = skipped {
                if wanted {
                    eprintln!(
                        "xtask: not in the {} guests: {name}: {reason}",
                        arch.debian()
                    );
                }
                continue;
            }
            selected.push((name, binary.clone(), args));
        }
        suites.push((arch, Suite { selected, env }));
    }
    let suite_of = |arch: Arch| {
        suites
            .iter()
            .find(|(built, _)| *built == arch)
            .map(|(_, suite)| suite)
            .context("the suite was not built for this architecture")
    };
    let mut runs: Vec<(Kernel, Init, String)> = Vec::new();
    for kernel in kernels {
        let suite = suite_of(kernel.arch)?;
        let script = suite::script(&suite.selected, &suite.env(), matrix.libtest_args);
        runs.push((*kernel, Init::Script, script));
    }
    if systemd {
        let env = suite_of(host)?.env();
        // Its tests are #[ignore]d elsewhere: they need systemd as PID 1.
        let mut args = vec!["--include-ignored".to_owned()];
        args.extend(matrix.libtest_args.iter().cloned());
        let script = suite::script(&systemd_tests, &env, &args);
        for which in [Systemd::Host, Systemd::Backports] {
            runs.push((SYSTEMD_KERNEL, Init::Systemd(which), script.clone()));
        }
    }
    let cache = crate::toolchain::cache_dir()?.join("kernels");
    let mut reports = Vec::new();
    for (kernel, init, script) in runs {
        let unpacked = debian::fetch(kernel, &cache)?;
        let userland = if kernel.arch == host {
            None
        } else {
            Some(debian::fetch_root(kernel.arch, &cache)?)
        };
        let systemd_root = match init {
            Init::Systemd(Systemd::Backports) => Some(debian::fetch_systemd(&cache)?),
            _ => None,
        };
        let env: Vec<(&str, &Path)> = systemd_root
            .iter()
            .map(|root| ("KA_VM_SYSTEMD_ROOT", root.as_path()))
            .collect();
        let label = guest_label(kernel, init);
        eprintln!(
            "xtask: {label} guest ({} {})",
            unpacked.release, unpacked.version
        );
        let out = vm_dir(matrix.workspace).join(&label);
        let outcome = guest::run(
            &unpacked,
            userland.as_deref(),
            init,
            &env,
            &out,
            matrix.workspace,
            &script,
            SUITE_DEADLINE,
        )?;
        let machine = read(&outcome.out, "machine");
        let (runs, counts) = suite::results(&outcome.out);
        let expected = if matches!(init, Init::Systemd(_)) {
            &systemd_tests
        } else {
            &suite_of(kernel.arch)?.selected
        };
        let failed_modules: Vec<String> = expected
            .iter()
            .filter(|(name, ..)| !runs.iter().any(|(ran, rc, _)| ran == name && *rc == 0))
            .map(|(name, ..)| name.clone())
            .collect();
        reports.push(Report {
            kernel,
            init,
            machine: machine.clone(),
            release: unpacked.release,
            version: unpacked.version,
            boot_secs: read(&outcome.out, "boot-seconds"),
            suite_secs: runs.iter().map(|(_, _, secs)| secs).sum(),
            counts,
            features: match init {
                Init::Script => read(&outcome.out, "features"),
                Init::Systemd(Systemd::Host) => "the host root's systemd as PID 1".to_owned(),
                Init::Systemd(Systemd::Backports) => {
                    "bookworm-backports' systemd as PID 1".to_owned()
                }
            },
            // A guest of the wrong architecture proves nothing of its own.
            ok: outcome.status == Some(0)
                && failed_modules.is_empty()
                && machine == kernel.arch.uname(),
            failed_modules,
        });
        eprintln!("xtask: {label} guest done in {} s", outcome.wall.as_secs());
    }
    print_summary(&reports);
    if let Some(failed) = reports.iter().find(|report| !report.ok) {
        bail!(
            "the suite failed in the {} guest ({}): {}",
            guest_label(failed.kernel, failed.init),
            failed.release,
            if failed.failed_modules.is_empty() {
                "the guest did not report".to_owned()
            } else {
                failed.failed_modules.join(", ")
            }
        );
    }
    Ok(())
}

/// `6.1`, or `systemd-6.1` and `systemd-backports-6.1` for the systemd guests.
fn guest_label(kernel: Kernel, init: Init) -> String {
    match init {
        Init::Script => kernel.name.to_owned(),
        Init::Systemd(Systemd::Host) => format!("systemd-{}", kernel.name),
        Init::Systemd(Systemd::Backports) => format!("systemd-backports-{}", kernel.name),
    }
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
        "\nkernel matrix\n| kernel | machine | release (Debian package) | boot s | suite s | passed | \
         failed | ignored | kernel features |\n|---|---|---|---:|---:|---:|---:|---:|---|\n",
    );
    let (mut passed, mut failed) = (0, 0);
    for report in reports {
        let _ = writeln!(
            text,
            "| {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
            guest_label(report.kernel, report.init),
            report.machine,
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
    let host = Arch::host().ok();
    if reports
        .iter()
        .any(|report| Some(report.kernel.arch) != host)
    {
        let (name, filters) = suite::FOREIGN_PACKAGE_TESTS;
        let _ = writeln!(
            text,
            "in the guests of another architecture, from {name}: {} (that architecture's \
             packages)",
            filters.join(", ")
        );
        for (name, reason) in suite::SAME_ON_EVERY_ARCHITECTURE {
            let _ = writeln!(
                text,
                "not run in the guests of another architecture: {name}: {reason} (the same code \
                 as on x86-64)"
            );
        }
    }
    let _ = writeln!(
        text,
        "only in the systemd guest: {SYSTEMD_TESTS}: installs the .deb and drives the unit \
         with systemd as PID 1"
    );
    let _ = write!(text, "kernel matrix: {passed} passed, {failed} failed");
    text
}

/// Boots the one guest of `targets` and runs `command` (bash) in the workspace inside it; fails
/// unless it exits 0.
pub(crate) fn run_command(
    workspace: &Path,
    targets: &Targets,
    command: &str,
) -> anyhow::Result<()> {
    let (kernel, init) = match (targets.kernels.as_slice(), targets.systemd) {
        ([kernel], false) => (*kernel, Init::Script),
        ([], true) => (SYSTEMD_KERNEL, Init::Systemd(Systemd::Host)),
        _ => bail!("--kernel takes one guest here: a kernel of the matrix, or systemd"),
    };
    packages::ensure(PACKAGES)?;
    let cache = crate::toolchain::cache_dir()?.join("kernels");
    let unpacked = debian::fetch(kernel, &cache)?;
    let userland = if kernel.arch == Arch::host()? {
        None
    } else {
        packages::ensure(&[(guest::qemu_program(kernel.arch), "qemu-system-arm")])?;
        Some(debian::fetch_root(kernel.arch, &cache)?)
    };
    let out = vm_dir(workspace).join(format!("{}-command", guest_label(kernel, init)));
    let outcome = guest::run(
        &unpacked,
        userland.as_deref(),
        init,
        &[],
        &out,
        workspace,
        command,
        COMMAND_DEADLINE,
    )?;
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

/// The integration suite built for `arch`: a static musl binary in the release profile, as the
/// agent the packages ship (they share its dependencies' build, and it runs two to three times
/// faster under emulation than a debug build).
fn suite_binary(mut cargo: Command, arch: Arch) -> anyhow::Result<PathBuf> {
    cargo.args(["test", "--release"]);
    arch.static_target(&mut cargo)?;
    crate::suite::build(cargo)
}

fn vm_dir(workspace: &Path) -> PathBuf {
    crate::target_dir(workspace).join("vm")
}

fn read(out: &Path, name: &str) -> String {
    std::fs::read_to_string(out.join(name))
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}
