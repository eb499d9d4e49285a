//! The article's firewall: client - router - server, the router a stateful firewall that only
//! lets tracked flows through and forgets a flow after a few idle seconds. Unmodified clients
//! (no setsockopt) keep their idle connection through it with the agent and lose it without.

use std::time::Duration;

use keepalive_tests::{
    AgentPlaces, Netns, Placement, Routed, TestCgroup, Workload, agent_bin, probe, require_host,
    wait_for,
};

/// Seconds the firewall keeps an idle established flow (the NAT gateway's 350 s, shrunk).
const FORGET_AFTER: &str = "3";

/// Forwarded packets pass only as part of a tracked flow, which only a SYN from the client's
/// side can start; everything else is counted and dropped, silently.
const FIREWALL: &str = "
table inet ka_firewall {
    counter dropped { }
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established accept
        iifname \"ka1b\" tcp flags syn ct state new accept
        counter name \"dropped\" drop
    }
}
";

const LOG_WAIT: Duration = Duration::from_secs(10);

struct Client {
    what: String,
    enforced: bool,
    v6: bool,
    local_port: String,
    workload: Workload,
}

/// Whether the router's connection tracking still holds the flow from `client`'s port.
fn tracked(router: &Netns, client: &Client) -> bool {
    router.tracks(client.v6, &client.local_port)
}

fn dropped(router: &Netns) -> u64 {
    let out = router.exec(
        "nft",
        &["list", "counter", "inet", "ka_firewall", "dropped"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|word| *word != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {text}"))
}

/// The first word of the answer to `send WAIT_MS` from every client, in order.
fn exchange(clients: &mut [Client], wait_ms: u32) -> Vec<String> {
    for client in clients.iter_mut() {
        client.workload.send(&format!("send {wait_ms}"));
    }
    clients
        .iter()
        .map(|client| {
            let line = client
                .workload
                .try_line_within(Duration::from_millis(u64::from(wait_ms)) + LOG_WAIT)
                .unwrap_or_else(|| panic!("{}: no answer to send", client.what));
            line.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn an_idle_connection_survives_a_forgetful_firewall_only_with_the_agent() {
    // One scenario, step by step: the firewall, the idle spell and the answers after it only
    // mean something in this order, on the same connections.
    require_host();
    let net = Routed::new();
    net.router.nft(FIREWALL);
    net.router.set_sysctl(
        "net/netfilter/nf_conntrack_tcp_timeout_established",
        FORGET_AFTER,
    );
    // No picking up mid-stream packets of a forgotten flow as a new one: forgotten is gone.
    net.router
        .set_sysctl("net/netfilter/nf_conntrack_tcp_loose", "0");

    let (enforced, plain) = (TestCgroup::new(), TestCgroup::new());
    let places = AgentPlaces::new();
    let name = enforced.cgroup().name.clone();
    let agent = places.spawn(
        agent_bin(),
        &[
            "run",
            "--cgroup",
            &name,
            "--idle",
            "1",
            "--interval",
            "1",
            "--count",
            "3",
            "--no-existing",
        ],
    );
    agent.expect_log("attached", LOG_WAIT);

    let server = probe(&["echo", "[::]:0"], Placement::netns_only(&net.server));
    let port = server.expect("listening").remove(0);
    let mut clients = Vec::new();
    for (v6, target) in [
        (false, format!("{}:{port}", net.server_link.b_v4)),
        (true, format!("[{}]:{port}", net.server_link.b_v6)),
    ] {
        for (is_enforced, cgroup) in [(true, &enforced), (false, &plain)] {
            let workload = probe(&["converse", &target], Placement::new(cgroup, &net.client));
            let local = workload.expect("connected").remove(1);
            let local_port = local.rsplit_once(':').unwrap().1.to_string();
            clients.push(Client {
                what: format!(
                    "{} client to {target}",
                    if is_enforced { "enforced" } else { "plain" }
                ),
                enforced: is_enforced,
                v6,
                local_port,
                workload,
            });
        }
    }
    let answers = exchange(&mut clients, 2000);
    assert!(
        answers.iter().all(|answer| answer == "reply"),
        "every client talks through the firewall while its flow is fresh: {answers:?}"
    );
    let keepalives_before = net.client.netstat("TcpExt", "TCPKeepAlive");

    // Idle, until the firewall has forgotten the plain clients' flows: the kernel's own
    // conntrack table, not a guess at its timing.
    wait_for(
        "the firewall to forget the plain clients' idle flows",
        Duration::from_secs(20),
        || {
            clients
                .iter()
                .filter(|client| !client.enforced)
                .all(|client| !tracked(&net.router, client))
                .then_some(())
        },
    );
    for client in clients.iter().filter(|client| client.enforced) {
        assert!(
            tracked(&net.router, client),
            "{}: keepalive probes keep the firewall's state alive",
            client.what
        );
    }
    assert!(
        net.client.netstat("TcpExt", "TCPKeepAlive") >= keepalives_before + 2,
        "the enforced clients sent keepalive probes while idle"
    );

    let dropped_before = dropped(&net.router);
    let answers = exchange(&mut clients, 3000);
    for (client, answer) in clients.iter().zip(&answers) {
        let expected = if client.enforced { "reply" } else { "no-reply" };
        assert_eq!(answer, expected, "{} after the idle spell", client.what);
    }
    assert!(
        dropped(&net.router) > dropped_before,
        "the plain clients' requests died at the firewall"
    );
}
