//! Connections that existed before the policy, reached by both paths: the TCP iterator program
//! in the kernel (from 5.15) and descriptors (pidfd_getfd, every kernel). Each connection is
//! read back from the kernel; the two paths must leave the same values.

use std::time::Duration;

use keepalive_agent::Enforcer;
use keepalive_common::{Outcome, Stage};
use keepalive_tests::{
    AgentCopy, AgentPlaces, Connection, Keepalive, Netns, Placement, TestCgroup, Workload, connect,
    kernel_offers_iterator, load_enforcer,
    policy::{parse, rule_values},
};

/// Four connections in `cgroup` (IPv4 and IPv6, each end in the cgroup) and one in `outside`.
fn connections(cgroup: &TestCgroup, outside: &TestCgroup, netns: &Netns) -> [Connection; 3] {
    let inside = Placement::new(cgroup, netns);
    [
        connect("127.0.0.1:0", "127.0.0.1", inside, inside),
        connect("[::1]:0", "::1", inside, inside),
        connect(
            "127.0.0.1:0",
            "127.0.0.1",
            Placement::new(outside, netns),
            Placement::new(outside, netns),
        ),
    ]
}

/// Sweeps with `enforcer` and checks each end: outbound (client) ends get idle 81, inbound
/// (server) ends the inbound rule's 84, the cgroup outside the policy nothing.
fn sweep_and_check(enforcer: &mut Enforcer, in_kernel: bool) {
    let root = TestCgroup::new();
    let enforced = root.child("c-enforced");
    let outside = root.child("d-outside");
    let netns = Netns::new();
    let [v4, v6, other] = connections(&enforced, &outside, &netns);
    let policy = parse(&format!(
        "[agent]\ncgroups = [\"{}/c-*\"]\nexisting = true\n[default]\nidle = \"81s\"\n\
         [[rule]]\nname = \"served\"\ndirection = \"inbound\"\nidle = \"84s\"\n",
        root.scope()
    ));
    let sweep = enforcer.apply(&policy).unwrap().existing.unwrap().unwrap();
    assert_eq!(sweep.in_kernel, in_kernel, "{sweep:?}");
    assert_eq!(
        sweep.connections, 4,
        "both ends of two connections: {sweep:?}"
    );
    assert_eq!(sweep.outcomes[Outcome::Set as usize], 4, "{sweep:?}");
    for (name, connection) in [("IPv4", &v4), ("IPv6", &v6)] {
        assert_eq!(
            (connection.client(), connection.server()),
            (rule_values(81), rule_values(84)),
            "{name}: client outbound, server inbound ({})",
            sweep.via()
        );
    }
    assert_eq!(
        other.client(),
        Keepalive::untouched(&netns),
        "outside the policy"
    );
    assert_eq!(
        other.server(),
        Keepalive::untouched(&netns),
        "outside the policy"
    );
}

#[test]
fn the_iterator_sweeps_existing_connections_where_the_kernel_offers_it() {
    let mut enforcer = load_enforcer(Stage::Full);
    let offered = kernel_offers_iterator();
    assert_eq!(
        enforcer.sweeps_in_kernel(),
        offered,
        "missing: {:?}",
        enforcer.missing_features()
    );
    sweep_and_check(&mut enforcer, offered);
}

#[test]
fn descriptors_give_existing_connections_the_same_values() {
    let mut enforcer = load_enforcer(Stage::Full);
    enforcer.sweep_with_descriptors();
    sweep_and_check(&mut enforcer, false);
}

/// One connection whose ends run as user 65534, in a named namespace (as containers' are).
fn nobody_connection(copy: &AgentCopy, cgroup: &TestCgroup, netns: &Netns) -> Connection {
    let probe = copy.probe();
    let as_nobody = |args: &[&str]| -> Workload {
        let mut all = vec!["--reuid=65534", "--regid=65534", "--clear-groups", "--"];
        all.push(probe.to_str().unwrap());
        all.extend_from_slice(args);
        Workload::spawn("setpriv", &all, Placement::new(cgroup, netns))
    };
    Connection::between(as_nobody, "127.0.0.1:0", "127.0.0.1")
}

#[test]
fn without_cap_sys_ptrace_only_the_iterator_reaches_other_users_connections() {
    let copy = AgentCopy::new();
    let root = TestCgroup::new();
    let netns = Netns::new();
    let connection = nobody_connection(&copy, &root, &netns);
    let places = AgentPlaces::new();
    let agent_path = copy.path();
    let agent = agent_path.to_str().unwrap();
    let scope = root.path().to_str().unwrap();
    let mut args = vec![
        "--inh-caps=-sys_ptrace",
        "--bounding-set=-sys_ptrace",
        "--",
        agent,
    ];
    let agent_args = places.args();
    args.push("run");
    args.extend(agent_args.iter().map(String::as_str));
    args.extend(["--cgroup", scope, "--idle", "87", "--no-metrics"]);
    let agent = Workload::spawn_daemon("setpriv", &args);
    let line = agent.expect_log("existing connections", Duration::from_secs(60));
    if kernel_offers_iterator() {
        assert!(
            line.contains("iterator") && line.contains("set=2"),
            "{line}"
        );
        assert_eq!(
            (connection.client(), connection.server()),
            (rule_values(87), rule_values(87))
        );
    } else {
        assert!(
            line.contains("descriptors") && line.contains("unreachable=2"),
            "{line}"
        );
        assert_eq!(connection.client(), Keepalive::untouched(&netns));
    }
}
