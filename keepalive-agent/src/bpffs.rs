//! The agent's directory in bpffs, where its maps and links are pinned: mounted if needed,
//! root only. The `bpf(2)` commands that pin, open and update links are in [`crate::sys`].
//!
//! Pinned, a link outlives the agent (even SIGKILL): enforcement stays, and the next agent
//! opens the pins and swaps its own programs in (BPF_LINK_UPDATE, atomic), without a second
//! attachment and without a moment where connections go unenforced.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let f_type = rustix::fs::statfs(path)?.f_type;
    // `f_type`'s signedness differs between C libraries; compare it as unsigned.
    Ok(u64::try_from(f_type).is_ok_and(|f_type| f_type == BPF_FS_MAGIC))
}

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "bpffs is not mounted at {} and mounting it failed ({error}): mount it with \
         `mount -t bpf bpf {}`", path.display(), path.display()
    )]
    Mount { path: PathBuf, error: io::Error },
    #[error("cannot prepare the agent's bpffs directory {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
}

/// The agent's directory in bpffs: `<bpffs>/keepalive-agent`, with `maps/` and `links/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    pub root: PathBuf,
}

impl PinDir {
    /// Mounts bpffs at `bpffs` if it is not there yet, and makes the agent's directories.
    pub fn prepare(bpffs: &Path) -> Result<Self, BpffsError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |error| BpffsError::Io { path, error }
        };
        fs::create_dir_all(bpffs).map_err(io_error(bpffs))?;
        if !is_bpffs(bpffs).map_err(io_error(bpffs))? {
            rustix::mount::mount(
                "bpf",
                bpffs,
                "bpf",
                rustix::mount::MountFlags::empty(),
                c"mode=0700",
            )
            .map_err(|error| BpffsError::Mount {
                path: bpffs.to_path_buf(),
                error: error.into(),
            })?;
        }
        let dir = Self::at(bpffs);
        for sub in [dir.maps(), dir.links()] {
            fs::create_dir_all(&sub).map_err(io_error(&sub))?;
        }
        // Root only: whoever can open a pinned map can rewrite the policy, and whoever can
        // unlink a pinned link can stop enforcement. The pins themselves are 0600.
        for sub in [&dir.root, &dir.maps(), &dir.links()] {
            fs::set_permissions(sub, fs::Permissions::from_mode(0o700)).map_err(io_error(sub))?;
        }
        Ok(dir)
    }

    /// The directory for `bpffs`, without touching anything.
    pub fn at(bpffs: &Path) -> Self {
        Self {
            root: bpffs.join("keepalive-agent"),
        }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// The pin of the link of the hook named `pin_name` (`sockops`, `setsockopt`) to the
    /// cgroup with `id`.
    pub fn link(&self, pin_name: &str, cgroup_id: u64) -> PathBuf {
        self.links().join(format!("{pin_name}-{cgroup_id}"))
    }

    /// The pinned links: (pin name of the hook, cgroup id, path).
    pub fn pinned_links(&self) -> Vec<(String, u64, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.links()) else {
            return Vec::new();
        };
        let mut links: Vec<(String, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let (pin_name, id) = name.rsplit_once('-')?;
                Some((pin_name.to_string(), id.parse().ok()?, entry.path()))
            })
            .collect();
        links.sort();
        links
    }

    /// Removes every pin (detaching the links no process holds) and the directories.
    pub fn remove(&self) -> io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for dir in [self.links(), self.maps()] {
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    fs::remove_file(entry.path())?;
                    removed.push(entry.path());
                }
            }
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match fs::remove_dir(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(removed)
    }
}
