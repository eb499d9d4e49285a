//! Connections that already exist when a policy takes effect get it too.
//!
//! The kernel's socket list (inet_diag, one network namespace at a time, entered from a helper
//! thread, filtered in the kernel to the swept cgroups) gives each TCP socket's cgroup,
//! addresses and inode; the policy decides as for a new
//! connection; the agent takes a duplicate of the owner's descriptor (pidfd_getfd) and applies
//! the rule with the same code the kernel runs (`keepalive_common::enforce`). A BPF iterator
//! could set options in the kernel, but it walks one namespace too and, without CO-RE, cannot
//! read a socket's cgroup.
//!
//! Direction is not recorded for existing sockets: one whose local port a listener of its
//! namespace holds counts as inbound, any other as outbound.

mod diag;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    net::IpAddr,
    os::{
        fd::{AsFd as _, OwnedFd, RawFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use keepalive_common::{
    Outcome,
    enforce::{Socket, apply},
};

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};

use crate::{
    cgroup::Cgroup,
    policy::{CgroupPath, Connection, Direction, Policy},
    sockopt,
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
}

/// A sweep to run later, on another thread: it reads /proc and every namespace's socket
/// list, which takes seconds with tens of thousands of connections.
#[derive(Debug, Clone)]
pub struct SweepJob {
    pub policy: Policy,
    pub mount: std::path::PathBuf,
    pub scopes: Vec<Cgroup>,
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
        sweep(&self.policy, &self.mount, &scopes).map_err(|e| e.to_string())
    }
}

/// Applies `policy` to the established connections of the processes in `scopes`.
pub fn sweep(policy: &Policy, mount: &Path, scopes: &[&Cgroup]) -> io::Result<Sweep> {
    let mut cgroups: HashMap<u64, CgroupPath> = HashMap::new();
    let mut pids: Vec<u32> = Vec::new();
    for scope in scopes {
        walk(mount, &scope.path, &mut cgroups, &mut pids)?;
    }
    // Socket inode -> (pid, fd), and one pid per network namespace.
    let mut holders: HashMap<u64, (u32, i32)> = HashMap::new();
    let mut namespaces: BTreeMap<u64, u32> = BTreeMap::new();
    for &pid in &pids {
        let Ok(netns) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue; // exited
        };
        namespaces.entry(netns.ino()).or_insert(pid);
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in fds.flatten() {
            let (Some(fd), Ok(target)) = (
                entry
                    .file_name()
                    .to_str()
                    .and_then(|name| name.parse::<i32>().ok()),
                fs::read_link(entry.path()),
            ) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|text| text.strip_prefix("socket:["))
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|inode| inode.parse::<u64>().ok());
            if let Some(inode) = inode {
                holders.entry(inode).or_insert((pid, fd));
            }
        }
    }

    let mut sweep = Sweep {
        namespaces: namespaces.len(),
        ..Sweep::default()
    };
    let ids: Vec<u64> = cgroups.keys().copied().collect();
    for pid in namespaces.values() {
        let sockets = in_namespace_of(*pid, || diag::tcp_sockets(Some(&ids)))?;
        let listening: HashSet<(IpAddr, u16)> = sockets
            .iter()
            .filter(|socket| socket.state == diag::LISTEN)
            .map(|socket| (socket.local, socket.local_port))
            .collect();
        for socket in sockets
            .iter()
            .filter(|socket| socket.state == diag::ESTABLISHED)
        {
            let Some(cgroup) = cgroups.get(&socket.cgroup_id) else {
                continue;
            };
            let inbound = listening.iter().any(|(addr, port)| {
                *port == socket.local_port && (addr.is_unspecified() || *addr == socket.local)
            });
            let conn = Connection {
                cgroup: cgroup.clone(),
                direction: Direction::from_outbound(!inbound),
                remote: socket.remote,
                remote_port: socket.remote_port,
                local_port: socket.local_port,
            };
            let decision = policy.decide(&conn);
            let Some(action) = policy.action(decision) else {
                continue;
            };
            sweep.connections += 1;
            let Some(&(holder, fd)) = holders.get(&socket.inode) else {
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

/// Every cgroup below `dir` (id -> path) and the processes in them.
fn walk(
    mount: &Path,
    dir: &Path,
    cgroups: &mut HashMap<u64, CgroupPath>,
    pids: &mut Vec<u32>,
) -> io::Result<()> {
    let metadata = fs::metadata(dir)?;
    let relative = dir.strip_prefix(mount).unwrap_or(dir);
    if let Ok(path) = CgroupPath::parse(&relative.to_string_lossy()) {
        cgroups.insert(metadata.ino(), path);
    }
    // A cgroup removed while we walk is simply gone.
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(
            procs
                .lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
    }
    for child in crate::cgroup::child_dirs(dir) {
        walk(mount, &child, cgroups, pids)?;
    }
    Ok(())
}

/// Runs `work` on a helper thread that has entered the network namespace of `pid`.
fn in_namespace_of<T: Send>(
    pid: u32,
    work: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let netns = fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // setns on this helper thread only.
                rustix::thread::move_into_link_name_space(
                    netns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace helper thread panicked")))
    })
}

/// A duplicate of descriptor `fd` of process `pid` (pidfd_getfd(2)): the same open file. The
/// test harness reads workloads' sockets with it too.
pub fn steal_fd(pid: u32, fd: RawFd) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    Ok(pidfd_getfd(pidfd, fd, PidfdGetfdFlags::empty())?)
}

/// `enforce::Socket` over getsockopt(2)/setsockopt(2).
struct FdSocket(OwnedFd);

impl Socket for FdSocket {
    fn get(&mut self, level: i32, name: i32) -> Result<i32, i64> {
        sockopt::get_int(self.0.as_fd(), level, name).map_err(negative_errno)
    }

    fn set(&mut self, level: i32, name: i32, value: i32) -> Result<(), i64> {
        sockopt::set_int(self.0.as_fd(), level, name, value).map_err(negative_errno)
    }
}

/// The kernel's convention, which `enforce::Socket` follows.
fn negative_errno(error: io::Error) -> i64 {
    -i64::from(error.raw_os_error().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Values;

    fn job(idle_secs: u32, scopes: &[(&str, u64)]) -> SweepJob {
        SweepJob {
            policy: Policy::enforce(
                Values {
                    idle_secs,
                    ..Values::default()
                },
                Vec::new(),
            ),
            mount: "/sys/fs/cgroup".into(),
            scopes: scopes
                .iter()
                .map(|&(name, id)| Cgroup {
                    path: Path::new("/sys/fs/cgroup").join(name.trim_start_matches('/')),
                    name: name.into(),
                    id,
                })
                .collect(),
        }
    }

    fn names(job: &SweepJob) -> Vec<&str> {
        job.scopes.iter().map(|scope| scope.name.as_str()).collect()
    }

    #[test]
    fn pending_jobs_of_one_policy_sweep_every_cgroup_they_name_once() {
        let merged = job(60, &[("/x/a", 1), ("/x/b", 2)])
            .then(job(60, &[("/x/c", 3)]))
            .then(job(60, &[("/x/a/inner", 4), ("/x/b", 2)]));
        assert_eq!(names(&merged), ["/x/a", "/x/b", "/x/c"]);
    }

    #[test]
    fn a_newer_policy_of_the_same_rules_sweeps_both_jobs_cgroups() {
        let mut wider = job(60, &[("/y", 2)]);
        wider.policy.scopes = vec![CgroupPath::parse("/y").unwrap_or_else(|e| panic!("{e}"))];
        let merged = job(60, &[("/x/a", 1)]).then(wider);
        assert_eq!(names(&merged), ["/x/a", "/y"]);
    }

    #[test]
    fn a_newer_policy_sweeps_its_own_cgroups_only() {
        let merged = job(60, &[("/x/a", 1)]).then(job(61, &[("/x/b", 2)]));
        assert_eq!(names(&merged), ["/x/b"]);
        assert_eq!(merged.policy.default.values.idle_secs, 61);
    }
}
