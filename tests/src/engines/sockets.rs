//! Reading back the keepalive settings of the sockets a container's processes hold.

use std::{path::Path, time::Duration};

use keepalive_agent::CgroupPath;

use crate::{Keepalive, poll, require_host};

/// The keepalive settings of every connected TCP socket held by the processes of a cgroup
/// (and its descendants), read back from the kernel through pidfd_getfd.
pub fn connected_sockets(cgroup: &CgroupPath) -> Vec<Keepalive> {
    let mount = require_host().cgroup2_mount;
    let dir = mount.join(cgroup.relative());
    let mut found = Vec::new();
    for pid in pids_below(&dir) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in fds.flatten() {
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
            let fd = entry.file_name().to_string_lossy().parse::<i32>().ok();
            if let (true, Some(fd)) = (is_socket, fd)
                && let Ok(socket) = keepalive_agent::existing::steal_fd(pid, fd)
                && is_connected_tcp(&socket)
            {
                found.push(Keepalive::of(&socket));
            }
        }
    }
    found
}

/// Whether a socket is a TCP socket with a peer.
fn is_connected_tcp(socket: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let protocol =
        keepalive_agent::sockopt::get_int(socket.as_fd(), libc::SOL_SOCKET, libc::SO_PROTOCOL).ok();
    if protocol != Some(libc::IPPROTO_TCP) {
        return false;
    }
    // SAFETY: a zeroed sockaddr_storage and its size, for getpeername to fill.
    unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = libc::socklen_t::try_from(size_of::<libc::sockaddr_storage>()).unwrap_or(0);
        libc::getpeername(
            socket.as_raw_fd(),
            (&raw mut addr).cast::<libc::sockaddr>(),
            &raw mut len,
        ) == 0
    }
}

/// Waits until a cgroup holds at least `count` connected TCP sockets, all with `idle_secs`
/// (and keepalive on); panics with what it saw otherwise.
pub fn expect_idle(what: &str, cgroup: &CgroupPath, count: usize, idle_secs: u32) {
    let mut last = Vec::new();
    let seen = poll(Duration::from_secs(20), || {
        last = connected_sockets(cgroup);
        (last.len() >= count
            && last
                .iter()
                .all(|socket| socket.enabled && socket.idle_secs == idle_secs))
        .then_some(())
    });
    assert!(
        seen.is_some(),
        "{what} ({cgroup}): expected {count} connected sockets with keepalive idle {idle_secs} s, \
         saw {last:?}"
    );
}

/// Pids of the processes in a cgroup directory and its descendants.
fn pids_below(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        pids.extend(
            procs
                .lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
    }
    pids
}
