//! A host sysctl changed for one test and put back when the guard drops, passed or failed.

use std::path::PathBuf;

use crate::cleanup_failed;

#[derive(Debug)]
pub struct SysctlGuard {
    path: PathBuf,
    before: String,
}

impl SysctlGuard {
    /// Sets `key` (`fs.inotify.max_queued_events`) to `value`; the old value comes back on drop.
    pub fn set(key: &str, value: &str) -> Self {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let before = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let guard = Self {
            path,
            before: before.trim().to_string(),
        };
        std::fs::write(&guard.path, value)
            .unwrap_or_else(|e| panic!("cannot set {key} = {value}: {e}"));
        guard
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(&self.path, &self.before) {
            cleanup_failed(&format!(
                "cannot restore {} to {}: {error}",
                self.path.display(),
                self.before
            ));
        }
    }
}
