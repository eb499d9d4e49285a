//! Private places for an agent binary under test: its own bpffs mount and state directory, so
//! it never touches the host's /sys/fs/bpf, and nothing stays mounted or pinned afterwards.

use std::path::{Path, PathBuf};

use keepalive_agent::bpffs::PinDir;

use crate::{cleanup_failed, unique_name};

/// A directory for one agent: `bpffs/` (the agent mounts bpffs there) and `state/`.
#[derive(Debug)]
pub struct AgentPlaces {
    root: PathBuf,
}

impl AgentPlaces {
    #[expect(
        clippy::new_without_default,
        reason = "creating directories is not a default value"
    )]
    pub fn new() -> Self {
        let root = std::env::temp_dir().join(unique_name());
        std::fs::create_dir_all(root.join("bpffs"))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
        Self { root }
    }

    pub fn bpffs(&self) -> PathBuf {
        self.root.join("bpffs")
    }

    /// Mounts a bpffs of its own at [`Self::bpffs`], as systemd does at /sys/fs/bpf on a host,
    /// for an agent that only sees it through a bind mount (a container). An agent run on the
    /// host mounts it itself when missing. Unmounted on drop.
    pub fn mount_bpffs(&self) {
        let bpffs = self.bpffs();
        PinDir::prepare(&bpffs)
            .unwrap_or_else(|e| panic!("cannot mount bpffs at {}: {e}", bpffs.display()));
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// `--bpffs DIR --state-dir DIR`, for every agent subcommand that takes them.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--bpffs".into(),
            self.bpffs().display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
        ]
    }
}

impl AgentPlaces {
    /// Starts `agent run ARGS --bpffs ... --state-dir ... --metrics-addr 127.0.0.1:0` as a
    /// daemon (log on stderr); `args` starts with `run`.
    pub fn spawn(&self, agent: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> crate::Workload {
        self.spawn_with_env(agent, args, &[])
    }

    /// [`Self::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        &self,
        agent: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> crate::Workload {
        let places = self.run_args();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(places.iter().map(String::as_str));
        crate::Workload::spawn_daemon_with_env(agent, &all, env)
    }

    /// [`Self::args`] plus a metrics endpoint on a free loopback port (tests run agents side by
    /// side; the default port would clash).
    pub fn run_args(&self) -> Vec<String> {
        let mut args = self.args();
        args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
        args
    }

    /// Runs `agent ARGS --bpffs ... --state-dir ...` to completion.
    pub fn command(
        &self,
        agent: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> std::process::Output {
        std::process::Command::new(agent)
            .args(args)
            .args(self.args())
            .output()
            .unwrap_or_else(|e| panic!("cannot run the agent: {e}"))
    }
}

impl Drop for AgentPlaces {
    fn drop(&mut self) {
        if let Err(error) = remove(&self.root) {
            cleanup_failed(&format!("{}: {error}", self.root.display()));
        }
    }
}

/// Removes the agent's pins (detaching links a killed agent left), unmounts its bpffs and
/// deletes the directory.
pub(crate) fn remove(root: &Path) -> std::io::Result<()> {
    let bpffs = root.join("bpffs");
    let _ignored = PinDir::at(&bpffs).remove();
    // Failure (not mounted) is fine.
    let _ignored = rustix::mount::unmount(&bpffs, rustix::mount::UnmountFlags::DETACH);
    std::fs::remove_dir_all(root)
}
