//! What an operator sees: the Prometheus endpoint (checked by promtool on a real scrape),
//! probes, JSON logs, and systemd readiness.

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

/// A scrape of `addr`'s /metrics once `series` has the value `want`, polled every 100 ms
/// until `LOG_WAIT` has passed.
fn scrape_until(addr: &str, series: &str, want: f64) -> String {
    let deadline = std::time::Instant::now() + LOG_WAIT;
    loop {
        let (code, metrics) = get(addr, "/metrics");
        assert_eq!(code, 200);
        if metrics.contains(series) && sample(&metrics, series) == want {
            return metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} is not {want}:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `promtool check metrics` accepts `metrics`.
fn promtool_check(metrics: &str) {
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
}

#[test]
fn metrics_count_connections_and_reloads_and_pass_promtool() {
    // One scenario: start, connections and a refused reload, then one scrape checked series by
    // series and by promtool; the values only mean something after those steps.
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
            "--missing-interval",
            "1",
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

    // The missing-keepalive count (every second here) sees both ends of both connections, each
    // with keepalive from the agent.
    let scope = cgroup.scope();
    let established = format!("keepalive_connections_established{{scope=\"{scope}\"}}");
    let metrics = scrape_until(&addr, &established, 4.0);
    assert_eq!(
        sample(
            &metrics,
            &format!("keepalive_connections_without_keepalive{{scope=\"{scope}\"}}")
        ),
        0.0
    );
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

    promtool_check(&metrics);
    every_queried_metric_is_exported(&metrics);
    drop(agent);
}

/// Every metric of the agent's that the alert rules and the dashboard query (deploy/) is in
/// `metrics`, a real scrape: a renamed metric cannot leave an alert that never fires.
fn every_queried_metric_is_exported(metrics: &str) {
    let mut exported: std::collections::HashSet<String> = metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    // A histogram with no observations yet (no failure: no series) is still declared.
    for histogram in metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" histogram"))
    {
        exported.extend(["_bucket", "_sum", "_count"].map(|suffix| format!("{histogram}{suffix}")));
    }
    let queried = super::monitoring::queried_metrics();
    assert!(!queried.is_empty());
    for name in &queried {
        assert!(
            exported.contains(name),
            "the alert rules or the dashboard query {name}, which the agent does not export:\n\
             {metrics}"
        );
    }
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
fn systemd_hears_ready_reloads_and_the_watchdog() {
    require_host();
    let cgroup = TestCgroup::new();
    let places = AgentPlaces::new();
    let socket_path = std::env::temp_dir().join(format!("{}.notify", unique_name()));
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(LOG_WAIT)).unwrap();
    let name = cgroup.cgroup().name.clone();
    // WatchdogSec=1s: a ping every 500 ms.
    let mut agent = places.spawn_with_env(
        agent_bin(),
        &["run", "--cgroup", &name],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut pings = 0;
    // The next message that is not a watchdog ping (those are counted).
    let mut next = || loop {
        let mut buffer = [0u8; 256];
        let received = socket.recv(&mut buffer).unwrap();
        let message = String::from_utf8_lossy(&buffer[..received]).to_string();
        if message == "WATCHDOG=1\n" {
            pings += 1;
        } else {
            return message;
        }
    };
    let ready = next();
    assert!(ready.starts_with("READY=1\nSTATUS=enforcing"), "{ready:?}");

    // Type=notify-reload: SIGHUP, then RELOADING=1 with the monotonic clock, then READY=1.
    agent.signal(libc::SIGHUP);
    let reloading = next();
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|rest| rest.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("{reloading:?}"));
    assert!(usec > 0);
    let ready = next();
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");

    std::thread::sleep(Duration::from_millis(1_200));
    agent.signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1\n");
    assert!(pings >= 2, "{pings} watchdog pings in more than a second");
    assert_eq!(agent.signal_and_wait(0, LOG_WAIT), Some(0));
    let _ignored = std::fs::remove_file(&socket_path);
}

/// Receives journal entries on a journald socket of its own (a private mount namespace with a
/// tmpfs on /run), runs the agent, and stops both once the `attached` entry arrived. `$1`: the
/// file the entries go to (each after its length, 4 bytes little-endian); then the agent's
/// command line.
const JOURNAL_SCRIPT: &str = r#"
set -eu
out="$1"; shift
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal
python3 - "$out" <<'PY' &
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/run/systemd/journal/socket")
open(sys.argv[1] + ".ready", "w").close()
s.settimeout(20)
with open(sys.argv[1], "wb") as out:
    while True:
        entry = s.recv(1 << 16)
        out.write(struct.pack("<I", len(entry)) + entry)
        out.flush()
        if b"attached\n" in entry:
            break
PY
receiver=$!
while [ ! -e "$out.ready" ]; do sleep 0.05; done
"$@" &
agent=$!
trap 'kill -TERM $agent 2>/dev/null || true' EXIT
wait $receiver
kill -TERM $agent
wait $agent
trap - EXIT
"#;

#[test]
fn journald_entries_carry_the_fields_and_priorities() {
    require_host();
    let cgroup = TestCgroup::new();
    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    let entries_file = places.state_dir().with_extension("journal");
    let mut args: Vec<String> = vec![
        "--log-format".into(),
        "journald".into(),
        "run".into(),
        "--cgroup".into(),
        name.clone(),
        "--no-metrics".into(),
    ];
    args.extend(places.args());
    let out = Command::new("timeout")
        .args(["60", "unshare", "--mount", "--propagation", "private"])
        .args(["sh", "-c", JOURNAL_SCRIPT, "journal"])
        .arg(&entries_file)
        .arg(agent_bin())
        .args(&args)
        .output()
        .unwrap();
    let entries = std::fs::read(&entries_file).unwrap_or_default();
    let _ignored = std::fs::remove_file(&entries_file);
    let _ignored = std::fs::remove_file(entries_file.with_extension("journal.ready"));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing went to stderr: the journal has it all.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rest = entries.as_slice();
    let mut attached = None;
    while let Some((length, after)) = rest.split_first_chunk::<4>() {
        let length = u32::from_le_bytes(*length) as usize;
        let (entry, after) = after.split_at(length.min(after.len()));
        let fields = journal_fields(entry);
        if fields.contains(&("MESSAGE".to_string(), "attached".to_string())) {
            attached = Some(fields);
        }
        rest = after;
    }
    let fields = attached.unwrap_or_else(|| panic!("no attached entry in {entries:?}"));
    for (key, value) in [
        ("PRIORITY", "6"),
        ("SYSLOG_IDENTIFIER", "keepalive-agent"),
        ("F_CGROUP", name.as_str()),
    ] {
        assert!(
            fields.contains(&(key.to_string(), value.to_string())),
            "{key}={value} not in {fields:?}"
        );
    }
}

/// The fields of one entry of journald's native protocol: `KEY=value\n`, or `KEY\n`, the
/// value's length (8 bytes little-endian), the value and `\n`.
fn journal_fields(mut entry: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = entry.iter().position(|byte| *byte == b'\n') {
        let line = &entry[..end];
        if let Some(equals) = line.iter().position(|byte| *byte == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..equals]).into_owned(),
                String::from_utf8_lossy(&line[equals + 1..]).into_owned(),
            ));
            entry = &entry[end + 1..];
            continue;
        }
        let Some((length, after)) = entry[end + 1..].split_first_chunk::<8>() else {
            break;
        };
        let length = usize::try_from(u64::from_le_bytes(*length)).unwrap();
        let value = &after[..length.min(after.len())];
        fields.push((
            String::from_utf8_lossy(line).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
        entry = after.get(length + 1..).unwrap_or_default();
    }
    fields
}
