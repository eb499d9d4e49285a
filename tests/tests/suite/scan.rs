//! `scan`, `explain` and the missing-keepalive gauge against real connections in throwaway
//! cgroups and network namespaces: some whose application set keepalive itself, some without,
//! IPv4 and IPv6. Scan's values must be what getsockopt reads on each socket, its rule what
//! `Policy::decide` says, and explain's rule the one the running agent counts.

use std::{
    collections::HashMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use keepalive_agent::{policy::file, without_keepalive};
use keepalive_common::{Stage, host::parse_kernel_version};
use keepalive_tests::{
    AgentPlaces, Netns, Placement, TestCgroup, Workload, agent_bin, connect,
    http::{self, sample},
    load_enforcer, probe, require_host,
    scan::{
        TempFile, app_keepalive, decided, held, netns_inode, reported, run, scan, scan_with, text,
    },
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// The policy of these tests: fill by default, audit towards ::1 (idle 20 s, which no socket
/// here has), connections that exist at start left alone.
fn policy_text(root: &TestCgroup) -> String {
    format!(
        "[agent]\ncgroups = [\"{}\"]\nexisting = false\n[default]\nmode = \"fill\"\n\
         [[rule]]\nname = \"v6-audit\"\nremote = \"::1/128\"\nmode = \"audit\"\nidle = \"20s\"\n",
        root.scope()
    )
}

/// What the policy of [`policy_text`] does to a socket: fill sets where keepalive is off and
/// keeps where it is on; audit counts both (neither has idle 20 s).
fn expected_action(rule: &str, keepalive: bool) -> &'static str {
    match (rule, keepalive) {
        ("v6-audit", _) => "audited",
        (_, true) => "kept",
        (_, false) => "set",
    }
}

#[test]
fn scan_reports_what_the_sockets_hold_and_what_the_policy_would_do() {
    require_host();
    let root = TestCgroup::new();
    let netns = Netns::new();
    let place = Placement::new(&root, &netns);
    let places = AgentPlaces::new();
    let config = places.state_dir().with_file_name("policy.toml");
    std::fs::write(&config, policy_text(&root)).unwrap();
    let policy = file::load(&config).unwrap();

    let app_v4 = app_keepalive("127.0.0.1", place);
    let app_v6 = app_keepalive("::1", place);
    let plain_v4 = connect("0.0.0.0:0", "127.0.0.1", place, place);
    let plain_v6 = connect("[::]:0", "::1", place, place);
    let workloads: Vec<&Workload> = app_v4.iter().chain(&app_v6).collect();

    let cgroup = root.path().to_str().unwrap();
    let (entries, summary) = scan(&["--config", config.to_str().unwrap(), "--cgroup", cgroup]);
    assert_eq!(
        entries.len(),
        8,
        "four connections, both ends: {entries:#?}"
    );
    let mut seen_app = 0;
    for entry in &entries {
        assert_eq!(entry["cgroup"], root.scope().as_str(), "{entry}");
        assert_eq!(entry["container"], Value::Null, "no engine here: {entry}");
        assert_eq!(entry["labels"], Value::Null, "{entry}");
        let values = reported(entry);
        let truth = held(entry, [&plain_v4, &plain_v6], &workloads);
        assert_eq!(values, truth, "scan against getsockopt: {entry}");
        if values.enabled {
            seen_app += 1;
            assert_eq!(
                (values.idle_secs, values.interval_secs, values.count),
                (60, 5, 3),
                "the application's own values: {entry}"
            );
        }
        let rule = decided(&policy, entry);
        assert_eq!(
            entry["rule"].as_str(),
            rule.as_deref(),
            "Policy::decide: {entry}"
        );
        let rule = rule.unwrap();
        assert_eq!(
            entry["action"].as_str(),
            Some(expected_action(&rule, values.enabled)),
            "{entry}"
        );
        let v6 = entry["remote"].as_str().unwrap().starts_with('[');
        assert_eq!(rule == "v6-audit", v6, "{entry}");
    }
    assert_eq!(seen_app, 2, "the two Python clients have keepalive on");
    assert_eq!(summary["connections"], 8, "{summary}");
    assert_eq!(summary["without_keepalive"], 6, "{summary}");
    assert_eq!(
        summary["would_change"], 3,
        "fill sets the three v4 ends without keepalive: {summary}"
    );
    assert_eq!(summary["audited"], 4, "{summary}");
    let groups = summary["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{summary}");
    assert_eq!(groups[0]["cgroup"], root.scope().as_str());

    agent_agrees(&places, &config, place, &entries);
}

/// The running agent's policy is the one judged by without --config, and the rule explain
/// names is the one the agent counts for a new connection of that kind.
fn agent_agrees(places: &AgentPlaces, config: &Path, place: Placement<'_>, entries: &[Value]) {
    let cgroup = place.cgroup.unwrap().path().to_str().unwrap();
    let agent = places.spawn(agent_bin(), &["run", "--config", config.to_str().unwrap()]);
    agent.expect_log("policy applied", WAIT);
    let state_dir = places.state_dir();
    let (again, _) = scan(&[
        "--cgroup",
        cgroup,
        "--state-dir",
        state_dir.to_str().unwrap(),
    ]);
    let actions = |list: &[Value]| -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = list
            .iter()
            .map(|e| (e["local"].to_string(), e["action"].to_string()))
            .collect();
        pairs.sort();
        pairs
    };
    assert_eq!(
        actions(&again),
        actions(entries),
        "existing = false: untouched"
    );
    for (listen, host, expected) in [
        ("[::]:0", "::1", "v6-audit"),
        ("0.0.0.0:0", "127.0.0.1", "default"),
    ] {
        let remote = if host.contains(':') {
            format!("[{host}]:5555")
        } else {
            format!("{host}:5555")
        };
        let rule = explained_rule(config, cgroup, &remote);
        assert_eq!(rule, expected, "explain {remote}");
        let before = rule_seen(places, &rule);
        let _new = connect(listen, host, place, place);
        let deadline = Instant::now() + WAIT;
        while rule_seen(places, &rule) < before + 2 {
            assert!(
                Instant::now() < deadline,
                "the agent did not count both ends of a connection to {host} under {rule}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(agent);
}

/// The rule `explain` names for an outbound connection of `cgroup` to `remote`.
fn explained_rule(config: &Path, cgroup: &str, remote: &str) -> String {
    let out = run(&[
        "explain",
        "--config",
        config.to_str().unwrap(),
        "--cgroup",
        cgroup,
        "--remote",
        remote,
    ]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let line = said
        .lines()
        .find_map(|line| line.strip_prefix("decided by: "))
        .unwrap_or_else(|| panic!("no decision in {said}"));
    if line.starts_with("the default") {
        return "default".into();
    }
    line.strip_prefix("rule \"")
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no rule in {line}"))
        .to_string()
}

/// Connections the running agent counted for `rule` (status --json).
fn rule_seen(places: &AgentPlaces, rule: &str) -> u64 {
    let out = places.command(agent_bin(), &["status", "--json"]);
    let status: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["name"] == rule)
        .map(|entry| entry["counters"]["seen"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("no rule {rule} in {status}"))
}

/// The gauge's value for `scope`, polled until it equals `want` or the deadline passes.
fn gauge_reaches(addr: &str, scope: &str, want: f64) {
    let name = format!("keepalive_connections_without_keepalive{{scope=\"{scope}\"}}");
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        let (_, metrics) = http::get_within(addr, "/metrics", WAIT);
        if metrics.lines().any(|line| line.starts_with(&name)) && sample(&metrics, &name) == want {
            return;
        }
        last = metrics;
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name} did not reach {want} within {WAIT:?}:\n{last}");
}

#[test]
fn the_gauge_follows_connections_as_they_open_and_close() {
    let host = require_host();
    let version = parse_kernel_version(&host.kernel_release).unwrap();
    let root = TestCgroup::new();
    let netns = Netns::new();
    let place = Placement::new(&root, &netns);
    let places = AgentPlaces::new();
    let config = places.state_dir().with_file_name("policy.toml");
    // audit changes nothing: whatever lacks keepalive stays without it.
    let text = format!(
        "[agent]\ncgroups = [\"{}\"]\n[default]\nmode = \"audit\"\n",
        root.scope()
    );
    std::fs::write(&config, text).unwrap();
    // The count says when it finds nothing could have changed and keeps its last answer.
    let agent = places.spawn_with_env(
        agent_bin(),
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--missing-interval",
            "1",
        ],
        &[("RUST_LOG", "info,keepalive_agent::status::live=debug")],
    );
    let addr = http::metrics_addr(&agent, WAIT);
    agent.expect_log("policy applied", WAIT);
    let scope = root.scope().to_string();
    gauge_reaches(&addr, &scope, 0.0);
    // With the kernel's count (5.15) a quiet period keeps the last count; every change below
    // must still reach the gauge within a period or two.
    if version >= (5, 15) {
        agent.expect_log("connections unchanged since the last count", WAIT);
    }

    let v4 = connect("0.0.0.0:0", "127.0.0.1", place, place);
    let v6 = connect("[::]:0", "::1", place, place);
    gauge_reaches(&addr, &scope, 4.0);
    // The Python client's end has keepalive; its server's accepted end does not.
    let app = app_keepalive("127.0.0.1", place);
    gauge_reaches(&addr, &scope, 5.0);
    drop(v4);
    gauge_reaches(&addr, &scope, 3.0);
    drop(app);
    drop(v6);
    gauge_reaches(&addr, &scope, 0.0);
    let (_, metrics) = http::get_within(&addr, "/metrics", WAIT);
    assert_eq!(
        sample(
            &metrics,
            &format!("keepalive_connections_established{{scope=\"{scope}\"}}")
        ),
        0.0
    );
}

/// The gauge counts through the kernel (the count iterator: each socket's SO_KEEPALIVE) where
/// it loads, else with a socket dump (keepalive: a timer pending): on idle connections, IPv4
/// and IPv6, with the application's keepalive and without, both say the same.
#[test]
fn the_gauges_kernel_count_and_its_socket_dump_agree_on_idle_connections() {
    let host = require_host();
    let version = parse_kernel_version(&host.kernel_release).unwrap();
    let root = TestCgroup::new();
    let netns = Netns::new();
    let place = Placement::new(&root, &netns);
    let _v4 = connect("0.0.0.0:0", "127.0.0.1", place, place);
    let _v6 = connect("[::]:0", "::1", place, place);
    let _app = app_keepalive("::1", place);
    let mount = keepalive_common::host::cgroup2_mount().unwrap();
    let scopes = [root.scope()];
    let dumped = without_keepalive::count(&mount, &scopes, None).unwrap();
    // Six ends; only the application's client end has keepalive.
    let scope = &dumped[&root.scope().to_string()];
    assert_eq!((scope.established, scope.without_keepalive), (6, 5));
    let enforcer = load_enforcer(Stage::Full);
    let Some(counter) = enforcer.connection_counter() else {
        // Before 5.15 the socket's cgroup is packed in `sk_cgrp_data.val`, no field the BTF
        // names: the gauge dumps there.
        assert!(
            version < (5, 15),
            "kernel {} refused the count iterator",
            host.kernel_release
        );
        return;
    };
    let counted = without_keepalive::count(&mount, &scopes, Some(&counter)).unwrap();
    assert_eq!(counted, dumped);
    let scope = &counted[&root.scope().to_string()];
    assert_eq!((scope.established, scope.without_keepalive), (6, 5));
}

/// Scan with fewer rights: what it cannot read is reported as unknown, never guessed.
#[test]
fn without_the_rights_scan_says_what_it_could_not_read() {
    require_host();
    let root = TestCgroup::new();
    let netns = Netns::new();
    let config = TempFile::with(&format!(
        "[agent]\ncgroups = [\"{}\"]\n[default]\nmode = \"fill\"\n",
        root.scope()
    ));
    // In the scan's own namespace (no setns needed), and in another one.
    let host = Placement {
        cgroup: Some(&root),
        ..Placement::default()
    };
    let _here = connect("127.0.0.1:0", "127.0.0.1", host, host);
    let _there = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        Placement::new(&root, &netns),
        Placement::new(&root, &netns),
    );
    let cgroup = root.path().to_str().unwrap();
    let config = config.path();
    let limited = |drop: &str| -> (Vec<Value>, Value) {
        let mut command = Command::new("setpriv");
        command
            .args([
                &format!("--inh-caps=-{drop}"),
                &format!("--bounding-set=-{drop}"),
                "--",
            ])
            .arg(agent_bin());
        scan_with(
            command,
            &["--config", config.to_str().unwrap(), "--cgroup", cgroup],
        )
    };

    // Other processes' namespaces are hidden, but the named one is found in /run/netns.
    let (entries, summary) = limited("sys_ptrace");
    assert_eq!(entries.len(), 4, "{entries:#?}");
    for entry in &entries {
        assert_eq!(entry["keepalive"], Value::Null, "{entry}");
        assert_eq!(
            entry["action"], "unknown",
            "fill needs the options: {entry}"
        );
        assert!(
            entry["unreadable"]
                .as_str()
                .unwrap()
                .contains("CAP_SYS_PTRACE"),
            "{entry}"
        );
    }
    assert_eq!(summary["unknown"], 4, "{summary}");
    assert!(
        summary["hidden_processes"].as_u64().unwrap() > 0,
        "{summary}"
    );

    let (entries, summary) = limited("sys_admin");
    assert_eq!(
        entries.len(),
        2,
        "only the scan's own namespace: {entries:#?}"
    );
    let skipped = summary["skipped_namespaces"].to_string();
    assert!(
        skipped.contains(&netns_inode(&netns).to_string()) && skipped.contains("CAP_SYS_ADMIN"),
        "{summary}"
    );
}

/// Scan time for many connections: `KA_SCAN_CONNECTIONS` (default 10,000) loopback
/// connections, both ends held by processes of 5,000 connections each (the host's hard
/// descriptor limit is 20,000 per process). Run by hand:
/// `cargo xtask test --only scan -- --ignored --nocapture scan_time`.
#[test]
#[ignore = "a measurement, run by hand"]
#[expect(
    clippy::print_stdout,
    reason = "the figures are the measurement's output"
)]
fn scan_time_for_many_connections() {
    require_host();
    let connections: usize = std::env::var("KA_SCAN_CONNECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let root = TestCgroup::new();
    let netns = Netns::new();
    netns.set_sysctl("net/ipv4/ip_local_port_range", "1024 65000");
    let place = Placement::new(&root, &netns);
    let per = 5_000;
    let holders: Vec<Workload> = (0..connections.div_ceil(per))
        .map(|i| {
            let count = per.min(connections - i * per).to_string();
            probe(&["hold", "127.0.0.1:0", &count], place)
        })
        .collect();
    for holder in &holders {
        holder.expect_within("holding", Duration::from_secs(300));
    }
    let config = TempFile::with(&format!("[agent]\ncgroups = [\"{}\"]\n", root.scope()));
    let config = config.path();
    let cgroup = root.path().to_str().unwrap();
    let mut figures = HashMap::new();
    for json in [true, false] {
        let started = Instant::now();
        let mut args = vec![
            "scan",
            "--config",
            config.to_str().unwrap(),
            "--cgroup",
            cgroup,
        ];
        if json {
            args.push("--json");
        }
        let out = Command::new(agent_bin())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .output()
            .unwrap();
        let took = started.elapsed();
        assert!(out.status.success(), "{}", text(&out));
        let lines = out.stdout.iter().filter(|byte| **byte == b'\n').count();
        figures.insert(if json { "json" } else { "table" }, (took, lines));
    }
    let started = Instant::now();
    let mount = keepalive_common::host::cgroup2_mount().unwrap();
    let counts = without_keepalive::count(&mount, &[root.scope()], None).unwrap();
    let gauge = started.elapsed();
    println!(
        "scan of {connections} connections ({} sockets): --json {:?} ({} lines), table {:?}; \
         the gauge's count {gauge:?} ({counts:?})",
        connections * 2,
        figures["json"].0,
        figures["json"].1,
        figures["table"].0,
    );
}
