use std::{net::IpAddr, path::Path};

use super::*;
use crate::{
    containers::{Container, resolve},
    policy::{Connection, Decision, Direction, file::parse},
};

const PAYMENTS: &str = r#"
[agent]
cgroups = ["/docker/*"]

[default]
idle = "60s"

[[rule]]
name = "payments"
labels = { "io.kubernetes.pod.namespace" = "payments" }
idle = "11s"
"#;

fn parsed(text: &str) -> Policy {
    parse(Path::new("test.toml"), text).unwrap_or_else(|e| panic!("{e}"))
}

fn refused(text: &str) -> String {
    match parse(Path::new("test.toml"), text) {
        Ok(policy) => panic!("accepted: {policy:?}"),
        Err(error) => error.to_string(),
    }
}

fn container(name: &str, cgroup: &str, labels: &[(&str, &str)]) -> Container {
    Container::new(
        "docker",
        format!("id-{name}"),
        name.into(),
        labels
            .iter()
            .map(|(key, value)| ((*key).to_string(), (*value).to_string()))
            .collect(),
        CgroupPath::parse(cgroup).unwrap_or_else(|e| panic!("{e}")),
    )
}

fn conn(cgroup: &str) -> Connection {
    Connection {
        cgroup: CgroupPath::parse(cgroup).unwrap_or_else(|e| panic!("{e}")),
        direction: Direction::Outbound,
        remote: "10.1.2.3"
            .parse::<IpAddr>()
            .unwrap_or_else(|e| panic!("{e}")),
        remote_port: 5432,
        local_port: 40000,
    }
}

#[test]
fn labels_and_container_keys_parse() {
    let policy = parsed(
        r#"
[[rule]]
labels = { "io.kubernetes.pod.namespace" = "payments", tier = "db" }
container = "pg*"
idle = "20s"
"#,
    );
    let Some(selection) = policy.rules[0].containers.as_ref() else {
        panic!("no selection in {policy:?}");
    };
    assert_eq!(selection.selector.labels.len(), 2);
    assert_eq!(
        selection.selector.labels["io.kubernetes.pod.namespace"],
        "payments"
    );
    assert_eq!(
        selection.selector.to_string(),
        "io.kubernetes.pod.namespace=payments, tier=db, container pg*"
    );
    assert!(
        selection.cgroups.is_empty(),
        "unresolved until the agent resolves it"
    );
    assert!(parsed(PAYMENTS).selects_containers());
}

#[test]
fn bad_labels_and_globs_are_refused_with_the_field_and_the_form() {
    let cases = [
        (
            "labels = \"payments\"",
            "field `labels`: \"payments\" is not a table",
        ),
        ("labels = {}", "field `labels`: the table is empty"),
        ("labels = { tier = 3 }", "label \"tier\": 3 is not a string"),
        (
            "labels = { \"\" = \"x\" }",
            "a label name must not be empty",
        ),
        ("container = \"\"", "field `container`: must not be empty"),
        (
            "container = \"web-[\"",
            "field `container`: \"web-[\" is not a glob",
        ),
        ("container = 5", "field `container`"),
    ];
    for (line, expected) in cases {
        let error = refused(&format!("[[rule]]\nname = \"r\"\n{line}\nidle = \"5s\"\n"));
        assert!(
            error.starts_with("test.toml:3:"),
            "{line}: the error should point at line 3: {error}"
        );
        assert!(
            error.contains(expected),
            "{line}: expected {expected:?} in: {error}"
        );
    }
}

#[test]
fn a_label_rule_applies_to_the_cgroups_of_matching_containers_only() {
    let containers = [
        container(
            "pay",
            "/docker/aaa",
            &[("io.kubernetes.pod.namespace", "payments")],
        ),
        container(
            "shop",
            "/docker/bbb",
            &[("io.kubernetes.pod.namespace", "shop")],
        ),
    ];
    let policy = resolve(&parsed(PAYMENTS), &containers);
    assert_eq!(
        policy.rules[0].rule_cgroups(),
        [&CgroupPath::parse("/docker/aaa").unwrap_or_else(|e| panic!("{e}"))]
    );
    assert_eq!(policy.decide(&conn("/docker/aaa")), Decision::Rule(0));
    assert_eq!(policy.decide(&conn("/docker/aaa/child")), Decision::Rule(0));
    assert_eq!(policy.decide(&conn("/docker/bbb")), Decision::Default);
    assert_eq!(policy.decide(&conn("/user.slice")), Decision::Outside);
}

#[test]
fn a_label_rule_matching_no_container_applies_to_nothing() {
    let containers = [container(
        "shop",
        "/docker/bbb",
        &[("io.kubernetes.pod.namespace", "shop")],
    )];
    let policy = resolve(&parsed(PAYMENTS), &containers);
    let Some(selection) = policy.rules[0].containers.as_ref() else {
        panic!("no selection in {policy:?}");
    };
    assert!(selection.cgroups.is_empty());
    assert!(
        !policy.rules[0].unscoped(),
        "it is not a rule for everything"
    );
    assert_eq!(policy.decide(&conn("/docker/bbb")), Decision::Default);
    assert_eq!(
        parsed(PAYMENTS).decide(&conn("/docker/bbb")),
        Decision::Default
    );
}

#[test]
fn a_label_rule_is_as_specific_as_the_cgroup_it_resolves_to() {
    let policy = parsed(
        r#"
[[rule]]
name = "everything"
idle = "30s"

[[rule]]
name = "kubepods"
cgroup = "/kubepods"
idle = "40s"

[[rule]]
name = "by-name"
container = "pgbouncer"
idle = "11s"

[[rule]]
name = "the-pod"
cgroup = "/kubepods/pod1"
idle = "20s"
"#,
    );
    let containers = [
        container("pgbouncer", "/kubepods/pod1/ccc", &[]),
        container("web", "/kubepods/pod1/ddd", &[]),
    ];
    let policy = resolve(&policy, &containers);
    // Deeper than the pod's rule and the kubepods rule, though later in the file.
    assert_eq!(
        policy.decide(&conn("/kubepods/pod1/ccc")),
        Decision::Rule(2)
    );
    assert_eq!(
        policy.decide(&conn("/kubepods/pod1/ddd")),
        Decision::Rule(3)
    );
    assert_eq!(policy.decide(&conn("/kubepods/other")), Decision::Rule(1));
    assert_eq!(policy.decide(&conn("/system.slice")), Decision::Rule(0));
}

#[test]
fn a_rule_with_a_cgroup_and_labels_takes_the_containers_inside_its_cgroup() {
    let policy = parsed(
        r#"
[[rule]]
cgroup = "/kubepods"
labels = { app = "db" }
idle = "11s"
"#,
    );
    let containers = [
        container("a", "/kubepods/pod1/aaa", &[("app", "db")]),
        container("b", "/docker/bbb", &[("app", "db")]),
    ];
    let policy = resolve(&policy, &containers);
    assert_eq!(
        policy.decide(&conn("/kubepods/pod1/aaa")),
        Decision::Rule(0)
    );
    assert_eq!(policy.decide(&conn("/docker/bbb")), Decision::Default);
    assert_eq!(policy.decide(&conn("/kubepods/pod2")), Decision::Default);
}

#[test]
fn compiled_tables_agree_with_the_reference_for_resolved_rules() {
    let containers = [
        container(
            "pay",
            "/docker/aaa",
            &[("io.kubernetes.pod.namespace", "payments")],
        ),
        container(
            "shop",
            "/docker/bbb",
            &[("io.kubernetes.pod.namespace", "shop")],
        ),
    ];
    let policy = resolve(&parsed(PAYMENTS), &containers);
    let points: Vec<CgroupPath> = ["/docker/aaa", "/docker/bbb"]
        .iter()
        .map(|path| CgroupPath::parse(path).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let tables = crate::compile::compile(&policy, &points, 1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tables.attachments[&points[0]].fallback.idle_secs, 11);
    assert_eq!(tables.attachments[&points[1]].fallback.idle_secs, 60);
}

const PODS: &str = r#"
[agent]
cgroups = ["/kubepods"]

[default]
idle = "60s"

[annotations]
prefix = "keepalive.example.com"
idle = ["10s", "5m"]

[[rule]]
name = "pgbouncer"
pod_labels = { app = "pgbouncer" }
idle = "13s"
interval = "3s"
"#;

fn pod(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Container {
    let mut pod = container(name, &format!("/kubepods/pod{name}"), labels);
    pod.kind = crate::containers::Kind::Pod;
    pod.annotations = annotations
        .iter()
        .map(|(key, value)| ((*key).to_string(), (*value).to_string()))
        .collect();
    pod
}

fn idle_of(policy: &Policy, cgroup: &str) -> u32 {
    policy
        .action(policy.decide(&conn(cgroup)))
        .unwrap_or_else(|| panic!("{cgroup} is outside"))
        .values
        .idle_secs
}

#[test]
fn a_pod_label_rule_reaches_the_pod_cgroup_and_every_container_below_it() {
    let pods = [
        pod("a", &[("app", "pgbouncer")], &[]),
        pod("b", &[("app", "web")], &[]),
        // An application container carrying the label itself is not a pod.
        container("c", "/kubepods/podc/app", &[("app", "pgbouncer")]),
    ];
    let policy = resolve(&parsed(PODS), &pods);
    assert_eq!(
        policy.rules[0].rule_cgroups(),
        [&CgroupPath::parse("/kubepods/poda").unwrap_or_else(|e| panic!("{e}"))]
    );
    assert_eq!(idle_of(&policy, "/kubepods/poda/app"), 13);
    assert_eq!(idle_of(&policy, "/kubepods/podb/app"), 60);
    assert_eq!(idle_of(&policy, "/kubepods/podc/app"), 60);
    // A container rule does not see pods' labels.
    let by_container =
        parsed("[[rule]]\nname = \"r\"\nlabels = { app = \"pgbouncer\" }\nidle = \"13s\"\n");
    assert!(
        resolve(&by_container, &pods[..1]).rules[0]
            .rule_cgroups()
            .is_empty()
    );
}

#[test]
fn annotations_within_bounds_come_first_and_keep_the_rest_of_the_pods_rule() {
    let pods = [
        pod(
            "a",
            &[("app", "pgbouncer")],
            &[("keepalive.example.com/idle", "20s")],
        ),
        pod(
            "b",
            &[("app", "web")],
            &[("keepalive.example.com/idle", "2s")],
        ),
        pod("c", &[], &[("keepalive.example.com/idle", "30s")]),
    ];
    let unresolved = parsed(PODS);
    let policy = resolve(&unresolved, &pods);
    assert_eq!(idle_of(&policy, "/kubepods/poda/app"), 20);
    let Decision::Rule(i) = policy.decide(&conn("/kubepods/poda/app")) else {
        panic!("the default decided")
    };
    assert_eq!(policy.rules[i].name, "pod a");
    assert_eq!(
        policy.rules[i].action.values.interval_secs, 3,
        "what the annotation does not name comes from the pod's rule"
    );
    assert_eq!(idle_of(&policy, "/kubepods/podb/app"), 60, "refused");
    assert_eq!(idle_of(&policy, "/kubepods/podc/app"), 30);
    let refused = crate::containers::refused_annotations(&unresolved, &pods);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0.name, "b");
    assert!(refused[0].1.contains("10s..=300s"), "{}", refused[0].1);
}

#[test]
fn pod_labels_and_annotations_errors_name_the_field() {
    for (text, expected) in [
        (
            "[[rule]]\npod_labels = { app = \"x\" }\nlabels = { a = \"b\" }\n",
            "field `pod_labels`: a rule selects pods",
        ),
        (
            "[[rule]]\npod_labels = {}\n",
            "field `pod_labels`: the table is empty",
        ),
        (
            "[annotations]\nprefix = \"Keepalive\"\nidle = [\"10s\", \"5m\"]\n",
            "field `prefix`: \"Keepalive\" is not a DNS name",
        ),
        (
            "[annotations]\nprefix = \"k.example.com\"\nidle = [\"5m\", \"10s\"]\n",
            "field `idle`: the lowest (300 s) is above the highest (10 s)",
        ),
        (
            "[annotations]\nprefix = \"k.example.com\"\ncount = [1]\n",
            "field `count`: write the lowest and the highest",
        ),
        (
            "[annotations]\nprefix = \"k.example.com\"\ncount = [0, 5]\n",
            "count = 0 is out of range",
        ),
        (
            "[annotations]\nprefix = \"k.example.com\"\n",
            "allows pods nothing",
        ),
        (
            "[annotations]\nprefix = \"k.example.com\"\nmodes = [\"sometimes\"]\n",
            "\"sometimes\" is not a mode",
        ),
    ] {
        let error = refused(text);
        assert!(
            error.contains(expected),
            "{text}: expected {expected:?} in: {error}"
        );
    }
}
