//! Scratch directories for files a test writes (policies, reports, copies of binaries), removed
//! on drop.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use crate::unique_name;

/// A fresh directory under the temporary directory (`ka-test-<pid>-<n>`), removed with what
/// it holds when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    #[expect(
        clippy::new_without_default,
        reason = "creating a directory is not a default value"
    )]
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name());
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to `name` in the directory with permissions `mode`.
    pub fn write(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        set_mode(&path, mode);
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ignored = fs::remove_dir_all(&self.0);
    }
}

/// A copy of the agent binary (and of the probe workload) that every user may run, for commands run as another user: the
/// checkout (and its `target/`) may sit under a directory only its owner can enter.
#[derive(Debug)]
pub struct AgentCopy {
    dir: TempDir,
}

impl AgentCopy {
    #[expect(
        clippy::new_without_default,
        reason = "copying a binary is not a default value"
    )]
    pub fn new() -> Self {
        let dir = TempDir::new();
        set_mode(dir.path(), 0o755);
        for ancestor in dir.path().ancestors().skip(1) {
            let mode = fs::metadata(ancestor)
                .map(|meta| meta.permissions().mode())
                .unwrap_or(0);
            assert!(
                mode & 0o001 != 0,
                "{} is not searchable by every user: set TMPDIR to a directory they can reach",
                ancestor.display()
            );
        }
        let copy = Self { dir };
        for (binary, copied) in [
            (crate::agent_bin(), copy.path()),
            (crate::probe_bin(), copy.probe()),
        ] {
            fs::copy(&binary, &copied)
                .unwrap_or_else(|e| panic!("cannot copy {}: {e}", binary.display()));
            set_mode(&copied, 0o755);
        }
        copy
    }

    /// The copy of the `ka-probe` workload binary beside it.
    pub fn probe(&self) -> PathBuf {
        self.dir.join("ka-probe")
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("keepalive-agent")
    }
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
}
