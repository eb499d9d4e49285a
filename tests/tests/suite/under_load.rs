//! The agent binary under load and churn: 20,000 connections from several processes while the
//! policy is reloaded over and over, while the agent is SIGKILLed and restarted, and thousands
//! of short-lived cgroups that must leave nothing behind.

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use keepalive_agent::{
    bpffs::PinDir,
    enforcer::{PinnedMaps, features},
};
use keepalive_tests::{
    AgentPlaces, Netns, Placement, TestCgroup, Workload, agent_bin, poll, probe, require_host,
    wait_for,
};

const LOG_WAIT: Duration = Duration::from_secs(10);
/// Load processes, connections each (both ends of each are checked), and the pace of each:
/// 40,000 connections over about eight seconds, long enough for three agent restarts under
/// qemu's emulation too.
const PROCESSES: usize = 4;
const CONNECTIONS: u64 = 10_000;
const PER_SECOND: u64 = 1_250;

/// `[keepalive, idle, interval, count]` of a connection end.
type Values = [u64; 4];

/// Starts the load: PROCESSES `ka-probe tally` workloads in `cgroup`.
fn start_load(cgroup: &TestCgroup, netns: &Netns) -> Vec<Workload> {
    let (count, rate) = (CONNECTIONS.to_string(), PER_SECOND.to_string());
    let load: Vec<Workload> = (0..PROCESSES)
        .map(|_| {
            probe(
                &["tally", "127.0.0.1:0", &count, &rate],
                Placement::new(cgroup, netns),
            )
        })
        .collect();
    for workload in &load {
        workload.expect("listening");
    }
    load
}

/// Whether every load process has printed its tallies.
fn tallied(lines: &[Vec<String>]) -> bool {
    lines
        .iter()
        .all(|lines| lines.last().is_some_and(|line| line.starts_with("tallied")))
}

/// Gathers what arrived so far from each load process.
fn gather(load: &[Workload], lines: &mut [Vec<String>]) {
    for (workload, lines) in load.iter().zip(lines.iter_mut()) {
        while let Some(line) = workload.try_line() {
            lines.push(line);
        }
    }
}

/// How many connection ends carried which values, over every load process.
fn tally(load: &[Workload], mut lines: Vec<Vec<String>>) -> BTreeMap<Values, u64> {
    wait_for("the load to finish", Duration::from_secs(120), || {
        gather(load, &mut lines);
        tallied(&lines).then_some(())
    });
    let mut seen = BTreeMap::new();
    for line in lines.iter().flatten() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["tally", values @ .., n] => {
                let values: Vec<u64> = values.iter().map(|v| v.parse().unwrap()).collect();
                *seen.entry(values.try_into().unwrap()).or_default() += n.parse::<u64>().unwrap();
            }
            ["tallied", count] => assert_eq!(*count, CONNECTIONS.to_string()),
            other => panic!("unexpected line {other:?}"),
        }
    }
    let total: u64 = seen.values().sum();
    assert_eq!(
        total,
        2 * CONNECTIONS * PROCESSES as u64,
        "both ends of every connection were read back: {seen:?}"
    );
    seen
}

fn policy_file(cgroup: &TestCgroup, values: Values) -> String {
    format!(
        "[agent]\ncgroups = [\"{}\"]\n[default]\nidle = \"{}s\"\ninterval = \"{}s\"\ncount = {}\n",
        cgroup.scope(),
        values[1],
        values[2],
        values[3]
    )
}

/// Replaces the file in one step, as configuration management (and a ConfigMap) does.
fn replace(path: &Path, text: &str) {
    let staging = path.with_extension("new");
    fs::write(&staging, text).unwrap();
    fs::rename(&staging, path).unwrap();
}

#[test]
fn forty_thousand_connections_across_reloads_each_get_one_whole_policy() {
    const A: Values = [1, 11, 2, 3];
    const B: Values = [1, 22, 4, 6];
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let config = places.state_dir().with_file_name("policy.toml");
    replace(&config, &policy_file(&cgroup, A));
    let config_arg = config.display().to_string();
    let agent = places.spawn(
        agent_bin(),
        &["run", "--config", &config_arg, "--no-existing"],
    );
    agent.expect_log("attached", LOG_WAIT);

    let load = start_load(&cgroup, &netns);
    let mut lines = vec![Vec::new(); PROCESSES];
    let mut reloads = 0;
    for round in 0.. {
        gather(&load, &mut lines);
        if tallied(&lines) {
            break;
        }
        replace(
            &config,
            &policy_file(&cgroup, if round % 2 == 0 { B } else { A }),
        );
        // Mostly SIGHUP (immediate); every fourth change is left to the file watch.
        if round % 4 != 3 {
            agent.signal(libc::SIGHUP);
        }
        let line = agent.expect_log("policy", LOG_WAIT);
        assert!(!line.contains("refused"), "{line}");
        if line.contains("policy reloaded") {
            reloads += 1;
        }
    }
    let seen = tally(&load, lines);
    assert!(reloads >= 10, "only {reloads} reloads during the load");
    for values in seen.keys() {
        assert!(
            *values == A || *values == B,
            "a connection end with {values:?} after {reloads} reloads: {seen:?}"
        );
    }
}

#[test]
fn connections_across_repeated_sigkills_and_restarts_are_all_enforced() {
    require_host();
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    let start = |idle: u64| {
        let idle = idle.to_string();
        let agent = places.spawn(
            agent_bin(),
            &["run", "--cgroup", &name, "--idle", &idle, "--no-existing"],
        );
        agent.expect_log("attached", LOG_WAIT);
        agent
    };
    let mut idle = 200;
    let mut agent = start(idle);
    let load = start_load(&cgroup, &netns);
    let mut lines = vec![Vec::new(); PROCESSES];
    let mut restarts = 0;
    loop {
        gather(&load, &mut lines);
        if tallied(&lines) {
            break;
        }
        agent.signal_and_wait(libc::SIGKILL, LOG_WAIT);
        idle += 1;
        agent = start(idle);
        restarts += 1;
    }
    let seen = tally(&load, lines);
    assert!(restarts >= 3, "only {restarts} restarts during the load");
    for values in seen.keys() {
        assert_eq!(values[0], 1, "a connection without keepalive: {seen:?}");
        assert!(
            (200..=idle).contains(&values[1]),
            "a connection end with idle {} (agents ran with 200..={idle}): {seen:?}",
            values[1]
        );
    }
    assert_eq!(agent.signal_and_wait(libc::SIGTERM, LOG_WAIT), Some(0));
}

/// Descendant cgroups the kernel still holds after their removal (cgroup.stat).
fn dying_descendants(cgroup: &TestCgroup) -> u64 {
    let stat = fs::read_to_string(cgroup.path().join("cgroup.stat")).unwrap();
    stat.lines()
        .find_map(|line| line.strip_prefix("nr_dying_descendants "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no nr_dying_descendants in {stat}"))
}

/// The agent's open descriptors and what each refers to.
fn open_fds(agent: &Workload) -> Vec<String> {
    let mut fds: Vec<String> = fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .unwrap()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let target = fs::read_link(entry.path()).ok()?;
            Some(format!(
                "{} -> {}",
                entry.file_name().display(),
                target.display()
            ))
        })
        .collect();
    fds.sort();
    fds
}

/// The agent's anonymous resident memory (its heap and stacks). VmRSS would also count the
/// pages of its own binary, faulted in the first time a code path runs (a cgroup that vanished
/// mid-attach, say), which grows it by a megabyte or so without a leak.
fn anon_rss_kib(agent: &Workload) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// What the agent holds for followed cgroups: pinned links and records in its maps.
fn held(places: &AgentPlaces) -> (usize, usize) {
    let pins = PinDir::at(&places.bpffs());
    let records = PinnedMaps::open(&pins.maps())
        .and_then(|maps| maps.records())
        .unwrap()
        .len();
    (pins.pinned_links().len(), records)
}

#[test]
fn thousands_of_short_lived_cgroups_leave_nothing_behind() {
    // One scenario: the batches, then what is left in the kernel and the agent after them;
    // the counts before and after only compare within one run.
    const BATCHES: usize = 20;
    const PER_BATCH: usize = 100;
    require_host();
    let root = TestCgroup::new();
    let netns = Netns::new();
    let places = AgentPlaces::new();
    let pattern = format!("{}/ctr-*", root.scope());
    let agent = places.spawn(
        agent_bin(),
        &["run", "--cgroup", &pattern, "--idle", "77", "--no-existing"],
    );
    agent.expect_log("policy applied", LOG_WAIT);
    let steady = root.child("ctr-steady");
    agent.expect_log("attached", LOG_WAIT);
    let baseline = held(&places);
    // sock_ops, and the lock where the kernel loads it (6.1 on; the agent's state says).
    let state = keepalive_agent::status::State::read(&places.state_dir()).unwrap();
    let lock = !features::lacks(&state.missing_features, features::LOCK);
    assert_eq!(
        baseline,
        (1 + usize::from(lock), 1),
        "one followed cgroup: its sock_ops link and the lock above it, one record"
    );

    let mut halfway = None;
    for batch in 0..BATCHES {
        let dirs: Vec<_> = (0..PER_BATCH)
            .map(|i| root.path().join(format!("ctr-{batch}-{i}")))
            .collect();
        for dir in &dirs {
            fs::create_dir(dir).unwrap();
        }
        // Even batches live until the agent has attached to every one of them; odd ones are
        // gone at once, usually before the agent gets to them.
        if batch % 2 == 0 {
            // A sock_ops link each; the lock above them holds them all.
            let all = (baseline.0 + PER_BATCH, baseline.1 + PER_BATCH);
            if poll(LOG_WAIT, || (held(&places) == all).then_some(())).is_none() {
                panic!(
                    "batch {batch}: the agent holds (links, records) {:?}, not {all:?}",
                    held(&places)
                );
            }
        }
        for dir in &dirs {
            fs::remove_dir(dir).unwrap();
        }
        if batch == BATCHES / 2 {
            wait_for("the agent to catch up", LOG_WAIT, || {
                (held(&places) == baseline).then_some(())
            });
            halfway = Some((open_fds(&agent), anon_rss_kib(&agent)));
        }
    }
    wait_for("the agent to forget every removed cgroup", LOG_WAIT, || {
        (held(&places) == baseline).then_some(())
    });
    wait_for(
        "the kernel to release every removed cgroup (no link keeps one alive)",
        LOG_WAIT,
        || (dying_descendants(&root) == 0).then_some(()),
    );
    let (fds, rss) = halfway.unwrap();
    // The agent opens a directory for a moment while it resolves a pattern or attaches, so
    // either sample may hold one such descriptor; a leak would hold one per cgroup.
    if poll(LOG_WAIT, || {
        (open_fds(&agent).len() <= fds.len()).then_some(())
    })
    .is_none()
    {
        panic!(
            "the agent's descriptors grew over {} more cgroups: {:#?} then {:#?}",
            BATCHES / 2 * PER_BATCH,
            fds,
            open_fds(&agent)
        );
    }
    let grown = anon_rss_kib(&agent).saturating_sub(rss);
    assert!(
        grown < 1024,
        "the agent's memory grew {grown} KiB over {} more cgroups",
        BATCHES / 2 * PER_BATCH
    );

    // Still enforcing where it should.
    let place = Placement::new(&steady, &netns);
    let conn = keepalive_tests::connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!(conn.client().idle_secs, 77);
}
