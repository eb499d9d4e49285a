//! The article's promise on a network of our own: two namespaces joined by a veth pair, a
//! client in the enforced cgroup beside a plain one, and a server that later vanishes without
//! a word: the enforced client learns it, the plain one waits forever.

use std::time::{Duration, Instant};

use keepalive_agent::Values;
use keepalive_common::Stage;
use keepalive_tests::{
    Netns, Placement, TestCgroup, Veth, Workload, enforce, load_enforcer, probe_bin, require_host,
    wait_for,
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

/// Two namespaces, a server in one, and the enforced and plain cgroups for clients in the other.
struct Pair {
    enforced: TestCgroup,
    plain: TestCgroup,
    client_ns: Netns,
    server_ns: Netns,
    veth: Veth,
}

impl Pair {
    fn new() -> Self {
        require_host();
        let client_ns = Netns::new();
        let server_ns = Netns::new();
        let veth = Veth::link(&client_ns, &server_ns);
        Self {
            enforced: TestCgroup::new(),
            plain: TestCgroup::new(),
            client_ns,
            server_ns,
            veth,
        }
    }

    /// A probe in the server namespace (`[::]:0` listens on both families).
    fn server(&self, mode: &str) -> (Workload, String) {
        let server = Workload::spawn(
            probe_bin(),
            &[mode, "[::]:0"],
            Placement::netns_only(&self.server_ns),
        );
        let port = server.expect("listening").remove(0);
        (server, port)
    }

    /// `ka-probe ARGS` as a client, enforced or plain.
    fn client(&self, enforced: bool, args: &[&str]) -> Workload {
        let cgroup = if enforced {
            &self.enforced
        } else {
            &self.plain
        };
        Workload::spawn(probe_bin(), args, Placement::new(cgroup, &self.client_ns))
    }

    /// Whether `ss` in the client namespace still shows an established connection from `local`.
    fn still_established(&self, local: &str) -> bool {
        self.client_ns
            .established()
            .iter()
            .any(|entry| entry.local == local)
    }
}

fn target(ip: &str, port: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn probes_then_dead_peer_times_out_the_blocked_reader(server_ip: fn(&Veth) -> String) {
    let pair = Pair::new();
    let mut enforcer = load_enforcer(Stage::Full);
    enforcer.apply(&enforce(POLICY, &[&pair.enforced])).unwrap();

    let (server, port) = pair.server("listen");
    let target = target(&server_ip(&pair.veth), &port);
    let sent_before = pair.client_ns.netstat("TcpExt", "TCPKeepAlive");
    let client = pair.client(true, &["connect", &target, "--read"]);
    client.expect("connected");
    server.expect("accepted");
    let plain = pair.client(false, &["connect", &target, "--read"]);
    let plain_local = plain.expect("connected").remove(1);
    server.expect("accepted");
    let client_ns = &pair.client_ns;

    // Idle connection, live peer: probes go out every second and are answered.
    wait_for(
        "two keepalive probes on the idle connection",
        Duration::from_secs(10),
        || (client_ns.netstat("TcpExt", "TCPKeepAlive") >= sent_before + 2).then_some(()),
    );

    pair.server_ns.nft(VANISH);
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

    // The same window, without the agent: the read is still blocked, the kernel still holds
    // the connection for established.
    let window = (bound + margin).saturating_sub(vanished.elapsed());
    assert_eq!(
        plain.try_line_within(window),
        None,
        "the plain client's read returns nothing within {:?}",
        bound + margin
    );
    assert!(
        pair.still_established(&plain_local),
        "without keepalive the dead connection stays established"
    );
}

/// Idle 60 s (no probe within the window) and a user timeout: a peer that vanishes while the
/// client has unacknowledged data in flight is given up on after the user timeout.
const USER_TIMEOUT: Values = Values {
    idle_secs: 60,
    interval_secs: 5,
    count: 3,
    user_timeout_ms: Some(2000),
};

fn unacked_data_to_a_dead_peer_fails_after_the_user_timeout(server_ip: fn(&Veth) -> String) {
    let pair = Pair::new();
    let mut enforcer = load_enforcer(Stage::Full);
    enforcer
        .apply(&enforce(USER_TIMEOUT, &[&pair.enforced]))
        .unwrap();
    let (_server, port) = pair.server("echo");
    let target = target(&server_ip(&pair.veth), &port);
    let mut clients: Vec<(Workload, String)> = [true, false]
        .into_iter()
        .map(|enforced| {
            let client = pair.client(enforced, &["converse", &target]);
            let local = client.expect("connected").remove(1);
            (client, local)
        })
        .collect();
    for (client, _) in &mut clients {
        client.send("send 2000");
        client.expect("reply");
    }

    pair.server_ns.nft(VANISH);
    let vanished = Instant::now();
    for (client, _) in &mut clients {
        client.send("send 20000");
    }
    let [(enforced, _), (plain, plain_local)] = &clients[..] else {
        unreachable!("two clients")
    };
    let error = enforced.expect_within("read-error", Duration::from_secs(20));
    let elapsed = vanished.elapsed();
    assert_eq!(
        error[0],
        libc::ETIMEDOUT.to_string(),
        "the pending read fails with ETIMEDOUT"
    );
    let timeout = Duration::from_millis(2000);
    let margin = Duration::from_millis(1500);
    assert!(
        elapsed >= timeout && elapsed <= timeout + margin,
        "gave up after {elapsed:?}, user timeout {timeout:?} (+ {margin:?})"
    );
    let window = (timeout + margin).saturating_sub(vanished.elapsed());
    assert_eq!(
        plain.try_line_within(window),
        None,
        "the plain client is still waiting"
    );
    assert!(
        pair.still_established(plain_local),
        "without a user timeout the kernel keeps retransmitting to the dead peer"
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

#[test]
fn ipv4_unacked_data_to_a_dead_peer_fails_after_the_user_timeout() {
    unacked_data_to_a_dead_peer_fails_after_the_user_timeout(|veth| veth.b_v4.clone());
}

#[test]
fn ipv6_unacked_data_to_a_dead_peer_fails_after_the_user_timeout() {
    unacked_data_to_a_dead_peer_fails_after_the_user_timeout(|veth| veth.b_v6.clone());
}
