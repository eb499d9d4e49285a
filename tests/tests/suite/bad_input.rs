//! Bad input and who may change policy: every malformed policy in `corpus/bad-policies` (and
//! missing, unreadable, directory and world-writable ones) gets one clear error from `check`,
//! is refused by a running agent with its policy untouched, and nothing panics. The agent's
//! pins are root's alone, and its metrics listen on loopback unless told otherwise.

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use keepalive_tests::{
    AgentCopy, AgentPlaces, Netns, Placement, TempDir, TestCgroup, Workload, agent_bin, connect,
    require_host, wait_for,
};

const LOG_WAIT: Duration = Duration::from_secs(10);
/// The unprivileged user of Debian (and most distributions).
const NOBODY: u32 = 65534;

/// Every corpus file with what its error must mention (its `# expect:` first line).
fn corpus() -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/bad-policies");
    let mut files: Vec<(PathBuf, String)> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let text = fs::read(&path).unwrap();
            let first = String::from_utf8_lossy(text.split(|b| *b == b'\n').next().unwrap());
            let expect = first
                .strip_prefix("# expect:")
                .unwrap_or_else(|| panic!("{} has no `# expect:` line", path.display()))
                .trim()
                .to_string();
            (path, expect)
        })
        .collect();
    files.sort();
    assert!(files.len() >= 40, "{} corpus files", files.len());
    files
}

/// `keepalive-agent check --config PATH`, as `uid` when given (then from a copy of the agent
/// that user may run).
fn check(path: &Path, uid: Option<u32>) -> Output {
    let Some(uid) = uid else {
        return Command::new(agent_bin())
            .args(["check", "--config"])
            .arg(path)
            .output()
            .unwrap();
    };
    let agent = AgentCopy::new();
    Command::new(agent.path())
        .args(["check", "--config"])
        .arg(path)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

/// A refusal: exit status 1 (not a panic's 101, not a signal), one line on stderr naming
/// `name` and mentioning `expect`.
fn assert_one_clear_error(out: &Output, name: &str, expect: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{name}: one line: {stderr}"
    );
    assert!(
        stderr.contains(name),
        "{name}: the error names the file: {stderr}"
    );
    assert!(
        stderr.contains(expect),
        "{name}: should mention {expect:?}: {stderr}"
    );
    stderr
}

#[test]
fn check_gives_every_malformed_policy_one_clear_error() {
    require_host();
    for (path, expect) in corpus() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_one_clear_error(&check(&path, None), &name, &expect);
    }
}

#[test]
fn check_refuses_missing_unreadable_directory_foreign_and_writable_by_anyone() {
    require_host();
    let scratch = TempDir::new();
    let good = "[default]\nidle = \"30s\"\n";
    let missing = scratch.join("missing.toml");
    assert_one_clear_error(&check(&missing, None), "missing.toml", "No such file");
    assert_one_clear_error(&check(scratch.path(), None), "ka-test", "is a directory");
    let private = scratch.write("private.toml", good, 0o600);
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o755)).unwrap();
    assert_one_clear_error(
        &check(&private, Some(NOBODY)),
        "private.toml",
        "Permission denied",
    );
    let open = scratch.write("open.toml", good, 0o666);
    assert_one_clear_error(&check(&open, None), "open.toml", "writable by every user");
    let foreign = scratch.write("foreign.toml", good, 0o644);
    std::os::unix::fs::chown(&foreign, Some(NOBODY), None).unwrap();
    assert_one_clear_error(&check(&foreign, None), "foreign.toml", "not root");
    let fine = scratch.write("fine.toml", good, 0o644);
    assert!(check(&fine, None).status.success());
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o777)).unwrap();
    assert_one_clear_error(&check(&fine, None), "fine.toml", "its directory");
}

/// A running agent (JSON logs) with a good policy file for `cgroup`.
struct Running {
    // Fields drop in order: the agent must be gone before its directories are removed.
    agent: Workload,
    config: PathBuf,
    places: AgentPlaces,
}

fn good_policy(cgroup: &TestCgroup) -> String {
    format!(
        "[agent]\ncgroups = [\"{}\"]\n[default]\nidle = \"123s\"\n",
        cgroup.scope()
    )
}

impl Running {
    fn start(cgroup: &TestCgroup) -> Self {
        let places = AgentPlaces::new();
        let config = places.state_dir().with_file_name("policy.toml");
        fs::write(&config, good_policy(cgroup)).unwrap();
        let config_arg = config.display().to_string();
        let agent = places.spawn(
            agent_bin(),
            &[
                "--log-format",
                "json",
                "run",
                "--config",
                &config_arg,
                "--no-existing",
            ],
        );
        agent.expect_log("attached", LOG_WAIT);
        Self {
            agent,
            config,
            places,
        }
    }

    /// SIGHUP, then the refusal whose error mentions `expect` (the file watch may log its own
    /// refusals of the same file in between).
    fn refused(&self, what: &str, expect: &str) {
        self.agent.signal(libc::SIGHUP);
        loop {
            let line = self.agent.expect_log("policy", LOG_WAIT);
            let json: serde_json::Value = serde_json::from_str(&line).unwrap();
            let message = json["fields"]["message"].as_str().unwrap_or_default();
            assert!(
                !message.starts_with("policy reloaded"),
                "{what}: the agent took it: {line}"
            );
            let error = json["fields"]["error"].as_str().unwrap_or_default();
            if message.starts_with("policy refused") && error.contains(expect) {
                assert!(!error.contains('\n'), "{what}: one line: {error}");
                return;
            }
        }
    }
}

#[test]
fn a_running_agent_refuses_every_bad_file_and_keeps_its_policy() {
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let running = Running::start(&cgroup);
    let config = &running.config;
    let mut tried = 0;
    for (path, expect) in corpus() {
        // Replaced in one step, as editors and ConfigMaps do (an in-place rewrite is the next
        // test's subject).
        let staging = config.with_extension("new");
        fs::copy(&path, &staging).unwrap();
        fs::rename(&staging, config).unwrap();
        running.refused(&path.display().to_string(), &expect);
        tried += 1;
    }
    fs::remove_file(config).unwrap();
    running.refused("a missing file", "No such file");
    fs::create_dir(config).unwrap();
    running.refused("a directory", "is a directory");
    fs::remove_dir(config).unwrap();
    fs::write(config, good_policy(&cgroup)).unwrap();
    fs::set_permissions(config, fs::Permissions::from_mode(0o666)).unwrap();
    running.refused("a world-writable file", "writable by every user");
    tried += 3;

    let place = Placement::new(&cgroup, &netns);
    let conn = connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!(
        conn.client().idle_secs,
        123,
        "the first policy is still the one in force after {tried} bad files"
    );
    // The state file follows the log line that announced the last refusal.
    wait_for("status to count every refusal", LOG_WAIT, || {
        let out = running.places.command(agent_bin(), &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (status["policy"]["reloads_failed"].as_u64().unwrap_or(0) >= tried).then_some(())
    });
}

#[test]
fn a_file_being_rewritten_in_place_is_not_read_half_way() {
    use std::io::Write as _;
    require_host();
    let cgroup = TestCgroup::new();
    let running = Running::start(&cgroup);
    // A tool that truncates, pauses, then writes (no rename), with a reload asked for in the
    // middle: read then, the file would be refused as empty, or parse as something else.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&running.config)
        .unwrap();
    running.agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(30));
    let rewritten = format!(
        "{}[[rule]]\nremote_port = 5432\nidle = \"45s\"\n",
        good_policy(&cgroup)
    );
    file.write_all(rewritten.as_bytes()).unwrap();
    drop(file);
    let line = running.agent.expect_log("policy reloaded", LOG_WAIT);
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        json["fields"]["rules"], 1,
        "the first reload read the whole new file, not the empty one: {line}"
    );
}

#[test]
fn the_agent_will_not_start_on_a_policy_anyone_could_write() {
    require_host();
    let cgroup = TestCgroup::new();
    let places = AgentPlaces::new();
    let config = places.state_dir().with_file_name("policy.toml");
    fs::write(&config, good_policy(&cgroup)).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o666)).unwrap();
    let mut args = vec![
        "run".to_string(),
        "--config".into(),
        config.display().to_string(),
    ];
    args.extend(places.run_args());
    let out = Command::new(agent_bin()).args(&args).output().unwrap();
    let stderr = assert_one_clear_error(&out, "policy.toml", "writable by every user");
    assert!(stderr.contains("chmod o-w"), "says how to fix it: {stderr}");
    assert!(
        keepalive_tests::kernel_links(&cgroup).is_empty(),
        "nothing was attached"
    );
}

#[test]
fn pins_are_root_only_and_metrics_stay_on_loopback() {
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    // No --metrics-addr: the default, inside a namespace of its own so the port is free.
    let mut args = vec!["run", "--cgroup", &name, "--no-existing"];
    let place_args = places.args();
    args.extend(place_args.iter().map(String::as_str));
    let agent = Workload::spawn_daemon_placed(agent_bin(), &args, Placement::netns_only(&netns));
    agent.expect_log("attached", LOG_WAIT);

    let listening = wait_for("the metrics listener", LOG_WAIT, || {
        let out = netns.exec("ss", &["-Hltn"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (!text.trim().is_empty()).then_some(text)
    });
    let locals: Vec<&str> = listening
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .collect();
    assert_eq!(locals, ["127.0.0.1:9477"], "only loopback: {listening}");

    let pins = places.bpffs().join("keepalive-agent");
    let mut checked = 0;
    let mut stack = vec![pins.clone()];
    while let Some(path) = stack.pop() {
        let meta = fs::metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            0,
            "{}",
            path.display()
        );
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        checked += 1;
    }
    assert!(checked > 10, "only {checked} pins and directories");

    // The kernel's own answer for an unprivileged process: not even the way to the maps.
    let map = pins.join("maps").join(keepalive_common::ATTACH_MAP);
    let out = Command::new("stat")
        .arg(&map)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "nobody can reach {}: {}",
        map.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
