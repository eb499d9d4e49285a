//! What the policy tests share: policy files from text, the fixture they enforce, the values
//! their rules set, and a Python client that may set or undo keepalive itself.

use std::path::Path;

use keepalive_agent::{Policy, policy::file};

use crate::{Fixture, Keepalive, Placement, Workload, probe};

/// The built-in default of policy files, which tests leave in place.
pub const DEFAULT: Keepalive = Keepalive {
    enabled: true,
    idle_secs: 60,
    interval_secs: 5,
    count: 3,
    user_timeout_ms: 0,
};

/// The values the rules of these tests set: `idle` tells which rule applied.
pub fn rule_values(idle: u32) -> Keepalive {
    Keepalive {
        idle_secs: idle,
        ..DEFAULT
    }
}

/// A policy file's text parsed, or a panic with the error and the text.
pub fn parse(text: &str) -> Policy {
    file::parse(Path::new("test.toml"), text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A test cgroup enforced with a policy file's text, in a fresh network namespace. The text
/// is a template: `{root}` is the test cgroup.
pub fn policy_fixture(template: &str) -> Fixture {
    Fixture::with_policy(|root| parse(&template.replace("{root}", root.scope().as_str())))
}

/// The `[agent]` section enforcing on the test cgroup (`{root}` of [`policy_fixture`]).
pub const SCOPE: &str = "[agent]\ncgroups = [\"{root}\"]\n";

/// A Python client that sets keepalive itself before connecting (argv: port, idle, intvl,
/// cnt), or with idle 0 does not; after connecting it may try to undo keepalive (argv[5]: 1).
const PYTHON_CLIENT: &str = "
import socket, sys
port, idle, intvl, cnt, undo = (int(a) for a in sys.argv[1:6])
c = socket.socket()
if idle:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
c.connect(('127.0.0.1', port))
if undo:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 999)
print('connected', c.fileno(), flush=True)
sys.stdin.read()
";

/// The client socket of a Python client (see [`PYTHON_CLIENT`]) to a probe server.
pub fn python_client(
    place: Placement<'_>,
    app: [u32; 3],
    undo: bool,
) -> (Keepalive, [Workload; 2]) {
    let server = probe(&["listen", "127.0.0.1:0"], place);
    let port = server.expect("listening").remove(0);
    let mut args = vec!["-c".to_string(), PYTHON_CLIENT.to_string(), port];
    args.extend(app.iter().map(u32::to_string));
    args.push(u8::from(undo).to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = Workload::spawn("python3", &args, place);
    let fd: i32 = client.expect("connected")[0]
        .parse()
        .expect("the client prints its descriptor");
    let values = Keepalive::of(client.steal_fd(fd));
    (values, [client, server])
}
