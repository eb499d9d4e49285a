//! The agent's read-only commands (`scan`, `explain`) asked about a container, with the
//! engine options that point them at one engine.
#![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

use super::{Engine, TestContainer};
use crate::{AgentPlaces, agent_bin, agent_succeeds};

/// The engine options that point the agent at `engine` only; the other engines' sockets point
/// nowhere.
pub fn engine_options(places: &AgentPlaces, engine: &Engine) -> Vec<String> {
    let nowhere = places
        .state_dir()
        .join("no-engine.sock")
        .display()
        .to_string();
    let own = engine.socket_option();
    let mut args = Vec::new();
    for option in [
        "--docker-socket",
        "--podman-socket",
        "--containerd-socket",
        "--crio-socket",
    ] {
        let socket = if option == own[0] {
            own[1].clone()
        } else {
            nowhere.clone()
        };
        args.extend([option.to_string(), socket]);
    }
    args
}

/// `scan --json` of a container's cgroup names the container and its labels on each of its
/// connections, as the engine reports them, and the rule named `value` (the container carries
/// `label` = `value`, which that rule selects).
pub fn expect_scan(
    places: &AgentPlaces,
    config: &str,
    engine: &Engine,
    container: &TestContainer,
    (label, value): (&str, &str),
) {
    let mut args: Vec<String> = ["scan", "--json", "--config", config, "--cgroup"]
        .map(String::from)
        .to_vec();
    args.push(container.cgroup.as_str().to_string());
    args.extend(engine_options(places, engine));
    // Scan loads nothing: no pin directory, and the policy is the file given.
    let out = agent_succeeds(&args);
    let connections: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|object| object.get("local").is_some())
        .collect();
    assert!(connections.len() >= 2, "scan found {connections:#?}");
    for connection in &connections {
        assert!(
            connection["container"]
                .as_str()
                .is_some_and(|name| !name.is_empty())
                && connection["labels"][label] == value
                && connection["rule"] == value,
            "scan of container {}: {connection:#}",
            container.id
        );
    }
}

/// `explain` of a container's connection (to port 8000) names the rule `value`, which the agent
/// applies to it.
pub fn expect_explain(
    places: &AgentPlaces,
    config: &str,
    engine: &Engine,
    cgroup: &keepalive_agent::CgroupPath,
    value: &str,
) {
    let mut args: Vec<String> = ["explain", "--config", config, "--remote", "127.0.0.1:8000"]
        .map(String::from)
        .to_vec();
    args.extend(["--cgroup".to_string(), cgroup.as_str().to_string()]);
    args.extend(engine_options(places, engine));
    let out = std::process::Command::new(agent_bin())
        .args(&args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("decided by: rule {value:?}")),
        "explain of cgroup {cgroup}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
