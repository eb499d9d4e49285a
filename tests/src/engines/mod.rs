//! Real container engines for the tests: dockerd, containerd and podman's API service, each
//! started by the test with its state, sockets and images in a temporary directory, and
//! stopped on drop with every container it ran. No registry is reachable: the image is a
//! rootfs of busybox-static (`sh`, `nc`, `sleep`), imported (Docker, podman) or used as a
//! rootfs directory (containerd's `ctr run --rootfs`).
//!
//! Platform notes (docs/operations.md, ../shared/notes/platform-facts.md): dockerd runs with
//! `--iptables=false --bridge=none` and the vfs storage driver, containers with
//! `--network none` (loopback only); podman with runc, the cgroupfs manager and lowered
//! ulimits.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use keepalive_agent::CgroupPath;

mod agent_container;
mod containers;
mod cri;
mod inspect;
mod setup;
mod sockets;

pub use agent_container::agent_container_args;
pub use cri::TestPod;
pub use inspect::{engine_options, expect_explain, expect_scan};
pub use setup::busybox_rootfs;
use setup::{
    absent_parents, engine_stopped, make_root, remove_empty_tree, spawn, stop, unmount_below,
};
pub use sockets::{connected_sockets, expect_idle};

use crate::{cleanup_failed, poll, wait_for};

/// How long a daemon may take to answer after it starts.
const START: Duration = Duration::from_secs(60);

/// The image every engine runs.
pub const IMAGE: &str = "localhost/ka-busybox:test";

/// What a container runs: a listener and a client connected to it over loopback, both
/// holding their sockets open (`sleep |` keeps their standard input open).
pub const SERVE_AND_CONNECT: &str =
    "sleep 100000 | nc -l -p 8000 & sleep 0.3; sleep 100000 | nc 127.0.0.1 8000 & wait";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Docker,
    Podman,
    Containerd,
}

/// One engine daemon and its state directory.
#[derive(Debug)]
pub struct Engine {
    kind: Kind,
    root: PathBuf,
    daemon: Child,
    containers: Vec<String>,
    /// Pod sandboxes it runs through the CRI.
    pods: Vec<String>,
    /// Cgroup directories the engine creates for its containers' parent, in every hierarchy
    /// (v1 controllers too), that did not exist before it started: removed on drop.
    new_parents: Vec<PathBuf>,
}

/// A container an engine runs.
#[derive(Debug, Clone)]
pub struct TestContainer {
    pub id: String,
    pub pid: u32,
    /// Its cgroup, as /proc/PID/cgroup shows it.
    pub cgroup: CgroupPath,
}

impl Engine {
    /// dockerd (it runs a containerd of its own under its exec root).
    pub fn docker() -> Self {
        let root = make_root();
        let arg = |name: &str| root.join(name).display().to_string();
        let daemon = spawn(
            Command::new("dockerd").args([
                "--data-root",
                &arg("data"),
                "--exec-root",
                &arg("exec"),
                "--pidfile",
                &arg("docker.pid"),
                "--host",
                &format!("unix://{}", arg("docker.sock")),
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--storage-driver=vfs",
                "--exec-opt",
                "native.cgroupdriver=cgroupfs",
            ]),
            &root,
        );
        let engine = Self::started(Kind::Docker, root, daemon);
        engine.import();
        engine
    }

    /// podman's Docker-compatible API service, with runc and the cgroupfs manager.
    pub fn podman() -> Self {
        let root = make_root();
        let conf = root.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\ntmp_dir = \"{}\"\n",
                root.join("tmp").display()
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
        let arg = |name: &str| root.join(name).display().to_string();
        let daemon = spawn(
            Command::new("podman").env("CONTAINERS_CONF", &conf).args([
                "--root",
                &arg("storage"),
                "--runroot",
                &arg("run"),
                "--storage-driver",
                "vfs",
                "system",
                "service",
                "--time",
                "0",
                &format!("unix://{}", arg("podman.sock")),
            ]),
            &root,
        );
        let engine = Self::started(Kind::Podman, root, daemon);
        engine.import();
        engine
    }

    /// A containerd of its own (CRI plugin off: the tests use namespace `k8s.io` directly,
    /// with the labels kubelet would give).
    pub fn containerd() -> Self {
        Self::containerd_with(|root| {
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\naddress = \"{0}/containerd.sock\"\n\
                 [ttrpc]\naddress = \"{0}/containerd.sock.ttrpc\"\n",
                root.display()
            )
        })
    }

    /// containerd with the configuration `config` gives for its state directory.
    fn containerd_with(config: impl Fn(&std::path::Path) -> String) -> Self {
        let root = make_root();
        let text = config(&root);
        let config = root.join("config.toml");
        std::fs::write(&config, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let daemon = spawn(
            Command::new("containerd").arg("--config").arg(&config),
            &root,
        );
        let engine = Self::started(Kind::Containerd, root, daemon);
        busybox_rootfs(&engine.root.join("rootfs"));
        engine
    }

    fn started(kind: Kind, root: PathBuf, daemon: Child) -> Self {
        let mut engine = Self {
            kind,
            root,
            daemon,
            containers: Vec::new(),
            pods: Vec::new(),
            new_parents: absent_parents(),
        };
        engine.wait_answering();
        engine
    }

    fn wait_answering(&mut self) {
        let kind = self.kind;
        wait_for(&format!("{kind:?} to answer"), START, || {
            if let Ok(Some(status)) = self.daemon.try_wait() {
                panic!(
                    "{kind:?} exited at start ({status}); its log: {}",
                    self.log()
                );
            }
            self.cli(&["version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(std::process::ExitStatus::success)
        });
    }

    /// Stops containerd and starts it again on the same state (the containers' shims keep
    /// running): an engine restart, as the agent sees it.
    pub fn restart_containerd(&mut self) {
        assert_eq!(
            self.kind,
            Kind::Containerd,
            "only containerd restarts in place"
        );
        stop(&mut self.daemon);
        self.daemon = spawn(
            Command::new("containerd")
                .arg("--config")
                .arg(self.root.join("config.toml")),
            &self.root,
        );
        self.wait_answering();
    }

    /// The socket the agent follows it on.
    pub fn socket(&self) -> PathBuf {
        self.root.join(match self.kind {
            Kind::Docker => "docker.sock",
            Kind::Podman => "podman.sock",
            Kind::Containerd => "containerd.sock",
        })
    }

    /// The agent's option naming this engine's socket.
    pub fn socket_option(&self) -> [String; 2] {
        let option = match self.kind {
            Kind::Docker => "--docker-socket",
            Kind::Podman => "--podman-socket",
            Kind::Containerd => "--containerd-socket",
        };
        [option.to_string(), self.socket().display().to_string()]
    }

    /// The engine's command-line client, talking to this daemon.
    pub fn cli(&self, args: &[&str]) -> Command {
        let socket = self.socket().display().to_string();
        let mut command = match self.kind {
            Kind::Docker => {
                let mut command = Command::new("docker");
                command.args(["--host", &format!("unix://{socket}")]);
                command
            }
            Kind::Podman => {
                let mut command = Command::new("podman");
                command.args(["--remote", "--url", &format!("unix://{socket}")]);
                command
            }
            Kind::Containerd => {
                let mut command = Command::new("ctr");
                command.args(["--address", &socket, "--namespace", "k8s.io"]);
                command
            }
        };
        command.args(args);
        command
    }

    /// Runs the client to success; its standard output.
    pub fn run_cli(&self, args: &[&str]) -> String {
        let out = self
            .cli(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run the {:?} client: {e}", self.kind));
        assert!(
            out.status.success(),
            "{:?} {args:?}: {}\n{}",
            self.kind,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn import(&self) {
        let rootfs = self.root.join("rootfs");
        busybox_rootfs(&rootfs);
        let tar = self.root.join("rootfs.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap_or_else(|e| panic!("cannot run tar: {e}"));
        assert!(status.success(), "tar of the busybox rootfs failed");
        self.run_cli(&["import", &tar.display().to_string(), IMAGE]);
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for sandbox in std::mem::take(&mut self.pods) {
            self.remove_pod_quietly(&sandbox);
        }
        for id in std::mem::take(&mut self.containers) {
            self.remove_quietly(&id);
        }
        if matches!(self.kind, Kind::Docker | Kind::Podman) {
            let _ignored = self
                .cli(&["rmi", "--force", IMAGE])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        stop(&mut self.daemon);
        engine_stopped();
        unmount_below(&self.root);
        for parent in &self.new_parents {
            // Gone already, or still used by containers of another engine: left alone.
            let _ignored = poll(Duration::from_secs(5), || {
                remove_empty_tree(parent);
                (!parent.exists()).then_some(())
            });
        }
        if let Err(error) = std::fs::remove_dir_all(&self.root) {
            cleanup_failed(&format!("{}: {error}", self.root.display()));
        }
    }
}
