//! Who could have written a policy file. The policy decides keepalive for every connection in
//! its cgroups, so a file that someone other than root (or the agent's own user) could change
//! is refused, the way sshd refuses a world-writable authorized_keys: the file itself, and the
//! directory it lives in (whoever can write there can replace the file).

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

/// Anyone may write.
const WORLD_WRITABLE: u32 = 0o002;
/// Only an entry's owner may remove or rename it (/tmp).
const STICKY: u32 = 0o1000;

/// Why `path` cannot be trusted, if it cannot; unreadable metadata is left to the read that
/// follows, which reports it.
pub(super) fn distrust(path: &Path) -> Option<String> {
    let euid = rustix::process::geteuid().as_raw();
    let file = fs::metadata(path).ok()?;
    if let Some(reason) = owner(&file, euid, "it") {
        return Some(reason);
    }
    if file.mode() & WORLD_WRITABLE != 0 {
        return Some(format!(
            "it is writable by every user (mode {:o}); `chmod o-w` it",
            file.permissions().mode() & 0o7777
        ));
    }
    let dir = fs::canonicalize(path).ok()?.parent()?.to_path_buf();
    let meta = fs::metadata(&dir).ok()?;
    if let Some(reason) = owner(&meta, euid, &format!("its directory {}", dir.display())) {
        return Some(reason);
    }
    if meta.mode() & WORLD_WRITABLE != 0 && meta.mode() & STICKY == 0 {
        return Some(format!(
            "its directory {} is writable by every user, who could replace the file; move the \
             file, or `chmod o-w` the directory",
            dir.display()
        ));
    }
    None
}

fn owner(meta: &fs::Metadata, euid: u32, what: &str) -> Option<String> {
    (meta.uid() != 0 && meta.uid() != euid).then(|| {
        format!(
            "{what} belongs to uid {}, not root, who could change the policy of every \
             connection; `chown root` it",
            meta.uid()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A fresh directory under the temporary directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ka-trust-{}-{name}", std::process::id()));
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("{e}"));
            Self(dir)
        }

        fn file(&self, mode: u32) -> PathBuf {
            let path = self.0.join("policy.toml");
            fs::write(&path, "").unwrap_or_else(|e| panic!("{e}"));
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("{e}"));
            path
        }

        fn chmod(&self, mode: u32) {
            fs::set_permissions(&self.0, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ignored = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_file_only_its_owner_can_write_is_trusted() {
        let scratch = Scratch::new("owner");
        assert_eq!(distrust(&scratch.file(0o644)), None);
        assert_eq!(distrust(&scratch.file(0o600)), None);
    }

    #[test]
    fn a_world_writable_file_is_not() {
        let scratch = Scratch::new("world");
        let reason = distrust(&scratch.file(0o666));
        assert!(
            reason
                .as_deref()
                .is_some_and(|r| r.contains("writable by every user (mode 666)")),
            "{reason:?}"
        );
    }

    #[test]
    fn a_world_writable_directory_is_not_unless_sticky() {
        let scratch = Scratch::new("dir");
        let file = scratch.file(0o644);
        scratch.chmod(0o777);
        let reason = distrust(&file);
        assert!(
            reason
                .as_deref()
                .is_some_and(|r| r.contains("its directory") && r.contains("could replace")),
            "{reason:?}"
        );
        scratch.chmod(0o1777);
        assert_eq!(
            distrust(&file),
            None,
            "like /tmp: nobody else can replace it"
        );
    }

    #[test]
    fn a_missing_file_is_left_to_the_read() {
        assert_eq!(distrust(Path::new("/nonexistent/policy.toml")), None);
    }
}
