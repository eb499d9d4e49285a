//! How connections end, read back from the agent (`/metrics`, `keepalive-agent report`) after
//! real failures across a router (client - router - server, network namespaces): a firewall
//! that forgets idle flows and resets or drops what comes later, and a peer that vanishes.
//! Clients and the server are unmodified probes; only the clients' cgroup is in scope.

use std::time::{Duration, Instant};

use keepalive_tests::{
    AgentPlaces, Placement, Routed, TempDir, TestCgroup, Workload, agent_bin, http, probe,
    require_host, wait_for,
};
use serde_json::Value;

/// Seconds the firewall keeps an idle established flow.
const FORGET_AFTER: u64 = 4;
/// The idle a client survives, and the one it does not.
const SHORT_IDLE: Duration = Duration::from_secs(2);
const LONG_IDLE: Duration = Duration::from_secs(6);
const WAIT: Duration = Duration::from_secs(10);

/// Flows start with the client's SYN and live while conntrack tracks them; a packet of a flow
/// it forgot is answered with a reset (`drop` in [`DROPPING`]).
const FIREWALL: &str = "
table inet ka_firewall {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established accept
        iifname \"ka1b\" tcp flags syn ct state new accept
        meta l4proto tcp VERDICT
    }
}
";
const RESETTING: &str = "reject with tcp reset";
const DROPPING: &str = "drop";

/// The network with the firewall on the router, forgetting after [`FORGET_AFTER`] s.
fn firewalled(verdict: &str) -> Routed {
    let net = Routed::new();
    net.router.nft(&FIREWALL.replace("VERDICT", verdict));
    net.router.set_sysctl(
        "net/netfilter/nf_conntrack_tcp_timeout_established",
        &FORGET_AFTER.to_string(),
    );
    // A mid-stream packet of a forgotten flow is not taken up as a new flow.
    net.router
        .set_sysctl("net/netfilter/nf_conntrack_tcp_loose", "0");
    net
}

/// A client that talks on command (`send WAIT_MS`), with its local port.
struct Client {
    what: String,
    port: String,
    v6: bool,
    workload: Workload,
}

fn clients(net: &Routed, cgroup: &TestCgroup, port: &str, what: &str) -> Vec<Client> {
    [
        (false, format!("{}:{port}", net.server_link.b_v4)),
        (true, format!("[{}]:{port}", net.server_link.b_v6)),
    ]
    .into_iter()
    .map(|(v6, target)| {
        let workload = probe(&["converse", &target], Placement::new(cgroup, &net.client));
        let local = workload.expect("connected").remove(1);
        Client {
            what: format!("{what} client to {target}"),
            port: local.rsplit_once(':').unwrap().1.to_owned(),
            v6,
            workload,
        }
    })
    .collect()
}

/// The answers of `clients` to `send WAIT_MS`: `reply N`, `no-reply` or `read-error ERRNO`.
fn exchange<'a>(clients: impl IntoIterator<Item = &'a mut Client>, wait_ms: u32) -> Vec<String> {
    let clients: Vec<&mut Client> = clients.into_iter().collect();
    let mut asked = Vec::new();
    for client in clients {
        client.workload.send(&format!("send {wait_ms}"));
        asked.push(client);
    }
    asked
        .iter()
        .map(|client| {
            client
                .workload
                .try_line_within(Duration::from_millis(u64::from(wait_ms)) + WAIT)
                .unwrap_or_else(|| panic!("{}: no answer to send", client.what))
        })
        .collect()
}

/// Waits until the firewall forgot `clients`' flows and they have idled `idle` since `since`.
fn idle_until_forgotten(net: &Routed, clients: &[&Client], since: Instant, idle: Duration) {
    wait_for(
        "the firewall to forget the idle clients' flows",
        Duration::from_secs(FORGET_AFTER) + WAIT,
        || {
            clients
                .iter()
                .all(|client| !net.router.tracks(client.v6, &client.port))
                .then_some(())
        },
    );
    std::thread::sleep(idle.saturating_sub(since.elapsed()));
}

/// A running agent and its metrics endpoint.
struct Agent {
    addr: String,
    _agent: Workload,
    _policy: TempDir,
}

/// The agent enforcing in `scope` the policy `rules` (the file's text after `[agent]`).
fn agent(places: &AgentPlaces, scope: &TestCgroup, rules: &str) -> Agent {
    let dir = TempDir::new();
    let text = format!(
        "[agent]\ncgroups = [\"{}\"]\n\n{rules}",
        scope.cgroup().name
    );
    let config = dir.write("policy.toml", &text, 0o644);
    let agent = places.spawn(
        agent_bin(),
        &["run", "--config", config.to_str().unwrap(), "--no-existing"],
    );
    // Logged first, then each attachment.
    let addr = http::metrics_addr(&agent, WAIT);
    agent.expect_log("attached", WAIT);
    Agent {
        addr,
        _agent: agent,
        _policy: dir,
    }
}

/// Keepalive after 60 s (too late for the firewall: what the report must find), ends followed.
const LATE_KEEPALIVE: &str = "[default]\nidle = \"60s\"\nends = true\n";

/// A scrape once `series` reads `want` (polled until [`WAIT`]).
fn scrape_until(addr: &str, series: &str, want: f64) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, metrics) = http::get_within(addr, "/metrics", WAIT);
        assert_eq!(code, 200, "{metrics}");
        if metrics.contains(series) && http::sample(&metrics, series) == want {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is not {want}:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn closed(rule: &str, outcome: &str) -> String {
    format!("keepalive_connections_closed_total{{rule=\"{rule}\",outcome=\"{outcome}\"}}")
}

/// `keepalive-agent report` from the running agent: (JSON, plain words).
fn report(addr: &str) -> (Value, String) {
    let run = |json: bool| {
        let mut command = std::process::Command::new(agent_bin());
        command.args(["report", "--metrics-addr", addr]);
        if json {
            command.arg("--json");
        }
        let out = keepalive_tests::succeeds(&mut command);
        String::from_utf8(out.stdout).unwrap()
    };
    let json = run(true);
    (
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}")),
        run(false),
    )
}

/// The report's entry for `network` (e.g. `10.250.2.0/24`).
fn destination<'a>(report: &'a Value, network: &str) -> &'a Value {
    report["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["network"] == network)
        .unwrap_or_else(|| panic!("no destination {network} in {report:#}"))
}

const V4_NETWORK: &str = "10.250.2.0/24";
const V6_NETWORK: &str = "fd00:250:2::/64";

#[test]
fn resets_after_the_firewalls_idle_timeout_are_counted_with_their_idle_and_reported() {
    require_host();
    let net = firewalled(RESETTING);
    let (enforced, neighbour) = (TestCgroup::new(), TestCgroup::new());
    let places = AgentPlaces::new();
    let agent = agent(&places, &enforced, LATE_KEEPALIVE);
    let addr = agent.addr.as_str();
    let server = probe(&["echo", "[::]:0"], Placement::netns_only(&net.server));
    let port = server.expect("listening").remove(0);
    let mut short = clients(&net, &enforced, &port, "short-idle");
    let mut long = clients(&net, &enforced, &port, "long-idle");
    let mut outside = clients(&net, &neighbour, &port, "out-of-scope");
    let all = short
        .iter_mut()
        .chain(long.iter_mut())
        .chain(outside.iter_mut());
    let answers = exchange(all, 2000);
    assert!(
        answers.iter().all(|answer| answer.starts_with("reply")),
        "every client talks while its flow is fresh: {answers:?}"
    );
    let since = Instant::now();

    std::thread::sleep(SHORT_IDLE);
    for answer in exchange(short.iter_mut(), 2000) {
        assert!(
            answer.starts_with("reply"),
            "after {SHORT_IDLE:?} idle: {answer}"
        );
    }
    // Normal closes, while their flows are fresh (FIN). (Left open, they would be reset too
    // when they close later.)
    for client in short {
        client.workload.finish();
    }
    let idle: Vec<&Client> = long.iter().chain(outside.iter()).collect();
    idle_until_forgotten(&net, &idle, since, LONG_IDLE);
    let failed_at = since.elapsed();
    for answer in exchange(long.iter_mut().chain(outside.iter_mut()), 2000) {
        assert_eq!(answer, "read-error 104", "after {failed_at:?} idle: reset");
    }

    // Two resets under the rule (IPv4 and IPv6); the neighbour cgroup's are not counted.
    let metrics = scrape_until(addr, &closed("default", "reset"), 2.0);
    for outcome in ["keepalive", "timeout"] {
        assert_eq!(http::sample(&metrics, &closed("default", outcome)), 0.0);
    }
    assert_eq!(
        http::sample(
            &metrics,
            "keepalive_failure_idle_seconds_count{rule=\"default\"}"
        ),
        2.0
    );
    // Both idled at least LONG_IDLE: nothing in the buckets up to 5 s.
    assert_eq!(
        http::sample(
            &metrics,
            "keepalive_failure_idle_seconds_bucket{rule=\"default\",le=\"5\"}"
        ),
        0.0,
        "{metrics}"
    );

    // The short-idle clients' closes, with the silence they survived.
    let metrics = scrape_until(addr, &closed("default", "closed"), 2.0);
    assert_eq!(http::sample(&metrics, &closed("default", "reset")), 2.0);

    let (json, text) = report(addr);
    assert_eq!(
        json["destinations"].as_array().unwrap().len(),
        2,
        "{json:#}"
    );
    let upper = failed_at.as_secs_f64() + 1.0;
    for network in [V4_NETWORK, V6_NETWORK] {
        let entry = destination(&json, network);
        assert_eq!(entry["port"].as_u64(), Some(port.parse().unwrap()));
        assert_eq!(
            (entry["reset"].as_u64(), entry["rule"].as_str()),
            (Some(1), Some("default"))
        );
        let shortest = entry["min_idle_secs"].as_f64().unwrap();
        assert!(
            (LONG_IDLE.as_secs_f64() - 0.1..=upper).contains(&shortest),
            "{network}: failed after {shortest} s idle; the clients idled {failed_at:?}"
        );
        // The short-idle clients sent after SHORT_IDLE (and a reply came): the timeout lies
        // between that and the shortest failing idle.
        let survived = entry["max_survived_secs"].as_f64().unwrap_or_else(|| {
            panic!("{network}: no survived idle, the short-idle clients' is missing: {entry:#}")
        });
        assert!(
            (SHORT_IDLE.as_secs_f64() - 0.1..=SHORT_IDLE.as_secs_f64() + 1.0).contains(&survived),
            "{network}: survived {survived} s idle; the short clients idled {SHORT_IDLE:?}"
        );
        let below = shortest.floor();
        let advice = format!(
            "none that idled up to {survived:.1} s: the network forgets idle flows between \
             {survived:.1} and {shortest:.1} s; rule `default` probes after 60 s: set idle \
             below {below} s"
        );
        assert!(
            entry["advice"].as_str().unwrap().ends_with(&advice),
            "{entry:#}"
        );
    }
    assert!(
        text.contains(&format!(
            "connections to {V4_NETWORK}:{port} were reset after"
        )),
        "{text}"
    );
    drop(agent);
}

#[test]
fn a_silent_drop_after_the_idle_timeout_is_a_timeout_with_its_idle() {
    require_host();
    let net = firewalled(DROPPING);
    let enforced = TestCgroup::new();
    let places = AgentPlaces::new();
    // TCP_USER_TIMEOUT 2 s: retransmissions give up soon after the first unanswered segment.
    let agent = agent(
        &places,
        &enforced,
        &format!("{LATE_KEEPALIVE}user_timeout = \"2s\"\n"),
    );
    let addr = agent.addr.as_str();
    let server = probe(&["echo", "[::]:0"], Placement::netns_only(&net.server));
    let port = server.expect("listening").remove(0);
    let mut long = clients(&net, &enforced, &port, "long-idle");
    for answer in exchange(long.iter_mut(), 2000) {
        assert!(
            answer.starts_with("reply"),
            "while the flow is fresh: {answer}"
        );
    }
    let since = Instant::now();
    idle_until_forgotten(&net, &long.iter().collect::<Vec<_>>(), since, LONG_IDLE);
    let failed_at = since.elapsed();
    for answer in exchange(long.iter_mut(), 6000) {
        assert_eq!(
            answer, "read-error 110",
            "the user timeout ends it: ETIMEDOUT"
        );
    }
    let metrics = scrape_until(addr, &closed("default", "timeout"), 2.0);
    assert_eq!(http::sample(&metrics, &closed("default", "keepalive")), 0.0);
    let (json, _) = report(addr);
    for network in [V4_NETWORK, V6_NETWORK] {
        let entry = destination(&json, network);
        assert_eq!(entry["timeout"].as_u64(), Some(1), "{entry:#}");
        // The silence before the first unanswered segment, without the retransmissions
        // (the kernel's stamp of them is its first retransmission, an RTO after the send).
        let shortest = entry["min_idle_secs"].as_f64().unwrap();
        assert!(
            (LONG_IDLE.as_secs_f64() - 1.0..=failed_at.as_secs_f64() + 1.0).contains(&shortest),
            "{network}: timed out after {shortest} s idle; the clients idled {failed_at:?}"
        );
    }
    drop(agent);
}

#[test]
fn a_dead_peer_found_by_keepalive_counts_under_the_rule_that_set_it() {
    require_host();
    let net = Routed::new();
    let enforced = TestCgroup::new();
    let places = AgentPlaces::new();
    let server = probe(&["listen", "[::]:0"], Placement::netns_only(&net.server));
    let port = server.expect("listening").remove(0);
    // Only the rule's connections are followed ([default] leaves ends alone).
    let agent = agent(
        &places,
        &enforced,
        &format!(
            "[[rule]]\nname = \"find-dead-peers\"\nremote_port = {port}\nidle = \"1s\"\n\
             interval = \"1s\"\ncount = 2\nends = true\n"
        ),
    );
    let addr = agent.addr.as_str();
    let idle_clients: Vec<Workload> = [
        format!("{}:{port}", net.server_link.b_v4),
        format!("[{}]:{port}", net.server_link.b_v6),
    ]
    .iter()
    .map(|target| {
        let client = probe(
            &["connect", target, "--read"],
            Placement::new(&enforced, &net.client),
        );
        client.expect("connected");
        client
    })
    .collect();
    // The peer vanishes: the router forwards nothing any more.
    net.router.nft(
        "table inet ka_gone {\n chain forward {\n  type filter hook forward priority filter; policy drop;\n }\n}\n",
    );
    for client in &idle_clients {
        let line = client
            .try_line_within(WAIT)
            .unwrap_or_else(|| panic!("the connection did not end within {WAIT:?}"));
        assert_eq!(line, "read-error 110", "keepalive gives up: ETIMEDOUT");
    }
    let metrics = scrape_until(addr, &closed("find-dead-peers", "keepalive"), 2.0);
    assert_eq!(
        http::sample(&metrics, &closed("find-dead-peers", "timeout")),
        0.0
    );
    let (json, text) = report(addr);
    for network in [V4_NETWORK, V6_NETWORK] {
        let entry = destination(&json, network);
        assert_eq!(
            (entry["keepalive"].as_u64(), entry["rule"].as_str()),
            (Some(1), Some("find-dead-peers")),
            "{entry:#}"
        );
    }
    assert!(
        text.contains("keepalive found 1 dead peer at 10.250.2.0/24"),
        "{text}"
    );
    drop(agent);
}

#[test]
fn a_scope_only_observed_reports_its_failures_and_the_idle_to_enforce() {
    require_host();
    let net = firewalled(RESETTING);
    let observed = TestCgroup::new();
    let places = AgentPlaces::new();
    let agent = agent(
        &places,
        &observed,
        "[default]\nmode = \"exempt\"\nends = true\n",
    );
    let addr = agent.addr.as_str();
    let server = probe(&["echo", "[::]:0"], Placement::netns_only(&net.server));
    let port = server.expect("listening").remove(0);
    let mut long = clients(&net, &observed, &port, "observed");
    long.truncate(1);
    for answer in exchange(long.iter_mut(), 2000) {
        assert!(
            answer.starts_with("reply"),
            "while the flow is fresh: {answer}"
        );
    }
    let since = Instant::now();
    let sockets = net.client.established();
    assert!(
        !sockets.is_empty() && sockets.iter().all(|socket| !socket.has_keepalive_timer()),
        "exempt: nothing set on the observed sockets: {sockets:?}"
    );
    idle_until_forgotten(&net, &long.iter().collect::<Vec<_>>(), since, LONG_IDLE);
    for answer in exchange(long.iter_mut(), 2000) {
        assert_eq!(answer, "read-error 104");
    }
    scrape_until(addr, &closed("default", "reset"), 1.0);
    let (json, _) = report(addr);
    let entry = destination(&json, V4_NETWORK);
    assert!(entry["rule_idle_secs"].is_null(), "{entry:#}");
    let below = entry["min_idle_secs"].as_f64().unwrap().floor();
    assert!(
        entry["advice"].as_str().unwrap().ends_with(&format!(
            "rule `default` leaves keepalive alone: enforce idle below {below} s"
        )),
        "{entry:#}"
    );
    drop(agent);
}
