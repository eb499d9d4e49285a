use std::path::Path;

use super::*;
use crate::policy::file;

fn example() -> Policy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.toml");
    file::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn conn(cgroup: &str, direction: Direction, remote: &str, local_port: u16) -> Connection {
    let remote: SocketAddr = remote.parse().unwrap_or_else(|e| panic!("{remote}: {e}"));
    Connection {
        cgroup: CgroupPath::parse(cgroup).unwrap_or_else(|e| panic!("{e}")),
        direction,
        remote: remote.ip(),
        remote_port: remote.port(),
        local_port,
    }
}

const PAYMENTS: &str = "/system.slice/payments.service";
const BATCH: &str = "/system.slice/batch.service";
const OUT: Direction = Direction::Outbound;
const IN: Direction = Direction::Inbound;

/// examples/policy.toml: connection -> the rule that decides (None: the default).
const CASES: [(&str, Direction, &str, u16, Option<&str>); 14] = [
    (PAYMENTS, OUT, "10.20.1.2:5432", 40000, Some("payments-db")),
    (
        PAYMENTS,
        OUT,
        "[fd00:20::5]:5432",
        40000,
        Some("payments-db"),
    ),
    (PAYMENTS, IN, "10.20.1.2:5432", 8080, Some("payments-db")),
    (
        "/system.slice/payments.service/worker",
        OUT,
        "10.20.1.2:5432",
        1,
        Some("payments-db"),
    ),
    (PAYMENTS, OUT, "10.20.1.2:5433", 40000, None),
    (
        "/system.slice/payments.serviceX",
        OUT,
        "10.20.1.2:5432",
        1,
        None,
    ),
    (PAYMENTS, OUT, "203.0.113.9:443", 40000, Some("nat-gateway")),
    ("/", OUT, "203.0.113.9:443", 40000, Some("nat-gateway")),
    (
        "/",
        OUT,
        "[::ffff:203.0.113.9]:443",
        40000,
        Some("nat-gateway"),
    ),
    ("/", IN, "203.0.113.9:443", 40000, None),
    ("/", IN, "198.51.100.1:50000", 22, Some("ssh")),
    ("/", OUT, "198.51.100.1:22", 50000, None),
    (BATCH, IN, "198.51.100.1:50000", 22, Some("batch-cap")),
    (BATCH, OUT, "203.0.113.9:443", 1, Some("batch-cap")),
];

#[test]
fn the_example_policy_decides_as_documented() {
    let policy = example();
    for (cgroup, direction, remote, local_port, expected) in CASES {
        let conn = conn(cgroup, direction, remote, local_port);
        let text = render(&policy, &conn, "examples/policy.toml");
        let named = match policy.decide(&conn) {
            Decision::Rule(i) => Some(policy.rules[i].name.as_str()),
            _ => None,
        };
        assert_eq!(named, expected, "{conn:?}");
        let line = match expected {
            Some(name) => format!("decided by: rule {name:?}"),
            None => "decided by: the default".to_string(),
        };
        assert!(
            text.contains(&line),
            "{conn:?}: expected {line:?} in\n{text}"
        );
    }
}

#[test]
fn each_candidate_says_why() {
    let policy = example();
    let text = render(&policy, &conn(PAYMENTS, OUT, "10.20.1.2:5433", 40000), "p");
    let expected = [
        "decided by: the default (no rule matched)",
        "the socket gets: enforce: keepalive on, idle 60 s, interval 5 s, count 3",
        "1. payments-db (line 35, cgroup /system.slice/payments.service): no match: remote \
         10.20.1.2 in 10.20.0.0/16, fd00:20::/32; remote port 5433 not in 5432",
        "2. nat-gateway (line 26, any cgroup): no match: remote 10.20.1.2 not in 203.0.113.0/24; \
         direction outbound is outbound",
        "3. ssh (line 46, any cgroup): no match: local port 40000 not in 22; direction outbound \
         is not inbound",
        "not candidates (their cgroup is neither /system.slice/payments.service nor an ancestor \
         of it):\n  batch-cap (line 53, cgroup /system.slice/batch.service)",
    ];
    for line in expected {
        assert!(text.contains(line), "expected {line:?} in\n{text}");
    }
    let decided = render(&policy, &conn("/", IN, "198.51.100.1:50000", 22), "p");
    assert!(
        decided.contains("3. ssh") || decided.contains("2. ssh"),
        "{decided}"
    );
    assert!(decided.contains("<- decides"), "{decided}");
    assert!(decided.contains("the socket gets: exempt"), "{decided}");
}

#[test]
fn outside_every_scope_nothing_decides() {
    let mut policy = example();
    policy.scopes = vec![CgroupPath::parse("/system.slice").unwrap_or_else(|e| panic!("{e}"))];
    let text = render(&policy, &conn("/user.slice", OUT, "10.0.0.1:1", 1), "p");
    assert!(text.contains("decided by: nothing"), "{text}");
}
