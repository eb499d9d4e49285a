//! The agent's own image run as a container by an engine, the way the DaemonSet runs it: its
//! `docker run` arguments.

use std::path::Path;

use super::Engine;
use crate::AgentPlaces;

/// `docker run` arguments for the agent's image as the DaemonSet runs it (the test
/// `the_agent_image_as_a_container_enforces_by_labels`): the policy file `config`, the
/// engine's socket, the host's cgroups, and `places`' state directory and bpffs as the
/// container's /sys/fs/bpf (what systemd mounts at /sys/fs/bpf on a host; the test mounts its
/// own, see [`AgentPlaces::mount_bpffs`], so it needs nothing mounted on the machine).
pub fn agent_container_args(docker: &Engine, places: &AgentPlaces, config: &Path) -> Vec<String> {
    let mounts = [
        format!("{}:/etc/keepalive-agent/policy.toml:ro", config.display()),
        format!("{}:/run/docker.sock", docker.socket().display()),
        format!("{}:/sys/fs/bpf", places.bpffs().display()),
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
        "/sys/fs/bpf".into(),
        "--no-metrics".into(),
    ]);
    args
}
