//! Rules that select containers or pods, resolved to the cgroups of those they match, and the
//! rules pods' annotations make: the one resolution `run` (whenever the engines report a
//! change), `scan` and `explain` use.

use tracing::info;

use super::{Container, Kind};
use crate::policy::{Action, CgroupPath, Policy, Rule, Selector};

/// `policy` with each rule that selects containers resolved to the cgroups of the `containers`
/// it matches (inside its `cgroup`, when it has one too), and a rule for each pod in its scopes
/// whose annotations it allows ([`annotated`]); without such rules or pods, `policy` as it is.
pub fn resolve(policy: &Policy, containers: &[Container]) -> Policy {
    let mut resolved = resolve_selections(policy, containers);
    let rules: Vec<Rule> = annotated(&resolved, containers)
        .into_iter()
        .filter_map(|(_, rule)| rule.ok())
        .collect();
    resolved.rules.extend(rules);
    resolved
}

/// The pods whose annotations the policy refuses, and why (the pod keeps what the policy gives
/// it).
pub fn refused_annotations<'a>(
    policy: &Policy,
    containers: &'a [Container],
) -> Vec<(&'a Container, String)> {
    annotated(policy, containers)
        .into_iter()
        .filter_map(|(pod, rule)| rule.err().map(|why| (pod, why)))
        .collect()
}

/// For each pod in the policy's scopes with annotations under its `[annotations]` prefix: the
/// rule of the pod's cgroup they make (what the policy gives the pod, with the annotated
/// values), or why they are refused.
fn annotated<'a>(
    policy: &Policy,
    containers: &'a [Container],
) -> Vec<(&'a Container, Result<Rule, String>)> {
    let Some(allowed) = &policy.annotations else {
        return Vec::new();
    };
    containers
        .iter()
        .filter(|pod| pod.kind == Kind::Pod && policy.in_scope(&pod.cgroup))
        .filter_map(|pod| {
            let base = base_action(policy, &pod.cgroup);
            let action = match allowed.apply(&pod.annotations, &base) {
                Ok(None) => return None,
                Ok(Some(action)) => action,
                Err(why) => return Some((pod, Err(why))),
            };
            let rule = Rule {
                cgroup: Some(pod.cgroup.clone()),
                annotated: true,
                ..Rule::new(format!("pod {}", pod.name), action)
            };
            Some((pod, Ok(rule)))
        })
        .collect()
}

/// What the policy gives every connection of `cgroup`: the first candidate that matches on
/// nothing but its cgroup, else the default.
fn base_action(policy: &Policy, cgroup: &CgroupPath) -> Action {
    policy
        .candidates(cgroup)
        .into_iter()
        .map(|i| &policy.rules[i])
        .find(|rule| !rule.has_match_keys())
        .map_or(policy.default, |rule| rule.action)
}

/// `policy` with its rules that select containers or pods resolved.
fn resolve_selections(policy: &Policy, containers: &[Container]) -> Policy {
    let mut resolved = policy.clone();
    for rule in &mut resolved.rules {
        let within = rule.cgroup.clone();
        if let Some(selection) = &mut rule.containers {
            let mut cgroups: Vec<CgroupPath> = containers
                .iter()
                .filter(|container| matches(&selection.selector, container))
                .map(|container| container.cgroup.clone())
                .filter(|cgroup| within.as_ref().is_none_or(|within| within.contains(cgroup)))
                .collect();
            cgroups.sort();
            cgroups.dedup();
            selection.cgroups = cgroups;
        }
    }
    resolved
}

/// Whether `container` has every label of `selector` and a name its glob matches; for a
/// selector of pods, whether it is a pod with every one of its pod labels.
pub fn matches(selector: &Selector, container: &Container) -> bool {
    let has = |labels: &std::collections::BTreeMap<String, String>| {
        labels
            .iter()
            .all(|(key, value)| container.labels.get(key) == Some(value))
    };
    if !selector.pod_labels.is_empty() {
        return container.kind == Kind::Pod && has(&selector.pod_labels);
    }
    container.kind == Kind::Container
        && has(&selector.labels)
        && selector
            .name
            .as_ref()
            .is_none_or(|glob| glob.compile_matcher().is_match(&container.name))
}

/// Logs each rule of `now` whose containers resolve to other cgroups than in `before` (the same
/// policy, resolved earlier).
pub fn log_changes(before: &Policy, now: &Policy) {
    for (old, new) in before.rules.iter().zip(&now.rules) {
        let (Some(was), Some(is)) = (&old.containers, &new.containers) else {
            continue;
        };
        if was.cgroups != is.cgroups {
            let cgroups: Vec<&str> = is.cgroups.iter().map(CgroupPath::as_str).collect();
            info!(
                rule = new.name,
                selects = %is.selector,
                cgroups = cgroups.join(" "),
                "the rule's containers changed{}",
                if cgroups.is_empty() {
                    "; it applies to nothing now"
                } else {
                    ""
                }
            );
        }
    }
}
