//! Containers, in one place: the engines that report them, the inventory `run` follows, the list
//! `scan` and `explain` ask once ([`listed`]), and the resolution of rules that select
//! containers to their cgroups ([`resolve`]).
//!
//! The engines: the Docker Engine API (Docker, and podman's compatible service) through
//! bollard, containerd's API (namespace `k8s.io`, where kubelet's CRI plugin puts pods)
//! through containerd-client with the pods of its CRI plugin, and a runtime that serves only
//! the CRI (CRI-O) through the same CRI client ([`cri`]). Each engine is followed live: its
//! event stream, and on each event the engine's list again (cheap, and nothing is missed if an
//! event is). Each container maps to the cgroup of its init process (/proc/PID/cgroup: the
//! agent needs the host's PID and cgroup namespaces), each pod to its pod's cgroup. An engine
//! without a socket gives no containers; one that goes away is retried with back-off, logged
//! once.

mod containerd;
pub mod cri;
mod docker;
pub mod listed;
pub mod resolve;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::{debug, info, warn};

pub use self::{
    listed::{ContainerInfo, Containers, Listed, ask_once},
    resolve::{log_changes, refused_annotations, resolve},
};
use crate::policy::{CgroupPath, Policy};

/// A container as an engine reports it, or a pod as the CRI does.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Container {
    /// `docker`, `podman`, `containerd`.
    pub engine: String,
    pub kind: Kind,
    /// A pod: its sandbox's id.
    pub id: String,
    /// Docker and podman: its name; containerd: the `io.kubernetes.container.name` label,
    /// else its id; a pod: `namespace/name`.
    pub name: String,
    /// A pod: the pod's labels (and the kubelet's `io.kubernetes.pod.*`).
    pub labels: BTreeMap<String, String>,
    /// A pod's annotations; a container's are not read (empty).
    pub annotations: BTreeMap<String, String>,
    /// Where its processes are, as /proc/PID/cgroup shows it; a pod: the pod's cgroup, parent
    /// of its containers'.
    pub cgroup: CgroupPath,
}

/// What an engine reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// An application's container (never a pod's sandbox).
    Container,
    /// A Kubernetes pod, through the CRI.
    Pod,
}

impl Container {
    /// A container of `engine`, with no annotations.
    pub fn new(
        engine: &str,
        id: String,
        name: String,
        labels: BTreeMap<String, String>,
        cgroup: CgroupPath,
    ) -> Self {
        Self {
            engine: engine.to_string(),
            kind: Kind::Container,
            id,
            name,
            labels,
            annotations: BTreeMap::new(),
            cgroup,
        }
    }
}

/// Where the engines listen.
#[derive(Debug, Clone)]
pub struct Sockets {
    /// The Docker Engine API's socket.
    pub docker: PathBuf,
    /// podman's Docker-compatible API socket.
    pub podman: PathBuf,
    /// containerd's API socket, and the namespace whose containers are followed.
    pub containerd: PathBuf,
    pub containerd_namespace: String,
    /// A runtime followed through the CRI alone (CRI-O).
    pub crio: PathBuf,
}

/// An engine reported containers that started, stopped or changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub engine: &'static str,
}

/// Where [`Changed`] goes: called from the engines' tasks.
pub type OnChange = Arc<dyn Fn(Changed) + Send + Sync>;

/// The containers every engine reports now, shared by the engines' tasks and the agent.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    engines: Arc<Mutex<BTreeMap<String, Vec<Container>>>>,
}

impl Inventory {
    /// Every container known now, sorted.
    pub fn all(&self) -> Vec<Container> {
        let Ok(engines) = self.engines.lock() else {
            return Vec::new();
        };
        let mut all: Vec<Container> = engines.values().flatten().cloned().collect();
        all.sort();
        all
    }

    /// `policy` with its rules that select containers resolved against the containers known
    /// now ([`resolve()`]).
    pub fn resolve(&self, policy: &Policy) -> Policy {
        if policy.selects_containers() {
            resolve(policy, &self.all())
        } else {
            policy.clone()
        }
    }

    /// Replaces what `engine` reports; whether anything changed.
    fn set(&self, engine: &str, mut containers: Vec<Container>) -> bool {
        containers.sort();
        let Ok(mut engines) = self.engines.lock() else {
            return false;
        };
        if engines.get(engine) == Some(&containers)
            || (containers.is_empty() && !engines.contains_key(engine))
        {
            return false;
        }
        engines.insert(engine.to_string(), containers);
        true
    }
}

/// Where an engine's containers go: the inventory, and a [`Changed`] when they changed.
#[derive(Clone)]
struct Sink {
    inventory: Inventory,
    on_change: OnChange,
}

impl Sink {
    fn set(&self, engine: &'static str, containers: Vec<Container>) {
        if self.inventory.set(engine, containers) {
            (self.on_change)(Changed { engine });
        }
    }
}

/// Why a session with an engine ended.
#[derive(Debug, thiserror::Error)]
enum EngineError {
    #[error("{0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("{0}")]
    Transport(#[from] containerd_client::tonic::transport::Error),
    #[error("{0}")]
    Grpc(#[from] containerd_client::tonic::Status),
    #[error("the event stream ended")]
    Ended,
}

const BACK_OFF_FIRST: Duration = Duration::from_millis(250);
const BACK_OFF_MAX: Duration = Duration::from_secs(10);

/// Follows every engine, each on a task of its own, until the runtime stops.
pub fn spawn(sockets: &Sockets, inventory: &Inventory, on_change: OnChange) {
    let sink = Sink {
        inventory: inventory.clone(),
        on_change,
    };
    for (engine, socket) in [
        ("docker", sockets.docker.clone()),
        ("podman", sockets.podman.clone()),
    ] {
        let sink = sink.clone();
        tokio::spawn(follow(engine, socket.clone(), move || {
            docker::session(engine, socket.clone(), sink.clone())
        }));
    }
    let (socket, namespace) = (
        sockets.containerd.clone(),
        sockets.containerd_namespace.clone(),
    );
    let containerd_sink = sink.clone();
    tokio::spawn(follow("containerd", socket.clone(), move || {
        containerd::session(socket.clone(), namespace.clone(), containerd_sink.clone())
    }));
    let socket = sockets.crio.clone();
    tokio::spawn(follow(cri::CRI_ONLY, socket.clone(), move || {
        cri::session(socket.clone(), sink.clone())
    }));
}

/// Every engine's running containers, asked once (for `scan`): an engine without a socket
/// gives none; one that fails or does not answer within `LIST_ONCE_TIMEOUT` is named in the
/// returned notes and gives none.
pub async fn list_once(sockets: &Sockets) -> (Vec<Container>, Vec<String>) {
    let mut all = Vec::new();
    let mut notes = Vec::new();
    let mut keep =
        |engine: &str,
         socket: &Path,
         listed: Result<Result<Vec<Container>, EngineError>, tokio::time::error::Elapsed>| {
            match listed {
                Ok(Ok(containers)) => all.extend(containers),
                Ok(Err(error)) => notes.push(format!("{engine} at {}: {error}", socket.display())),
                Err(_) => notes.push(format!(
                    "{engine} at {}: no answer within {LIST_ONCE_TIMEOUT:?}",
                    socket.display()
                )),
            }
        };
    for (engine, socket) in [("docker", &sockets.docker), ("podman", &sockets.podman)] {
        if socket.exists() {
            let listed =
                tokio::time::timeout(LIST_ONCE_TIMEOUT, docker::list_once(engine, socket)).await;
            keep(engine, socket, listed);
        }
    }
    let socket = &sockets.containerd;
    if socket.exists() {
        let listed = tokio::time::timeout(
            LIST_ONCE_TIMEOUT,
            containerd::list_once(socket, &sockets.containerd_namespace),
        )
        .await;
        keep("containerd", socket, listed);
    }
    let socket = &sockets.crio;
    if socket.exists() {
        let listed = tokio::time::timeout(LIST_ONCE_TIMEOUT, cri::list_once(socket)).await;
        keep(cri::CRI_ONLY, socket, listed);
    }
    all.sort();
    (all, notes)
}

/// How long `list_once` waits for one engine.
const LIST_ONCE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a session with an engine ended.
#[derive(Debug)]
struct Ended {
    /// It was up (listed the containers) before it ended.
    connected: bool,
    error: Option<EngineError>,
}

impl Ended {
    fn from(connected: bool, result: Result<(), EngineError>) -> Self {
        Self {
            connected,
            error: Some(result.err().unwrap_or(EngineError::Ended)),
        }
    }
}

/// Runs sessions with one engine forever: waits for its socket, reconnects with back-off,
/// logs each change of its state once. What it reported stays until it is back (containers
/// outlive a restarting engine; those that end take their cgroups with them).
async fn follow<F, S>(engine: &'static str, socket: PathBuf, session: S)
where
    S: Fn() -> F,
    F: Future<Output = Ended>,
{
    let mut back_off = BACK_OFF_FIRST;
    // What was logged since the last connection (or the start): the socket absent (true), or
    // the engine lost or unreachable (false); each is logged once.
    let mut said: Option<bool> = None;
    loop {
        let ended = if socket.exists() {
            session().await
        } else {
            Ended {
                connected: false,
                error: None,
            }
        };
        if ended.connected {
            said = None;
            back_off = BACK_OFF_FIRST;
        }
        let absent = ended.error.is_none();
        if said != Some(absent) {
            if let Some(error) = &ended.error {
                warn!(engine, socket = %socket.display(), %error, "lost the container engine, or cannot reach it; reconnecting with back-off");
            } else {
                debug!(engine, socket = %socket.display(), "no container engine at this socket (yet); looking again with back-off");
            }
            said = Some(absent);
        }
        tokio::time::sleep(back_off).await;
        back_off = (back_off * 2).min(BACK_OFF_MAX);
    }
}

/// Logs that a session is up (once per session).
fn connected(engine: &str, socket: &Path, containers: usize) {
    info!(engine, socket = %socket.display(), containers, "following the container engine");
}

/// The cgroup v2 path of process `pid`, as /proc/PID/cgroup shows it.
fn cgroup_of(pid: i64) -> Option<CgroupPath> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|line| line.strip_prefix("0::"))?;
    CgroupPath::parse(path.trim()).ok()
}
