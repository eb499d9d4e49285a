//! Where a policy attaches: the enforced cgroups (patterns expanded) and the rule cgroups
//! inside them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use super::{Enforcer, EnforcerError};
use crate::{
    cgroup::{Cgroup, CgroupError},
    policy::{CgroupPath, Pattern, Policy},
};

impl Enforcer {
    /// Enforced cgroups (patterns expanded; plain ones must exist) and the existing rule
    /// cgroups inside them; rules whose cgroup does not exist are reported, not fatal
    /// (containers come and go).
    pub(super) fn attach_points(&self, policy: &Policy) -> Result<Points, EnforcerError> {
        let mut scopes = Vec::new();
        for scope in &policy.scopes {
            if scope.is_pattern() {
                scopes.extend(expand(&self.mount, scope));
            } else {
                scopes.push(scope.clone());
            }
        }
        let mut points = Points::default();
        for scope in outermost(&scopes) {
            let cgroup = match Cgroup::resolve(&self.mount, Path::new(scope.as_str())) {
                Ok(cgroup) => cgroup,
                // Removed since (a container ended): nothing to enforce there now.
                Err(CgroupError::NotFound { .. }) => {
                    points.missing.push(("enforced cgroup".into(), scope));
                    continue;
                }
                Err(source) => return Err(EnforcerError::Scope { scope, source }),
            };
            points.all.insert(scope.clone(), cgroup.clone());
            points.scopes.insert(scope, cgroup);
        }
        let rule_cgroups = policy.rules.iter().flat_map(|rule| {
            rule.rule_cgroups()
                .into_iter()
                .map(move |cgroup| (rule, cgroup))
        });
        for (rule, cgroup) in rule_cgroups {
            if points.all.contains_key(cgroup)
                || !points.scopes.keys().any(|scope| scope.contains(cgroup))
            {
                continue;
            }
            match Cgroup::resolve(&self.mount, Path::new(cgroup.as_str())) {
                Ok(resolved) => {
                    points.all.insert(cgroup.clone(), resolved);
                }
                Err(CgroupError::NotFound { .. }) => {
                    points.missing.push((rule.name.clone(), cgroup.clone()))
                }
                Err(source) => {
                    return Err(EnforcerError::Scope {
                        scope: cgroup.clone(),
                        source,
                    });
                }
            }
        }
        Ok(points)
    }
}

/// Where a policy attaches.
#[derive(Debug, Default)]
pub(super) struct Points {
    /// Every attachment of the sock_ops program: enforced cgroups and rule cgroups in them.
    pub(super) all: BTreeMap<CgroupPath, Cgroup>,
    /// The enforced cgroups (outermost only): the setsockopt hook, the existing-connection
    /// sweep.
    pub(super) scopes: BTreeMap<CgroupPath, Cgroup>,
    pub(super) missing: Vec<(String, CgroupPath)>,
}

/// Paths without the ones nested in another (those add nothing).
fn outermost(scopes: &[CgroupPath]) -> BTreeSet<CgroupPath> {
    scopes
        .iter()
        .filter(|scope| {
            !scopes
                .iter()
                .any(|other| other != *scope && other.contains(scope))
        })
        .cloned()
        .collect()
}

/// The existing cgroups a pattern matches.
fn expand(mount: &Path, pattern: &CgroupPath) -> Vec<CgroupPath> {
    let mut found = Vec::new();
    let compiled = Pattern::new(pattern);
    let mut stack = vec![mount.join(pattern.literal_prefix().relative())];
    while let Some(dir) = stack.pop() {
        let relative = dir.strip_prefix(mount).unwrap_or(&dir);
        if let Ok(path) = CgroupPath::parse(&relative.to_string_lossy())
            && compiled.matches(&path)
        {
            found.push(path);
        }
        stack.extend(crate::cgroup::child_dirs(&dir));
    }
    found
}
