//! The mounted cgroup hierarchy as the attach-point planner ([`crate::plan`]) sees it.

use std::path::Path;

use super::{Enforcer, EnforcerError};
use crate::{
    cgroup::{Cgroup, CgroupError},
    plan::{self, Hierarchy, Plan},
    policy::{CgroupPath, Pattern, Policy},
};

impl Enforcer {
    /// Where `policy` attaches on this host now ([`plan::attach_points`]).
    pub(super) fn plan(&self, policy: &Policy) -> Result<Plan<Cgroup>, EnforcerError> {
        plan::attach_points(policy, &Mounted { mount: &self.mount })
    }
}

/// The cgroup2 hierarchy mounted at `mount`.
struct Mounted<'a> {
    mount: &'a Path,
}

impl Hierarchy for Mounted<'_> {
    type Cgroup = Cgroup;
    type Error = EnforcerError;

    /// A walk from the pattern's literal prefix.
    fn expand(&self, pattern: &CgroupPath) -> Vec<CgroupPath> {
        let mut found = Vec::new();
        let compiled = Pattern::new(pattern);
        let mut stack = vec![self.mount.join(pattern.literal_prefix().relative())];
        while let Some(dir) = stack.pop() {
            let relative = dir.strip_prefix(self.mount).unwrap_or(&dir);
            if let Ok(path) = CgroupPath::parse(&relative.to_string_lossy())
                && compiled.matches(&path)
            {
                found.push(path);
            }
            stack.extend(crate::cgroup::child_dirs(&dir));
        }
        found
    }

    fn resolve(&self, path: &CgroupPath) -> Result<Option<Cgroup>, EnforcerError> {
        match Cgroup::resolve(self.mount, Path::new(path.as_str())) {
            Ok(cgroup) => Ok(Some(cgroup)),
            // Removed since (a container ended): nothing to do there now.
            Err(CgroupError::NotFound { .. }) => Ok(None),
            Err(source) => Err(EnforcerError::Cgroup {
                cgroup: path.clone(),
                source,
            }),
        }
    }
}
