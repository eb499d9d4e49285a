//! Whether what the enforcer believes is attached really is, and putting back what someone
//! else removed (`bpftool link detach`, a removed pin, a link given another program).

use super::{
    ApplyReport, Enforcer, EnforcerError,
    links::{Hook, SETSOCKOPT, SOCK_OPS, Unanswered},
};
use crate::{existing::SweepJob, policy::CgroupPath};

/// One attachment the kernel does not have as the enforcer left it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fault {
    /// `sockops` or `setsockopt`.
    pub program: &'static str,
    /// The cgroup, as /proc/PID/cgroup shows it.
    pub cgroup: String,
    /// What is wrong: `pin removed`, `link detached`, `program replaced`, ...
    pub what: &'static str,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}: {}", self.program, self.cgroup, self.what)
    }
}

impl Enforcer {
    /// [`Self::faults`] when something may have changed since the last call (a cgroup link
    /// detached or updated anywhere on the host, a pin removed; see `changes`), else None:
    /// the steady state costs two syscalls, whatever the number of attachments.
    pub fn faults_if_changed(&mut self) -> Option<Vec<Fault>> {
        let since = self
            .changes
            .since_last(self.sock_ops.len() + self.setsockopt.len());
        if !since.any() {
            return None;
        }
        let (faults, unanswered) = self.ask_each(since.pins);
        if unanswered {
            self.changes.ask_again();
        }
        Some(faults)
    }

    /// Whether [`Self::faults_if_changed`] learns of changes from the kernel (false: the
    /// kernel refused the link watch, and every call asks every attachment).
    pub fn watches_links(&self) -> bool {
        self.changes.watching_links()
    }

    /// How often [`Self::faults_if_changed`] should run: 500 ms, 800 ms where each call walks
    /// every link on the host (the link iterator; still within a second of a removal).
    pub fn health_interval(&self) -> std::time::Duration {
        self.changes.interval()
    }

    /// Asks the kernel about every attachment (one link info each, and whether its pin is
    /// there).
    pub fn faults(&self) -> Vec<Fault> {
        self.ask_each(true).0
    }

    /// The faults, and whether a question went unanswered; `pins`: look at held links' pins.
    fn ask_each(&self, pins: bool) -> (Vec<Fault>, bool) {
        let mut faults = Vec::new();
        let mut unanswered = false;
        for hook in [SOCK_OPS, SETSOCKOPT] {
            let Ok(program_id) = self.program_id(hook) else {
                continue;
            };
            for attachment in self.attachments_of(hook).values() {
                match attachment.fault(program_id, pins) {
                    Ok(Some(what)) => faults.push(Fault {
                        program: hook.pin_name,
                        cgroup: attachment.cgroup.name.clone(),
                        what,
                    }),
                    Ok(None) => {}
                    Err(Unanswered) => unanswered = true,
                }
            }
        }
        (faults, unanswered)
    }

    /// Drops the faulty attachments (their pins too) and applies the policy in force again,
    /// which attaches afresh and rewrites their records. The sweep of existing connections
    /// (those opened meanwhile went unenforced) is returned to run off the caller's thread.
    pub fn heal(
        &mut self,
        faults: &[Fault],
    ) -> Result<Option<(ApplyReport, Option<SweepJob>)>, EnforcerError> {
        for fault in faults {
            let hook = if fault.program == SOCK_OPS.pin_name {
                SOCK_OPS
            } else {
                SETSOCKOPT
            };
            let Ok(path) = CgroupPath::parse(&fault.cgroup) else {
                continue;
            };
            if let Some(attachment) = self.attachments_mut(hook).remove(&path) {
                attachment.detach(hook)?;
            }
        }
        let Some(policy) = self.policy().cloned() else {
            return Ok(None);
        };
        self.reapply(&policy).map(Some)
    }

    fn program_id(&self, hook: Hook) -> Result<u32, EnforcerError> {
        let program = self
            .ebpf
            .program(hook.program)
            .ok_or(EnforcerError::Missing(hook.program))?;
        let info = program.info().map_err(super::program_error(hook.program))?;
        Ok(info.id())
    }
}
