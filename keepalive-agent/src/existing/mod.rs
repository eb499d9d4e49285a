//! Connections that already exist when a policy takes effect get it too.
//!
//! Two paths, one network namespace at a time (entered from a helper thread):
//! - [`iterator`], from Linux 5.14: a TCP iterator program finds each socket's cgroup and
//!   rule and applies it in the kernel, with the sock_ops program's code. No descriptor of any
//!   process is touched.
//! - descriptors, on older kernels (or `--existing-via descriptors`): the kernel's socket list
//!   (inet_diag, filtered in the kernel to the swept cgroups) gives each TCP socket's cgroup,
//!   addresses and inode; the policy decides as for a new connection; the agent takes a
//!   duplicate of the owner's descriptor (pidfd_getfd, which needs CAP_SYS_PTRACE over
//!   processes of other users) and applies the rule with the same code the kernel runs
//!   (`keepalive_common::enforce`).
//!
//! Direction is not recorded for existing sockets: one whose local port a listener of its
//! namespace holds counts as inbound, any other as outbound.

pub(crate) mod btf;
pub(crate) mod diag;
pub mod iterator;
pub(crate) mod procs;

use std::{io, path::Path, sync::Arc};

use keepalive_common::{Outcome, enforce::apply};

pub use self::procs::steal_fd;
use self::procs::{FdSocket, Population, established_in};
use crate::{
    cgroup::Cgroup,
    policy::{Connection, Policy},
};

/// What a sweep found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Established connections of the enforced cgroups.
    pub connections: u64,
    /// How many ended in each [`Outcome`].
    pub outcomes: [u64; Outcome::COUNT as usize],
    /// Connections no process holds a descriptor of (closing, or passed out of the cgroup's
    /// processes): left as they are.
    pub unreachable: u64,
    /// Network namespaces looked at.
    pub namespaces: usize,
    /// Processes whose namespace (or descriptors) the agent may not read: processes of other
    /// users without CAP_SYS_PTRACE, or gone meanwhile. Their connections may be missed.
    pub unlisted: u64,
    /// Whether the connections were updated by the iterator program, in the kernel.
    pub in_kernel: bool,
}

impl Sweep {
    /// How the connections were reached, as logs and tests name it.
    #[must_use]
    pub const fn via(&self) -> &'static str {
        if self.in_kernel {
            "iterator"
        } else {
            "descriptors"
        }
    }
}

/// A sweep to run later, on another thread: it reads /proc and every namespace's socket
/// list, which takes seconds with tens of thousands of connections.
#[derive(Debug, Clone)]
pub struct SweepJob {
    pub policy: Policy,
    pub mount: std::path::PathBuf,
    pub scopes: Vec<Cgroup>,
    /// The in-kernel path, where this kernel offers it and the agent uses it.
    pub iterator: Option<Arc<iterator::IteratorSweep>>,
}

impl SweepJob {
    /// This job and a `newer` one as one: the newer policy's, over both jobs' cgroups when
    /// their rules are the same (several cgroups followed in a row, a reload that only changed
    /// where the policy is enforced), over the newer's alone when not (a reload of other rules
    /// sweeps every enforced cgroup). A cgroup no longer enforced is left alone by the sweep.
    #[must_use]
    pub fn then(mut self, mut newer: Self) -> Self {
        if self.policy.default == newer.policy.default && self.policy.rules == newer.policy.rules {
            newer.scopes.append(&mut self.scopes);
            // Outermost first; one inside another (or the same) goes: the walk covers it.
            newer.scopes.sort_by_key(|scope| scope.path.clone());
            newer
                .scopes
                .dedup_by(|inner, outer| inner.path.starts_with(&outer.path));
        }
        newer
    }

    pub fn run(&self) -> Result<Sweep, String> {
        let scopes: Vec<&Cgroup> = self.scopes.iter().collect();
        match &self.iterator {
            Some(iterator) => iterator.sweep(&self.mount, &scopes),
            None => sweep(&self.policy, &self.mount, &scopes),
        }
        .map_err(|e| e.to_string())
    }
}

/// Applies `policy` to the established connections of the processes in `scopes`.
pub fn sweep(policy: &Policy, mount: &Path, scopes: &[&Cgroup]) -> io::Result<Sweep> {
    let Population { cgroups, holders } =
        Population::walk(mount, scopes.iter().map(|scope| scope.path.as_path()), true)?;
    let mut sweep = Sweep {
        namespaces: holders.namespaces.len(),
        unlisted: holders.unlisted,
        ..Sweep::default()
    };
    let ids: Vec<u64> = cgroups.keys().copied().collect();
    for netns in holders.namespaces.values() {
        for (socket, direction) in established_in(netns, Some(&ids))? {
            let Some(cgroup) = cgroups.get(&socket.cgroup_id) else {
                continue;
            };
            let conn = Connection {
                cgroup: cgroup.clone(),
                direction,
                remote: socket.remote,
                remote_port: socket.remote_port,
                local_port: socket.local_port,
            };
            let decision = policy.decide(&conn);
            let Some(action) = policy.action(decision) else {
                continue;
            };
            sweep.connections += 1;
            let Some(&(holder, fd)) = holders.sockets.get(&socket.inode) else {
                sweep.unreachable += 1;
                continue;
            };
            let Ok(duplicate) = steal_fd(holder, fd) else {
                sweep.unreachable += 1;
                continue;
            };
            let applied = apply(
                &action.record(Policy::slot(decision)),
                &mut FdSocket(duplicate),
            );
            sweep.outcomes[applied.outcome as usize] += 1;
        }
    }
    Ok(sweep)
}
