//! The policy engine against the real kernel: each match key, each mode, precedence, reloads
//! under load, connections that already existed, and applications that try to undo the policy.
#![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

use std::path::Path;

use keepalive_agent::{Policy, enforcer::features, policy::file};
use keepalive_common::{
    Outcome, Stage,
    sockopt::{SOL_TCP, TCP_KEEPIDLE},
};
use keepalive_tests::{
    Fixture, Keepalive, Netns, Placement, TestCgroup, Workload, connect, load_enforcer, probe,
};

/// The built-in default of policy files, which tests leave in place.
const DEFAULT: Keepalive = Keepalive {
    enabled: true,
    idle_secs: 60,
    interval_secs: 5,
    count: 3,
    user_timeout_ms: 0,
};

/// The values the rules of these tests set: `idle` tells which rule applied.
fn rule_values(idle: u32) -> Keepalive {
    Keepalive {
        idle_secs: idle,
        ..DEFAULT
    }
}

fn parse(text: &str) -> Policy {
    file::parse(Path::new("test.toml"), text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A test cgroup enforced with a policy file's text, in a fresh network namespace. The text
/// is a template: `{root}` is the test cgroup.
fn policy_fixture(template: &str) -> Fixture {
    Fixture::with_policy(|root| parse(&template.replace("{root}", root.scope().as_str())))
}

const SCOPE: &str = "[agent]\ncgroups = [\"{root}\"]\n";

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

/// A Python client that sets keepalive itself before connecting (argv: port, idle, intvl,
/// cnt), or with idle 0 does not; after connecting it may try to undo keepalive (argv[5]: 1).
const PYTHON_CLIENT: &str = "
import socket, sys
port, idle, intvl, cnt, undo = (int(a) for a in sys.argv[1:6])
c = socket.socket()
if idle:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
c.connect(('127.0.0.1', port))
if undo:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 999)
print('connected', c.fileno(), flush=True)
sys.stdin.read()
";

/// The client socket of a Python client (see [`PYTHON_CLIENT`]) to a probe server.
fn python_client(place: Placement<'_>, app: [u32; 3], undo: bool) -> (Keepalive, [Workload; 2]) {
    let server = probe(&["listen", "127.0.0.1:0"], place);
    let port = server.expect("listening").remove(0);
    let mut args = vec!["-c".to_string(), PYTHON_CLIENT.to_string(), port];
    args.extend(app.iter().map(u32::to_string));
    args.push(u8::from(undo).to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = Workload::spawn("python3", &args, place);
    let fd: i32 = client.expect("connected")[0].parse().unwrap();
    let values = Keepalive::of(client.steal_fd(fd));
    (values, [client, server])
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

/// What a socket holds after its application turned keepalive off and set idle 999 (the
/// `undo` of [`python_client`]): the rule's values where the lock loaded, the application's
/// where the kernel cannot load it (before 6.1; the agent says so at start).
fn after_undo(fixture: &Fixture, held: Keepalive) -> Keepalive {
    if fixture.enforcer.has_lock() {
        held
    } else {
        Keepalive {
            enabled: false,
            idle_secs: 999,
            ..held
        }
    }
}

/// The hook's overrides in `slot`: some where the lock loaded, none where it could not.
fn assert_overridden(fixture: &Fixture, slot: u32, at_least: u64) {
    let overridden = fixture
        .enforcer
        .outcomes(slot)
        .unwrap()
        .get(Outcome::Overridden);
    if fixture.enforcer.has_lock() {
        assert!(overridden >= at_least, "{overridden} overrides");
    } else {
        assert_eq!(overridden, 0, "no lock on this kernel, yet overrides");
    }
}

#[test]
fn an_application_cannot_undo_enforced_keepalive() {
    let fixture = policy_fixture(&format!("{SCOPE}[default]\nidle = \"70s\"\n"));
    let (values, _w) = python_client(fixture.inside(), [0, 0, 0], true);
    assert_eq!(
        values,
        after_undo(&fixture, rule_values(70)),
        "SO_KEEPALIVE 0 and idle 999 overridden (where the lock loads)"
    );
    assert_overridden(&fixture, 0, 2);
}

#[test]
fn an_unlocked_rule_lets_the_application_change_its_mind() {
    let fixture = policy_fixture(&format!("{SCOPE}[default]\nidle = \"70s\"\nlock = false\n"));
    let (values, _w) = python_client(fixture.inside(), [0, 0, 0], true);
    assert_eq!((values.enabled, values.idle_secs), (false, 999));
}

#[test]
fn the_lock_follows_direction_rules() {
    // Direction rules make the hook need each socket's direction (kept in socket storage).
    let fixture = policy_fixture(&format!(
        "{SCOPE}[[rule]]\ndirection = \"outbound\"\nidle = \"71s\"\n\
         [[rule]]\ndirection = \"inbound\"\nmode = \"exempt\"\n"
    ));
    let (values, _w) = python_client(fixture.inside(), [0, 0, 0], true);
    assert_eq!(values, after_undo(&fixture, rule_values(71)));

    // A direction rule that this connection matches in neither direction: both directions
    // lead to the default, so nothing is stored for the socket and the hook still holds it.
    let fixture = policy_fixture(&format!(
        "{SCOPE}[default]\nidle = \"72s\"\n[[rule]]\ndirection = \"outbound\"\nremote_port = 1\n\
         mode = \"exempt\"\n"
    ));
    let (values, _w) = python_client(fixture.inside(), [0, 0, 0], true);
    assert_eq!(values, after_undo(&fixture, rule_values(72)));
}

#[test]
fn audit_counts_an_application_undoing_keepalive_without_stopping_it() {
    let fixture = policy_fixture(&format!("{SCOPE}[default]\nmode = \"audit\"\n"));
    let (values, _w) = python_client(fixture.inside(), [0, 0, 0], true);
    assert_eq!((values.enabled, values.idle_secs), (false, 999));
    assert_overridden(&fixture, 0, 1);
}

#[test]
fn connections_that_already_existed_get_the_policy_and_its_changes() {
    let root = TestCgroup::new();
    let netns = Netns::new();
    let place = Placement::new(&root, &netns);
    let before = connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert_eq!(before.client(), Keepalive::untouched(&netns));

    let mut enforcer = load_enforcer(Stage::Full);
    let text = |idle: &str, existing: bool| {
        parse(&format!(
            "[agent]\ncgroups = [\"{}\"]\nexisting = {existing}\n[default]\nidle = \"{idle}\"\n",
            root.scope()
        ))
    };
    let applied = enforcer.apply(&text("81s", true)).unwrap();
    let sweep = applied.existing.unwrap().unwrap();
    assert_eq!(sweep.connections, 2, "{sweep:?}");
    assert_eq!(sweep.outcomes[Outcome::Set as usize], 2, "{sweep:?}");
    assert_eq!(
        (before.client(), before.server()),
        (rule_values(81), rule_values(81))
    );

    enforcer.apply(&text("82s", true)).unwrap();
    assert_eq!(
        before.client(),
        rule_values(82),
        "a policy change reaches them too"
    );
    let applied = enforcer.apply(&text("83s", false)).unwrap();
    assert!(applied.existing.is_none());
    assert_eq!(
        before.client(),
        rule_values(82),
        "existing = false leaves them alone"
    );
}

#[test]
fn a_new_cgroup_gets_its_own_connections_swept_and_nothing_else_is_touched() {
    let root = TestCgroup::new();
    let netns = Netns::new();
    let old = root.child("c-old");
    let at_old = Placement::new(&old, &netns);
    let sibling = connect("127.0.0.1:0", "127.0.0.1", at_old, at_old);
    let mut enforcer = load_enforcer(Stage::Full);
    let policy = parse(&format!(
        "[agent]\ncgroups = [\"{}/c-*\"]\nexisting = true\n[default]\nidle = \"81s\"\n",
        root.scope()
    ));
    let applied = enforcer.apply(&policy).unwrap();
    assert_eq!(applied.existing.unwrap().unwrap().connections, 2);
    assert_eq!(sibling.client(), rule_values(81));
    // The application sets its own value after the sweep; the policy does not lock it.
    keepalive_agent::sockopt::set_int(sibling.client_socket(), SOL_TCP, TCP_KEEPIDLE, 999).unwrap();

    // A container's cgroup, its connections opened before the agent follows it.
    let new = root.child("c-new");
    let at_new = Placement::new(&new, &netns);
    let inside = connect("127.0.0.1:0", "127.0.0.1", at_new, at_new);
    assert_eq!(inside.client(), Keepalive::untouched(&netns));
    let Some(followed) = enforcer.refresh().unwrap() else {
        panic!("c-new matches c-* but nothing changed");
    };
    let ids = |cgroups: &[keepalive_agent::Cgroup]| -> Vec<u64> {
        cgroups.iter().map(|cgroup| cgroup.id).collect()
    };
    assert_eq!(ids(&followed.attached), [new.cgroup().id]);
    assert!(followed.detached.is_empty(), "{followed:?}");
    let sweep = followed.existing.unwrap().unwrap();
    assert_eq!(
        sweep.connections, 2,
        "only the new cgroup's two ends are swept: {sweep:?}"
    );
    assert_eq!(
        (inside.client(), inside.server()),
        (rule_values(81), rule_values(81))
    );
    assert_eq!(
        sibling.client().idle_secs,
        999,
        "the sibling's connection is not touched again"
    );
    assert_eq!(
        followed.generation, applied.generation,
        "the lookup entries in force serve the new cgroup: not rewritten"
    );
    assert_eq!(
        enforcer.record(new.cgroup().id).unwrap(),
        enforcer.record(old.cgroup().id).unwrap()
    );

    // A cgroup that goes takes its link and nothing else; nothing is swept.
    let gone = new.cgroup().id;
    drop(inside);
    drop(new);
    let Some(forgotten) = enforcer.refresh().unwrap() else {
        panic!("c-new went but nothing changed");
    };
    assert_eq!(ids(&forgotten.detached), [gone]);
    assert!(forgotten.attached.is_empty() && forgotten.existing.is_none());
    assert_eq!(sibling.client().idle_secs, 999);
    let attached: Vec<u64> = enforcer.attachments().map(|cgroup| cgroup.id).collect();
    assert_eq!(attached, [old.cgroup().id]);

    // A reload that only enforces in one more place sweeps that place alone; one that changes
    // the rules sweeps everywhere.
    let other = root.child("d-other");
    let at_other = Placement::new(&other, &netns);
    let elsewhere = connect("127.0.0.1:0", "127.0.0.1", at_other, at_other);
    let wider = |idle: &str| {
        parse(&format!(
            "[agent]\ncgroups = [\"{root}/c-*\", \"{root}/d-*\"]\nexisting = true\n\
             [default]\nidle = \"{idle}\"\n",
            root = root.scope()
        ))
    };
    let reloaded = enforcer.apply(&wider("81s")).unwrap();
    assert_eq!(reloaded.existing.unwrap().unwrap().connections, 2);
    assert_eq!(elsewhere.client(), rule_values(81));
    assert_eq!(sibling.client().idle_secs, 999);
    let changed = enforcer.apply(&wider("82s")).unwrap();
    assert_eq!(changed.existing.unwrap().unwrap().connections, 4);
    assert_eq!(
        (sibling.client(), elsewhere.client()),
        (rule_values(82), rule_values(82))
    );
}

/// Values of the two policies alternated under load: every field differs.
const A: [i32; 4] = [1, 11, 2, 3];
const B: [i32; 4] = [1, 22, 4, 6];

#[test]
fn reloads_under_load_give_every_connection_one_whole_policy() {
    let mut fixture = policy_fixture(SCOPE);
    let root = fixture.cgroup.scope();
    // Only the kernel's path is under test: the sweep of existing connections sets a socket's
    // options one by one from user space, so a read racing it may see two policies' values.
    let policy = |values: [i32; 4]| {
        parse(
            &format!(
                "{SCOPE}existing = false\n[default]\nidle = \"{}s\"\ninterval = \"{}s\"\ncount = {}\n\
             [[rule]]\nremote = \"127.0.0.0/8\"\nremote_port = \"1-65535\"\nidle = \"{}s\"\n\
             interval = \"{}s\"\ncount = {}\n",
                values[1], values[2], values[3], values[1], values[2], values[3]
            )
            .replace("{root}", root.as_str()),
        )
    };
    let enforcer = &mut fixture.enforcer;
    enforcer.apply(&policy(A)).unwrap();
    let load = probe(
        &["tally", "127.0.0.1:0", "6000"],
        Placement::new(&fixture.cgroup, &fixture.netns),
    );
    load.expect("listening");
    let mut reloads = 0;
    let tally = loop {
        enforcer
            .apply(&policy(if reloads % 2 == 0 { B } else { A }))
            .unwrap();
        reloads += 1;
        if let Some(line) = load.try_line() {
            break line;
        }
    };
    let mut lines = vec![tally];
    lines.extend(std::iter::from_fn(|| {
        load.try_line_within(std::time::Duration::from_secs(10))
    }));
    let mut seen = std::collections::BTreeMap::new();
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["tally", values @ .., n] => {
                let values: Vec<i32> = values.iter().map(|v| v.parse().unwrap()).collect();
                seen.insert(values, n.parse::<u64>().unwrap());
            }
            ["tallied", count] => assert_eq!(*count, "6000"),
            other => panic!("unexpected line {other:?}"),
        }
    }
    assert!(
        reloads >= 5,
        "only {reloads} reloads happened during the load"
    );
    assert_eq!(
        seen.values().sum::<u64>(),
        12_000,
        "both ends of every connection: {seen:?}"
    );
    for values in seen.keys() {
        assert!(
            values[..] == A || values[..] == B,
            "a connection with mixed values {values:?} after {reloads} reloads: {seen:?}"
        );
    }
}
