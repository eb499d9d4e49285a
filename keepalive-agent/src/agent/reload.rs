//! Reading the policy again (settled files, refused versions) and logging what an apply did.

use std::{path::Path, time::Duration};

use tracing::{info, warn};

use super::Config;
use crate::{
    enforcer::{ApplyReport, Enforcer},
    existing::{Sweep, SweepJob},
    policy::Policy,
};

/// How long the policy file must have been left alone before it is read (an editor or a
/// ConfigMap update is several events; a tool that truncates and then writes must not be read
/// half-way: a truncated file may still parse).
const SETTLE: Duration = Duration::from_millis(100);

/// What a reload did.
#[derive(Debug)]
pub(super) enum Reload {
    Applied(Box<(Policy, ApplyReport, Option<SweepJob>)>),
    Unchanged,
    /// `what` happened (`policy refused`, `policy not applied`) and why; logged by the
    /// caller once the state is published.
    Refused {
        what: &'static str,
        error: String,
    },
}

/// Reads the policy again, from a file nobody has touched for [`SETTLE`] before or after the
/// read, and not replaced during it: a writer that truncates and then writes in place is never
/// caught half-way, and the version read is known. A file rewritten without pause is read
/// after ten rounds anyway, and checked like any other (its version unknown). Blocking: runs
/// on the agent's thread.
pub(super) fn load_settled(config: &Config) -> (anyhow::Result<Policy>, Option<FileVersion>) {
    let Some(file) = &config.file else {
        return (config.policy(), None);
    };
    for _ in 0..10 {
        if let Some(wait) = unsettled(file) {
            std::thread::sleep(wait);
            continue;
        }
        let before = FileVersion::of(file);
        let policy = config.policy();
        if unsettled(file).is_none() && FileVersion::of(file) == before {
            return (policy, Some(before));
        }
    }
    (config.policy(), None)
}

/// How much longer `path` must be left alone to count as settled, if it is not yet.
fn unsettled(path: &Path) -> Option<Duration> {
    let modified = std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()?;
    let age = std::time::SystemTime::now().duration_since(modified).ok()?;
    SETTLE.checked_sub(age).filter(|wait| !wait.is_zero())
}

/// A version of a file on disk: another file renamed over it, or a write to it, is a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FileVersion {
    Missing,
    At {
        dev: u64,
        ino: u64,
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
}

impl FileVersion {
    pub(super) fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        match std::fs::metadata(path) {
            Ok(meta) => Self::At {
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
            },
            Err(_) => Self::Missing,
        }
    }
}

/// Applies a policy read again; one that does not check, or does not apply, leaves the
/// running one in force.
pub(super) fn reload(loaded: anyhow::Result<Policy>, enforcer: &mut Enforcer) -> Reload {
    let policy = match loaded {
        Ok(policy) => policy,
        Err(error) => {
            return Reload::Refused {
                what: "policy refused",
                error: format!("{error:#}"),
            };
        }
    };
    if enforcer.policy() == Some(&policy) {
        return Reload::Unchanged;
    }
    match enforcer.apply_later(&policy) {
        Ok((applied, sweep)) => Reload::Applied(Box::new((policy, applied, sweep))),
        Err(error) => Reload::Refused {
            what: "policy not applied",
            error: format!("{error:#}"),
        },
    }
}

/// Logs the attachments an apply made and removed, and the rules whose cgroup is absent.
pub(super) fn report(applied: &ApplyReport, policy: &Policy) {
    for cgroup in &applied.attached {
        info!(cgroup = %cgroup.name, id = cgroup.id, default = %policy.default, rules = policy.rules.len(), "attached");
    }
    for cgroup in &applied.detached {
        info!(cgroup = %cgroup.name, id = cgroup.id, "detached");
    }
    for (rule, cgroup) in &applied.absent {
        warn!(rule, cgroup = %cgroup, "cgroup does not exist (yet); it is covered as soon as it does");
    }
    for sentence in &applied.unsupported {
        warn!("{sentence}");
    }
}

/// Logs what a sweep of existing connections did.
pub(super) fn report_sweep(sweep: &Result<Sweep, String>) {
    match sweep {
        Ok(sweep) => {
            let outcomes: Vec<String> = keepalive_common::Outcome::ALL
                .iter()
                .filter(|outcome| sweep.outcomes[**outcome as usize] > 0)
                .map(|outcome| format!("{}={}", outcome.name(), sweep.outcomes[*outcome as usize]))
                .collect();
            info!(
                connections = sweep.connections,
                outcomes = outcomes.join(" "),
                unreachable = sweep.unreachable,
                namespaces = sweep.namespaces,
                unlisted = sweep.unlisted,
                via = sweep.via(),
                "existing connections"
            );
        }
        Err(error) => warn!(%error, "existing connections could not be updated; new ones are"),
    }
}
