//! Following the cgroup tree under the policy in force: a cgroup that came, went or was given
//! other rules touches only itself, its attachment, its record and its own existing connections,
//! so covering a new container does not grow with what else the host runs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use keepalive_common::AttachRecord;

use super::{
    ApplyReport, Enforcer, EnforcerError,
    links::{Attachment, SETSOCKOPT, SOCK_OPS},
    maps,
};
use crate::{
    cgroup::Cgroup,
    compile::{self, Tables, compile},
    existing::SweepJob,
    plan::{self, NewCgroup, Plan},
    policy::{CgroupPath, Policy},
};

impl Enforcer {
    /// The policy in force applied again (cgroups came or went, an attachment was put back):
    /// what it cannot do on this kernel was said when it was first applied.
    ///
    /// When the policy over the cgroups that exist now compiles to the lookup entries in force
    /// (the usual case: a new container matching a pattern gets a ruleset its siblings have),
    /// only the attachments that came, went or whose record differs are touched, the
    /// generation stays, and the sweep covers only the cgroups newly attached or given another
    /// record. Otherwise, the whole policy is applied as a new generation.
    pub(crate) fn reapply(
        &mut self,
        policy: &Policy,
    ) -> Result<(ApplyReport, Option<SweepJob>), EnforcerError> {
        let plan = self.plan(policy)?;
        self.reapply_planned(policy, plan)
    }

    /// [`Self::reapply`] over a plan already made.
    fn reapply_planned(
        &mut self,
        policy: &Policy,
        plan: Plan<Cgroup>,
    ) -> Result<(ApplyReport, Option<SweepJob>), EnforcerError> {
        let tables = compile(policy, &plan.paths(), self.generation)?;
        let unchanged_entries = self.tables().is_some_and(|old| same_entries(old, &tables));
        let (applied, sweep) = if unchanged_entries && self.policy() == Some(policy) {
            self.apply_changes(policy, plan, tables)?
        } else {
            self.apply_later(policy)?
        };
        Ok((
            ApplyReport {
                unsupported: Vec::new(),
                ..applied
            },
            sweep,
        ))
    }

    /// Brings the attachments to `plan`, whose `tables` have the entries in force: detaches
    /// what went (or was made again under the same name), attaches what came, rewrites the
    /// records that differ. Nothing else is written.
    fn apply_changes(
        &mut self,
        policy: &Policy,
        plan: Plan<Cgroup>,
        tables: Tables,
    ) -> Result<(ApplyReport, Option<SweepJob>), EnforcerError> {
        let Plan {
            attachments: points,
            enforced: scopes,
            locks,
            absent,
        } = plan;
        let detached = self.detach_where(SOCK_OPS, |path, id| {
            points.get(path).is_none_or(|cgroup| cgroup.id != id)
        })?;
        // Before anything that may fail (a new cgroup can vanish while it is attached): the
        // records of what went must go now, since nothing is detached a second time.
        if !detached.is_empty() {
            maps::prune_cgroups(
                &mut self.ebpf,
                &points.values().map(|cgroup| cgroup.id).collect(),
            )?;
        }
        let old = self.tables().map(|old| &old.attachments);
        let mut changed: BTreeMap<CgroupPath, Cgroup> = points
            .iter()
            .filter(|(path, _)| {
                !self.sock_ops.contains_key(*path)
                    || old.and_then(|old| old.get(*path)) != tables.attachments.get(*path)
            })
            .map(|(path, cgroup)| (path.clone(), cgroup.clone()))
            .collect();
        let attached = self.attach_and_write(&changed, &tables)?;
        if self.has_lock() {
            // A lock put back: what applications set meanwhile is swept back to the policy.
            for (point, _) in locks
                .iter()
                .filter(|(point, _)| !self.setsockopt.contains_key(*point))
            {
                for (path, cgroup) in scopes.iter().filter(|(path, _)| point.contains(path)) {
                    changed.insert(path.clone(), cgroup.clone());
                }
            }
            self.sync(SETSOCKOPT, &locks)?;
        }
        let sweep = (policy.existing && !changed.is_empty()).then(|| SweepJob {
            policy: policy.clone(),
            mount: self.mount.clone(),
            iterator: self.iterator.clone(),
            scopes: outermost(&changed),
        });
        self.current = Some((policy.clone(), tables));
        let report = ApplyReport {
            generation: self.generation,
            attached,
            detached,
            absent,
            ..ApplyReport::default()
        };
        Ok((report, sweep))
    }

    /// Covers cgroups created since the policy in force was planned (`created`: their
    /// directories) without planning again, where [`plan::new_cgroup`] tells what each changes:
    /// a new container among 10,000 is attached in the time of its own syscalls, not of a walk
    /// of the tree. `None`: they need a plan ([`Self::refresh_later`]), also when one is
    /// gone already or its rules make a ruleset the tables lack.
    pub fn cover_created(
        &mut self,
        created: &[PathBuf],
    ) -> Result<Option<(ApplyReport, Option<SweepJob>)>, EnforcerError> {
        let (policy, new) = {
            let Some((policy, tables)) = &self.current else {
                return Ok(None);
            };
            let mut paths = Vec::new();
            for dir in created {
                let relative = dir.strip_prefix(&self.mount).ok();
                let path =
                    relative.and_then(|path| CgroupPath::parse(&path.to_string_lossy()).ok());
                let Some(path) = path else {
                    return Ok(None);
                };
                paths.push(path);
            }
            paths.sort_by_key(CgroupPath::depth);
            let mut new: BTreeMap<CgroupPath, (Cgroup, AttachRecord)> = BTreeMap::new();
            for path in paths {
                let attached =
                    |at: &str| tables.attachments.contains_key(at) || new.contains_key(at);
                match plan::new_cgroup(policy, attached, &path) {
                    NewCgroup::Replan => return Ok(None),
                    NewCgroup::Nothing => {}
                    // The lock of its scope is held above it (from its literal prefix) unless
                    // that prefix was made since the plan: then planning again attaches it.
                    NewCgroup::Attach if self.has_lock() && !locked(&self.setsockopt, &path) => {
                        return Ok(None);
                    }
                    NewCgroup::Attach => {
                        let record = compile::record_for(policy, tables, &path);
                        let cgroup = Cgroup::find(&self.mount, Path::new(path.as_str()));
                        let (Some(record), Ok(cgroup)) = (record, cgroup) else {
                            return Ok(None);
                        };
                        new.insert(path, (cgroup, record));
                    }
                }
            }
            (policy.clone(), new)
        };
        let mut attached = Vec::new();
        for (path, (cgroup, record)) in new {
            let attachment = Attachment::create(
                SOCK_OPS,
                self.program_fd(SOCK_OPS)?,
                &cgroup,
                self.pins.as_ref(),
            )?;
            self.sock_ops.insert(path.clone(), attachment);
            maps::write_record(&mut self.ebpf, cgroup.id, &record)?;
            if let Some((_, tables)) = &mut self.current {
                tables.attachments.insert(path, record);
            }
            attached.push(cgroup);
        }
        let sweep = (policy.existing && !attached.is_empty()).then(|| SweepJob {
            policy,
            mount: self.mount.clone(),
            iterator: self.iterator.clone(),
            scopes: attached.clone(),
        });
        let report = ApplyReport {
            generation: self.generation,
            attached,
            ..ApplyReport::default()
        };
        Ok(Some((report, sweep)))
    }

    /// Applies the policy in force again if the cgroups it covers changed (a cgroup matching a
    /// pattern or named by a rule appeared, or one went). `None`: nothing to do.
    pub fn refresh(&mut self) -> Result<Option<ApplyReport>, EnforcerError> {
        let refreshed = self.refresh_later()?;
        Ok(refreshed.map(|(mut report, sweep)| {
            report.existing = sweep.map(|job| job.run());
            report
        }))
    }

    /// [`Self::refresh`], leaving the sweep to the caller as [`Self::apply_later`] does.
    pub fn refresh_later(
        &mut self,
    ) -> Result<Option<(ApplyReport, Option<SweepJob>)>, EnforcerError> {
        let Some((policy, _)) = &self.current else {
            return Ok(None);
        };
        let plan = self.plan(policy)?;
        let same = |ours: &BTreeMap<CgroupPath, Attachment>,
                    wanted: &BTreeMap<CgroupPath, Cgroup>| {
            ours.len() == wanted.len()
                && ours.iter().all(|(path, attachment)| {
                    wanted
                        .get(path)
                        .is_some_and(|cgroup| cgroup.id == attachment.cgroup.id)
                })
        };
        if same(&self.sock_ops, &plan.attachments)
            && (!self.has_lock() || same(&self.setsockopt, &plan.locks))
        {
            return Ok(None);
        }
        let policy = policy.clone();
        self.reapply_planned(&policy, plan).map(Some)
    }
}

/// Whether a lock in `locks` holds `path` (it is there or above it).
fn locked(locks: &BTreeMap<CgroupPath, Attachment>, path: &CgroupPath) -> bool {
    locks.contains_key(path)
        || path
            .ancestors()
            .any(|ancestor| locks.contains_key(ancestor))
}

/// Whether two compilations hold the same lookup entries (records aside).
fn same_entries(old: &Tables, new: &Tables) -> bool {
    old.addr == new.addr
        && old.ports == new.ports
        && old.decisions == new.decisions
        && old.rulesets == new.rulesets
}

/// The cgroups of `changed` not inside another of them: a sweep of each covers its subtree.
fn outermost(changed: &BTreeMap<CgroupPath, Cgroup>) -> Vec<Cgroup> {
    let paths: std::collections::HashSet<&str> = changed.keys().map(CgroupPath::as_str).collect();
    changed
        .iter()
        .filter(|(path, _)| !path.nested_in(&paths))
        .map(|(_, cgroup)| cgroup.clone())
        .collect()
}
