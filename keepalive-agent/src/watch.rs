//! Watching the policy file, and the cgroup tree, for changes (inotify, through the inotify
//! crate, polled by tokio).
//!
//! The directory, not the file: editors replace files by renaming a new one over them, and a
//! Kubernetes ConfigMap volume swaps a `..data` symlink. Any event in the directory only wakes
//! the agent, which then compares the file's content with what it last applied.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::io::{Interest, unix::AsyncFd};

/// An inotify instance, polled by tokio.
fn register(inotify: Inotify) -> io::Result<AsyncFd<Inotify>> {
    // SAFETY: the Inotify owns its descriptor until it is dropped (with the AsyncFd: we never
    // call `close`) and always returns that same one.
    unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }.map_err(io::Error::from)
}

/// Reads the events queued on `inotify` once it is readable, and hands them to `each`.
async fn next_events(
    inotify: &mut AsyncFd<Inotify>,
    buffer: &mut [u8],
    mut each: impl FnMut(&WatchDescriptor, EventMask, Option<&std::ffi::OsStr>),
) -> io::Result<()> {
    loop {
        let mut guard = inotify.readable_mut().await?;
        match guard.try_io(|inotify| inotify.get_mut().read_events(buffer)) {
            Ok(events) => {
                for event in events? {
                    each(&event.wd, event.mask, event.name);
                }
                return Ok(());
            }
            Err(_would_block) => continue,
        }
    }
}

/// Wakes on changes in the directory of a file.
#[derive(Debug)]
pub struct Watch {
    inotify: AsyncFd<Inotify>,
}

impl Watch {
    pub fn new(file: &Path) -> io::Result<Self> {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let inotify = Inotify::init()?;
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::ATTRIB;
        inotify.watches().add(dir, mask)?;
        Ok(Self {
            inotify: register(inotify)?,
        })
    }

    /// Returns after at least one change in the directory, having drained the events.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buffer = [0u8; 4096];
        next_events(&mut self.inotify, &mut buffer, |_, _, _| ()).await
    }
}

/// Wakes when cgroups appear or go anywhere below the given roots (inotify on every
/// directory of the sub-trees; new directories are watched as they come). When the kernel's
/// event queue overflowed (IN_Q_OVERFLOW: events, and so new directories, were lost), the
/// sub-trees are walked again: every directory is watched, and the caller rescans.
#[derive(Debug)]
pub struct CgroupWatch {
    inotify: AsyncFd<Inotify>,
    roots: Vec<PathBuf>,
    /// Watch descriptor -> directory, to watch what is created inside.
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

impl CgroupWatch {
    /// Watches the sub-trees at `roots` (each the nearest existing directory is used).
    pub fn new(roots: &[PathBuf]) -> io::Result<Self> {
        let inotify = register(Inotify::init()?)?;
        let mut watch = Self {
            inotify,
            roots: roots.to_vec(),
            dirs: HashMap::new(),
        };
        watch.add_roots();
        Ok(watch)
    }

    fn add_roots(&mut self) {
        for root in self.roots.clone() {
            let existing = root.ancestors().find(|dir| dir.is_dir()).unwrap_or(&root);
            self.add_tree(existing, &mut Vec::new());
        }
    }

    /// Watches `root` and the directories below it, which are added to `below`.
    fn add_tree(&mut self, root: &Path, below: &mut Vec<PathBuf>) {
        let mut watches = self.inotify.get_ref().watches();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let mask = WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR;
            let Ok(wd) = watches.add(&dir, mask) else {
                continue; // gone already
            };
            let children = crate::cgroup::child_dirs(&dir);
            below.extend(children.iter().cloned());
            stack.extend(children);
            self.dirs.insert(wd, dir);
        }
    }

    /// Returns after at least one cgroup was created or removed, having drained the events and
    /// watched the new directories: `Overflowed` when events were lost (the sub-trees were
    /// walked again; whatever they hold must be looked at again too).
    pub async fn changed(&mut self) -> io::Result<Change> {
        let mut buffer = [0u8; 8192];
        let mut created = Vec::new();
        let mut removed = false;
        let mut overflowed = false;
        let dirs = &mut self.dirs;
        next_events(&mut self.inotify, &mut buffer, |wd, mask, name| {
            if mask.contains(EventMask::CREATE) {
                match (dirs.get(wd), name) {
                    (Some(dir), Some(name)) => created.push(dir.join(name)),
                    // Where it was made is not known: only a walk tells.
                    _ => removed = true,
                }
            }
            removed |= mask.intersects(EventMask::DELETE | EventMask::DELETE_SELF);
            if mask.contains(EventMask::Q_OVERFLOW) {
                overflowed = true;
            }
            if mask.contains(EventMask::IGNORED) {
                dirs.remove(wd);
            }
        })
        .await?;
        // Children made before their parent's watch are found by this walk, not by an event.
        let mut found = Vec::new();
        for dir in &created {
            self.add_tree(dir, &mut found);
        }
        if overflowed {
            self.add_roots();
            return Ok(Change::Overflowed);
        }
        if removed || created.is_empty() {
            return Ok(Change::Events);
        }
        created.extend(found);
        created.sort();
        created.dedup();
        Ok(Change::Created(created))
    }
}

/// What [`CgroupWatch::changed`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Only these cgroups appeared (their directories), none went.
    Created(Vec<PathBuf>),
    /// Cgroups were removed (and maybe created): the tree must be looked at again.
    Events,
    /// The kernel's queue overflowed: events were lost.
    Overflowed,
}
