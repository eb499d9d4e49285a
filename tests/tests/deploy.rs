//! The deployment files: the Kubernetes manifests validate offline against the API's schemas,
//! the policy they carry checks, and every command line they give the agent parses; the
//! systemd unit passes systemd-analyze verify and holds its security exposure to a threshold.
#![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use keepalive_tests::{TempDir, agent_bin};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &str) -> String {
    fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs the agent with `args` and `--help` appended: clap rejects any unknown or malformed
/// flag before it prints the help.
fn assert_agent_accepts(args: &[String], source: &str) {
    let out = Command::new(agent_bin())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{source}: keepalive-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_manifests_validate_offline() {
    let tool = std::env::var_os("KUBERNETES_VALIDATE")
        .map_or_else(|| PathBuf::from("kubernetes-validate"), PathBuf::from);
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    let resources: Vec<String> = kustomization
        .lines()
        .skip_while(|line| !line.starts_with("resources:"))
        .skip(1)
        .take_while(|line| line.trim_start().starts_with("- "))
        .map(|line| line.trim_start().trim_start_matches("- ").to_string())
        .collect();
    assert!(
        resources.contains(&"daemonset.yaml".to_string()),
        "{resources:?}"
    );
    let files: Vec<PathBuf> = resources
        .iter()
        .map(|file| repo().join("deploy/kubernetes").join(file))
        .collect();
    let out = Command::new(&tool)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (PyPI kubernetes-validate; cargo xtask test installs it): {e}",
                tool.display()
            )
        });
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches(" passed ")
            .count(),
        files.len()
    );
}

#[test]
fn the_configmap_policy_checks_and_the_daemonset_arguments_parse() {
    let check = Command::new(agent_bin())
        .args(["check", "--config"])
        .arg(repo().join("deploy/kubernetes/policy.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let daemonset = read("deploy/kubernetes/daemonset.yaml");
    let args: Vec<String> = daemonset
        .lines()
        .skip_while(|line| line.trim() != "args:")
        .skip(1)
        .filter(|line| !line.trim_start().starts_with('#'))
        .take_while(|line| line.trim_start().starts_with("- "))
        .map(|line| line.trim_start().trim_start_matches("- ").to_string())
        .collect();
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    assert!(
        args.iter().any(|arg| arg == "--persist"),
        "rolling updates must not detach"
    );
    assert_agent_accepts(&args, "daemonset.yaml");
    let port = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--metrics-addr=127.0.0.1:"))
        .unwrap_or_else(|| panic!("no loopback metrics address in {args:?}"));
    assert_eq!(
        daemonset.matches(&format!("port: {port}")).count(),
        2,
        "both probes use the metrics port"
    );
}

/// The highest `systemd-analyze security` exposure the unit may have (0 is best, 10 worst).
/// The hardened unit scores 3.0 (the unit before hardening scored 5.7); what is left is what
/// the agent needs: root with CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_NET_ADMIN and CAP_BPF, bpf()
/// and pidfd_getfd(), the host's network, and every process's /proc entries.
const SECURITY_THRESHOLD: f64 = 3.0;

/// The major version of the systemd whose `systemd-analyze` runs the tests.
fn systemd_version() -> u32 {
    let out = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze (Debian package systemd): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|version| version.parse().ok())
        .unwrap_or_else(|| panic!("no version in {text}"))
}

/// `systemd-analyze verify` on a copy of the unit (and its drop-ins) that runs the agent
/// under test: the lines about our unit it printed.
fn verify_unit(dropins: &[&str]) -> Vec<String> {
    let unit = read("deploy/systemd/keepalive-agent.service");
    let dir = TempDir::new();
    let copy = dir.join("keepalive-agent.service");
    fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/keepalive-agent",
            &agent_bin().display().to_string(),
        ),
    )
    .unwrap();
    if !dropins.is_empty() {
        let dropin_dir = dir.join("keepalive-agent.service.d");
        fs::create_dir(&dropin_dir).unwrap();
        for dropin in dropins {
            let name = Path::new(dropin).file_name().unwrap();
            fs::write(dropin_dir.join(name), read(dropin)).unwrap();
        }
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze (Debian package systemd): {e}"));
    drop(dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    stderr
        .lines()
        .filter(|line| line.contains("keepalive-agent"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_systemd_unit_verifies_and_its_commands_parse() {
    let unit = read("deploy/systemd/keepalive-agent.service");
    for key in ["ExecStart=", "ExecStartPre="] {
        let line = unit.lines().find(|line| line.starts_with(key)).unwrap();
        let args: Vec<String> = line
            .split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect();
        assert_agent_accepts(&args, key);
    }
    let settings: Vec<&str> = unit.lines().filter(|line| !line.starts_with('#')).collect();
    for setting in [
        "Type=notify-reload",
        "WatchdogSec=30s",
        "LimitMEMLOCK=infinity",
        "ProtectControlGroups=yes",
        "ProtectKernelTunables=yes",
        "RestrictNamespaces=net",
        "ReadWritePaths=/sys/fs/bpf",
    ] {
        assert!(settings.contains(&setting), "{setting} is missing");
    }
    // notify-reload sends SIGHUP itself and waits for READY=1.
    assert!(!unit.contains("ExecReload="));
    let ours = verify_unit(&[]);
    // systemd 252 and older do not know notify-reload: the drop-in for them must apply cleanly.
    if systemd_version() < 253 {
        assert!(
            ours.iter()
                .all(|line| line.contains("Failed to parse service type, ignoring: notify-reload")),
            "systemd-analyze verify: {ours:?}"
        );
    } else {
        assert!(ours.is_empty(), "systemd-analyze verify: {ours:?}");
    }
    let with_dropin =
        verify_unit(&["deploy/systemd/keepalive-agent.service.d/before-systemd-253.conf"]);
    assert!(
        with_dropin
            .iter()
            .all(|line| line.contains("Failed to parse service type, ignoring: notify-reload")),
        "systemd-analyze verify with the drop-in: {with_dropin:?}"
    );
}

#[test]
fn the_systemd_unit_is_hardened_to_the_threshold() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(repo().join("deploy/systemd/keepalive-agent.service"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze (Debian package systemd): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = stdout
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for keepalive-agent.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        exposure <= SECURITY_THRESHOLD,
        "exposure {exposure} is above {SECURITY_THRESHOLD}:\n{stdout}"
    );
}

#[test]
fn the_container_image_command_parses() {
    let dockerfile = read("deploy/Dockerfile");
    let cmd = dockerfile
        .lines()
        .find(|line| line.starts_with("CMD "))
        .unwrap();
    let args: Vec<String> = cmd
        .trim_start_matches("CMD ")
        .trim_matches(['[', ']'])
        .split(',')
        .map(|arg| arg.trim().trim_matches('"').to_string())
        .collect();
    assert_agent_accepts(&args, "Dockerfile CMD");
}
