//! Where a policy attaches, decided once: the enforced cgroups (patterns expanded, the outermost
//! only) and the rule cgroups inside them. The enforcer plans over the cgroups that exist
//! ([`Hierarchy`] on the mounted hierarchy); `check`, the compiler's tests and the fuzzer plan
//! over [`Named`], as if every cgroup the policy names existed.

use std::collections::{BTreeMap, BTreeSet};

use crate::policy::{CgroupPath, Policy, Rule};

/// The cgroups that exist, as the planner sees them.
pub trait Hierarchy {
    /// What an existing cgroup is found as (the enforcer: [`crate::Cgroup`]).
    type Cgroup: Clone;
    type Error;
    /// The existing cgroups `pattern` matches.
    fn expand(&self, pattern: &CgroupPath) -> Vec<CgroupPath>;
    /// `path` if it exists, None if it does not.
    fn find(&self, path: &CgroupPath) -> Result<Option<Self::Cgroup>, Self::Error>;
}

/// Where a policy attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<C> {
    /// Every attachment of the sock_ops program: enforced cgroups and rule cgroups in them.
    pub attachments: BTreeMap<CgroupPath, C>,
    /// The enforced cgroups (outermost only): the existing-connection sweep.
    pub enforced: BTreeMap<CgroupPath, C>,
    /// Where the setsockopt hook (the lock) attaches: each scope's literal part (a plain scope
    /// itself, a pattern's leading components without wildcards), outermost only, where it
    /// exists. The hook finds the caller's rules by walking up its cgroups, so one link above
    /// a pattern's matches holds all of them, present and future: a host with 10,000
    /// containers has 10,000 links fewer for the health check to walk, and a new container
    /// needs no lock of its own.
    pub locks: BTreeMap<CgroupPath, C>,
    /// (who named it, cgroup) of enforced cgroups and rule cgroups that do not exist (now).
    pub absent: Vec<(String, CgroupPath)>,
}

impl<C> Default for Plan<C> {
    fn default() -> Self {
        Self {
            attachments: BTreeMap::new(),
            enforced: BTreeMap::new(),
            locks: BTreeMap::new(),
            absent: Vec::new(),
        }
    }
}

impl<C> Plan<C> {
    /// The attachment paths, in order (what [`crate::compile::compile`] takes).
    pub fn paths(&self) -> Vec<CgroupPath> {
        self.attachments.keys().cloned().collect()
    }
}

/// The attachments of `policy` over `hierarchy`: enforced cgroups with patterns expanded, those
/// nested in another dropped (they add nothing), those that do not exist reported absent; then
/// each rule cgroup inside an enforced one, if it exists. Rules whose cgroup does not exist are
/// reported, not fatal (containers come and go).
pub fn attach_points<H: Hierarchy>(
    policy: &Policy,
    hierarchy: &H,
) -> Result<Plan<H::Cgroup>, H::Error> {
    let mut scopes = Vec::new();
    for scope in &policy.scopes {
        if scope.is_pattern() {
            scopes.extend(hierarchy.expand(scope));
        } else {
            scopes.push(scope.clone());
        }
    }
    let mut plan = Plan::default();
    for scope in outermost(&scopes) {
        let Some(cgroup) = hierarchy.find(&scope)? else {
            plan.absent.push(("enforced cgroup".into(), scope));
            continue;
        };
        plan.attachments.insert(scope.clone(), cgroup.clone());
        plan.enforced.insert(scope, cgroup);
    }
    // A plain scope's literal prefix is the scope itself.
    let literal: Vec<CgroupPath> = policy
        .scopes
        .iter()
        .map(CgroupPath::literal_prefix)
        .collect();
    for point in outermost(&literal) {
        if let Some(cgroup) = hierarchy.find(&point)? {
            plan.locks.insert(point, cgroup);
        }
    }
    // A rule's cgroup, or the cgroups of the containers it selects.
    let rule_cgroups = policy.rules.iter().flat_map(|rule| {
        rule.rule_cgroups()
            .into_iter()
            .map(move |cgroup| (rule, cgroup))
    });
    for (rule, cgroup) in rule_cgroups {
        if plan.attachments.contains_key(cgroup)
            || !plan.enforced.keys().any(|scope| scope.contains(cgroup))
        {
            continue;
        }
        match hierarchy.find(cgroup)? {
            Some(found) => {
                plan.attachments.insert(cgroup.clone(), found);
            }
            None => plan.absent.push((rule.name.clone(), cgroup.clone())),
        }
    }
    Ok(plan)
}

/// What a cgroup created since the last plan changes there ([`new_cgroup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewCgroup {
    /// It is one more enforced cgroup (a pattern matches it, nothing above it is attached):
    /// the plan gains it, as an attachment and an enforced cgroup, and nothing else.
    Attach,
    /// Outside every enforced cgroup, or inside an attachment that already covers it: the plan
    /// is the same.
    Nothing,
    /// The policy names it or a cgroup below it (an enforced cgroup, a rule's): only planning
    /// again tells.
    Replan,
}

/// What the cgroup `path`, created since the plan whose attachments `attached` tells (by
/// path), changes in it, without looking at the host: a new container among 10,000 costs a
/// pattern match and a lookup per ancestor. Cgroups created together are taken shallowest
/// first, each counted as attached once it is.
pub fn new_cgroup(
    policy: &Policy,
    attached: impl Fn(&str) -> bool,
    path: &CgroupPath,
) -> NewCgroup {
    let named = policy
        .scopes
        .iter()
        .filter(|scope| !scope.is_pattern())
        .chain(policy.rules.iter().flat_map(Rule::rule_cgroups));
    if named.clone().any(|named| path.contains(named)) {
        return NewCgroup::Replan;
    }
    if path.ancestors().any(&attached) {
        return NewCgroup::Nothing;
    }
    let matched = policy
        .scopes
        .iter()
        .any(|scope| scope.is_pattern() && scope.matches(path));
    if matched {
        NewCgroup::Attach
    } else {
        NewCgroup::Nothing
    }
}

/// Paths without the ones nested in another.
fn outermost(scopes: &[CgroupPath]) -> BTreeSet<CgroupPath> {
    let texts: std::collections::HashSet<&str> = scopes.iter().map(CgroupPath::as_str).collect();
    scopes
        .iter()
        .filter(|scope| !scope.nested_in(&texts))
        .cloned()
        .collect()
}

/// A hierarchy of the cgroups a policy names (and their ancestors), all assumed to exist:
/// planning without looking at the host (`check`: the limits for the largest case; tests).
#[derive(Debug, Clone, Default)]
pub struct Named {
    cgroups: BTreeSet<CgroupPath>,
}

impl Named {
    /// The plain paths `policy` names (enforced cgroups, rule cgroups) and their ancestors.
    pub fn of(policy: &Policy) -> Self {
        let mut named = Self::default();
        let paths = policy
            .scopes
            .iter()
            .chain(policy.rules.iter().flat_map(Rule::rule_cgroups));
        named.extend(paths.filter(|path| !path.is_pattern()).cloned());
        named
    }

    /// Adds `paths` and their ancestors.
    pub fn extend(&mut self, paths: impl IntoIterator<Item = CgroupPath>) {
        for path in paths {
            let mut at = CgroupPath::root();
            self.cgroups.insert(at.clone());
            for part in path.as_str().split('/').filter(|part| !part.is_empty()) {
                let Ok(next) = CgroupPath::parse(&format!("{}/{part}", at.as_str())) else {
                    break;
                };
                at = next;
                self.cgroups.insert(at.clone());
            }
        }
    }
}

impl Hierarchy for Named {
    type Cgroup = ();
    type Error = std::convert::Infallible;

    fn expand(&self, pattern: &CgroupPath) -> Vec<CgroupPath> {
        self.cgroups
            .iter()
            .filter(|path| pattern.matches(path))
            .cloned()
            .collect()
    }

    fn find(&self, _path: &CgroupPath) -> Result<Option<()>, Self::Error> {
        Ok(Some(()))
    }
}

/// [`attach_points`] over [`Named::of`] `policy`: its attachment paths if every cgroup it
/// names existed.
pub fn named_attach_points(policy: &Policy) -> Vec<CgroupPath> {
    let Ok(plan) = attach_points(policy, &Named::of(policy));
    plan.paths()
}

#[cfg(test)]
mod tests;
