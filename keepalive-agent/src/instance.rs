//! One running agent per pin directory.
//!
//! `run` holds an exclusive `flock` on `<bpffs>/keepalive-agent` for its whole life. The
//! kernel releases it when the process ends, however it ends (a SIGKILLed agent's successor
//! is never refused), and `/proc/locks` names the holder. A second `run` is refused at once;
//! `run --take-over` asks the holder to hand over (SIGUSR2: it exits leaving enforcement
//! pinned) and takes the lock when it is free; `detach` asks the holder to stop (SIGTERM:
//! it detaches as it stops).

use std::{
    fs::File,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How long `--take-over` and `detach` wait for the running agent to let go.
pub const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "another keepalive-agent{} is already running with the pins under {}: stop it, or \
         replace it without a gap in enforcement with `keepalive-agent run --take-over ...`",
        pid_text(*pid), dir.display()
    )]
    Running { pid: Option<u32>, dir: PathBuf },
    #[error(
        "the running keepalive-agent{} did not let go of {} within {} s",
        pid_text(*pid), dir.display(), timeout.as_secs()
    )]
    Stuck {
        pid: Option<u32>,
        dir: PathBuf,
        timeout: Duration,
    },
    #[error("cannot lock {}: {error}", dir.display())]
    Io { dir: PathBuf, error: io::Error },
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map_or_else(String::new, |pid| format!(" (pid {pid})"))
}

/// The lock of the running agent; released when dropped or when the process ends.
#[derive(Debug)]
pub struct InstanceLock {
    _dir: File,
}

impl InstanceLock {
    /// Takes the lock on `dir` (the agent's pin directory), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, InstanceError> {
        match try_lock(dir)? {
            Some(lock) => Ok(lock),
            None => Err(InstanceError::Running {
                pid: holder(dir),
                dir: dir.to_path_buf(),
            }),
        }
    }

    /// Takes the lock on `dir`; if an agent holds it, sends it `signal` and waits up to
    /// `timeout` for it to let go. Returns the lock (None: the agent removed `dir` as it
    /// stopped) and the pid that held it, if any.
    pub fn replace(
        dir: &Path,
        signal: libc::c_int,
        timeout: Duration,
    ) -> Result<(Option<Self>, Option<u32>), InstanceError> {
        match attempt(dir)? {
            Attempt::Locked(lock) => return Ok((Some(lock), None)),
            Attempt::Gone => return Ok((None, None)),
            Attempt::Held => {}
        }
        let pid = holder(dir);
        if let Some(pid) = pid
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw)
            && let Some(signal) = rustix::process::Signal::from_named_raw(signal)
        {
            // A failure (it exited meanwhile) shows in the wait.
            let _ignored = rustix::process::kill_process(pid, signal);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match attempt(dir)? {
                Attempt::Locked(lock) => return Ok((Some(lock), pid)),
                Attempt::Gone => return Ok((None, pid)),
                Attempt::Held => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(InstanceError::Stuck {
            pid,
            dir: dir.to_path_buf(),
            timeout,
        })
    }
}

enum Attempt {
    Locked(InstanceLock),
    Held,
    /// The holder removed the directory as it stopped (it may do so at any moment).
    Gone,
}

fn attempt(dir: &Path) -> Result<Attempt, InstanceError> {
    match try_lock(dir) {
        Ok(Some(lock)) => Ok(Attempt::Locked(lock)),
        Ok(None) => Ok(Attempt::Held),
        Err(InstanceError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => {
            Ok(Attempt::Gone)
        }
        Err(error) => Err(error),
    }
}

fn try_lock(dir: &Path) -> Result<Option<InstanceLock>, InstanceError> {
    let io_error = |error| InstanceError::Io {
        dir: dir.to_path_buf(),
        error,
    };
    let file = File::open(dir).map_err(io_error)?;
    // flock(2), LOCK_EX | LOCK_NB.
    match file.try_lock() {
        Ok(()) => Ok(Some(InstanceLock { _dir: file })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(error)) => Err(io_error(error)),
    }
}

/// The pid holding a `flock` on `dir`, from `/proc/locks`; None if nobody does (or the
/// directory is gone).
pub fn holder(dir: &Path) -> Option<u32> {
    let meta = std::fs::metadata(dir).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// `/proc/locks` lines: `1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF` (device major and
/// minor in hex, inode in decimal).
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let wanted = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts with `1: ->`; only holders count.
        if fields.get(1) != Some(&"FLOCK") || fields.get(5) != Some(&wanted.as_str()) {
            return None;
        }
        // 0: the holder is in a pid namespace this process cannot see.
        fields.get(4)?.parse().ok().filter(|pid| *pid != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let dev = libc::makedev(0, 0x2a);
        let locks = "1: POSIX  ADVISORY  WRITE 11 00:2a:99 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 77 00:2a:1234 0 EOF\n";
        assert_eq!(holder_in(locks, dev, 1234), Some(4242));
        assert_eq!(holder_in(locks, dev, 99), None);
    }

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("ka-instance-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let first = InstanceLock::acquire(&dir).unwrap_or_else(|e| panic!("{e}"));
        let second = InstanceLock::acquire(&dir).err().map(|e| e.to_string());
        let expected = format!("(pid {})", std::process::id());
        assert!(
            second.as_deref().is_some_and(|e| e.contains(&expected)),
            "{second:?}"
        );
        drop(first);
        assert!(InstanceLock::acquire(&dir).is_ok());
        let _ignored = std::fs::remove_dir(&dir);
    }

    #[test]
    fn a_directory_already_removed_means_the_holder_stopped() {
        // The wait loop takes the same step each round: a stopping agent may remove its
        // directory between `holder` and any attempt to lock it.
        let dir = std::env::temp_dir().join(format!("ka-instance-gone-{}", std::process::id()));
        let replaced = InstanceLock::replace(&dir, libc::SIGTERM, Duration::from_secs(1));
        assert!(
            matches!(replaced, Ok((None, None))),
            "{:?}",
            replaced.map(|(lock, pid)| (lock.is_some(), pid))
        );
    }
}
