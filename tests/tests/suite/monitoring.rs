//! What comes with the agent for monitoring it: the alert rules (deploy/prometheus), checked
//! and unit-tested by a real `promtool`, the same rules as a PrometheusRule component rendered
//! by `kubectl kustomize`, and the Grafana dashboard (deploy/grafana). That every metric they
//! query is one the agent exports is checked against a real scrape in `observability`.

use std::process::Command;

use keepalive_tests::{
    manifests,
    repo::{read, root as repo},
    succeeds,
};
use serde_json::Value;

const RULES: &str = "deploy/prometheus/keepalive-agent.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/keepalive-agent.rules.test.yml";
const DASHBOARD: &str = "deploy/grafana/keepalive-agent.json";

/// The alerts the rules must have: what an operator of the agent is paged or warned for.
const ALERTS: [&str; 8] = [
    "KeepaliveAgentDown",
    "KeepaliveAgentNotReady",
    "KeepaliveEnforcementMissing",
    "KeepaliveReloadFailing",
    "KeepaliveKernelFeatureMissing",
    "KeepaliveSetsockoptErrors",
    "KeepaliveConnectionsWithoutKeepalive",
    "KeepaliveAnnotationsRefused",
];

fn promtool() -> Command {
    let mut promtool = Command::new("promtool");
    promtool.current_dir(repo());
    promtool
}

#[test]
fn the_alert_rules_pass_promtool_and_each_alert_has_a_unit_test() {
    let checked = succeeds(promtool().args(["check", "rules", RULES]));
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        said.contains(&format!("SUCCESS: {} rules found", ALERTS.len())),
        "{said}"
    );
    let tested = succeeds(promtool().args(["test", "rules", RULE_TESTS]));
    assert!(
        String::from_utf8_lossy(&tested.stdout).contains("SUCCESS"),
        "{}",
        String::from_utf8_lossy(&tested.stdout)
    );
    let rules = manifests::parse(&read(RULES));
    let tests = manifests::parse(&read(RULE_TESTS));
    let defined: Vec<&str> = rules[0]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| rule["alert"].as_str().unwrap())
        .collect();
    assert_eq!(defined, ALERTS);
    for alert in ALERTS {
        let firing = tests[0]["tests"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|test| test["alert_rule_test"].as_array().unwrap())
            .filter(|case| case["alertname"] == alert)
            .map(|case| case["exp_alerts"].as_array().unwrap().len())
            .collect::<Vec<_>>();
        assert!(
            firing.contains(&0) && firing.iter().any(|alerts| *alerts > 0),
            "{alert}: its unit test must see it both silent and firing: {firing:?}"
        );
    }
}

#[test]
fn the_prometheusrule_component_carries_the_rules_file_verbatim() {
    let (_, documents) = manifests::overlay(&["prometheusrule"]);
    let rule = manifests::find(&documents, "PrometheusRule", Some("keepalive-agent"));
    assert_eq!(rule["metadata"]["namespace"], "keepalive-agent");
    let file = &manifests::parse(&read(RULES))[0];
    assert_eq!(
        rule["spec"], *file,
        "the PrometheusRule's spec must be {RULES}, verbatim"
    );
}

/// Every PromQL expression of the dashboard.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// The metric names of the agent's own (`keepalive_`) that the alert rules and the dashboard
/// query.
pub(crate) fn queried_metrics() -> Vec<String> {
    let mut text = read(RULES);
    text.extend(dashboard_queries().into_iter().map(|query| query + "\n"));
    let mut names: Vec<String> = text
        .match_indices("keepalive_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_dashboard_shows_what_an_operator_asks_first() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    assert_eq!(dashboard["uid"], "keepalive-agent");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|variable| variable["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "instance"]);
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        assert!(!panel["targets"].as_array().unwrap().is_empty(), "{panel}");
    }
    let queries = dashboard_queries().join("\n");
    for (shown, metric) in [
        (
            "connections by rule and outcome",
            "keepalive_connections_total",
        ),
        ("attachments", "keepalive_attached_cgroups"),
        (
            "connections ended, by rule and how",
            "keepalive_connections_closed_total",
        ),
        (
            "idle before a failure",
            "keepalive_failure_idle_seconds_bucket",
        ),
        ("reloads", "keepalive_reloads_total"),
        (
            "connections without keepalive",
            "keepalive_connections_without_keepalive",
        ),
        ("agent CPU", "container_cpu_usage_seconds_total"),
        ("agent memory", "container_memory_working_set_bytes"),
    ] {
        assert!(
            queries.contains(metric),
            "no panel shows {shown} ({metric})"
        );
    }
    assert!(
        queried_metrics().len() >= 10,
        "the rules and the dashboard query too few of the agent's metrics: {:?}",
        queried_metrics()
    );
}
