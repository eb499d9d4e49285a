//! Rules that select containers, resolved to the cgroups of the containers they match: the one
//! resolution `run` (whenever the engines report a change), `scan` and `explain` use.

use tracing::info;

use super::Container;
use crate::policy::{CgroupPath, Policy, Selector};

/// `policy` with each rule that selects containers resolved to the cgroups of the `containers`
/// it matches (inside its `cgroup`, when it has one too); without such rules, `policy` as it is.
pub fn resolve(policy: &Policy, containers: &[Container]) -> Policy {
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

/// Whether `container` has every label of `selector` and a name its glob matches.
pub fn matches(selector: &Selector, container: &Container) -> bool {
    selector
        .labels
        .iter()
        .all(|(key, value)| container.labels.get(key) == Some(value))
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
