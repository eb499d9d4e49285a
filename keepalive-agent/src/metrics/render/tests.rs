use super::*;
use crate::{
    enforcer::{Ends, Outcomes},
    policy::{Action, Policy, Rule, Values},
    status::State,
};

#[test]
fn rules_sharing_the_last_slot_are_one_series() {
    let limit = keepalive_common::limits::COUNTED_SLOTS as usize;
    let mut policy = Policy::enforce(Values::default(), vec![crate::CgroupPath::root()]);
    policy.rules = (0..limit + 5)
        .map(|i| Rule::new(format!("r{i}"), Action::enforce(Values::default())))
        .collect();
    let rules: Vec<RuleCounters> = State::new(&policy, "test", 1)
        .rules
        .into_iter()
        .map(|rule| RuleCounters {
            containers: None,
            slot: rule.slot,
            name: rule.name,
            line: rule.line,
            action: rule.action,
            counters: Outcomes::default(),
            ends: Ends::default(),
        })
        .collect();
    let series: Vec<String> = series(&rules).into_iter().map(|(name, _)| name).collect();
    assert_eq!(series.len(), limit, "one series per slot");
    assert_eq!(series.first().map(String::as_str), Some("default"));
    assert_eq!(series.get(1).map(String::as_str), Some("r0"));
    assert_eq!(series.last().map(String::as_str), Some("shared"));
}

#[test]
fn exposition_names_counters_with_total_in_help_type_and_samples() {
    let mut outcomes = Outcomes::default();
    outcomes.0[Outcome::Set as usize] = 3;
    let snapshot = Snapshot {
        pins: "/sys/fs/bpf/keepalive-agent".into(),
        agent_running: true,
        agent_pid: Some(1),
        faults: Vec::new(),
        policy: Some(PolicyInForce {
            source: "command line".into(),
            generation: 2,
            applied_at: 7,
            scopes: vec!["/".into()],
            reloads_succeeded: 1,
            reloads_failed: 0,
        }),
        missing_features: Vec::new(),
        attached: Vec::new(),
        records: 1,
        counters: None,
        rules: vec![RuleCounters {
            containers: None,
            slot: 0,
            name: "a \"quoted\" rule".into(),
            line: 0,
            action: String::new(),
            counters: outcomes,
            ends: Ends([4, 2, 1, 0]),
        }],
        agent: Some(crate::status::AgentTelemetry::default()),
    };
    let text = exposition(snapshot).unwrap_or_default();
    for line in [
        "# HELP keepalive_connections_total Connections decided, by rule and outcome",
        "# TYPE keepalive_connections_total counter",
        r#"keepalive_connections_total{rule="a \"quoted\" rule",outcome="set"} 3"#,
        "# TYPE keepalive_up gauge",
        "keepalive_up 1",
        "keepalive_policy_generation 2",
        r#"keepalive_reloads_total{result="success"} 1"#,
        "# TYPE keepalive_program_run_seconds_total counter",
        r#"keepalive_connections_closed_total{rule="a \"quoted\" rule",outcome="reset"} 2"#,
        "# TYPE keepalive_failure_idle_seconds histogram",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    assert!(
        !text.contains("_total_total") && !text.contains("# EOF"),
        "{text}"
    );
}
