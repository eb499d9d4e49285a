//! cgroup v2 directories: finding what the user names, and their ids.

use std::{
    fmt, fs, io,
    os::unix::fs::{DirEntryExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::policy::CgroupPath;

/// `CGROUP2_SUPER_MAGIC` from include/uapi/linux/magic.h.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "cgroup {arg:?} not found: {} is not a directory of the cgroup v2 hierarchy mounted at {}",
        tried.display(), mount.display()
    )]
    NotFound {
        arg: PathBuf,
        tried: PathBuf,
        mount: PathBuf,
    },
    #[error("{} is not in the cgroup v2 hierarchy (mounted at {})", path.display(), mount.display())]
    NotCgroup2 { path: PathBuf, mount: PathBuf },
    #[error("cannot read cgroup {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("cgroup {}: {reason}", arg.display())]
    BadName { arg: PathBuf, reason: String },
}

/// The one reading of a cgroup the user names (`--cgroup` of run, scan and explain): a path
/// inside the hierarchy (`/`, `system.slice/x.service`, as /proc/PID/cgroup prints them), or a
/// filesystem path under the cgroup2 `mount`, as a [`CgroupPath`]. Whether it exists is
/// [`Cgroup::find`]'s question.
pub fn named(mount: &Path, arg: &Path) -> Result<CgroupPath, CgroupError> {
    let bad = |reason: String| CgroupError::BadName {
        arg: arg.to_path_buf(),
        reason,
    };
    let inside = arg.strip_prefix(mount).unwrap_or(arg);
    let text = inside
        .to_str()
        .ok_or_else(|| bad("not valid UTF-8".into()))?;
    CgroupPath::parse(text).map_err(|error| bad(error.to_string()))
}

/// A cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Absolute path in the filesystem.
    pub path: PathBuf,
    /// Path inside the hierarchy, as /proc/PID/cgroup shows it (`/` for the root).
    pub name: String,
    /// The cgroup id: the inode number of its directory (what `bpf_get_current_cgroup_id` and
    /// cgroup storage keys use).
    pub id: u64,
}

impl fmt::Display for Cgroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (id {})", self.name, self.id)
    }
}

impl Cgroup {
    /// Finds a user-given cgroup: a path inside the hierarchy (`/`, `system.slice`,
    /// `/kubepods.slice/pod1`, as /proc/PID/cgroup prints them) or a filesystem path under the
    /// cgroup2 mount (`/sys/fs/cgroup/system.slice`).
    pub fn find(mount: &Path, arg: &Path) -> Result<Self, CgroupError> {
        let path = if arg.starts_with(mount) {
            arg.to_path_buf()
        } else {
            mount.join(arg.strip_prefix("/").unwrap_or(arg))
        };
        let metadata = fs::metadata(&path).map_err(|error| match error.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => CgroupError::NotFound {
                arg: arg.to_path_buf(),
                tried: path.clone(),
                mount: mount.to_path_buf(),
            },
            _ => CgroupError::Io {
                path: path.clone(),
                error,
            },
        })?;
        if !metadata.is_dir() {
            return Err(CgroupError::NotFound {
                arg: arg.to_path_buf(),
                tried: path,
                mount: mount.to_path_buf(),
            });
        }
        if !is_cgroup2(&path)? {
            return Err(CgroupError::NotCgroup2 {
                path,
                mount: mount.to_path_buf(),
            });
        }
        let path = path.canonicalize().map_err(|error| CgroupError::Io {
            path: path.clone(),
            error,
        })?;
        let name = match path.strip_prefix(mount) {
            Ok(rest) => format!("/{}", rest.display()),
            Err(_) => {
                return Err(CgroupError::NotCgroup2 {
                    path,
                    mount: mount.to_path_buf(),
                });
            }
        };
        Ok(Self {
            id: metadata.ino(),
            path,
            name,
        })
    }
}

fn is_cgroup2(path: &Path) -> Result<bool, CgroupError> {
    let stat = rustix::fs::statfs(path).map_err(|error| CgroupError::Io {
        path: path.to_path_buf(),
        error: error.into(),
    })?;
    // `f_type`'s signedness differs between C libraries; compare it as unsigned.
    Ok(u64::try_from(stat.f_type).is_ok_and(|f_type| f_type == CGROUP2_SUPER_MAGIC))
}

/// The directories directly inside `dir` (its child cgroups); none if it cannot be read (it
/// may be gone already).
pub(crate) fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    child_cgroups(dir)
        .into_iter()
        .map(|(path, _)| path)
        .collect()
}

/// [`child_dirs`] with each one's cgroup id, read from its directory entry (kernfs gives a
/// cgroup's id as the entry's inode number): no syscall per cgroup.
pub(crate) fn child_cgroups(dir: &Path) -> Vec<(PathBuf, u64)> {
    fs::read_dir(dir).map_or_else(
        |_| Vec::new(),
        |entries| {
            entries
                .flatten()
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .map(|entry| (entry.path(), entry.ino()))
                .collect()
        },
    )
}

/// Every cgroup of the hierarchy by id (to find what a pinned link's id names).
pub fn by_id(mount: &Path) -> std::collections::HashMap<u64, PathBuf> {
    let mut found = std::collections::HashMap::new();
    if let Ok(metadata) = fs::metadata(mount) {
        found.insert(metadata.ino(), mount.to_path_buf());
    }
    let mut stack = vec![mount.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for (child, id) in child_cgroups(&dir) {
            found.insert(id, child.clone());
            stack.push(child);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let dir = std::env::temp_dir();
        let error = Cgroup::find(Path::new("/"), &dir).err();
        assert!(
            matches!(error, Some(CgroupError::NotCgroup2 { .. })),
            "{error:?}"
        );
    }

    #[test]
    fn a_missing_cgroup_names_what_was_tried() {
        let error = Cgroup::find(Path::new("/nonexistent-mount"), Path::new("/a/b"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("\"/a/b\"") && error.contains("/nonexistent-mount/a/b"),
            "{error}"
        );
    }
}
