//! The policy engine against the real kernel: each match key, each mode and precedence.
//! Changes of policy, connections that already existed and applications that try to undo the
//! policy are in `policy_changes.rs`.

use keepalive_agent::enforcer::features;
use keepalive_common::{Outcome, Stage};
use keepalive_tests::{
    Fixture, Keepalive, Netns, Placement, TestCgroup, connect, load_enforcer,
    policy::{DEFAULT, SCOPE, parse, policy_fixture, python_client, rule_values},
};

#[test]
fn remote_cidr_matches_ipv4_ipv6_and_mapped_peers() {
    let fixture = policy_fixture(&format!(
        "{SCOPE}[[rule]]\nremote = \"127.0.0.2/32\"\nidle = \"11s\"\n\
         [[rule]]\nremote = \"::1/128\"\nidle = \"12s\"\n"
    ));
    let inside = fixture.inside();
    let v4 = connect("0.0.0.0:0", "127.0.0.2", inside, inside);
    assert_eq!(v4.client(), rule_values(11), "client to 127.0.0.2");
    assert_eq!(v4.server(), DEFAULT, "the server's peer is 127.0.0.1");
    let mapped = connect("[::]:0", "::ffff:127.0.0.2", inside, inside);
    assert_eq!(
        mapped.client(),
        rule_values(11),
        "an IPv4-mapped peer matches the IPv4 rule"
    );
    let v6 = connect("[::1]:0", "::1", inside, inside);
    assert_eq!(
        (v6.client(), v6.server()),
        (rule_values(12), rule_values(12))
    );
    let other = connect("127.0.0.1:0", "127.0.0.1", inside, inside);
    assert_eq!((other.client(), other.server()), (DEFAULT, DEFAULT));
}

#[test]
fn remote_and_local_ports_match_single_ports_and_ranges() {
    let fixture = policy_fixture(&format!(
        "{SCOPE}[[rule]]\nremote_port = 5432\nidle = \"21s\"\n\
         [[rule]]\nlocal_port = \"6000-6009\"\nidle = \"22s\"\n"
    ));
    let inside = fixture.inside();
    let db = connect("127.0.0.1:5432", "127.0.0.1", inside, inside);
    assert_eq!(db.client(), rule_values(21), "remote port 5432");
    assert_eq!(
        db.server(),
        DEFAULT,
        "the server's remote port is the client's ephemeral one"
    );
    let range = connect("127.0.0.1:6005", "127.0.0.1", inside, inside);
    assert_eq!(
        range.server(),
        rule_values(22),
        "local port 6005 is in 6000-6009"
    );
    assert_eq!(range.client(), DEFAULT);
    let outside = connect("127.0.0.1:6010", "127.0.0.1", inside, inside);
    assert_eq!((outside.client(), outside.server()), (DEFAULT, DEFAULT));
}

#[test]
fn direction_tells_connections_opened_from_connections_accepted() {
    let fixture = policy_fixture(&format!(
        "{SCOPE}[[rule]]\ndirection = \"inbound\"\nidle = \"31s\"\n\
         [[rule]]\ndirection = \"outbound\"\nidle = \"32s\"\n"
    ));
    let conn = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    assert_eq!(conn.server(), rule_values(31));
    assert_eq!(conn.client(), rule_values(32));
}

#[test]
fn cgroup_rules_cover_descendants_and_the_most_specific_cgroup_wins() {
    let root = TestCgroup::new();
    let app = root.child("app");
    let worker = app.child("worker");
    let other = root.child("other");
    let netns = Netns::new();
    let mut enforcer = load_enforcer(Stage::Full);
    // The worker's rule comes last in the file and still wins for the worker.
    let text = format!(
        "[agent]\ncgroups = [\"{root}\"]\n\
         [[rule]]\nname = \"app\"\ncgroup = \"{app}\"\nidle = \"41s\"\n\
         [[rule]]\nname = \"any\"\nremote = \"127.0.0.0/8\"\nidle = \"42s\"\n\
         [[rule]]\nname = \"worker\"\ncgroup = \"{worker}\"\nremote_port = 7000\nidle = \"43s\"\n",
        root = root.scope(),
        app = app.scope(),
        worker = worker.scope()
    );
    enforcer.apply(&parse(&text)).unwrap();
    let check = |cgroup: &TestCgroup, listen: &str| {
        let place = Placement::new(cgroup, &netns);
        connect(listen, "127.0.0.1", place, place).client()
    };
    assert_eq!(
        check(&worker, "127.0.0.1:7000"),
        rule_values(43),
        "worker rule first"
    );
    assert_eq!(
        check(&worker, "127.0.0.1:7001"),
        rule_values(41),
        "then its ancestor's"
    );
    assert_eq!(
        check(&app, "127.0.0.1:7000"),
        rule_values(41),
        "app's own rule"
    );
    assert_eq!(
        check(&other, "127.0.0.1:7000"),
        rule_values(42),
        "global rules elsewhere"
    );
    let root_place = Placement::new(&root, &netns);
    let ipv6 = connect("[::1]:0", "::1", root_place, root_place).client();
    assert_eq!(ipv6, DEFAULT, "the default for what no rule matches");
}

#[test]
fn client_and_server_in_two_cgroups_get_their_own_policies() {
    let root = TestCgroup::new();
    let clients = root.child("clients");
    let servers = root.child("servers");
    let netns = Netns::new();
    let mut enforcer = load_enforcer(Stage::Full);
    let text = format!(
        "[agent]\ncgroups = [\"{root}\"]\n\
         [[rule]]\ncgroup = \"{clients}\"\nidle = \"51s\"\n\
         [[rule]]\ncgroup = \"{servers}\"\nidle = \"52s\"\n",
        root = root.scope(),
        clients = clients.scope(),
        servers = servers.scope()
    );
    enforcer.apply(&parse(&text)).unwrap();
    let conn = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        Placement::new(&servers, &netns),
        Placement::new(&clients, &netns),
    );
    assert_eq!(
        conn.client(),
        rule_values(51),
        "outbound: the client's cgroup"
    );
    assert_eq!(
        conn.server(),
        rule_values(52),
        "inbound: the listener's cgroup, not the running task's"
    );
}

fn app_values(idle: u32, interval: u32, count: u32) -> Keepalive {
    Keepalive {
        enabled: true,
        idle_secs: idle,
        interval_secs: interval,
        count,
        user_timeout_ms: 0,
    }
}

/// Whether the kernel lets the program read a socket's keepalive options (6.1 on): fill, cap
/// and audit need it; without it their connections are left alone and counted failed.
fn reads(fixture: &Fixture) -> bool {
    !fixture.enforcer.lacks(features::READS)
}

/// Where the kernel cannot read: every connection of the slot failed and none was changed.
fn assert_all_failed(fixture: &Fixture, at_least: u64) {
    let outcomes = fixture.enforcer.outcomes(0).unwrap();
    assert!(
        outcomes.get(Outcome::Failed) >= at_least
            && outcomes.seen() == outcomes.get(Outcome::Failed),
        "no keepalive reads on this kernel: {outcomes:?}"
    );
}

#[test]
fn fill_only_fills_sockets_without_keepalive() {
    let fixture = policy_fixture(&format!(
        "{SCOPE}[default]\nmode = \"fill\"\nidle = \"61s\"\n"
    ));
    let filled = Keepalive {
        idle_secs: 61,
        ..DEFAULT
    };
    let (plain, _p) = python_client(fixture.inside(), [0, 0, 0], false);
    let (own, _o) = python_client(fixture.inside(), [900, 30, 7], false);
    assert_eq!(
        own,
        app_values(900, 30, 7),
        "the application's own keepalive is kept"
    );
    if !reads(&fixture) {
        assert_eq!(plain, Keepalive::untouched(&fixture.netns));
        assert_all_failed(&fixture, 2);
        return;
    }
    assert_eq!(plain, filled);
    let outcomes = fixture.enforcer.outcomes(0).unwrap();
    assert!(
        outcomes.get(Outcome::Kept) >= 1 && outcomes.get(Outcome::Set) >= 1,
        "{outcomes:?}"
    );
}

#[test]
fn cap_lowers_what_exceeds_and_keeps_what_complies() {
    let fixture = policy_fixture(&format!(
        "{SCOPE}[default]\nmode = \"cap\"\nidle = \"30s\"\n"
    ));
    let (lax, _l) = python_client(fixture.inside(), [900, 30, 7], false);
    let (strict, _s) = python_client(fixture.inside(), [10, 2, 4], false);
    assert_eq!(
        strict,
        app_values(10, 2, 4),
        "already within the cap: left alone"
    );
    let (none, _n) = python_client(fixture.inside(), [0, 0, 0], false);
    if !reads(&fixture) {
        assert_eq!(lax, app_values(900, 30, 7), "left alone");
        assert_eq!(none, Keepalive::untouched(&fixture.netns), "left alone");
        assert_all_failed(&fixture, 3);
        return;
    }
    assert_eq!(
        lax,
        app_values(30, 5, 3),
        "idle and interval x count brought down"
    );
    assert_eq!(
        none,
        app_values(30, 5, 3),
        "no keepalive of its own: the policy's"
    );
    let outcomes = fixture.enforcer.outcomes(0).unwrap();
    assert!(
        outcomes.get(Outcome::Capped) >= 1 && outcomes.get(Outcome::Compliant) >= 1,
        "{outcomes:?}"
    );
}

#[test]
fn exempt_and_audit_change_nothing_and_audit_counts() {
    let fixture = policy_fixture(&format!(
        "{SCOPE}[[rule]]\nname = \"ssh\"\nlocal_port = 2222\nmode = \"exempt\"\n\
         [default]\nmode = \"audit\"\n"
    ));
    let untouched = Keepalive::untouched(&fixture.netns);
    let exempt = connect(
        "127.0.0.1:2222",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    assert_eq!(exempt.server(), untouched, "exempt");
    let audited = connect(
        "127.0.0.1:0",
        "127.0.0.1",
        fixture.inside(),
        fixture.inside(),
    );
    assert_eq!(
        (audited.client(), audited.server()),
        (untouched, untouched),
        "audit"
    );
    assert!(fixture.enforcer.outcomes(1).unwrap().get(Outcome::Exempted) >= 1);
    if !reads(&fixture) {
        assert_all_failed(&fixture, 3);
        return;
    }
    let audit = fixture.enforcer.outcomes(0).unwrap();
    assert!(
        audit.get(Outcome::Audited) >= 3,
        "the exempt connection's client and both ends: {audit:?}"
    );
}
