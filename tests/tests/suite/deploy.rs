//! The deployment files: the Kubernetes manifests, rendered by a real `kubectl kustomize`,
//! validate offline against the API's schemas, the policy they carry checks, every command
//! line they give the agent parses, metrics are reachable from the cluster, the pod has no
//! token and the image is the one `cargo xtask image` tags; the
//! systemd unit passes systemd-analyze verify and holds its security exposure to a threshold;
//! the packages `cargo xtask dist` makes (`packages`).

#[path = "deploy/packages.rs"]
mod packages;

use std::{fs, path::Path, process::Command};

use keepalive_tests::{
    TempDir, agent_bin, image, manifests,
    repo::{assert_agent_accepts, read, root as repo},
    succeeds,
};
use serde_json::Value;

/// The base as `kubectl apply -k deploy/kubernetes` sends it, parsed.
fn base() -> Vec<Value> {
    manifests::parse(&manifests::render(&repo().join("deploy/kubernetes")))
}

fn agent_container(documents: &[Value]) -> &Value {
    let pod = &manifests::find(documents, "DaemonSet", Some("keepalive-agent"))["spec"]["template"];
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{containers:?}");
    &containers[0]
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|item| item.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_rendered_manifests_validate_offline() {
    let yaml = manifests::render(&repo().join("deploy/kubernetes"));
    let documents = manifests::parse(&yaml);
    let mut kinds: Vec<&str> = documents
        .iter()
        .map(|doc| doc["kind"].as_str().unwrap())
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["ConfigMap", "DaemonSet", "Namespace", "Service"]);
    for doc in &documents {
        assert_eq!(
            doc["metadata"]["namespace"]
                .as_str()
                .or(doc["metadata"]["name"].as_str()),
            Some("keepalive-agent"),
            "{doc}"
        );
    }
    manifests::validate(&yaml, documents.len());
}

#[test]
fn the_configmap_policy_checks_and_the_daemonset_arguments_parse() {
    let documents = base();
    let policy = manifests::find(&documents, "ConfigMap", Some("keepalive-agent-policy"))["data"]
        ["policy.toml"]
        .as_str()
        .unwrap();
    assert_eq!(policy, read("deploy/kubernetes/policy.toml"));
    succeeds(
        Command::new(agent_bin())
            .args(["check", "--config"])
            .arg(repo().join("deploy/kubernetes/policy.toml")),
    );

    let container = agent_container(&documents);
    let args = strings(&container["args"]);
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    assert!(
        args.iter().any(|arg| arg == "--persist"),
        "rolling updates must not detach"
    );
    // The kubelet expands $(NAME) from the container's env; each one used must be defined.
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|var| var["name"].as_str().unwrap())
        .collect();
    let expanded: Vec<String> = args
        .iter()
        .map(|arg| {
            env.iter().fold(arg.clone(), |arg, name| {
                arg.replace(&format!("$({name})"), "192.0.2.10")
            })
        })
        .collect();
    assert!(
        !expanded.iter().any(|arg| arg.contains("$(")),
        "undefined variables in {args:?} (env {env:?})"
    );
    assert_agent_accepts(&expanded, "daemonset.yaml");
}

#[test]
fn metrics_are_reachable_by_an_in_cluster_prometheus() {
    let documents = base();
    let container = agent_container(&documents);
    let args = strings(&container["args"]);
    // The node's address from the downward API, not the node's loopback.
    let port: u16 = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--metrics-addr=$(HOST_IP):"))
        .unwrap_or_else(|| panic!("no node-address metrics address in {args:?}"))
        .parse()
        .unwrap();
    let host_ip = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|var| var["name"] == "HOST_IP")
        .unwrap();
    assert_eq!(
        host_ip["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    let ports = container["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["name"], "metrics");
    assert_eq!(ports[0]["containerPort"], port);
    assert_eq!(ports[0]["hostPort"], port, "host network: the node's port");
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["port"], "metrics", "{probe}");
        assert!(
            get["host"].is_null(),
            "{probe} must call the pod's (node's) IP"
        );
    }

    let service = manifests::find(&documents, "Service", Some("keepalive-agent-metrics"));
    let pod_labels =
        &manifests::find(&documents, "DaemonSet", None)["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod_labels[key], value,
            "the Service selects the agents' pods"
        );
    }
    assert_eq!(
        service["spec"]["clusterIP"], "None",
        "one endpoint per node"
    );
    let service_ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(service_ports[0]["name"], "metrics");
    assert_eq!(service_ports[0]["targetPort"], "metrics");
}

#[test]
fn the_daemonset_runs_the_built_image_without_a_token_unconfined() {
    let documents = base();
    let daemonset = manifests::find(&documents, "DaemonSet", Some("keepalive-agent"));
    let pod = &daemonset["spec"]["template"];
    let container = agent_container(&documents);
    // What `cargo xtask image` tags; an overlay's `images:` points it at a registry.
    assert_eq!(container["image"], image::reference());
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(pod["spec"]["hostPID"], true);
    assert_eq!(
        pod["spec"]["securityContext"]["appArmorProfile"]["type"],
        "Unconfined"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["container.apparmor.security.beta.kubernetes.io/agent"],
        "unconfined",
        "Kubernetes before 1.30 reads the annotation"
    );
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mounts = container["volumeMounts"].as_array().unwrap();
    let containerd = mounts
        .iter()
        .find(|mount| mount["mountPath"] == "/run/containerd")
        .unwrap_or_else(|| panic!("containerd's socket directory is not mounted: {mounts:?}"));
    assert_eq!(containerd["readOnly"], true);
}

#[test]
fn the_servicemonitor_component_scrapes_the_metrics_service() {
    let (_, documents) = manifests::overlay(&["servicemonitor"]);
    let monitor = manifests::find(&documents, "ServiceMonitor", Some("keepalive-agent"));
    assert_eq!(monitor["metadata"]["namespace"], "keepalive-agent");
    let service = manifests::find(&documents, "Service", Some("keepalive-agent-metrics"));
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&service["metadata"]["labels"][key], value);
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
}

/// The components for nodes whose runtime is Docker (cri-dockerd) or CRI-O: each points the
/// agent at the runtime's socket inside a read-only mount of its directory, and validates.
#[test]
fn the_runtime_components_mount_the_socket_directory_and_parse() {
    for (component, option) in [("docker", "--docker-socket="), ("crio", "--crio-socket=")] {
        let (yaml, documents) = manifests::overlay(&[component]);
        manifests::validate(&yaml, documents.len());
        let container = agent_container(&documents);
        let args = strings(&container["args"]);
        let socket = args
            .iter()
            .find_map(|arg| arg.strip_prefix(option))
            .unwrap_or_else(|| panic!("{component}: no {option} in {args:?}"));
        let mounts = container["volumeMounts"].as_array().unwrap();
        assert!(
            mounts.iter().any(|mount| {
                mount["readOnly"] == true
                    && Path::new(socket).parent() == mount["mountPath"].as_str().map(Path::new)
            }),
            "{component}: {socket} is not in a read-only mount: {mounts:?}"
        );
    }
}

/// The highest `systemd-analyze security` exposure the unit may have (0 is best, 10 worst).
/// The hardened unit scores 3.0 (the unit before hardening scored 5.7); what is left is what
/// the agent needs: root with CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_NET_ADMIN and CAP_BPF, bpf()
/// pidfd_getfd() and perf_event_open(), the host's network, and every process's /proc entries.
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
        "ReadOnlyPaths=/sys /proc/sys /proc/sysrq-trigger -/proc/irq -/proc/bus -/proc/fs",
        "ProtectProc=invisible",
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
