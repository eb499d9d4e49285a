//! The agent binary with a policy file: live reloads on change and on SIGHUP, bad files
//! refused with the running policy kept, and `check`.

use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use keepalive_tests::{
    AgentPlaces, Keepalive, Netns, Placement, TempDir, TestCgroup, Workload, agent_bin, connect,
    require_host, succeeds,
};

const LOG_WAIT: Duration = Duration::from_secs(10);

fn policy_text(cgroup: &TestCgroup, idle: &str) -> String {
    format!(
        "[agent]\ncgroups = [\"{}\"]\n[default]\nidle = \"{idle}\"\n",
        cgroup.scope()
    )
}

/// Replaces the file the way editors and config tools do: write a new file, rename it over.
fn replace(path: &std::path::Path, text: &str) {
    let staging = path.with_extension("new");
    fs::write(&staging, text).unwrap();
    fs::rename(&staging, path).unwrap();
}

fn idle(idle_secs: u32) -> Keepalive {
    Keepalive {
        enabled: true,
        idle_secs,
        interval_secs: 5,
        count: 3,
        user_timeout_ms: 0,
    }
}

/// The agent's log lines up to the first containing `text` (not included).
fn lines_until(agent: &Workload, text: &str) -> Vec<String> {
    let deadline = Instant::now() + LOG_WAIT;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.try_line_within(left) {
            Some(line) if line.contains(text) => return lines,
            Some(line) => lines.push(line),
            None => panic!("no log line with `{text}` within {LOG_WAIT:?}: {lines:#?}"),
        }
    }
}

#[test]
fn file_changes_reload_live_and_bad_files_leave_the_running_policy() {
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let dir = TempDir::new();
    let places = AgentPlaces::new();
    let config = dir.join("policy.toml");
    fs::write(&config, policy_text(&cgroup, "91s")).unwrap();
    let place = Placement::new(&cgroup, &netns);
    let mut agent = places.spawn(agent_bin(), &["run", "--config", config.to_str().unwrap()]);
    agent.expect_log("attached", LOG_WAIT);
    let first = connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!(first.client(), idle(91));

    // A file with an error is refused, loudly, and changes nothing.
    replace(&config, "[default]\ncount = 200\n");
    let refused = agent.expect_log("policy refused", LOG_WAIT);
    assert!(
        refused.contains("policy.toml:2") && refused.contains("1..=127"),
        "{refused}"
    );
    let during = connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!(during.client(), idle(91), "the running policy stays");

    // Files coming and going beside it (an editor's swap file) do not read, log and count the
    // refused version again; SIGHUP does.
    for name in [".policy.toml.swp", "policy.toml~"] {
        fs::write(dir.join(name), "scratch").unwrap();
        fs::remove_file(dir.join(name)).unwrap();
    }
    agent.signal(libc::SIGHUP);
    let again = agent.expect_log("policy refused", LOG_WAIT);
    assert!(
        again.contains("SIGHUP"),
        "only SIGHUP reads it again: {again}"
    );

    replace(&config, &policy_text(&cgroup, "92s"));
    let between = lines_until(&agent, "policy reloaded");
    assert!(
        !between.iter().any(|line| line.contains("policy refused")),
        "the refused version was read again: {between:#?}"
    );
    // Existing connections are swept off the event loop, after the reload is logged.
    agent.expect_log("existing connections", LOG_WAIT);
    let after = connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!((after.client(), after.server()), (idle(92), idle(92)));
    assert_eq!(
        first.client(),
        idle(92),
        "connections that existed get the change"
    );

    // SIGHUP reads the file again; unchanged content is a no-op.
    agent.signal(libc::SIGHUP);
    agent.expect_log("policy unchanged", LOG_WAIT);

    fs::remove_file(&config).unwrap();
    let missing = agent.expect_log("policy refused", LOG_WAIT);
    assert!(missing.contains("cannot read policy file"), "{missing}");
    assert_eq!(agent.signal_and_wait(libc::SIGTERM, LOG_WAIT), Some(0));
}

#[test]
fn check_validates_without_loading_and_names_file_line_field_and_range() {
    let dir = TempDir::new();
    let good = dir.join("good.toml");
    fs::write(&good, include_str!("../../../examples/policy.toml")).unwrap();
    let out = succeeds(
        Command::new(agent_bin())
            .args(["check", "--config"])
            .arg(&good),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 4 rule(s)"));

    let cases = [
        (
            "[[rule]]\nname = \"db\"\nidle = \"40000s\"\n",
            ":3:",
            "idle = 40000 s is out of range: allowed 1..=32767",
        ),
        ("[default]\nintervall = \"5s\"\n", ":2:", "intervall"),
        (
            "[[rule]]\nremote = \"10.0.0.1/8\"\n",
            ":2:",
            "did you mean 10.0.0.0/8",
        ),
    ];
    for (text, line, message) in cases {
        let bad = dir.join("bad.toml");
        fs::write(&bad, text).unwrap();
        let out = Command::new(agent_bin())
            .args(["check", "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("bad.toml{line}")) && stderr.contains(message),
            "{stderr}"
        );
    }
    for (path, message) in [
        (dir.join("missing.toml"), "cannot read policy file"),
        (dir.path().to_path_buf(), "is a directory"),
    ] {
        let out = Command::new(agent_bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{stderr}"
        );
    }
}
