use std::net::IpAddr;

use super::*;

fn path(text: &str) -> CgroupPath {
    CgroupPath::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn cidr(text: &str) -> Cidr {
    Cidr::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn values(idle: u32) -> Values {
    Values {
        idle_secs: idle,
        ..Values::default()
    }
}

fn rule(name: &str, cgroup: Option<&str>) -> Rule {
    Rule {
        cgroup: cgroup.map(path),
        ..Rule::new(name, Action::enforce(values(10)))
    }
}

fn conn(
    cgroup: &str,
    direction: Direction,
    remote: &str,
    remote_port: u16,
    local_port: u16,
) -> Connection {
    Connection {
        cgroup: path(cgroup),
        direction,
        remote: remote.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}")),
        remote_port,
        local_port,
    }
}

#[test]
fn cgroup_paths_normalise_and_nest() {
    assert_eq!(
        path("system.slice//a.service/").as_str(),
        "/system.slice/a.service"
    );
    assert_eq!(path("/").as_str(), "/");
    assert!(CgroupPath::parse("/a/../b").is_err());
    assert!(path("/").contains(&path("/a")));
    assert!(path("/a").contains(&path("/a/b")));
    assert!(path("/a").contains(&path("/a")));
    assert!(
        !path("/a").contains(&path("/ab")),
        "a prefix of the name is not an ancestor"
    );
    assert!(!path("/a/b").contains(&path("/a")));
    assert_eq!(path("/a/b").depth(), 2);
}

#[test]
fn cidrs_map_ipv4_into_ipv6() {
    let v4 = cidr("10.1.0.0/16");
    assert_eq!(v4.len, 112);
    assert_eq!(v4.to_string(), "10.1.0.0/16");
    let mapped_peer = mapped("::ffff:10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}")));
    let plain_peer = mapped("10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(mapped_peer, plain_peer);
    assert!(v4.contains_addr(plain_peer));
    assert_eq!(cidr("fd00::1").len, 128);
    assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
    assert!(cidr("::/0").contains(&v4));
    let error = Cidr::parse("10.1.2.3/8").err().unwrap_or_default();
    assert!(error.contains("did you mean 10.0.0.0/8"), "{error}");
    assert!(Cidr::parse("10.0.0.0/33").is_err());
    assert!(Cidr::parse("example.com").is_err());
}

#[test]
fn most_specific_cgroup_first_then_file_order_then_unscoped() {
    let policy = Policy {
        scopes: vec![path("/")],
        default: Action::enforce(values(60)),
        rules: vec![
            rule("global", None),
            rule("a", Some("/a")),
            rule("ab-1", Some("/a/b")),
            rule("ab-2", Some("/a/b")),
            rule("other", Some("/c")),
        ],
        existing: true,
        annotations: None,
    };
    let names = |cgroup: &str| -> Vec<&str> {
        policy
            .candidates(&path(cgroup))
            .into_iter()
            .map(|i| policy.rules[i].name.as_str())
            .collect()
    };
    assert_eq!(names("/a/b/c"), ["ab-1", "ab-2", "a", "global"]);
    assert_eq!(names("/a"), ["a", "global"]);
    assert_eq!(names("/x"), ["global"]);
}

#[test]
fn first_matching_rule_decides() {
    let mut db = rule("db", None);
    db.remote = vec![cidr("10.0.0.0/8")];
    db.remote_ports = vec![PortRange {
        first: 5432,
        last: 5432,
    }];
    db.direction = Some(Direction::Outbound);
    let mut exempt = rule("ssh", Some("/svc"));
    exempt.local_ports = vec![PortRange {
        first: 22,
        last: 22,
    }];
    exempt.action.mode = Mode::Exempt;
    let policy = Policy {
        scopes: vec![path("/svc"), path("/db")],
        default: Action::enforce(values(60)),
        rules: vec![db, exempt],
        existing: true,
        annotations: None,
    };
    let out = Direction::Outbound;
    assert_eq!(
        policy.decide(&conn("/db", out, "10.2.3.4", 5432, 40000)),
        Decision::Rule(0)
    );
    assert_eq!(
        policy.decide(&conn("/db", Direction::Inbound, "10.2.3.4", 5432, 40000)),
        Decision::Default,
        "direction must match"
    );
    assert_eq!(
        policy.decide(&conn("/db", out, "::ffff:10.2.3.4", 5432, 1)),
        Decision::Rule(0)
    );
    assert_eq!(
        policy.decide(&conn("/db", out, "11.0.0.1", 5432, 1)),
        Decision::Default
    );
    assert_eq!(
        policy.decide(&conn("/svc/x", Direction::Inbound, "::1", 50000, 22)),
        Decision::Rule(1)
    );
    assert_eq!(
        policy.decide(&conn("/other", out, "10.0.0.1", 5432, 1)),
        Decision::Outside
    );
}

#[test]
fn slots_cap_at_the_counted_limit() {
    assert_eq!(Policy::slot(Decision::Default), 0);
    assert_eq!(Policy::slot(Decision::Rule(0)), 1);
    assert_eq!(
        Policy::slot(Decision::Rule(1_000_000)),
        limits::COUNTED_SLOTS - 1
    );
}

#[test]
fn scope_patterns_match_components_and_depths() {
    let any_pod = path("kubepods.slice/**");
    assert!(any_pod.is_pattern());
    assert_eq!(any_pod.literal_prefix(), path("/kubepods.slice"));
    assert!(
        any_pod.matches(&path("/kubepods.slice")),
        "** matches no component too"
    );
    assert!(any_pod.matches(&path("/kubepods.slice/burstable/pod1/c1")));
    assert!(!any_pod.matches(&path("/system.slice")));
    let docker = path("system.slice/docker-*.scope");
    assert!(docker.matches(&path("/system.slice/docker-abc123.scope")));
    assert!(!docker.matches(&path("/system.slice/docker-abc123.scope/child")));
    assert!(
        docker.covers(&path("/system.slice/docker-abc123.scope/child")),
        "descendants are covered"
    );
    assert!(!docker.covers(&path("/system.slice/sshd.service")));
    assert!(!docker.covers(&path("/system.slice")));
    assert!(path("/a/?b").matches(&path("/a/xb")) && !path("/a/?b").matches(&path("/a/b")));
    assert!(path("/a").covers(&path("/a/b")) && !path("/a").is_pattern());
}
