//! The policy engine against the real kernel as the policy changes: applications that try to
//! undo it, connections that already existed, new cgroups followed, and reloads under load.

use keepalive_common::{
    Outcome, Stage,
    sockopt::{SOL_TCP, TCP_KEEPIDLE},
};
use keepalive_tests::{
    Fixture, Keepalive, Netns, Placement, TestCgroup, connect, load_enforcer,
    policy::{SCOPE, parse, policy_fixture, python_client, rule_values},
    probe,
};

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
fn the_lock_of_a_pattern_holds_later_matches_and_lets_their_siblings_be() {
    // The lock sits once at the pattern's literal prefix (the test cgroup), above every match.
    let root = TestCgroup::new();
    let netns = Netns::new();
    let mut enforcer = load_enforcer(Stage::Full);
    let policy = parse(&format!(
        "[agent]\ncgroups = [\"{}/c-*\"]\n[default]\nidle = \"73s\"\n",
        root.scope()
    ));
    enforcer.apply(&policy).unwrap();
    let later = root.child("c-later");
    let sibling = root.child("d-sibling");
    assert!(enforcer.refresh().unwrap().is_some(), "c-later matches c-*");
    let (values, _w) = python_client(Placement::new(&later, &netns), [0, 0, 0], true);
    let held = rule_values(73);
    if enforcer.has_lock() {
        assert_eq!(values, held, "held by the lock above it");
    } else {
        assert_eq!((values.enabled, values.idle_secs), (false, 999));
    }
    let (values, _w) = python_client(Placement::new(&sibling, &netns), [0, 0, 0], true);
    assert_eq!(
        (values.enabled, values.idle_secs),
        (false, 999),
        "outside the pattern the hook lets the application's calls through"
    );
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
    // One scenario, step by step: a cgroup comes, goes, and the policy widens and changes over
    // the same connections; splitting it would hide what each step leaves alone.
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
