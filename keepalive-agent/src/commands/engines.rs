//! Where the container engines listen, as `run`, `scan` and `explain` take it.

use std::path::PathBuf;

use clap::Args;

/// Where the engines listen.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Docker Engine API socket, for rules with `labels` or `container`. A missing socket is
    /// fine: no containers from it, and it is looked for again.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/docker.sock",
        env = "KEEPALIVE_AGENT_DOCKER_SOCKET"
    )]
    pub docker_socket: PathBuf,

    /// podman's Docker-compatible API socket (`podman system service`).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/podman/podman.sock",
        env = "KEEPALIVE_AGENT_PODMAN_SOCKET"
    )]
    pub podman_socket: PathBuf,

    /// containerd's API socket; its containers in --containerd-namespace are followed, and the
    /// pods its CRI plugin serves there.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/containerd/containerd.sock",
        env = "KEEPALIVE_AGENT_CONTAINERD_SOCKET"
    )]
    pub containerd_socket: PathBuf,

    /// containerd namespace to follow (`k8s.io`: Kubernetes' CRI plugin).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "k8s.io",
        env = "KEEPALIVE_AGENT_CONTAINERD_NAMESPACE"
    )]
    pub containerd_namespace: String,

    /// A runtime followed through the CRI alone (CRI-O): its pods and containers.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/crio/crio.sock",
        env = "KEEPALIVE_AGENT_CRIO_SOCKET"
    )]
    pub crio_socket: PathBuf,
}

impl EngineArgs {
    /// The sockets as [`crate::containers`] takes them.
    pub fn sockets(&self) -> crate::containers::Sockets {
        crate::containers::Sockets {
            docker: self.docker_socket.clone(),
            podman: self.podman_socket.clone(),
            containerd: self.containerd_socket.clone(),
            containerd_namespace: self.containerd_namespace.clone(),
            crio: self.crio_socket.clone(),
        }
    }
}
