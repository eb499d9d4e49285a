//! Real container engines (dockerd, containerd, podman), started by the tests: rules keyed by
//! container labels, resolved by the agent through the engines' APIs, hold on the sockets of
//! real containers, read back from the containers' own processes.

use std::{path::PathBuf, time::Duration};

use keepalive_tests::{
    AgentPlaces, TestCgroup, agent_bin,
    engines::{
        Engine, SERVE_AND_CONNECT, TestContainer, agent_container_args, connected_sockets,
        engine_options, expect_explain, expect_idle, expect_scan,
    },
    poll, require_host, unique_name, wait_for,
};

const NAMESPACE: &str = "io.kubernetes.pod.namespace";
const LOG_WAIT: Duration = Duration::from_secs(30);

/// The policy of the issue: `scope` enforced with idle 60 s, pods of namespace payments 11 s,
/// and a rule whose labels no container has.
fn policy_file(scope: &str) -> (PathBuf, TempFile) {
    let path = std::env::temp_dir().join(format!("{}.toml", unique_name()));
    std::fs::write(
        &path,
        format!(
            r#"[agent]
cgroups = ["{scope}"]

[default]
idle = "60s"

[[rule]]
name = "payments"
labels = {{ "{NAMESPACE}" = "payments" }}
idle = "11s"

[[rule]]
name = "nobody"
labels = {{ "{NAMESPACE}" = "nobody-has-this" }}
idle = "22s"
"#
        ),
    )
    .unwrap();
    (path.clone(), TempFile(path))
}

/// Removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ignored = std::fs::remove_file(&self.0);
    }
}

/// Waits until the container's client and server sockets exist.
fn wait_connected(container: &TestContainer) {
    wait_for(
        &format!("the sockets of container {}", container.id),
        LOG_WAIT,
        || (connected_sockets(&container.cgroup).len() >= 2).then_some(()),
    );
}

/// The agent following only `engine`.
fn spawn_agent(places: &AgentPlaces, config: &str, engine: &Engine) -> keepalive_tests::Workload {
    let mut args: Vec<String> = ["run", "--config", config].map(String::from).to_vec();
    args.extend(engine_options(places, engine));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    places.spawn(agent_bin(), &refs)
}

fn status_rules(places: &AgentPlaces) -> Vec<serde_json::Value> {
    let out = places.command(agent_bin(), &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["rules"].as_array().cloned().unwrap_or_default()
}

/// `status` names the cgroups of the payments containers, and says the rule nobody matches
/// applies to nothing.
fn expect_status(places: &AgentPlaces, payments: &[&TestContainer]) {
    let mut rules = Vec::new();
    let settled = poll(LOG_WAIT, || {
        rules = status_rules(places);
        let described = |name: &str| {
            rules
                .iter()
                .find(|rule| rule["name"] == name)
                .and_then(|rule| rule["containers"].as_str().map(str::to_string))
                .unwrap_or_default()
        };
        (payments
            .iter()
            .all(|container| described("payments").contains(container.cgroup.as_str()))
            && described("nobody").contains("applies to nothing"))
        .then_some(())
    });
    assert!(settled.is_some(), "status rules: {rules:#?}");
}

/// The whole scenario on one engine: containers started before the agent (the
/// existing-connections path) and after it (new connections), namespace payments and shop.
fn scenario(mut engine: Engine, scope: &str, parent: Option<&str>) {
    let before_pay = engine.run(
        "pay-before",
        &[(NAMESPACE, "payments")],
        parent,
        SERVE_AND_CONNECT,
    );
    let before_shop = engine.run(
        "shop-before",
        &[(NAMESPACE, "shop")],
        parent,
        SERVE_AND_CONNECT,
    );
    wait_connected(&before_pay);
    wait_connected(&before_shop);
    assert!(
        connected_sockets(&before_pay.cgroup)
            .iter()
            .all(|socket| !socket.enabled),
        "no keepalive before the agent"
    );

    let places = AgentPlaces::new();
    let (config, _file) = policy_file(scope);
    let agent = spawn_agent(&places, &config.display().to_string(), &engine);
    agent.expect_log("following the container engine", LOG_WAIT);
    expect_idle(
        "payments, started before the agent",
        &before_pay.cgroup,
        2,
        11,
    );
    expect_idle("shop, started before the agent", &before_shop.cgroup, 2, 60);

    let after_pay = engine.run(
        "pay-after",
        &[(NAMESPACE, "payments")],
        parent,
        SERVE_AND_CONNECT,
    );
    let after_shop = engine.run(
        "shop-after",
        &[(NAMESPACE, "shop")],
        parent,
        SERVE_AND_CONNECT,
    );
    expect_idle(
        "payments, started after the agent",
        &after_pay.cgroup,
        2,
        11,
    );
    expect_idle("shop, started after the agent", &after_shop.cgroup, 2, 60);
    expect_status(&places, &[&before_pay, &after_pay]);
    expect_scan(
        &places,
        &config.display().to_string(),
        &engine,
        &before_pay,
        (NAMESPACE, "payments"),
    );
    expect_explain(
        &places,
        &config.display().to_string(),
        &engine,
        &before_pay.cgroup,
        "payments",
    );

    // A container that stops is followed: its rule no longer names its cgroup.
    engine.remove(&after_pay.id);
    let gone = poll(LOG_WAIT, || {
        let rules = status_rules(&places);
        let payments = rules.iter().find(|rule| rule["name"] == "payments")?;
        let text = payments["containers"].as_str()?;
        (!text.contains(after_pay.cgroup.as_str())).then_some(())
    });
    assert!(
        gone.is_some(),
        "the stopped container's cgroup is still in the rule"
    );
    drop(agent);
}

#[test]
fn docker_containers_get_the_rule_of_their_labels() {
    require_host();
    scenario(Engine::docker(), "/docker/*", None);
}

#[test]
fn podman_containers_get_the_rule_of_their_labels() {
    require_host();
    scenario(Engine::podman(), "/libpod_parent/*", None);
}

#[test]
fn containerd_pods_get_the_rule_of_their_kubernetes_namespace() {
    require_host();
    // Kubelet-like paths: <pods>/pod-<name>/<container>, in a cgroup of the test's own.
    let pods = TestCgroup::new();
    let parent = format!("{}/pod-{}", pods.scope(), std::process::id());
    scenario(Engine::containerd(), pods.scope().as_str(), Some(&parent));
}

/// A container's log (standard error, then output).
fn logs(engine: &Engine, id: &str) -> String {
    let out = engine.cli(&["logs", id]).output().unwrap();
    String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
}

/// The agent's image (`cargo xtask image`, env `KA_AGENT_IMAGE`) run by Docker the way the
/// DaemonSet runs it: host PID and cgroup namespaces, a bpffs and /sys/fs/cgroup from the
/// host, the engine's socket mounted at its default path, capabilities instead of
/// `--privileged` (which this kernel refuses: see docs/operations.md).
#[test]
fn the_agent_image_as_a_container_enforces_by_labels() {
    require_host();
    let archive = keepalive_tests::image::archive();
    let mut docker = Engine::docker();
    docker.run_cli(&["load", "--input", &archive.display().to_string()]);
    let before_pay = docker.run(
        "pay-before",
        &[(NAMESPACE, "payments")],
        None,
        SERVE_AND_CONNECT,
    );
    let before_shop = docker.run(
        "shop-before",
        &[(NAMESPACE, "shop")],
        None,
        SERVE_AND_CONNECT,
    );
    wait_connected(&before_pay);
    wait_connected(&before_shop);

    let places = AgentPlaces::new();
    places.mount_bpffs();
    let (config, _file) = policy_file("/docker/*");
    std::fs::create_dir_all(places.state_dir()).unwrap();
    let args = agent_container_args(&docker, &places, &config);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = docker.run_raw(&refs);
    let following = poll(LOG_WAIT, || {
        logs(&docker, &agent)
            .contains("following the container engine")
            .then_some(())
    });
    assert!(
        following.is_some(),
        "the agent container did not follow Docker: {}",
        logs(&docker, &agent)
    );
    expect_idle(
        "payments, started before the agent container",
        &before_pay.cgroup,
        2,
        11,
    );
    expect_idle(
        "shop, started before the agent container",
        &before_shop.cgroup,
        2,
        60,
    );
    let after_pay = docker.run(
        "pay-after",
        &[(NAMESPACE, "payments")],
        None,
        SERVE_AND_CONNECT,
    );
    let after_shop = docker.run(
        "shop-after",
        &[(NAMESPACE, "shop")],
        None,
        SERVE_AND_CONNECT,
    );
    expect_idle(
        "payments, started after the agent container",
        &after_pay.cgroup,
        2,
        11,
    );
    expect_idle(
        "shop, started after the agent container",
        &after_shop.cgroup,
        2,
        60,
    );

    // Stopping the container stops the agent: it detaches (no --persist) and says so.
    docker.run_cli(&["stop", "--time", "20", &agent]);
    let log = logs(&docker, &agent);
    assert!(log.contains("detached"), "{log}");
    docker.remove(&agent);
}

/// containerd restarting under the agent: the agent says it lost it, reconnects with back-off,
/// and follows containers started after the restart.
#[test]
fn a_restarted_engine_is_followed_again() {
    require_host();
    let pods = TestCgroup::new();
    let parent = format!("{}/pod-restart", pods.scope());
    let mut containerd = Engine::containerd();
    let places = AgentPlaces::new();
    let (config, _file) = policy_file(pods.scope().as_str());
    let agent = spawn_agent(&places, &config.display().to_string(), &containerd);
    agent.expect_log("following the container engine", LOG_WAIT);

    containerd.restart_containerd();
    agent.expect_log("lost the container engine", LOG_WAIT);
    agent.expect_log("following the container engine", LOG_WAIT);
    let pay = containerd.run(
        "pay-after-restart",
        &[(NAMESPACE, "payments")],
        Some(&parent),
        SERVE_AND_CONNECT,
    );
    expect_idle(
        "payments, started after containerd restarted",
        &pay.cgroup,
        2,
        11,
    );
    drop(agent);
}

/// containerd lets a container's labels change: the agent follows, and the container's
/// existing connections get the rule its new labels select.
#[test]
fn a_container_whose_labels_change_is_followed() {
    require_host();
    let pods = TestCgroup::new();
    let parent = format!("{}/pod-relabel", pods.scope());
    let mut containerd = Engine::containerd();
    let shop = containerd.run(
        "relabelled",
        &[(NAMESPACE, "shop")],
        Some(&parent),
        SERVE_AND_CONNECT,
    );
    wait_connected(&shop);
    let places = AgentPlaces::new();
    let (config, _file) = policy_file(pods.scope().as_str());
    let agent = spawn_agent(&places, &config.display().to_string(), &containerd);
    agent.expect_log("following the container engine", LOG_WAIT);
    expect_idle("shop, before its labels change", &shop.cgroup, 2, 60);

    containerd.run_cli(&[
        "containers",
        "label",
        &shop.id,
        &format!("{NAMESPACE}=payments"),
    ]);
    expect_idle("the container relabelled payments", &shop.cgroup, 2, 11);
    drop(agent);
}
