//! The mounted cgroup hierarchy as the attach-point planner ([`crate::plan`]) sees it.

use std::{
    cell::RefCell,
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::{Enforcer, EnforcerError};
use crate::{
    cgroup::{Cgroup, CgroupError},
    plan::{self, Hierarchy, Plan},
    policy::{CgroupPath, Pattern, Policy},
};

impl Enforcer {
    /// Where `policy` attaches on this host now ([`plan::attach_points`]).
    pub(super) fn plan(&self, policy: &Policy) -> Result<Plan<Cgroup>, EnforcerError> {
        let mounted = Mounted {
            mount: &self.mount,
            walked: RefCell::default(),
        };
        plan::attach_points(policy, &mounted)
    }
}

/// The cgroup2 hierarchy mounted at `mount`.
struct Mounted<'a> {
    mount: &'a Path,
    /// The ids of the cgroups a pattern's walk found ([`crate::cgroup::child_cgroups`]):
    /// finding them costs no syscall, where [`Cgroup::find`] of a name takes six (10,000
    /// cgroups: most of a plan's time).
    walked: RefCell<HashMap<CgroupPath, u64>>,
}

impl Hierarchy for Mounted<'_> {
    type Cgroup = Cgroup;
    type Error = EnforcerError;

    /// A walk from the pattern's literal prefix, into the directories below which it may match.
    fn expand(&self, pattern: &CgroupPath) -> Vec<CgroupPath> {
        let mut found = Vec::new();
        let compiled = Pattern::new(pattern);
        let mut walked = self.walked.borrow_mut();
        let mut stack: Vec<(PathBuf, Option<u64>)> =
            vec![(self.mount.join(pattern.literal_prefix().relative()), None)];
        while let Some((dir, id)) = stack.pop() {
            let relative = dir.strip_prefix(self.mount).unwrap_or(&dir);
            let Ok(path) = CgroupPath::parse(&relative.to_string_lossy()) else {
                continue;
            };
            let below = compiled.may_match_below(&path);
            if compiled.matches(&path) {
                if let Some(id) = id {
                    walked.insert(path.clone(), id);
                }
                found.push(path);
            }
            if !below {
                continue;
            }
            stack.extend(
                crate::cgroup::child_cgroups(&dir)
                    .into_iter()
                    .map(|(child, id)| (child, Some(id))),
            );
        }
        found
    }

    fn find(&self, path: &CgroupPath) -> Result<Option<Cgroup>, EnforcerError> {
        if let Some(&id) = self.walked.borrow().get(path) {
            return Ok(Some(Cgroup {
                path: self.mount.join(path.relative()),
                name: path.as_str().to_owned(),
                id,
            }));
        }
        match Cgroup::find(self.mount, Path::new(path.as_str())) {
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
