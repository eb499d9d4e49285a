//! Pods through the CRI (Kubernetes' Container Runtime Interface, `runtime.v1`), which
//! containerd's CRI plugin serves on containerd's own socket: each ready pod sandbox with the
//! pod's labels and annotations (the kubelet puts them on the sandbox, not on the app
//! containers), at the pod's cgroup, the parent of the sandbox's.
//!
//! A rule by pod labels reaches the pod cgroup, so it covers every container of the pod,
//! including those that start after the sandbox: the kubelet makes the sandbox first.

use std::collections::BTreeMap;

use containerd_client::tonic::{Code, transport::Channel};
use k8s_cri::v1::{
    ListPodSandboxRequest, PodSandboxFilter, PodSandboxState, PodSandboxStateValue,
    PodSandboxStatusRequest, runtime_service_client::RuntimeServiceClient,
};
use serde::Deserialize;
use tracing::debug;

use super::{Container, EngineError, Kind, cgroup_of};
use crate::policy::CgroupPath;

/// What the verbose sandbox status says in its `info` entry (containerd, CRI-O): the sandbox
/// process.
#[derive(Deserialize)]
struct SandboxInfo {
    pid: i64,
}

/// The ready pods the runtime at `channel` serves through the CRI, each at its pod cgroup;
/// None when the runtime serves no CRI (containerd with its CRI plugin disabled).
pub(super) async fn pods(
    channel: &Channel,
    engine: &str,
) -> Result<Option<Vec<Container>>, EngineError> {
    let mut client = RuntimeServiceClient::new(channel.clone());
    let request = ListPodSandboxRequest {
        filter: Some(PodSandboxFilter {
            state: Some(PodSandboxStateValue {
                state: PodSandboxState::SandboxReady.into(),
            }),
            ..PodSandboxFilter::default()
        }),
    };
    let sandboxes = match client.list_pod_sandbox(request).await {
        Ok(response) => response.into_inner().items,
        Err(status) if status.code() == Code::Unimplemented => return Ok(None),
        Err(status) => return Err(status.into()),
    };
    let mut pods = Vec::with_capacity(sandboxes.len());
    for sandbox in sandboxes {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.id.clone(),
            verbose: true,
        };
        let info = match client.pod_sandbox_status(request).await {
            Ok(response) => response.into_inner().info,
            // Gone since the list.
            Err(status) if status.code() == Code::NotFound => continue,
            Err(status) => return Err(status.into()),
        };
        let metadata = sandbox.metadata.unwrap_or_default();
        let Some(sandbox_cgroup) = info
            .get("info")
            .and_then(|info| serde_json::from_str::<SandboxInfo>(info).ok())
            .and_then(|info| cgroup_of(info.pid))
        else {
            continue;
        };
        let Some(cgroup) = pod_cgroup(&sandbox_cgroup, &metadata.uid) else {
            debug!(
                pod = format!("{}/{}", metadata.namespace, metadata.name),
                cgroup = %sandbox_cgroup,
                "the pod's sandbox is not in a cgroup of its pod (no cgroup parent named after \
                 the pod's uid, as the kubelet gives): rules by pod labels skip it"
            );
            continue;
        };
        pods.push(Container {
            engine: engine.to_string(),
            kind: Kind::Pod,
            id: sandbox.id,
            name: format!("{}/{}", metadata.namespace, metadata.name),
            labels: sandbox.labels.into_iter().collect(),
            annotations: sandbox.annotations.into_iter().collect::<BTreeMap<_, _>>(),
            cgroup,
        });
    }
    Ok(Some(pods))
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
