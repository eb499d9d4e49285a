//! The deployment files: the Kubernetes manifests validate offline against the API's schemas,
//! the policy they carry checks, and every command line they give the agent parses; the
//! systemd unit passes systemd-analyze verify.
#![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use keepalive_tests::{agent_bin, unique_name};

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
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let dir = std::env::temp_dir().join(unique_name());
    fs::create_dir(&dir).unwrap();
    let copy = dir.join("keepalive-agent.service");
    fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/keepalive-agent",
            &agent_bin().display().to_string(),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze (Debian package systemd): {e}"));
    let _ignored = fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("keepalive-agent"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {stderr}"
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
