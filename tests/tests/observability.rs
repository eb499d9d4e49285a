//! What an operator sees: the Prometheus endpoint (checked by promtool on a real scrape),
//! probes, JSON logs, and systemd readiness.
#![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

use std::{
    io::Write as _,
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::Duration,
};

use keepalive_tests::{
    AgentPlaces, Netns, Placement, TestCgroup, Workload, agent_bin, connect,
    http::{self, sample},
    require_host, unique_name,
};

const LOG_WAIT: Duration = Duration::from_secs(10);

fn metrics_addr(agent: &Workload) -> String {
    http::metrics_addr(agent, LOG_WAIT)
}

fn get(addr: &str, path: &str) -> (u16, String) {
    http::get_within(addr, path, LOG_WAIT)
}

#[test]
fn metrics_count_connections_and_reloads_and_pass_promtool() {
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let config = places.state_dir().with_file_name("policy.toml");
    let text = format!(
        "[agent]\ncgroups = [\"{}\"]\n[[rule]]\nname = \"db\"\nremote_port = 5432\n",
        cgroup.scope()
    );
    std::fs::write(&config, &text).unwrap();
    let agent = places.spawn(
        agent_bin(),
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--program-stats",
        ],
    );
    let addr = metrics_addr(&agent);
    agent.expect_log("policy applied", LOG_WAIT);
    assert_eq!(get(&addr, "/healthz").0, 200);
    assert_eq!(get(&addr, "/readyz").0, 200);
    assert_eq!(get(&addr, "/nothing").0, 404);

    let place = Placement::new(&cgroup, &netns);
    let _db = connect("127.0.0.1:5432", "127.0.0.1", place, place);
    let _other = connect("127.0.0.1:0", "127.0.0.1", place, place);
    let staging = config.with_extension("new");
    std::fs::write(&staging, "[default]\ncount = 500\n").unwrap();
    std::fs::rename(&staging, &config).unwrap();
    agent.expect_log("policy refused", LOG_WAIT);

    let (code, metrics) = get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        sample(
            &metrics,
            r#"keepalive_connections_total{rule="db",outcome="set"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"keepalive_connections_total{rule="default",outcome="set"}"#
        ),
        3.0
    );
    assert_eq!(
        sample(&metrics, r#"keepalive_reloads_total{result="failure"}"#),
        1.0
    );
    assert_eq!(sample(&metrics, "keepalive_attached_cgroups"), 1.0);
    assert_eq!(sample(&metrics, "keepalive_last_reload_success "), 0.0);
    assert_eq!(sample(&metrics, "keepalive_build_info{version="), 1.0);
    assert_eq!(sample(&metrics, "keepalive_enforcement_missing "), 0.0);
    assert!(
        !metrics.contains("slot=") && !metrics.contains("id="),
        "no label that changes on reorder or restart: {metrics}"
    );
    assert!(
        sample(
            &metrics,
            "keepalive_program_runs_total{program=\"ka_sockops\"}"
        ) >= 18.0,
        "{metrics}"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool (Debian package prometheus): {e}"));
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(agent);
}

#[test]
fn json_logs_are_one_object_per_line() {
    require_host();
    let cgroup = TestCgroup::new();
    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    let mut agent = places.spawn(
        agent_bin(),
        &["--log-format", "json", "run", "--cgroup", &name],
    );
    let attached = agent.expect_log("attached", LOG_WAIT);
    let json: serde_json::Value =
        serde_json::from_str(&attached).unwrap_or_else(|e| panic!("{e}: {attached}"));
    assert_eq!(json["fields"]["cgroup"], name.as_str());
    assert_eq!(json["level"], "INFO");
    assert_eq!(agent.signal_and_wait(libc::SIGTERM, LOG_WAIT), Some(0));
}

#[test]
fn systemd_hears_ready_once_enforcement_is_live() {
    require_host();
    let cgroup = TestCgroup::new();
    let places = AgentPlaces::new();
    let socket_path = std::env::temp_dir().join(format!("{}.notify", unique_name()));
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(LOG_WAIT)).unwrap();
    let name = cgroup.cgroup().name.clone();
    let mut agent = places.spawn_with_env(
        agent_bin(),
        &["run", "--cgroup", &name],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let mut buffer = [0u8; 256];
    let received = socket.recv(&mut buffer).unwrap();
    let message = String::from_utf8_lossy(&buffer[..received]).to_string();
    assert!(message.starts_with("READY=1"), "{message}");
    agent.signal(libc::SIGTERM);
    let received = socket.recv(&mut buffer).unwrap();
    assert_eq!(&buffer[..received], b"STOPPING=1");
    assert_eq!(agent.signal_and_wait(0, LOG_WAIT), Some(0));
    let _ignored = std::fs::remove_file(&socket_path);
}
