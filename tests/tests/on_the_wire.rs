//! The article's promise on a network of our own: two namespaces joined by a veth pair, a
//! client in the enforced cgroup, and a server that later vanishes without a word.
#![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

use std::time::{Duration, Instant};

use keepalive_agent::Values;
use keepalive_common::Stage;
use keepalive_tests::{
    Netns, Placement, TestCgroup, Veth, Workload, enforce, load_enforcer, require_host, wait_for,
};

const POLICY: Values = Values {
    idle_secs: 1,
    interval_secs: 1,
    count: 3,
    user_timeout_ms: None,
};

/// Drops every packet in and out of a namespace: the host is gone, no RST, no ICMP.
const VANISH: &str = "
table inet ka_vanish {
    chain in { type filter hook input priority 0; policy drop; }
    chain out { type filter hook output priority 0; policy drop; }
}
";

fn probes_then_dead_peer_times_out_the_blocked_reader(server_ip: fn(&Veth) -> String) {
    require_host();
    let cgroup = TestCgroup::new();
    let client_ns = Netns::new();
    let server_ns = Netns::new();
    let veth = Veth::link(&client_ns, &server_ns);
    let mut enforcer = load_enforcer(Stage::Full);
    enforcer.apply(&enforce(POLICY, &[&cgroup])).unwrap();

    let listen = if server_ip(&veth).contains(':') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let server = Workload::spawn(
        env!("CARGO_BIN_EXE_ka-probe"),
        &["listen", listen],
        Placement::netns_only(&server_ns),
    );
    let port = server.expect("listening").remove(0);
    let target = match server_ip(&veth) {
        ip if ip.contains(':') => format!("[{ip}]:{port}"),
        ip => format!("{ip}:{port}"),
    };
    let sent_before = client_ns.netstat("TcpExt", "TCPKeepAlive");
    let client = Workload::spawn(
        env!("CARGO_BIN_EXE_ka-probe"),
        &["connect", &target, "--read"],
        Placement::new(&cgroup, &client_ns),
    );
    client.expect("connected");
    server.expect("accepted");

    // Idle connection, live peer: probes go out every second and are answered.
    wait_for(
        "two keepalive probes on the idle connection",
        Duration::from_secs(10),
        || (client_ns.netstat("TcpExt", "TCPKeepAlive") >= sent_before + 2).then_some(()),
    );

    server_ns.nft(VANISH);
    let vanished = Instant::now();
    let read = client.expect_within("read-error", Duration::from_secs(20));
    let elapsed = vanished.elapsed();
    assert_eq!(
        read[0],
        libc::ETIMEDOUT.to_string(),
        "the blocked read fails with ETIMEDOUT"
    );

    // Dead after `count` unanswered probes `interval` apart, at most `idle` after the last answer.
    let bound = Duration::from_secs(u64::from(
        POLICY.idle_secs + POLICY.interval_secs * POLICY.count,
    ));
    let margin = Duration::from_secs(2);
    assert!(
        elapsed <= bound + margin,
        "took {elapsed:?}, bound {bound:?} + {margin:?}"
    );
    let floor = Duration::from_secs(u64::from(POLICY.interval_secs * (POLICY.count - 1)));
    assert!(
        elapsed >= floor,
        "took {elapsed:?}: too fast for {} unanswered probes",
        POLICY.count
    );
}

#[test]
fn ipv4_probes_flow_and_a_silently_dead_peer_times_out_the_blocked_reader() {
    probes_then_dead_peer_times_out_the_blocked_reader(|veth| veth.b_v4.clone());
}

#[test]
fn ipv6_probes_flow_and_a_silently_dead_peer_times_out_the_blocked_reader() {
    probes_then_dead_peer_times_out_the_blocked_reader(|veth| veth.b_v6.clone());
}
