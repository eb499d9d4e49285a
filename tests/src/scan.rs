//! `scan`, `explain` and the agent binary's JSON, from the outside: workloads that set keepalive
//! themselves, running the commands, reading their entries.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use keepalive_agent::policy::{CgroupPath, Connection, Decision, Direction, Policy};
use serde_json::Value;

use crate::{Keepalive, Netns, Placement, Workload, agent_bin, probe, unique_name};

/// A Python client that sets keepalive itself (argv: host, port, idle, intvl, cnt) and holds
/// the connection until its standard input closes.
pub const PYTHON_CLIENT: &str = "
import socket, sys
host, port, idle, intvl, cnt = sys.argv[1], *(int(a) for a in sys.argv[2:6])
c = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
c.connect((host, port))
print('connected', c.fileno(), flush=True)
sys.stdin.read()
";

/// A probe server and a Python client with keepalive 1 / 60 / 5 / 3, in `place`.
pub fn app_keepalive(host: &str, place: Placement<'_>) -> [Workload; 2] {
    let listen = if host.contains(':') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let server = probe(&["listen", listen], place);
    let port = server.expect("listening").remove(0);
    let client = Workload::spawn(
        "python3",
        &["-c", PYTHON_CLIENT, host, &port, "60", "5", "3"],
        place,
    );
    client.expect("connected");
    server.expect("accepted");
    [client, server]
}

/// Runs the agent binary with `args` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the agent: {e}"))
}

/// Its standard output and error, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `scan --json ARGS`: the connection objects and the summary.
pub fn scan(args: &[&str]) -> (Vec<Value>, Value) {
    scan_with(Command::new(agent_bin()), args)
}

/// `scan --json ARGS` run by `command` (the agent, or a wrapper that runs it): the connection
/// objects and the summary.
pub fn scan_with(mut command: Command, args: &[&str]) -> (Vec<Value>, Value) {
    let out = command
        .args(["scan", "--json"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scan: {e}"));
    assert!(out.status.success(), "scan failed: {}", text(&out));
    let mut lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let summary = lines.pop().unwrap_or_default();
    assert!(summary.get("summary").is_some(), "last line: {summary}");
    (lines, summary["summary"].clone())
}

/// Field `key` of a scan entry, as text; panics naming the entry if it is not.
fn string<'a>(entry: &'a Value, key: &str) -> &'a str {
    entry[key]
        .as_str()
        .unwrap_or_else(|| panic!("no text {key} in {entry}"))
}

/// Field `key` of a scan entry, as a number; panics naming the entry if it is not one.
fn number<T: TryFrom<i64>>(entry: &Value, key: &str) -> T {
    entry[key]
        .as_i64()
        .and_then(|value| T::try_from(value).ok())
        .unwrap_or_else(|| panic!("no number {key} in {entry}"))
}

fn address(entry: &Value, key: &str) -> std::net::SocketAddr {
    let text = string(entry, key);
    text.parse()
        .unwrap_or_else(|e| panic!("{key} {text:?}: {e} in {entry}"))
}

/// The rule `Policy::decide` gives the connection an entry of scan describes.
pub fn decided(policy: &Policy, entry: &Value) -> Option<String> {
    let (remote, local) = (address(entry, "remote"), address(entry, "local"));
    let conn = Connection {
        cgroup: CgroupPath::parse(string(entry, "cgroup"))
            .unwrap_or_else(|e| panic!("{e} in {entry}")),
        direction: Direction::from_outbound(entry["direction"] == "outbound"),
        remote: remote.ip(),
        remote_port: remote.port(),
        local_port: local.port(),
    };
    match policy.decide(&conn) {
        Decision::Rule(i) => Some(policy.rules[i].name.clone()),
        Decision::Default => Some("default".into()),
        Decision::Outside => None,
    }
}

/// What getsockopt reads on the socket an entry names, through its holder among `workloads`.
pub fn read_back(workloads: &[&Workload], entry: &Value) -> Keepalive {
    let (pid, fd): (u32, i32) = (number(entry, "pid"), number(entry, "fd"));
    let holder = workloads
        .iter()
        .find(|workload| workload.pid() == pid)
        .unwrap_or_else(|| panic!("pid {pid} is none of the test's workloads: {entry}"));
    Keepalive::of(holder.steal_fd(fd))
}

/// What the socket of a scan entry holds, read back with getsockopt: an end of one of the
/// `plain` connections (by its port), else a socket of one of `workloads`.
pub fn held(entry: &Value, plain: [&crate::Connection; 2], workloads: &[&Workload]) -> Keepalive {
    let port = |key: &str| {
        entry[key]
            .as_str()
            .expect("a scan entry's address")
            .rsplit(':')
            .next()
            .expect("a scan entry's address")
            .to_string()
    };
    let plain = plain
        .into_iter()
        .find(|conn| port("local") == conn.port || port("remote") == conn.port);
    match plain {
        Some(conn) if port("local") == conn.port => conn.server(),
        Some(conn) => conn.client(),
        None => read_back(workloads, entry),
    }
}

/// The keepalive options a scan entry reports.
pub fn reported(entry: &Value) -> Keepalive {
    Keepalive {
        enabled: entry["keepalive"]
            .as_bool()
            .unwrap_or_else(|| panic!("no keepalive in {entry}")),
        idle_secs: number(entry, "idle"),
        interval_secs: number(entry, "interval"),
        count: number(entry, "count"),
        user_timeout_ms: number(entry, "user_timeout"),
    }
}

/// The inode of a namespace, as scan's `netns` reports it.
pub fn netns_inode(netns: &Netns) -> u64 {
    std::fs::metadata(Path::new("/run/netns").join(netns.name()))
        .unwrap_or_else(|e| panic!("{}: {e}", netns.name()))
        .ino()
}

/// A file in the temporary directory with a unique name, removed on drop.
#[derive(Debug)]
pub struct TempFile(PathBuf);

impl TempFile {
    /// A new file holding `text`.
    pub fn with(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name()));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ignored = std::fs::remove_file(&self.0);
    }
}
