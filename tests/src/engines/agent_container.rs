//! The agent's own image run as a container by an engine, the way the DaemonSet runs it: its
//! `docker run` arguments, and the host bpffs directory it pins in.

use std::path::{Path, PathBuf};

use super::Engine;
use crate::{AgentPlaces, unique_name};

/// A directory in the host's bpffs for an agent running as a container (it pins there); the
/// pins and the directory are removed on drop.
#[derive(Debug)]
pub struct HostPins(PathBuf);

impl HostPins {
    #[expect(
        clippy::new_without_default,
        reason = "creating a directory is not a default value"
    )]
    pub fn new() -> Self {
        let dir = PathBuf::from("/sys/fs/bpf").join(unique_name());
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create {} (bpffs at /sys/fs/bpf?): {e}",
                dir.display()
            )
        });
        Self(dir)
    }
}

impl Drop for HostPins {
    fn drop(&mut self) {
        let _ignored = keepalive_agent::bpffs::PinDir::at(&self.0).remove();
        let _ignored = std::fs::remove_dir(&self.0);
    }
}

/// `docker run` arguments for the agent's image as the DaemonSet runs it (the test
/// `the_agent_image_as_a_container_enforces_by_labels`): the policy file `config`, the
/// engine's socket, the host's bpffs and cgroups, `places`' state directory, pins in `pins`.
pub fn agent_container_args(
    docker: &Engine,
    places: &AgentPlaces,
    config: &Path,
    pins: &HostPins,
) -> Vec<String> {
    let mounts = [
        format!("{}:/etc/keepalive-agent/policy.toml:ro", config.display()),
        format!("{}:/run/docker.sock", docker.socket().display()),
        "/sys/fs/bpf:/sys/fs/bpf".to_string(),
        "/sys/fs/cgroup:/sys/fs/cgroup".to_string(),
        format!("{}:/run/keepalive-agent", places.state_dir().display()),
    ];
    let mut args: Vec<String> = [
        "--detach",
        "--name",
        "keepalive-agent",
        "--pid=host",
        "--cgroupns=host",
        "--network=none",
        "--cap-add=ALL",
        "--cap-drop=SYS_RESOURCE",
        "--security-opt=seccomp=unconfined",
        "--security-opt=apparmor=unconfined",
    ]
    .map(String::from)
    .to_vec();
    for mount in &mounts {
        args.extend(["--volume".to_string(), mount.clone()]);
    }
    args.extend([
        crate::image::reference(),
        "run".into(),
        "--config".into(),
        "/etc/keepalive-agent/policy.toml".into(),
        "--bpffs".into(),
        pins.0.display().to_string(),
        "--no-metrics".into(),
    ]);
    args
}
