//! Making a policy the one in force: planning, compiling, attaching, writing the records, and
//! taking away what is no longer wanted.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    ApplyReport, Enforcer, EnforcerError,
    links::{Attachment, Hook, SETSOCKOPT, SOCK_OPS},
    maps,
};
use crate::{
    bpffs::BpffsError,
    cgroup::Cgroup,
    compile::{Tables, compile},
    existing::SweepJob,
    plan::Plan,
    policy::{CgroupPath, Policy},
};

impl Enforcer {
    /// Makes `policy` the one in force.
    ///
    /// Nothing changes unless it compiles and fits. The new generation's lookup entries go in
    /// beside the old ones, then each attachment's record is replaced (one atomic update each:
    /// a connection is decided from one record, so it sees the old or the new policy whole),
    /// then attachments no longer needed go, then every entry of other generations.
    pub fn apply(&mut self, policy: &Policy) -> Result<ApplyReport, EnforcerError> {
        let (mut report, sweep) = self.apply_later(policy)?;
        report.existing = sweep.map(|job| job.run());
        Ok(report)
    }

    /// [`Self::apply`], leaving the sweep of existing connections (when the policy asks for
    /// it) to the caller: `existing` is None and the job is returned.
    pub fn apply_later(
        &mut self,
        policy: &Policy,
    ) -> Result<(ApplyReport, Option<SweepJob>), EnforcerError> {
        let plan = self.plan(policy)?;
        let covered = self.covered_by_same_rules(policy);
        let generation = self.generation.wrapping_add(1);
        let tables = compile(policy, &plan.paths(), generation)?;
        let Plan {
            attachments: points,
            enforced: scopes,
            locks,
            absent,
        } = plan;

        let mut keep: BTreeSet<u32> = self
            .tables()
            .map(|old| {
                old.attachments
                    .values()
                    .map(|record| record.ruleset)
                    .collect()
            })
            .unwrap_or_default();
        if let Err(error) = maps::insert_entries(&mut self.ebpf, &tables) {
            // What went in is unreachable (no record points at it); take it out again.
            let _ignored = maps::prune_entries(&mut self.ebpf, &keep);
            return Err(error);
        }
        // A cgroup removed and made again under the same name is a new one to attach to.
        let mut replaced = self.detach_where(SOCK_OPS, |path, id| {
            points.get(path).is_some_and(|cgroup| cgroup.id != id)
        })?;
        let report = ApplyReport {
            generation,
            absent,
            unsupported: self.unsupported(policy),
            attached: self.attach_and_write(&points, &tables)?,
            ..ApplyReport::default()
        };
        if self.has_lock() {
            self.sync(SETSOCKOPT, &locks)?;
        }
        let report = ApplyReport {
            detached: {
                replaced.extend(self.sync(SOCK_OPS, &points)?);
                replaced
            },
            ..report
        };
        keep = tables
            .attachments
            .values()
            .map(|record| record.ruleset)
            .collect();
        maps::prune_entries(&mut self.ebpf, &keep)?;
        maps::prune_cgroups(
            &mut self.ebpf,
            &points.values().map(|cgroup| cgroup.id).collect(),
        )?;
        self.current = Some((policy.clone(), tables));
        self.generation = generation;
        let sweep = self.sweep_job(policy, scopes, &covered);
        Ok((report, sweep))
    }

    /// Where the connections already have these rules (a reload that only changed where the
    /// policy is enforced, a put-back attachment): no need to sweep there again.
    fn covered_by_same_rules(&self, policy: &Policy) -> Vec<(CgroupPath, u64)> {
        match self.policy() {
            Some(old) if same_rules(old, policy) => self
                .sock_ops
                .iter()
                .map(|(path, attachment)| (path.clone(), attachment.cgroup.id))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The sweep of existing connections `policy` asks for, in the cgroups of `scopes` that
    /// `covered` does not cover already; None when there is nothing to sweep.
    fn sweep_job(
        &self,
        policy: &Policy,
        scopes: BTreeMap<CgroupPath, Cgroup>,
        covered: &[(CgroupPath, u64)],
    ) -> Option<SweepJob> {
        let scopes: Vec<Cgroup> = scopes
            .into_iter()
            .filter(|(path, cgroup)| {
                // The same path with another id is a cgroup made again: not swept yet.
                !covered
                    .iter()
                    .any(|(done, id)| done.contains(path) && (done != path || *id == cgroup.id))
            })
            .map(|(_, cgroup)| cgroup)
            .collect();
        (policy.existing && !scopes.is_empty()).then(|| SweepJob {
            policy: policy.clone(),
            mount: self.mount.clone(),
            iterator: self.iterator.clone(),
            scopes,
        })
    }

    /// Attaches the sock_ops program where it is not yet and writes every attachment's record;
    /// returns the cgroups newly attached to.
    pub(super) fn attach_and_write(
        &mut self,
        points: &BTreeMap<CgroupPath, Cgroup>,
        tables: &Tables,
    ) -> Result<Vec<Cgroup>, EnforcerError> {
        let mut attached = Vec::new();
        // Deepest first: a new nested attachment starts zeroed and defers to its ancestors,
        // which still hold a whole (old) policy until their own record is replaced.
        let mut ordered: Vec<(&CgroupPath, &Cgroup)> = points.iter().collect();
        ordered.sort_by_key(|(path, _)| std::cmp::Reverse(path.depth()));
        for (path, cgroup) in ordered {
            if !self.sock_ops.contains_key(path) {
                let attachment = Attachment::create(
                    SOCK_OPS,
                    self.program_fd(SOCK_OPS)?,
                    cgroup,
                    self.pins.as_ref(),
                )?;
                self.sock_ops.insert(path.clone(), attachment);
                attached.push(cgroup.clone());
            }
            maps::write_record(&mut self.ebpf, cgroup.id, &tables.attachments[path])?;
        }
        Ok(attached)
    }

    /// Detaches everything and, when pinned, removes the pins; new connections are no longer
    /// touched.
    pub fn detach_all(&mut self) -> Result<Vec<Cgroup>, EnforcerError> {
        self.sync(SETSOCKOPT, &BTreeMap::new())?;
        let detached = self.sync(SOCK_OPS, &BTreeMap::new())?;
        maps::prune_entries(&mut self.ebpf, &BTreeSet::new())?;
        maps::prune_cgroups(&mut self.ebpf, &BTreeSet::new())?;
        if let Some(pins) = &self.pins {
            pins.remove().map_err(|error| {
                EnforcerError::Bpffs(BpffsError::Io {
                    path: pins.root.clone(),
                    error,
                })
            })?;
        }
        self.current = None;
        Ok(detached)
    }

    /// Attaches `hook` to exactly `wanted`: new cgroups get a link, others lose theirs. New
    /// links go in before the old ones go (a lock moving from a cgroup to its ancestor holds
    /// throughout), except where a cgroup was made again under the same name.
    pub(super) fn sync(
        &mut self,
        hook: Hook,
        wanted: &BTreeMap<CgroupPath, Cgroup>,
    ) -> Result<Vec<Cgroup>, EnforcerError> {
        let mut detached = self.detach_where(hook, |path, id| {
            wanted.get(path).is_some_and(|cgroup| cgroup.id != id)
        })?;
        for (path, cgroup) in wanted {
            if !self.attachments_of(hook).contains_key(path) {
                let attachment =
                    Attachment::create(hook, self.program_fd(hook)?, cgroup, self.pins.as_ref())?;
                self.attachments_mut(hook).insert(path.clone(), attachment);
            }
        }
        detached.extend(self.detach_where(hook, |path, _| !wanted.contains_key(path))?);
        Ok(detached)
    }

    /// Detaches `hook` from the cgroups for which `stale(path, id)` holds.
    pub(super) fn detach_where(
        &mut self,
        hook: Hook,
        stale: impl Fn(&CgroupPath, u64) -> bool,
    ) -> Result<Vec<Cgroup>, EnforcerError> {
        let paths: Vec<CgroupPath> = self
            .attachments_of(hook)
            .iter()
            .filter(|(path, attachment)| stale(path, attachment.cgroup.id))
            .map(|(path, _)| path.clone())
            .collect();
        let mut detached = Vec::with_capacity(paths.len());
        for path in paths {
            if let Some(attachment) = self.attachments_mut(hook).remove(&path) {
                detached.push(attachment.detach(hook)?);
            }
        }
        Ok(detached)
    }
}

/// Whether `new` decides every connection of a cgroup both enforce as `old` did, and `old`
/// swept existing connections too: they differ at most in where they are enforced.
fn same_rules(old: &Policy, new: &Policy) -> bool {
    old.existing && old.default == new.default && old.rules == new.rules
}
