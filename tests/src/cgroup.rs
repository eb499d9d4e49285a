//! Throwaway cgroup v2 directories.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use keepalive_agent::{Cgroup, CgroupPath};

use crate::{cleanup_failed, poll, require_host, unique_name};

/// A cgroup created for one test, removed (with every process in it) on drop.
#[derive(Debug)]
pub struct TestCgroup {
    cgroup: Cgroup,
}

impl TestCgroup {
    /// A new cgroup directly under the root of the cgroup2 hierarchy.
    #[expect(
        clippy::new_without_default,
        reason = "creating a cgroup is not a default value"
    )]
    pub fn new() -> Self {
        let host = require_host();
        Self::create(&host.cgroup2_mount, &host.cgroup2_mount.join(unique_name()))
    }

    /// A new cgroup inside this one.
    pub fn child(&self, name: &str) -> Self {
        let mount = require_host().cgroup2_mount;
        Self::create(&mount, &self.cgroup.path.join(name))
    }

    fn create(mount: &Path, path: &Path) -> Self {
        fs::create_dir(path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        let cgroup = Cgroup::find(mount, path)
            .unwrap_or_else(|e| panic!("cannot resolve new cgroup {}: {e}", path.display()));
        Self { cgroup }
    }

    /// The cgroup as the agent sees it.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The cgroup as policies name it (`/ka-test-...`).
    pub fn scope(&self) -> CgroupPath {
        CgroupPath::parse(&self.cgroup.name).expect("a cgroup name is a cgroup path")
    }

    pub fn path(&self) -> &Path {
        &self.cgroup.path
    }

    /// Pids of the processes in this cgroup (not its descendants).
    pub fn pids(&self) -> Vec<u32> {
        pids(&self.cgroup.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_tree(&self.cgroup.path);
    }
}

fn pids(path: &Path) -> Vec<u32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// Kills every process in the cgroup and its descendants, then removes the directories.
pub(crate) fn remove_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    // cgroup.kill (Linux 5.14) SIGKILLs the whole sub-tree at once.
    let _ignored = fs::write(path.join("cgroup.kill"), "1");
    let mut dirs: Vec<PathBuf> = Vec::new();
    collect_dirs(path, &mut dirs);
    // Deepest first: a cgroup with children cannot be removed.
    dirs.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
    for dir in dirs {
        let empty = poll(Duration::from_secs(10), || {
            pids(&dir).is_empty().then_some(())
        });
        // rmdir fails with EBUSY while killed tasks finish exiting; retry until it succeeds.
        let removed = empty.and_then(|()| {
            poll(Duration::from_secs(10), || match fs::remove_dir(&dir) {
                Ok(()) => Some(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(()),
                Err(_) => None,
            })
        });
        if removed.is_none() {
            cleanup_failed(&format!("cannot remove test cgroup {}", dir.display()));
        }
    }
}

fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
    out.push(path.to_path_buf());
}
