//! `keepalive-agent check --config FILE`: the policy file checked as `run` would, nothing
//! loaded.

use std::fmt::Write as _;

use crate::{
    Mode,
    cli::CheckArgs,
    compile::compile,
    enforcer::features,
    plan::named_attach_points,
    policy::{CgroupPath, Policy, file},
};

/// Checks the file; `Ok` holds a summary (and warnings) for the user.
pub fn check(args: &CheckArgs) -> anyhow::Result<String> {
    let policy = file::load(&args.config)?;
    // As if every rule cgroup existed: the limits are checked for the largest case.
    compile(&policy, &named_attach_points(&policy), 1)?;
    let mut out = String::new();
    let scopes: Vec<&str> = policy.scopes.iter().map(CgroupPath::as_str).collect();
    let _ = writeln!(
        out,
        "{}: ok: {} rule(s); default: {}; enforced in {}; existing connections: {}",
        args.config.display(),
        policy.rules.len(),
        policy.default,
        scopes.join(", "),
        if policy.existing {
            "updated"
        } else {
            "left alone"
        },
    );
    for rule in &policy.rules {
        if let Some(selection) = &rule.containers {
            let what = if selection.selector.pod_labels.is_empty() {
                "containers"
            } else {
                "pods"
            };
            let _ = writeln!(
                out,
                "note: rule {:?} (line {}) selects {what} ({}); the running agent resolves \
                 it to their cgroups through the container engines",
                rule.name, rule.line, selection.selector
            );
        }
    }
    if let Some(annotations) = &policy.annotations {
        let _ = writeln!(
            out,
            "note: pods may set their keepalive through annotations {}/...; the running agent \
             reads them through the container engines",
            annotations.prefix
        );
    }
    for warning in warnings(&policy) {
        let _ = writeln!(out, "warning: {warning}");
    }
    // check loads nothing, so this kernel's limits go by its release (`run` probes them).
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let missing = features::by_release(release.trim());
    for sentence in features::unsupported(&policy, &missing) {
        let _ = writeln!(
            out,
            "warning: on this kernel ({}): {sentence}",
            release.trim()
        );
    }
    let locked = std::iter::once(&policy.default)
        .chain(policy.rules.iter().map(|rule| &rule.action))
        .any(|action| action.lock && matches!(action.mode, Mode::Enforce | Mode::Cap));
    if let Some(lock) = missing
        .iter()
        .find(|missing| missing.feature == features::LOCK)
        .filter(|_| locked)
    {
        let _ = writeln!(out, "warning: {lock}");
    }
    Ok(out)
}

/// Rules that can never decide anything.
fn warnings(policy: &Policy) -> Vec<String> {
    let mut warnings = Vec::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        if let Some(cgroup) = &rule.cgroup
            && !policy
                .scopes
                .iter()
                .any(|scope| scope.covers(cgroup) || cgroup.contains(&scope.literal_prefix()))
        {
            warnings.push(format!(
                "rule {:?} (line {}): cgroup {cgroup} is outside every enforced cgroup; it never applies",
                rule.name, rule.line
            ));
        }
        let shadow = policy.rules[..i].iter().find(|earlier| {
            !earlier.has_match_keys()
                && earlier.containers == rule.containers
                && match (&earlier.cgroup, &rule.cgroup) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a == b,
                    _ => false,
                }
        });
        if let Some(earlier) = shadow {
            warnings.push(format!(
                "rule {:?} (line {}): rule {:?} (line {}) matches every connection it would, so it never applies",
                rule.name, rule.line, earlier.name, earlier.line
            ));
        }
    }
    warnings
}
