//! One agent per set of pins, and enforcement that heals: a second `run` is refused and names
//! the first, `--take-over` hands over without a gap, a SIGKILLed agent's successor starts,
//! `detach` stops a running agent first, and what someone else removes or replaces comes back.
#![expect(clippy::print_stderr, reason = "the closing note's figures")]

use std::{
    process::Command,
    time::{Duration, Instant},
};

use keepalive_tests::{
    AgentPlaces, Netns, Placement, TestCgroup, Workload, agent_bin, agent_succeeds, connect,
    http::{get_within, metrics_addr, sample},
    kernel_links, links_per_cgroup, poll, require_host, wait_for,
};

const LOG_WAIT: Duration = Duration::from_secs(10);

/// A running agent and its metrics endpoint.
fn start(places: &AgentPlaces, name: &str, extra: &[&str]) -> (Workload, String) {
    let mut args = vec!["run", "--cgroup", name, "--no-existing"];
    args.extend_from_slice(extra);
    let agent = places.spawn(agent_bin(), &args);
    let addr = metrics_addr(&agent, LOG_WAIT);
    agent.expect_log("policy applied", LOG_WAIT);
    (agent, addr)
}

#[test]
fn a_second_agent_is_refused_and_a_take_over_hands_over() {
    // One scenario, step by step: each agent starts from the pins and the lock the one before
    // it left, so the steps only mean something in this order.
    require_host();
    let cgroup = TestCgroup::new();
    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    let (mut first, _) = start(&places, &name, &["--idle", "201"]);

    let started = Instant::now();
    let second = Command::new(agent_bin())
        .args(["run", "--cgroup", &name, "--idle", "202"])
        .args(places.run_args())
        .output()
        .unwrap();
    let refused_in = started.elapsed();
    let error = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second agent must not run");
    assert!(
        error.contains(&format!("pid {}", first.pid())) && error.contains("--take-over"),
        "one sentence naming the running agent and the way to replace it: {error}"
    );
    assert!(refused_in < Duration::from_secs(1), "{refused_in:?}");
    eprintln!("figure: second agent refused in {refused_in:?}");
    assert_eq!(
        kernel_links(&cgroup).len(),
        links_per_cgroup(),
        "the first agent's links only"
    );

    // check and status work beside it.
    let policy = places.state_dir().with_file_name("policy.toml");
    std::fs::write(&policy, "[default]\ncount = 4\n").unwrap();
    agent_succeeds(["check", "--config", policy.to_str().unwrap()]);
    let status = places.command(agent_bin(), &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["agent_running"], true);
    assert_eq!(json["agent_pid"], first.pid());

    // A SIGKILLed agent's lock dies with it: the next one starts and adopts.
    assert_eq!(first.signal_and_wait(libc::SIGKILL, LOG_WAIT), None);
    let (mut third, _) = start(&places, &name, &["--idle", "203"]);

    // A deliberate hand-over: the running agent exits leaving its links, the new one swaps its
    // programs in.
    let mut fourth = places.spawn(
        agent_bin(),
        &[
            "run",
            "--cgroup",
            &name,
            "--no-existing",
            "--idle",
            "204",
            "--take-over",
        ],
    );
    third.expect_log("handing over", LOG_WAIT);
    assert_eq!(third.signal_and_wait(0, LOG_WAIT), Some(0));
    let adopted = fourth.expect_log("attached", LOG_WAIT);
    assert!(adopted.contains("adopted=true"), "{adopted}");
    fourth.expect_log("policy applied", LOG_WAIT);
    let netns = Netns::new();
    let place = Placement::new(&cgroup, &netns);
    let conn = connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!(conn.client().idle_secs, 204, "the new agent's policy");
    assert_eq!(
        kernel_links(&cgroup).len(),
        links_per_cgroup(),
        "still one link of each program"
    );

    // detach beside a running agent stops it first, and says so.
    let detach = places.command(agent_bin(), &["detach"]);
    let said = String::from_utf8_lossy(&detach.stdout);
    assert!(
        detach.status.success(),
        "{}",
        String::from_utf8_lossy(&detach.stderr)
    );
    assert!(
        said.contains(&format!("agent pid {} is running", fourth.pid()))
            && said.contains("SIGTERM"),
        "{said}"
    );
    assert_eq!(fourth.signal_and_wait(0, LOG_WAIT), Some(0));
    assert!(kernel_links(&cgroup).is_empty(), "detached");
}

/// `bpftool link detach` of the sock_ops link of `cgroup`; returns when.
fn detach_sock_ops_link(cgroup: &TestCgroup) -> Instant {
    let (id, _) = kernel_links(cgroup)
        .into_iter()
        .find(|(_, kind)| kind.ends_with("sock_ops"))
        .unwrap();
    let detached = Instant::now();
    let out = Command::new("bpftool")
        .args(["link", "detach", "id", &id.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    detached
}

/// Waits until a new connection in `cgroup` gets `idle` again; returns how long it took.
fn enforced_again(cgroup: &TestCgroup, netns: &Netns, idle: u32, since: Instant) -> Duration {
    let place = Placement::new(cgroup, netns);
    wait_for("enforcement to come back", LOG_WAIT, || {
        let conn = connect("127.0.0.1:0", "127.0.0.1", place, place);
        (conn.client().idle_secs == idle).then(|| since.elapsed())
    })
}

#[test]
fn enforcement_removed_behind_the_agents_back_comes_back() {
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    let (mut agent, addr) = start(&places, &name, &["--idle", "211"]);
    assert_eq!(get_within(&addr, "/readyz", LOG_WAIT).0, 200);

    // bpftool link detach of the sock_ops link.
    let detached = detach_sock_ops_link(&cgroup);
    let healed_in = enforced_again(&cgroup, &netns, 211, detached);
    let logged = agent.expect_log("enforcement removed by someone else", LOG_WAIT);
    assert!(logged.contains("link detached"), "{logged}");
    agent.expect_log("re-attached", LOG_WAIT);
    assert!(healed_in < Duration::from_secs(2), "{healed_in:?}");
    eprintln!("figure: external `bpftool link detach` healed in {healed_in:?}");

    // A removed pin.
    let pin = places.bpffs().join("keepalive-agent/links").join(format!(
        "{}-{}",
        if links_per_cgroup() == 2 {
            "setsockopt"
        } else {
            "sockops"
        },
        cgroup.cgroup().id
    ));
    let removed = Instant::now();
    std::fs::remove_file(&pin).unwrap();
    wait_for("the pin to come back", LOG_WAIT, || {
        pin.exists().then_some(())
    });
    let logged = agent.expect_log("enforcement removed by someone else", LOG_WAIT);
    assert!(logged.contains("pin removed"), "{logged}");
    eprintln!("figure: removed pin put back in {:?}", removed.elapsed());

    // Another tool swaps programs of its own into the agent's links (BPF_LINK_UPDATE), as
    // the library does when it adopts pins (sharing the pinned maps, which the kernel requires
    // of a program replacing one that uses cgroup storage).
    let mount = require_host().cgroup2_mount;
    let replaced = Instant::now();
    let intruder = keepalive_agent::Enforcer::pinned(&mount, &places.bpffs()).unwrap();
    let logged = agent.expect_log("enforcement removed by someone else", LOG_WAIT);
    assert!(logged.contains("program replaced"), "{logged}");
    let healed_in = enforced_again(&cgroup, &netns, 211, replaced);
    eprintln!("figure: replaced program put back in {healed_in:?}");
    drop(intruder);

    let ready = poll(LOG_WAIT, || {
        let (code, metrics) = get_within(&addr, "/metrics", LOG_WAIT);
        (code == 200 && sample(&metrics, "keepalive_reattached_total ") >= 3.0).then_some(metrics)
    });
    let metrics = ready.unwrap_or_else(|| panic!("keepalive_reattached_total never reached 3"));
    assert_eq!(sample(&metrics, "keepalive_enforcement_missing "), 0.0);
    assert_eq!(get_within(&addr, "/readyz", LOG_WAIT).0, 200);
    assert_eq!(
        kernel_links(&cgroup).len(),
        links_per_cgroup(),
        "one link of each program again"
    );
    assert_eq!(agent.signal_and_wait(libc::SIGTERM, LOG_WAIT), Some(0));
    assert!(kernel_links(&cgroup).is_empty());
}

/// The health check asks the kernel about attachments only when something may have changed
/// (the link watch counts detaches and updates, inotify sees pins go): with 1,000 of them, a
/// detached link and a removed pin still come back within a second. Under the kernel matrix's
/// software emulation, where every step is several times slower, within five.
#[test]
fn with_a_thousand_attachments_what_is_removed_comes_back_within_a_second() {
    require_host();
    let within = if std::env::var_os("KA_VM_OUT").is_some() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(1)
    };
    let root = TestCgroup::new();
    // A sock_ops link per child, and where the kernel loads it one lock above them all.
    let locks = links_per_cgroup() - 1;
    let children: Vec<TestCgroup> = (0..1000 - locks)
        .map(|i| root.child(&format!("c-{i}")))
        .collect();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let (mut agent, _addr) = start(
        &places,
        &format!("{}/c-*", root.scope()),
        &["--idle", "213"],
    );
    let pins = places.bpffs().join("keepalive-agent/links");
    let pinned = || std::fs::read_dir(&pins).unwrap().count();
    assert_eq!(pinned(), 1000, "one pinned link per attachment");
    assert_eq!(
        kernel_links(&root).len(),
        locks,
        "the lock at the pattern's literal prefix, not one per match"
    );
    let last = children.last().unwrap();

    let detached = detach_sock_ops_link(last);
    let healed_in = enforced_again(last, &netns, 213, detached);
    assert!(healed_in < within, "link detached: healed in {healed_in:?}");
    agent.expect_log("link detached", LOG_WAIT);
    eprintln!("figure: 1,000 attachments, `bpftool link detach` healed in {healed_in:?}");

    let pin = pins.join(format!("sockops-{}", children[0].cgroup().id));
    let removed = Instant::now();
    std::fs::remove_file(&pin).unwrap();
    // The agent holds the link's descriptor: enforcement stays while the pin is put back.
    let back = poll(LOG_WAIT, || pin.exists().then(|| removed.elapsed()));
    let healed_in = back.unwrap_or_else(|| panic!("the pin never came back"));
    assert!(healed_in < within, "pin removed: healed in {healed_in:?}");
    agent.expect_log("pin removed", LOG_WAIT);
    enforced_again(&children[0], &netns, 213, removed);
    eprintln!("figure: 1,000 attachments, removed pin healed in {healed_in:?}");
    assert_eq!(pinned(), 1000);
    // Detaching 1,000 attachments (a pin removed each) takes longer than one under the
    // matrix's emulation (over 10 s on 5.10).
    assert_eq!(
        agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(120)),
        Some(0)
    );
}

#[test]
fn enforcement_that_cannot_be_put_back_is_not_ready_and_status_says_where() {
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    let (mut agent, addr) = start(&places, &name, &["--idle", "231"]);
    assert_eq!(get_within(&addr, "/readyz", LOG_WAIT).0, 200);

    // Without its links directory the agent can attach but not pin: it cannot put them back.
    let dir = places.bpffs().join("keepalive-agent/links");
    std::fs::remove_dir_all(&dir).unwrap();
    let unready = poll(LOG_WAIT, || {
        let (code, body) = get_within(&addr, "/readyz", LOG_WAIT);
        (code == 503).then_some(body)
    })
    .unwrap_or_else(|| panic!("/readyz stayed ready with nothing attached"));
    assert!(
        unready.contains("enforcement missing") && unready.contains(&name),
        "{unready}"
    );
    let status = wait_for("status to say where", LOG_WAIT, || {
        let out = places.command(agent_bin(), &["status"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("enforcement missing").then_some(text)
    });
    assert!(status.contains(&name), "{status}");

    std::fs::create_dir(&dir).unwrap();
    let repaired = Instant::now();
    let ready = poll(LOG_WAIT, || {
        (get_within(&addr, "/readyz", LOG_WAIT).0 == 200).then_some(())
    });
    assert!(
        ready.is_some(),
        "not ready again after the directory came back"
    );
    assert!(repaired.elapsed() < 2 * Duration::from_secs(1));
    enforced_again(&cgroup, &netns, 231, repaired);
    assert_eq!(kernel_links(&cgroup).len(), links_per_cgroup());
    assert_eq!(agent.signal_and_wait(libc::SIGTERM, LOG_WAIT), Some(0));
}
