//! Kubernetes pods as the kubelet makes them through containerd's CRI plugin: rules by pod
//! labels reach the pod's app container (not only its sandbox), pod annotations set values
//! within the policy's bounds, and refusals are counted. Every value is read back from the
//! sockets the app container's own processes hold.

use std::time::Duration;

use keepalive_tests::{
    AgentPlaces, TestCgroup, Workload, agent_bin,
    engines::{Engine, TestPod, connected_sockets, engine_options, expect_explain, expect_idle},
    http::{get_within, metrics_addr},
    poll, require_host, unique_name,
};

const LOG_WAIT: Duration = Duration::from_secs(30);
const PREFIX: &str = "keepalive.example.com";

/// A listener on `port` and a client connected to it over loopback (host network: each pod
/// its own port), both holding their sockets open.
fn serve_and_connect(port: u16) -> String {
    format!("sleep 100000 | nc -l -p {port} & sleep 0.3; sleep 100000 | nc 127.0.0.1 {port} & wait")
}

/// The issue's policy: the pods' parent enforced with idle 60 s, pods labelled
/// app=pgbouncer 13 s, annotations allowed for idle 10 s..5 min.
fn policy(scope: &str) -> String {
    format!(
        r#"[agent]
cgroups = ["{scope}"]

[default]
idle = "60s"

[annotations]
prefix = "{PREFIX}"
idle = ["10s", "5m"]

[[rule]]
name = "pgbouncer"
pod_labels = {{ app = "pgbouncer" }}
idle = "13s"
"#
    )
}

/// A policy file, removed on drop.
struct PolicyFile(std::path::PathBuf);

impl PolicyFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name()));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ignored = std::fs::remove_file(&self.0);
    }
}

fn spawn_agent(places: &AgentPlaces, config: &PolicyFile, engine: &Engine) -> Workload {
    let mut args: Vec<String> = vec!["run".into(), "--config".into(), config.arg()];
    args.extend(engine_options(places, engine));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    places.spawn(agent_bin(), &refs)
}

/// The agent following `engine` through the CRI alone, as it follows CRI-O (`--crio-socket`),
/// containerd's own API out of reach.
fn spawn_agent_cri_only(places: &AgentPlaces, config: &PolicyFile, engine: &Engine) -> Workload {
    let mut args: Vec<String> = vec!["run".into(), "--config".into(), config.arg()];
    for pair in engine_options(places, engine).chunks(2) {
        let socket = if pair[0] == "--crio-socket" {
            engine.socket().display().to_string()
        } else {
            places
                .state_dir()
                .join("no-engine.sock")
                .display()
                .to_string()
        };
        args.extend([pair[0].clone(), socket]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    places.spawn(agent_bin(), &refs)
}

/// The value of a counter on the agent's endpoint (0 when absent).
fn counter(addr: &str, name: &str) -> f64 {
    let (_, body) = get_within(addr, "/metrics", LOG_WAIT);
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// `scan --json` of a pod's cgroup says `rule` decided for each of its connections.
fn expect_scan_rule(
    places: &AgentPlaces,
    config: &PolicyFile,
    engine: &Engine,
    pod: &TestPod,
    rule: &str,
) {
    let mut args: Vec<String> = vec![
        "scan".into(),
        "--json".into(),
        "--config".into(),
        config.arg(),
        "--cgroup".into(),
        pod.cgroup.as_str().to_string(),
    ];
    args.extend(engine_options(places, engine));
    let out = keepalive_tests::agent_succeeds(&args);
    let connections: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|object| object.get("local").is_some())
        .collect();
    assert!(
        connections.len() >= 2
            && connections
                .iter()
                .all(|connection| connection["rule"] == rule),
        "scan of pod {}: expected rule {rule:?} on each connection: {connections:#?}",
        pod.name
    );
}

/// `status --json` says rule `rule` selects the pod cgroup `cgroup` (not its sandbox's).
fn expect_status_names(places: &AgentPlaces, rule: &str, cgroup: &keepalive_agent::CgroupPath) {
    let mut selects = String::new();
    let named = poll(LOG_WAIT, || {
        let out = places.command(agent_bin(), &["status", "--json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        selects = json["rules"]
            .as_array()?
            .iter()
            .find(|entry| entry["name"] == rule)?["containers"]
            .as_str()?
            .to_string();
        selects
            .split_whitespace()
            .any(|word| word == cgroup.as_str())
            .then_some(())
    });
    assert!(
        named.is_some(),
        "status: rule {rule} selects {selects:?}, not the pod cgroup {cgroup}"
    );
}

/// A pod labelled app=pgbouncer.
fn pgbouncer_pod(engine: &mut Engine, parent: &TestCgroup, name: &str, port: u16) -> TestPod {
    run_pod(engine, parent, name, &[("app", "pgbouncer")], &[], port)
}

fn run_pod(
    engine: &mut Engine,
    parent: &TestCgroup,
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    port: u16,
) -> TestPod {
    engine.run_pod(
        name,
        &parent.scope(),
        labels,
        annotations,
        &serve_and_connect(port),
    )
}

/// The done-when of issue 26: a pod labelled app=pgbouncer holds idle 13 on its app
/// container's client and server sockets, a neighbour the default, a pod annotated idle 20 s
/// holds 20, one annotated 2 s the default with the refusal counted; pods made before and after
/// the agent starts.
#[test]
fn pods_get_the_rule_of_their_labels_and_their_annotations_within_bounds() {
    require_host();
    let pods = TestCgroup::new();
    let mut containerd = Engine::containerd_cri();
    let pgbouncer = pgbouncer_pod(&mut containerd, &pods, "pgbouncer", 18001);
    let web = run_pod(&mut containerd, &pods, "web", &[("app", "web")], &[], 18002);
    let mut seen = Vec::new();
    let connected = poll(LOG_WAIT, || {
        seen = connected_sockets(&pgbouncer.cgroup);
        (seen.len() >= 2).then_some(())
    });
    assert!(connected.is_some(), "the pgbouncer pod's sockets: {seen:?}");
    assert!(
        seen.iter().all(|socket| !socket.enabled),
        "keepalive before the agent: {seen:?}"
    );

    let places = AgentPlaces::new();
    let config = PolicyFile::new(&policy(pods.scope().as_str()));
    let agent = spawn_agent(&places, &config, &containerd);
    let addr = metrics_addr(&agent, LOG_WAIT);
    agent.expect_log("following the container engine", LOG_WAIT);
    expect_idle(
        "the pgbouncer pod, made before the agent",
        &pgbouncer.cgroup,
        2,
        13,
    );
    expect_idle("its neighbour", &web.cgroup, 2, 60);
    expect_status_names(&places, "pgbouncer", &pgbouncer.cgroup);

    let after = pgbouncer_pod(&mut containerd, &pods, "pgbouncer-after", 18003);
    expect_idle("a pgbouncer pod made after the agent", &after.cgroup, 2, 13);
    let idle = format!("{PREFIX}/idle");
    let annotated = run_pod(
        &mut containerd,
        &pods,
        "annotated",
        &[("app", "web")],
        &[(&idle, "20s")],
        18004,
    );
    expect_idle("a pod annotated idle 20 s", &annotated.cgroup, 2, 20);
    expect_explain(
        &places,
        &config.arg(),
        &containerd,
        &annotated.cgroup,
        "pod default/annotated",
    );
    expect_scan_rule(
        &places,
        &config,
        &containerd,
        &annotated,
        "pod default/annotated",
    );
    expect_scan_rule(&places, &config, &containerd, &pgbouncer, "pgbouncer");
    let before = counter(&addr, "keepalive_annotations_refused_total");
    let refused = run_pod(
        &mut containerd,
        &pods,
        "too-eager",
        &[("app", "web")],
        &[(&idle, "2s")],
        18005,
    );
    expect_idle("a pod annotated idle 2 s (refused)", &refused.cgroup, 2, 60);
    let counted = poll(LOG_WAIT, || {
        (counter(&addr, "keepalive_annotations_refused_total") >= before + 1.0).then_some(())
    });
    assert!(counted.is_some(), "the refusal is not counted");
    agent.expect_log("refusing the pod's keepalive annotations", LOG_WAIT);
    drop(agent);
}

/// A pod recreated with other labels gets the rule of its new labels, and the runtime
/// restarting is followed through.
#[test]
fn recreated_pods_and_a_restarted_runtime_are_followed() {
    require_host();
    let pods = TestCgroup::new();
    let mut containerd = Engine::containerd_cri();
    let places = AgentPlaces::new();
    let config = PolicyFile::new(&policy(pods.scope().as_str()));
    let agent = spawn_agent(&places, &config, &containerd);
    agent.expect_log("following the container engine", LOG_WAIT);
    let first = run_pod(&mut containerd, &pods, "db", &[("app", "web")], &[], 18011);
    expect_idle("the pod as first made", &first.cgroup, 2, 60);
    containerd.remove_pod(&first);
    let second = pgbouncer_pod(&mut containerd, &pods, "db", 18012);
    expect_idle("the pod recreated as pgbouncer", &second.cgroup, 2, 13);

    containerd.restart_containerd();
    agent.expect_log("lost the container engine", LOG_WAIT);
    agent.expect_log("following the container engine", LOG_WAIT);
    let third = pgbouncer_pod(&mut containerd, &pods, "after-restart", 18013);
    expect_idle(
        "a pgbouncer pod made after the restart",
        &third.cgroup,
        2,
        13,
    );
    drop(agent);
}

/// The CRI client alone (the path CRI-O takes, CRI-O not being in Debian: containerd's CRI
/// serves the same API): pods before and after the agent, a container rule by the kubelet's
/// container name, and annotations, without containerd's own API or events.
#[test]
fn a_runtime_followed_through_the_cri_alone() {
    require_host();
    let pods = TestCgroup::new();
    let mut containerd = Engine::containerd_cri();
    let before = pgbouncer_pod(&mut containerd, &pods, "pgbouncer", 18021);
    let places = AgentPlaces::new();
    let config = PolicyFile::new(&format!(
        "{}\n[[rule]]\nname = \"sidecar\"\nlabels = {{ \"io.kubernetes.container.name\" = \"app\" }}\ncontainer = \"app\"\nidle = \"17s\"\n",
        policy(pods.scope().as_str())
    ));
    let agent = spawn_agent_cri_only(&places, &config, &containerd);
    agent.expect_log("following the container engine", LOG_WAIT);
    agent.expect_log("listing it periodically", LOG_WAIT);
    // The app container's own cgroup is deeper than its pod's: the container rule decides.
    expect_idle(
        "a pod's app container, by its container rule",
        &before.cgroup,
        2,
        17,
    );
    let idle = format!("{PREFIX}/idle");
    let annotated = run_pod(
        &mut containerd,
        &pods,
        "annotated",
        &[("app", "web")],
        &[(&idle, "25s")],
        18022,
    );
    expect_idle(
        "a pod annotated after the agent, its container rule first",
        &annotated.cgroup,
        2,
        17,
    );
    drop(agent);

    let config = PolicyFile::new(&policy(pods.scope().as_str()));
    let agent = spawn_agent_cri_only(&places, &config, &containerd);
    agent.expect_log("following the container engine", LOG_WAIT);
    expect_idle("the pgbouncer pod", &before.cgroup, 2, 13);
    expect_idle("the annotated pod", &annotated.cgroup, 2, 25);
    let after = pgbouncer_pod(&mut containerd, &pods, "pgbouncer-after", 18023);
    expect_idle("a pgbouncer pod made after the agent", &after.cgroup, 2, 13);
    drop(agent);
}
