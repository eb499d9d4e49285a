//! Watching the policy file, and the cgroup tree, for changes (inotify).
//!
//! The directory, not the file: editors replace files by renaming a new one over them, and a
//! Kubernetes ConfigMap volume swaps a `..data` symlink. Any event in the directory only wakes
//! the agent, which then compares the file's content with what it last applied.

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use tokio::io::{Interest, unix::AsyncFd};

/// Wakes on changes in the directory of a file.
#[derive(Debug)]
pub struct Watch {
    inotify: AsyncFd<OwnedFd>,
}

impl Watch {
    pub fn new(file: &Path) -> io::Result<Self> {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_ATTRIB;
        // SAFETY: a NUL-terminated path and our inotify descriptor.
        if unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd stays open and the same for the AsyncFd's whole life.
        let inotify = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { inotify })
    }

    /// Returns after at least one change in the directory, having drained the events.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.inotify.readable_mut().await?;
            let mut buffer = [0u8; 4096];
            let fd = guard.get_inner().as_raw_fd();
            // SAFETY: reading into a buffer of the given size from our descriptor.
            let read = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
            if read > 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(error);
        }
    }
}

/// Wakes when cgroups appear or go anywhere below the given roots (inotify on every
/// directory of the sub-trees; new directories are watched as they come). When the kernel's
/// event queue overflowed (IN_Q_OVERFLOW: events, and so new directories, were lost), the
/// sub-trees are walked again: every directory is watched, and the caller rescans.
#[derive(Debug)]
pub struct CgroupWatch {
    inotify: AsyncFd<OwnedFd>,
    roots: Vec<std::path::PathBuf>,
    /// Watch descriptor -> directory, to watch what is created inside.
    dirs: std::collections::HashMap<i32, std::path::PathBuf>,
}

impl CgroupWatch {
    /// Watches the sub-trees at `roots` (each the nearest existing directory is used).
    pub fn new(roots: &[std::path::PathBuf]) -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd stays open and the same for the AsyncFd's whole life.
        let inotify = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let mut watch = Self {
            inotify,
            roots: roots.to_vec(),
            dirs: std::collections::HashMap::new(),
        };
        watch.add_roots();
        Ok(watch)
    }

    fn add_roots(&mut self) {
        for root in self.roots.clone() {
            let existing = root.ancestors().find(|dir| dir.is_dir()).unwrap_or(&root);
            self.add_tree(existing);
        }
    }

    fn add_tree(&mut self, root: &Path) {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
                continue;
            };
            let mask = libc::IN_CREATE | libc::IN_DELETE | libc::IN_ONLYDIR;
            // SAFETY: a NUL-terminated path and our inotify descriptor.
            let wd = unsafe {
                libc::inotify_add_watch(self.inotify.get_ref().as_raw_fd(), path.as_ptr(), mask)
            };
            if wd < 0 {
                continue; // gone already
            }
            stack.extend(crate::cgroup::child_dirs(&dir));
            self.dirs.insert(wd, dir);
        }
    }

    /// Returns after at least one cgroup was created or removed, having drained the events and
    /// watched the new directories: `Overflowed` when events were lost (the sub-trees were
    /// walked again; whatever they hold must be looked at again too).
    pub async fn changed(&mut self) -> io::Result<Change> {
        loop {
            let mut guard = self.inotify.readable_mut().await?;
            let mut buffer = [0u8; 8192];
            let fd = guard.get_inner().as_raw_fd();
            // SAFETY: reading into a buffer of the given size from our descriptor.
            let read = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
            if read < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return Err(error);
            }
            drop(guard);
            let read = usize::try_from(read).unwrap_or(0);
            let mut created = Vec::new();
            let mut overflowed = false;
            let mut at = 0;
            // struct inotify_event: wd (i32), mask (u32), cookie (u32), len (u32), name[len].
            while at + 16 <= read {
                let word = |offset: usize| {
                    u32::from_ne_bytes([
                        buffer[at + offset],
                        buffer[at + offset + 1],
                        buffer[at + offset + 2],
                        buffer[at + offset + 3],
                    ])
                };
                let (wd, mask, len) = (word(0).cast_signed(), word(4), word(12) as usize);
                let name = &buffer[at + 16..(at + 16 + len).min(read)];
                let name = name.split(|byte| *byte == 0).next().unwrap_or_default();
                if mask & libc::IN_CREATE != 0
                    && let Some(dir) = self.dirs.get(&wd)
                {
                    created.push(dir.join(OsStr::from_bytes(name)));
                }
                if mask & libc::IN_Q_OVERFLOW != 0 {
                    overflowed = true;
                }
                if mask & libc::IN_IGNORED != 0 {
                    self.dirs.remove(&wd);
                }
                at += 16 + len;
            }
            for dir in created {
                self.add_tree(&dir);
            }
            if overflowed {
                self.add_roots();
                return Ok(Change::Overflowed);
            }
            return Ok(Change::Events);
        }
    }
}

/// What [`CgroupWatch::changed`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Cgroups were created or removed.
    Events,
    /// The kernel's queue overflowed: events were lost.
    Overflowed,
}
