//! What the sweep (both ways), `scan` and the count of connections without keepalive share:
//! one walk from cgroups to the established connections of their processes ([`Population`],
//! then [`sockets_in`] each namespace, with directions: [`established_in`]), and a socket's
//! options read or set through a duplicate of its owner's descriptor.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    net::IpAddr,
    os::{
        fd::{AsFd as _, OwnedFd, RawFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use keepalive_common::enforce::Socket;
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};

use super::diag::{self, DiagSocket};
use crate::{
    policy::{CgroupPath, Direction},
    sockopt,
};

/// The cgroups below some roots, and the network namespaces their processes are in (with who
/// holds which socket, when asked): where the established connections of those cgroups are.
#[derive(Debug)]
pub(crate) struct Population {
    /// Cgroup id -> path, for every cgroup below the roots.
    pub(crate) cgroups: HashMap<u64, CgroupPath>,
    pub(crate) holders: Holders,
}

impl Population {
    /// Walks each of `roots` (cgroup directories below `mount`); with `sockets`, lists the
    /// processes' socket descriptors too.
    pub(crate) fn walk<'a>(
        mount: &Path,
        roots: impl IntoIterator<Item = &'a Path>,
        sockets: bool,
    ) -> io::Result<Self> {
        let mut cgroups = HashMap::new();
        let mut pids = Vec::new();
        for root in roots {
            walk(mount, root, &mut cgroups, &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(Self {
            cgroups,
            holders: Holders::of(&pids, sockets),
        })
    }
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
    // kernfs gives a directory 2 + its subdirectories as link count: a leaf cgroup (most of
    // them) is not listed, its 30-odd interface files the most of what a walk would read.
    if metadata.nlink() == 2 {
        return Ok(());
    }
    for child in crate::cgroup::child_dirs(dir) {
        walk(mount, &child, cgroups, pids)?;
    }
    Ok(())
}

/// Whether reading `/proc/PID/...` failed because the process is not ours to look at. A
/// process that exits while it is read fails the same way (EACCES: the kernel's ptrace check
/// refuses a task whose memory is gone, even to root), so a process that has exited or is a
/// zombie by now is not counted as refused.
fn refused(error: &io::Error, pid: u32) -> bool {
    error.kind() == io::ErrorKind::PermissionDenied && !exited(pid)
}

/// Whether `pid` is gone or a zombie (its `stat` state is Z or X).
fn exited(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // pid (comm) STATE ...: comm may hold spaces and parentheses, the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, Some("Z" | "X" | "x"))
}

/// Who holds which socket, and where each network namespace can be entered.
#[derive(Debug, Default)]
pub(crate) struct Holders {
    /// Socket inode -> (pid, fd): the first holder found.
    pub(crate) sockets: HashMap<u64, (u32, i32)>,
    /// Network namespace inode -> a file that enters it (`/proc/PID/ns/net`).
    pub(crate) namespaces: BTreeMap<u64, PathBuf>,
    /// Processes whose descriptors could not be listed (not ours to read without
    /// CAP_SYS_PTRACE, or gone).
    pub(crate) unlisted: u64,
}

impl Holders {
    /// The namespaces of `pids`; with `sockets`, their socket descriptors too.
    pub(crate) fn of(pids: &[u32], sockets: bool) -> Self {
        let mut holders = Self::default();
        for &pid in pids {
            let netns = match fs::metadata(format!("/proc/{pid}/ns/net")) {
                Ok(netns) => netns,
                Err(error) => {
                    if refused(&error, pid) {
                        holders.unlisted += 1;
                    }
                    continue; // exited, or not ours to look at
                }
            };
            holders
                .namespaces
                .entry(netns.ino())
                .or_insert_with(|| PathBuf::from(format!("/proc/{pid}/ns/net")));
            if sockets {
                holders.add_sockets(pid);
            }
        }
        if holders.unlisted > 0 {
            // Processes of other users: their namespace files need CAP_SYS_PTRACE, but a
            // namespace mounted somewhere (ip netns, container engines) opens without it.
            holders.add_mounted_namespaces();
        }
        holders
    }

    /// Network namespaces bind-mounted where this process sees them (`ip netns`, container
    /// engines): opening one needs no right over the processes inside.
    pub(crate) fn add_mounted_namespaces(&mut self) {
        let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        for line in mountinfo.lines() {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT ... - FSTYPE SOURCE OPTIONS
            let fields: Vec<&str> = line.split(' ').collect();
            let is_netns = fields.get(3).is_some_and(|root| root.starts_with("net:["))
                && line.contains(" - nsfs ");
            let Some(mount_point) = fields.get(4).filter(|_| is_netns) else {
                continue;
            };
            // Mountinfo escapes spaces and the like as octal (\040).
            let path = PathBuf::from(mount_point.replace("\\040", " "));
            if let Ok(netns) = fs::metadata(&path) {
                self.namespaces.entry(netns.ino()).or_insert(path);
            }
        }
    }

    fn add_sockets(&mut self, pid: u32) {
        let fds = match fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            Err(error) => {
                if refused(&error, pid) {
                    self.unlisted += 1;
                }
                return;
            }
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
                self.sockets.entry(inode).or_insert((pid, fd));
            }
        }
    }
}

/// The established TCP connections of the namespace `netns` (a `/proc/PID/ns/net` or
/// `/run/netns` file), of the cgroups `only` when given, each with its direction: one whose
/// local port a listener of the namespace holds counts as inbound, any other as outbound.
pub(crate) fn established_in(
    netns: &Path,
    only: Option<&[u64]>,
) -> io::Result<Vec<(DiagSocket, Direction)>> {
    let sockets = sockets_in(netns, only)?;
    let listening: HashSet<(IpAddr, u16)> = sockets
        .iter()
        .filter(|socket| socket.state == diag::LISTEN)
        .map(|socket| (socket.local, socket.local_port))
        .collect();
    Ok(sockets
        .into_iter()
        .filter(|socket| socket.state == diag::ESTABLISHED)
        .map(|socket| {
            let inbound = listening.iter().any(|(addr, port)| {
                *port == socket.local_port && (addr.is_unspecified() || *addr == socket.local)
            });
            (socket, Direction::from_outbound(!inbound))
        })
        .collect())
}

/// The TCP sockets of the namespace `netns`, listening and established (of the cgroups `only`
/// when given), in one dump: for a caller that needs no direction.
pub(crate) fn sockets_in(netns: &Path, only: Option<&[u64]>) -> io::Result<Vec<DiagSocket>> {
    in_namespace(netns, || diag::tcp_sockets(only))
}

/// `work` run in the network namespace `netns`, on a helper thread that entered it. The
/// caller's own namespace is used without entering it, so that works without CAP_SYS_ADMIN.
pub(crate) fn in_namespace<T: Send>(
    netns: &Path,
    work: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    let target = fs::File::open(netns)?;
    let own = fs::metadata("/proc/thread-self/ns/net")?.ino();
    if target.metadata()?.ino() == own {
        return work();
    }
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // setns on this helper thread only.
                rustix::thread::move_into_link_name_space(
                    target.as_fd(),
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
    duplicate(&pidfd(pid)?, fd)
}

/// A pidfd of process `pid` (pidfd_open(2)), to take several descriptors from it.
pub(crate) fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

/// A duplicate of descriptor `fd` of the process behind `pidfd` (pidfd_getfd(2)).
pub(crate) fn duplicate(pidfd: &OwnedFd, fd: RawFd) -> io::Result<OwnedFd> {
    Ok(pidfd_getfd(pidfd, fd, PidfdGetfdFlags::empty())?)
}

/// `enforce::Socket` over getsockopt(2)/setsockopt(2).
pub(crate) struct FdSocket(pub(crate) OwnedFd);

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
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_zombie_or_a_vanished_process_has_exited_a_live_one_has_not() {
        assert!(!exited(std::process::id()));
        let mut child = std::process::Command::new("true")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run true: {e}"));
        let pid = child.id();
        // Not reaped yet: a zombie once it has exited.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exited(pid) {
            assert!(Instant::now() < deadline, "pid {pid} never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        let _status = child.wait();
        assert!(exited(pid), "a reaped child is gone");
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(!refused(&denied, pid), "gone, not refused");
        assert!(refused(&denied, std::process::id()));
    }
}
