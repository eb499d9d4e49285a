//! Starting and stopping engine daemons, and what they leave behind: mounts below their state
//! directory, cgroup parents in every hierarchy.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{poll, require_host, unique_name};

/// Host directories the engines' shims and runtimes make whatever their state directory is.
const HOST_DIRS: [&str; 2] = ["/run/containerd", "/run/docker"];

/// Engines alive in this process, and which of [`HOST_DIRS`] were absent before the first.
static LIVE: std::sync::Mutex<(usize, Vec<&str>)> = std::sync::Mutex::new((0, Vec::new()));

/// Counts an engine starting.
fn engine_started() {
    if let Ok(mut live) = LIVE.lock() {
        if live.0 == 0 {
            live.1 = HOST_DIRS
                .into_iter()
                .filter(|dir| !Path::new(dir).exists())
                .collect();
        }
        live.0 += 1;
    }
}

/// Counts an engine stopped; the last one removes what the engines left empty in
/// [`HOST_DIRS`] that was not there before.
pub(super) fn engine_stopped() {
    if let Ok(mut live) = LIVE.lock() {
        live.0 = live.0.saturating_sub(1);
        if live.0 == 0 {
            for dir in std::mem::take(&mut live.1) {
                remove_empty_tree(Path::new(dir));
            }
        }
    }
}

/// SIGTERM, then SIGKILL if it is still there after a while.
pub(super) fn stop(daemon: &mut Child) {
    let pid = i32::try_from(daemon.id()).unwrap_or(i32::MAX);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let exited = poll(Duration::from_secs(30), || daemon.try_wait().ok().flatten());
    if exited.is_none() {
        let _ignored = daemon.kill();
        let _ignored = daemon.wait();
    }
}

/// Where the engines put their containers by default (Docker, podman).
pub(super) const PARENTS: [&str; 2] = ["docker", "libpod_parent"];

/// Removes the empty cgroup directories of a tree, deepest first.
pub(super) fn remove_empty_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_empty_tree(&entry.path());
            }
        }
    }
    let _ignored = std::fs::remove_dir(dir);
}

/// Those of [`PARENTS`] that do not exist now, in every cgroup hierarchy.
pub(super) fn absent_parents() -> Vec<PathBuf> {
    absent_in_hierarchies(&PARENTS)
}

/// Those of `names` (top-level cgroups) that do not exist now, in every cgroup hierarchy:
/// runc makes a container's parent in the v1 controllers' hierarchies too.
pub(super) fn absent_in_hierarchies(names: &[&str]) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut absent = Vec::new();
    for line in mounts.lines() {
        let (fields, fstype) = match line.split_once(" - ") {
            Some((fields, rest)) => (fields, rest.split_whitespace().next().unwrap_or("")),
            None => continue,
        };
        if !matches!(fstype, "cgroup" | "cgroup2") {
            continue;
        }
        let Some(point) = fields.split_whitespace().nth(4) else {
            continue;
        };
        absent.extend(
            names
                .iter()
                .map(|parent| Path::new(point).join(parent))
                .filter(|dir| !dir.exists()),
        );
    }
    absent
}

/// Unmounts whatever an engine left mounted below `root` (deepest first).
pub(super) fn unmount_below(root: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for point in mounted_below(&mounts, root) {
        if let Ok(path) = std::ffi::CString::new(point) {
            // SAFETY: a NUL-terminated path; failure (already gone) is fine.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The mount points of `mountinfo` below `root`, deepest first. Below by path components: as
/// a string prefix, `/tmp/ka-test-7-1` had `/tmp/ka-test-7-11/bpffs` below it, and an engine's
/// cleanup unmounted the bpffs of an agent of another test running beside it.
fn mounted_below<'a>(mountinfo: &'a str, root: &Path) -> Vec<&'a str> {
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|point| Path::new(point).starts_with(root))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    points
}

/// A state directory for a new engine (counted as started: [`engine_stopped`] on its drop).
pub(super) fn make_root() -> PathBuf {
    require_host();
    engine_started();
    let root = std::env::temp_dir().join(unique_name());
    std::fs::create_dir_all(&root)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
    root
}

pub(super) fn spawn(command: &mut Command, root: &Path) -> Child {
    let log = std::fs::File::create(root.join("daemon.log"))
        .unwrap_or_else(|e| panic!("cannot create the daemon log: {e}"));
    let err = log
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot share the daemon log: {e}"));
    command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"))
}

/// A root filesystem of busybox-static: /bin/busybox and the applets the tests use.
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", bin.display()));
    for sub in ["proc", "sys", "dev", "tmp", "etc"] {
        let _ignored = std::fs::create_dir_all(dir.join(sub));
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .unwrap_or_else(|e| panic!("cannot copy /bin/busybox (Debian busybox-static): {e}"));
    for applet in ["sh", "nc", "sleep", "cat"] {
        let _ignored = std::os::unix::fs::symlink("busybox", bin.join(applet));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::mounted_below;

    #[test]
    fn only_mounts_below_the_root_by_path_are_below_it() {
        let mountinfo = "\
            30 1 0:27 / /tmp/ka-test-7-1 rw - tmpfs tmpfs rw\n\
            31 30 0:28 / /tmp/ka-test-7-1/rootfs/proc rw - proc proc rw\n\
            32 1 0:29 / /tmp/ka-test-7-11/bpffs rw - bpf bpf rw\n\
            33 30 0:30 / /tmp/ka-test-7-1/rootfs rw - overlay overlay rw\n";
        assert_eq!(
            mounted_below(mountinfo, Path::new("/tmp/ka-test-7-1")),
            [
                "/tmp/ka-test-7-1/rootfs/proc",
                "/tmp/ka-test-7-1/rootfs",
                "/tmp/ka-test-7-1"
            ]
        );
    }
}
