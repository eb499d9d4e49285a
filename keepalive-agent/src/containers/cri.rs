//! Pods through the CRI (Kubernetes' Container Runtime Interface, `runtime.v1`), which
//! containerd's CRI plugin serves on containerd's own socket: each ready pod sandbox with the
//! pod's labels and annotations (the kubelet puts them on the sandbox, not on the app
//! containers), at the pod's cgroup, the parent of the sandbox's.
//!
//! A rule by pod labels reaches the pod cgroup, so it covers every container of the pod,
//! including those that start after the sandbox: the kubelet makes the sandbox first.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::Duration,
};

use containerd_client::tonic::{Code, Status, transport::Channel};
use k8s_cri::v1::{
    ContainerFilter, ContainerState, ContainerStateValue, ContainerStatusRequest, GetEventsRequest,
    ListContainersRequest, ListPodSandboxRequest, PodSandboxFilter, PodSandboxState,
    PodSandboxStateValue, PodSandboxStatusRequest, runtime_service_client::RuntimeServiceClient,
};
use serde::Deserialize;
use tracing::{debug, info};

use super::{Container, Ended, EngineError, Kind, Sink, cgroup_of, connected};
use crate::policy::CgroupPath;

/// The engine name of a runtime followed through the CRI only (CRI-O).
pub(super) const CRI_ONLY: &str = "cri-o";
/// How often a runtime without the CRI's event stream is listed again.
const POLL: Duration = Duration::from_secs(1);

/// What a verbose status says in its `info` entry (containerd, CRI-O): the process.
#[derive(Deserialize)]
struct Info {
    pid: i64,
}

/// A runtime's CRI, with the cgroup of each sandbox and container it has seen (a status per
/// new one only: a list is then two calls, whatever the runtime holds).
pub(super) struct Cri {
    client: RuntimeServiceClient<Channel>,
    engine: &'static str,
    /// Pods' cgroups by sandbox id; None: not in a cgroup of its own (skipped).
    pods: HashMap<String, Option<CgroupPath>>,
    /// Containers' cgroups by id; None: without a process (skipped).
    containers: HashMap<String, Option<CgroupPath>>,
}

impl Cri {
    pub(super) fn new(channel: &Channel, engine: &'static str) -> Self {
        Self {
            client: RuntimeServiceClient::new(channel.clone()),
            engine,
            pods: HashMap::new(),
            containers: HashMap::new(),
        }
    }

    /// The ready pods, each at its pod cgroup; None when the runtime serves no CRI (containerd
    /// with its CRI plugin disabled).
    pub(super) async fn pods(&mut self) -> Result<Option<Vec<Container>>, EngineError> {
        let request = ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                state: Some(PodSandboxStateValue {
                    state: PodSandboxState::SandboxReady.into(),
                }),
                ..PodSandboxFilter::default()
            }),
        };
        let sandboxes = match self.client.list_pod_sandbox(request).await {
            Ok(response) => response.into_inner().items,
            Err(status) if status.code() == Code::Unimplemented => return Ok(None),
            Err(status) => return Err(status.into()),
        };
        let mut pods = Vec::with_capacity(sandboxes.len());
        let mut seen = HashMap::with_capacity(sandboxes.len());
        for sandbox in sandboxes {
            let metadata = sandbox.metadata.unwrap_or_default();
            let name = format!("{}/{}", metadata.namespace, metadata.name);
            let cgroup = match self.pods.get(&sandbox.id) {
                Some(known) => known.clone(),
                None => {
                    let request = PodSandboxStatusRequest {
                        pod_sandbox_id: sandbox.id.clone(),
                        verbose: true,
                    };
                    let answer = self.client.pod_sandbox_status(request).await;
                    let Some(sandbox_cgroup) = process_cgroup(answer.map(|r| r.into_inner().info))?
                    else {
                        continue;
                    };
                    let cgroup = pod_cgroup(&sandbox_cgroup, &metadata.uid);
                    if cgroup.is_none() {
                        debug!(
                            pod = name,
                            cgroup = %sandbox_cgroup,
                            "the pod's sandbox is not in a cgroup of its pod (no cgroup parent \
                             named after the pod's uid, as the kubelet gives): rules by pod \
                             labels skip it"
                        );
                    }
                    cgroup
                }
            };
            seen.insert(sandbox.id.clone(), cgroup.clone());
            if let Some(cgroup) = cgroup {
                pods.push(Container {
                    engine: self.engine.to_string(),
                    kind: Kind::Pod,
                    id: sandbox.id,
                    name,
                    labels: sandbox.labels.into_iter().collect(),
                    annotations: sandbox.annotations.into_iter().collect::<BTreeMap<_, _>>(),
                    cgroup,
                });
            }
        }
        self.pods = seen;
        Ok(Some(pods))
    }

    /// The running containers (a runtime followed through the CRI only), each at the cgroup of
    /// its process.
    async fn containers(&mut self) -> Result<Vec<Container>, EngineError> {
        let request = ListContainersRequest {
            filter: Some(ContainerFilter {
                state: Some(ContainerStateValue {
                    state: ContainerState::ContainerRunning.into(),
                }),
                ..ContainerFilter::default()
            }),
        };
        let listed = self
            .client
            .list_containers(request)
            .await?
            .into_inner()
            .containers;
        let mut containers = Vec::with_capacity(listed.len());
        let mut seen = HashMap::with_capacity(listed.len());
        for container in listed {
            let cgroup = match self.containers.get(&container.id) {
                Some(known) => known.clone(),
                None => {
                    let request = ContainerStatusRequest {
                        container_id: container.id.clone(),
                        verbose: true,
                    };
                    let answer = self.client.container_status(request).await;
                    process_cgroup(answer.map(|r| r.into_inner().info))?
                }
            };
            seen.insert(container.id.clone(), cgroup.clone());
            if let Some(cgroup) = cgroup {
                let name = container
                    .metadata
                    .map_or_else(|| container.id.clone(), |metadata| metadata.name);
                containers.push(Container::new(
                    self.engine,
                    container.id,
                    name,
                    container.labels.into_iter().collect(),
                    cgroup,
                ));
            }
        }
        self.containers = seen;
        Ok(containers)
    }
}

/// The cgroup of the process a verbose status names; None when it is gone (NotFound) or names
/// none.
fn process_cgroup(
    answer: Result<HashMap<String, String>, Status>,
) -> Result<Option<CgroupPath>, EngineError> {
    let info = match answer {
        Ok(info) => info,
        Err(status) if status.code() == Code::NotFound => return Ok(None),
        Err(status) => return Err(status.into()),
    };
    Ok(info
        .get("info")
        .and_then(|info| serde_json::from_str::<Info>(info).ok())
        .and_then(|info| cgroup_of(info.pid)))
}

/// One connection to a runtime followed through the CRI only (CRI-O): its pods and containers,
/// listed again on each event of the CRI's event stream, or every [`POLL`] where the runtime
/// has none (it is then the only way to learn of changes: two calls a second).
pub(super) async fn session(socket: std::path::PathBuf, sink: Sink) -> Ended {
    let mut up = false;
    let result = follow_cri(&socket, &sink, &mut up).await;
    Ended::from(up, result)
}

async fn follow_cri(socket: &Path, sink: &Sink, up: &mut bool) -> Result<(), EngineError> {
    let channel = containerd_client::connect(socket).await?;
    let mut cri = Cri::new(&channel, CRI_ONLY);
    let all = list_all(&mut cri).await?;
    connected(CRI_ONLY, socket, all.len());
    *up = true;
    sink.set(CRI_ONLY, all);
    let mut client = RuntimeServiceClient::new(channel);
    match client.get_container_events(GetEventsRequest {}).await {
        Ok(events) => {
            let mut events = events.into_inner();
            while events.message().await?.is_some() {
                sink.set(CRI_ONLY, list_all(&mut cri).await?);
            }
            Err(EngineError::Ended)
        }
        Err(status) if status.code() == Code::Unimplemented => {
            info!(engine = CRI_ONLY, socket = %socket.display(), period = ?POLL, "the runtime has no CRI event stream; listing it periodically");
            loop {
                tokio::time::sleep(POLL).await;
                sink.set(CRI_ONLY, list_all(&mut cri).await?);
            }
        }
        Err(status) => Err(status.into()),
    }
}

/// Pods and containers; a runtime without the CRI is an error here.
async fn list_all(cri: &mut Cri) -> Result<Vec<Container>, EngineError> {
    let mut all = cri
        .pods()
        .await?
        .ok_or_else(|| EngineError::Grpc(Status::unimplemented("the socket serves no CRI")))?;
    all.extend(cri.containers().await?);
    Ok(all)
}

/// The pods and containers of a runtime followed through the CRI only, listed once (`scan`).
pub(super) async fn list_once(socket: &Path) -> Result<Vec<Container>, EngineError> {
    let channel = containerd_client::connect(socket).await?;
    list_all(&mut Cri::new(&channel, CRI_ONLY)).await
}

/// The pod's cgroup: the parent of its sandbox's, when that parent is the pod's own (the
/// kubelet names it after the pod's uid: `pod<uid>` with the cgroupfs driver,
/// `kubepods-<class>-pod<uid with _>.slice` with systemd's). Without a cgroup parent of its
/// own the sandbox sits beside other pods' and its parent is theirs too: None.
pub fn pod_cgroup(sandbox: &CgroupPath, uid: &str) -> Option<CgroupPath> {
    if uid.is_empty() {
        return None;
    }
    let (parent, _) = sandbox.as_str().rsplit_once('/')?;
    let name = parent.rsplit('/').next()?;
    let named = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))]
        .iter()
        .any(|pod| name == pod || name.ends_with(&format!("-{pod}.slice")));
    named.then(|| CgroupPath::parse(parent).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> CgroupPath {
        CgroupPath::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_pod_cgroup_is_the_sandbox_parent_named_after_the_pod() {
        let uid = "0b7d6c1e-95a3-4e2a-8a35-1f2d9c0e7a41";
        assert_eq!(
            pod_cgroup(&path(&format!("/kubepods/burstable/pod{uid}/abc123")), uid),
            Some(path(&format!("/kubepods/burstable/pod{uid}")))
        );
        let slice = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
        assert_eq!(
            pod_cgroup(
                &path(&format!(
                    "/kubepods.slice/kubepods-besteffort.slice/{slice}/cri-containerd-abc.scope"
                )),
                uid
            ),
            Some(path(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/{slice}"
            )))
        );
    }

    #[test]
    fn a_shared_parent_is_not_a_pod_cgroup() {
        let uid = "0b7d6c1e-95a3-4e2a-8a35-1f2d9c0e7a41";
        assert_eq!(pod_cgroup(&path("/k8s.io/abc123"), uid), None);
        assert_eq!(pod_cgroup(&path("/kubepods/podother/abc"), uid), None);
        assert_eq!(pod_cgroup(&path("/abc123"), uid), None);
        assert_eq!(pod_cgroup(&path("/kubepods/pod/abc"), ""), None);
    }
}
