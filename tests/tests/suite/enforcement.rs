//! The real program in the running kernel, attached to a throwaway cgroup; workloads are child
//! processes in that cgroup, inside a fresh network namespace; results are read back from the
//! kernel (getsockopt through pidfd_getfd, `ss -tno`).

use std::time::Duration;

use keepalive_agent::{Action, Values};
use keepalive_common::Outcome;
use keepalive_tests::{
    AgentPlaces, Fixture, Keepalive, Netns, Placement, TestCgroup, Workload, agent_bin, connect,
    enforce, netns::SsEntry, require_host,
};

/// Distinct from the kernel defaults and from each other, so a match cannot be a coincidence.
const POLICY: Values = Values {
    idle_secs: 37,
    interval_secs: 7,
    count: 4,
    user_timeout_ms: Some(12_345),
};

const OTHER_POLICY: Values = Values {
    idle_secs: 23,
    interval_secs: 3,
    count: 6,
    user_timeout_ms: Some(4_321),
};

fn assert_both_enforced(fixture: &Fixture, listen: &str, connect_ip: &str, policy: &Values) {
    let before = fixture.enforcer.outcomes(0).unwrap().get(Outcome::Set);
    let conn = connect(listen, connect_ip, fixture.inside(), fixture.inside());
    assert_eq!(
        conn.client(),
        Keepalive::enforced(policy),
        "client socket ({connect_ip})"
    );
    assert_eq!(
        conn.server(),
        Keepalive::enforced(policy),
        "server socket ({listen})"
    );
    let after = fixture.enforcer.outcomes(0).unwrap().get(Outcome::Set);
    assert_eq!(
        after - before,
        2,
        "client and server socket, each counted once"
    );
    let outcomes = fixture.enforcer.outcomes(0).unwrap();
    assert_eq!(
        outcomes.get(Outcome::Failed),
        0,
        "no bpf_setsockopt failed: {outcomes:?}"
    );
    assert!(outcomes.get(Outcome::Set) >= 2, "{outcomes:?}");
}

#[test]
fn ipv4_client_and_server_get_the_policy() {
    let fixture = Fixture::enforcing(&POLICY);
    assert_both_enforced(&fixture, "127.0.0.1:0", "127.0.0.1", &POLICY);
}

#[test]
fn ipv6_client_and_server_get_the_policy() {
    let fixture = Fixture::enforcing(&POLICY);
    assert_both_enforced(&fixture, "[::1]:0", "::1", &POLICY);
}

#[test]
fn ipv4_mapped_ipv6_client_and_server_get_the_policy() {
    let fixture = Fixture::enforcing(&POLICY);
    // A dual-stack listener accepts an IPv4 client as ::ffff:127.0.0.1, and an IPv6 client
    // socket reaches the IPv4 loopback through the mapped address.
    assert_both_enforced(&fixture, "[::]:0", "::ffff:127.0.0.1", &POLICY);
    assert_both_enforced(&fixture, "[::]:0", "127.0.0.1", &POLICY);
}

#[test]
fn user_timeout_is_left_alone_when_the_policy_has_none() {
    let policy = Values {
        user_timeout_ms: None,
        ..POLICY
    };
    let fixture = Fixture::enforcing(&policy);
    let conn = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    assert_eq!(conn.client(), Keepalive::enforced(&policy));
    assert_eq!(conn.client().user_timeout_ms, 0);
}

#[test]
fn ss_shows_a_keepalive_timer_on_enforced_connections_only() {
    let fixture = Fixture::enforcing(&POLICY);
    let enforced = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    let untouched = connect(
        "127.0.0.2:0",
        "127.0.0.2",
        fixture.outside(),
        fixture.outside(),
    );
    assert!(enforced.client().enabled && !untouched.client().enabled);

    let entries = fixture.netns.established();
    let (inside, outside): (Vec<_>, Vec<_>) =
        entries.iter().partition(|entry| enforced.is_end(entry));
    assert!(
        outside.iter().all(|entry| untouched.is_end(entry)),
        "{entries:?}"
    );
    assert_eq!(
        inside.len(),
        2,
        "both ends of the enforced connection: {entries:?}"
    );
    assert_eq!(
        outside.len(),
        2,
        "both ends of the untouched connection: {entries:?}"
    );
    for entry in &inside {
        assert!(entry.has_keepalive_timer(), "no keepalive timer: {entry:?}");
        // ss prints the time left; it cannot exceed the policy's idle time.
        let secs: u32 = entry
            .timer
            .as_deref()
            .and_then(|timer| timer.split(',').nth(1))
            .and_then(|left| left.strip_suffix("sec").or(left.strip_suffix("min")))
            .and_then(|left| left.parse().ok())
            .unwrap_or(u32::MAX);
        assert!(secs <= POLICY.idle_secs, "timer beyond idle: {entry:?}");
    }
    for entry in &outside {
        assert!(
            !entry.has_keepalive_timer(),
            "untouched connection has a timer: {entry:?}"
        );
    }
}

#[test]
fn policy_change_applies_to_the_next_connection_without_reload() {
    let mut fixture = Fixture::enforcing(&POLICY);
    let program = fixture.enforcer.program_stats().unwrap().id;
    let first = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    assert_eq!(first.client(), Keepalive::enforced(&POLICY));

    fixture
        .enforcer
        .apply(&enforce(OTHER_POLICY, &[&fixture.cgroup]))
        .unwrap();
    let second = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    assert_eq!(
        second.client(),
        Keepalive::enforced(&OTHER_POLICY),
        "client after the change"
    );
    assert_eq!(
        second.server(),
        Keepalive::enforced(&OTHER_POLICY),
        "server after the change"
    );
    assert_eq!(
        fixture.enforcer.program_stats().unwrap().id,
        program,
        "same program, not a reload"
    );
    let record = fixture.enforcer.record(fixture.cgroup.cgroup().id).unwrap();
    assert_eq!(
        record.fallback,
        Action::enforce(OTHER_POLICY).record(0),
        "the map holds the new policy"
    );
}

#[test]
fn out_of_range_policy_change_is_refused_and_the_old_policy_stays() {
    let mut fixture = Fixture::enforcing(&POLICY);
    let bad = Values {
        count: 128,
        ..OTHER_POLICY
    };
    let error = fixture
        .enforcer
        .apply(&enforce(bad, &[&fixture.cgroup]))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("count = 128") && error.contains("1..=127"),
        "{error}"
    );
    let conn = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    assert_eq!(conn.client(), Keepalive::enforced(&POLICY));
}

#[test]
fn processes_outside_the_cgroup_are_untouched() {
    let fixture = Fixture::enforcing(&POLICY);
    let conn = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.outside(),
        fixture.outside(),
    );
    let untouched = Keepalive::untouched(&fixture.netns);
    assert_eq!(conn.client(), untouched);
    assert_eq!(conn.server(), untouched);
}

#[test]
fn server_socket_follows_the_listeners_cgroup_not_the_running_task() {
    let fixture = Fixture::enforcing(&POLICY);
    let untouched = Keepalive::untouched(&fixture.netns);
    // On loopback the server's PASSIVE_ESTABLISHED runs in the client's task: attribution
    // must come from the listener, not from whoever is on the CPU.
    let server_inside = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.outside(),
    );
    assert_eq!(server_inside.server(), Keepalive::enforced(&POLICY));
    assert_eq!(server_inside.client(), untouched);

    let client_inside = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.outside(),
        fixture.inside(),
    );
    assert_eq!(client_inside.client(), Keepalive::enforced(&POLICY));
    assert_eq!(client_inside.server(), untouched);
}

#[test]
fn descendant_cgroups_are_covered() {
    let fixture = Fixture::enforcing(&POLICY);
    let child = fixture.cgroup.child("workload");
    let place = Placement::new(&child, &fixture.netns);
    let conn = connect("[::1]:0", "::1", place, place);
    assert_eq!(conn.client(), Keepalive::enforced(&POLICY));
    assert_eq!(conn.server(), Keepalive::enforced(&POLICY));
}

#[test]
fn after_detach_new_connections_are_untouched() {
    let mut fixture = Fixture::enforcing(&POLICY);
    let before = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    assert_eq!(before.client(), Keepalive::enforced(&POLICY));

    let detached = fixture.enforcer.detach_all().unwrap();
    assert_eq!(detached, vec![fixture.cgroup.cgroup().clone()]);
    let after = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    let untouched = Keepalive::untouched(&fixture.netns);
    assert_eq!(after.client(), untouched);
    assert_eq!(after.server(), untouched);
    assert_eq!(
        before.client(),
        Keepalive::enforced(&POLICY),
        "earlier connections keep theirs"
    );
}

/// Python's socket module, used the way most programs use it: no setsockopt anywhere.
const PYTHON_SERVER: &str = "
import socket, sys
s = socket.create_server(('127.0.0.1', 0))
print('listening', s.getsockname()[1], flush=True)
c, peer = s.accept()
print('accepted', c.fileno(), flush=True)
sys.stdin.read()
";
const PYTHON_CLIENT: &str = "
import socket, sys
c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
print('connected', c.fileno(), flush=True)
sys.stdin.read()
";

#[test]
fn a_program_that_never_calls_setsockopt_is_covered() {
    let fixture = Fixture::enforcing(&POLICY);
    let server = Workload::spawn("python3", &["-c", PYTHON_SERVER], fixture.inside());
    let port = server.expect("listening").remove(0);
    let client = Workload::spawn("python3", &["-c", PYTHON_CLIENT, &port], fixture.inside());
    let client_fd = client.expect("connected")[0].parse().unwrap();
    let server_fd = server.expect("accepted")[0].parse().unwrap();
    assert_eq!(
        Keepalive::of(client.steal_fd(client_fd)),
        Keepalive::enforced(&POLICY)
    );
    assert_eq!(
        Keepalive::of(server.steal_fd(server_fd)),
        Keepalive::enforced(&POLICY)
    );
    let timers = fixture.netns.established();
    assert!(
        timers.len() == 2 && timers.iter().all(SsEntry::has_keepalive_timer),
        "ss -tno: {timers:?}"
    );
}

#[test]
fn agent_binary_attaches_enforces_and_detaches_on_sigterm() {
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let place = Placement::new(&cgroup, &netns);
    let places = AgentPlaces::new();
    let mut agent = places.spawn(
        agent_bin(),
        &[
            "run",
            "--cgroup",
            &cgroup.cgroup().name,
            "--idle",
            "41",
            "--interval",
            "9",
            "--count",
            "5",
            "--user-timeout",
            "7000",
        ],
    );
    let line = agent.expect_log("attached", Duration::from_secs(10));
    assert!(line.contains(&cgroup.cgroup().name), "{line}");
    let policy = Values {
        idle_secs: 41,
        interval_secs: 9,
        count: 5,
        user_timeout_ms: Some(7000),
    };
    let conn = connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!(conn.client(), Keepalive::enforced(&policy));
    assert_eq!(conn.server(), Keepalive::enforced(&policy));

    assert_eq!(
        agent.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)),
        Some(0)
    );
    let after = connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!(
        after.client(),
        Keepalive::untouched(&netns),
        "detached on SIGTERM"
    );
}

#[test]
fn agent_binary_refuses_out_of_range_values() {
    require_host();
    for (flag, value, range) in [("--idle", "0", "1..=32767"), ("--count", "128", "1..=127")] {
        let out = std::process::Command::new(agent_bin())
            .args(["run", flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag) && stderr.contains(range), "{stderr}");
    }
}
