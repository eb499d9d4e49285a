//! Operating the agent binary: pinned state across SIGKILL and restarts, `status`, `detach`,
//! and one-sentence errors.

use std::{process::Command, time::Duration};

use keepalive_tests::{
    AgentPlaces, Netns, Placement, TestCgroup, agent_bin, kernel_links, links_per_cgroup, probe,
    require_host,
};

const LOG_WAIT: Duration = Duration::from_secs(10);

fn run_args<'a>(cgroup: &'a str, idle: &'a str) -> Vec<&'a str> {
    vec!["run", "--cgroup", cgroup, "--idle", idle, "--no-existing"]
}

#[test]
fn connections_across_sigkill_and_restart_are_all_enforced() {
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    let mut first = places.spawn(agent_bin(), &run_args(&name, "101"));
    first.expect_log("attached", LOG_WAIT);

    let load = probe(
        &["tally", "127.0.0.1:0", "30000"],
        Placement::new(&cgroup, &netns),
    );
    load.expect("listening");
    first.signal_and_wait(libc::SIGKILL, LOG_WAIT);
    let mut second = places.spawn(agent_bin(), &run_args(&name, "102"));
    let adopted = second.expect_log("attached", LOG_WAIT);
    assert!(
        adopted.contains("adopted=true"),
        "the new agent takes over: {adopted}"
    );
    assert_eq!(
        kernel_links(&cgroup).len(),
        links_per_cgroup(),
        "one link per program, not two of each"
    );

    let mut seen = Vec::new();
    while let Some(line) = load.try_line_within(Duration::from_secs(30)) {
        if line.starts_with("tallied") {
            break;
        }
        seen.push(line);
    }
    let mut total = 0;
    for line in &seen {
        let words: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|w| w.parse().unwrap())
            .collect();
        let [keepalive, idle, _, _, n] = words[..] else {
            panic!("unexpected line {line}");
        };
        assert_eq!(keepalive, 1, "a connection without keepalive: {seen:?}");
        assert!(
            idle == 101 || idle == 102,
            "a connection with idle {idle}: {seen:?}"
        );
        total += n;
    }
    assert_eq!(total, 60_000, "both ends of every connection: {seen:?}");
    assert_eq!(second.signal_and_wait(libc::SIGTERM, LOG_WAIT), Some(0));
    assert_eq!(
        kernel_links(&cgroup).len(),
        0,
        "SIGTERM without --persist detaches"
    );
}

#[test]
fn persist_keeps_enforcement_until_detach_and_status_tells() {
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    let mut args = run_args(&name, "103");
    args.push("--persist");
    let mut agent = places.spawn(agent_bin(), &args);
    agent.expect_log("attached", LOG_WAIT);
    assert_eq!(agent.signal_and_wait(libc::SIGTERM, LOG_WAIT), Some(0));
    assert_eq!(
        kernel_links(&cgroup).len(),
        links_per_cgroup(),
        "--persist leaves enforcement in place"
    );
    let place = Placement::new(&cgroup, &netns);
    let conn = keepalive_tests::connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!(conn.client().idle_secs, 103, "and it still enforces");

    let status = places.command(agent_bin(), &["status", "--json"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["agent_running"], false);
    assert_eq!(json["attached"][0]["cgroup"], name.as_str());
    assert_eq!(
        json["attached"][0]["programs"].as_array().map(Vec::len),
        Some(links_per_cgroup())
    );
    assert_eq!(json["rules"][0]["name"], "default");
    assert!(
        json["rules"][0]["counters"]["set"].as_u64().unwrap() >= 2,
        "{json}"
    );
    let table = places.command(agent_bin(), &["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&name) && table.contains("default"),
        "{table}"
    );

    let detach = places.command(agent_bin(), &["detach"]);
    assert!(
        detach.status.success(),
        "{}",
        String::from_utf8_lossy(&detach.stderr)
    );
    assert_eq!(
        kernel_links(&cgroup).len(),
        0,
        "bpftool agrees: nothing attached"
    );
    let after = places.command(agent_bin(), &["status"]);
    assert!(
        String::from_utf8_lossy(&after.stdout).contains("nothing attached"),
        "{}",
        String::from_utf8_lossy(&after.stdout)
    );
    let untouched = keepalive_tests::connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert!(!untouched.client().enabled);
}

#[test]
fn setup_errors_are_one_sentence() {
    require_host();
    let places = AgentPlaces::new();
    let places_args = places.args();
    let bpffs = [
        "--bpffs",
        "/proc/ka-test-no-bpffs",
        "--state-dir",
        places_args[3].as_str(),
    ];
    let mut missing = vec!["run", "--cgroup", "/ka-test-does-not-exist"];
    missing.extend(places_args.iter().map(String::as_str));
    let mut bad_bpffs = vec!["run", "--cgroup", "/"];
    bad_bpffs.extend(bpffs);
    let cases: [(&[&str], &str); 2] = [(&missing, "not found"), (&bad_bpffs, "bpffs")];
    for (args, expected) in cases {
        let out = Command::new(agent_bin()).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let error = stderr
            .lines()
            .find(|line| line.contains("error:"))
            .unwrap_or_default();
        assert!(
            !out.status.success() && error.contains(expected),
            "{args:?}: {stderr}"
        );
        assert_eq!(
            stderr.matches("error:").count(),
            1,
            "one error line: {stderr}"
        );
    }
}
