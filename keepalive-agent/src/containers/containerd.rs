//! containerd's API through containerd-client: the containers of one namespace (`k8s.io` for
//! Kubernetes) with a running task.

use std::path::PathBuf;

use containerd_client::{
    services::v1::{
        ListContainersRequest, ListTasksRequest, SubscribeRequest,
        containers_client::ContainersClient, events_client::EventsClient,
        tasks_client::TasksClient,
    },
    tonic::{Request, transport::Channel},
    with_namespace,
};

use super::{Container, Ended, EngineError, Sink, cgroup_of, connected, cri};

const ENGINE: &str = "containerd";
/// Kubernetes names the container in this label (CRI).
const NAME_LABEL: &str = "io.kubernetes.container.name";
/// `Status::Running` of containerd's task types.
const RUNNING: i32 = 2;
/// The CRI plugin marks each container `sandbox` (a pod's pause container, which carries the
/// pod's labels) or `container` (an application's).
const KIND_LABEL: &str = "io.cri-containerd.kind";

/// One connection: subscribe to the namespace's events, list, then list again on each
/// container or task event. The list holds the pods the CRI plugin serves on the same socket
/// ([`cri::Cri::pods`]), the plugin's sandboxes not as containers: their labels are the pod's.
pub(super) async fn session(socket: PathBuf, namespace: String, sink: Sink) -> Ended {
    let mut up = false;
    let result = run(&socket, &namespace, &sink, &mut up).await;
    Ended::from(up, result)
}

async fn run(
    socket: &std::path::Path,
    namespace: &str,
    sink: &Sink,
    up: &mut bool,
) -> Result<(), EngineError> {
    let channel = containerd_client::connect(socket).await?;
    let request = SubscribeRequest {
        filters: vec![format!("namespace=={namespace}")],
    };
    // containerd answers a subscription with its first event: subscribe on a task of its
    // own, list meanwhile, then wait for events.
    let mut client = EventsClient::new(channel.clone());
    let subscribed = tokio::spawn(async move { client.subscribe(request).await });
    tokio::task::yield_now().await;
    let mut cri = cri::Cri::new(&channel, ENGINE);
    let containers = list(&channel, namespace, &mut cri).await?;
    connected(ENGINE, socket, containers.len());
    *up = true;
    sink.set(ENGINE, containers);
    let mut events = subscribed
        .await
        .map_err(|_| EngineError::Ended)??
        .into_inner();
    while let Some(envelope) = events.message().await? {
        if envelope.topic.starts_with("/tasks/") || envelope.topic.starts_with("/containers/") {
            sink.set(ENGINE, list(&channel, namespace, &mut cri).await?);
        }
    }
    Err(EngineError::Ended)
}

/// The namespace's running containers, listed once (`scan`).
pub(super) async fn list_once(
    socket: &std::path::Path,
    namespace: &str,
) -> Result<Vec<Container>, EngineError> {
    let channel = containerd_client::connect(socket).await?;
    list(&channel, namespace, &mut cri::Cri::new(&channel, ENGINE)).await
}

/// The namespace's containers whose task runs, each at the cgroup of its init process, and the
/// pods of the CRI plugin (none without it).
async fn list(
    channel: &Channel,
    namespace: &str,
    cri: &mut cri::Cri,
) -> Result<Vec<Container>, EngineError> {
    let mut containers = running(channel, namespace).await?;
    containers.extend(cri.pods().await?.unwrap_or_default());
    Ok(containers)
}

/// The namespace's containers whose task runs, pods' sandboxes aside.
async fn running(channel: &Channel, namespace: &str) -> Result<Vec<Container>, EngineError> {
    let tasks = TasksClient::new(channel.clone())
        .list(with_namespace!(ListTasksRequest::default(), namespace))
        .await?
        .into_inner()
        .tasks;
    let all = ContainersClient::new(channel.clone())
        .list(with_namespace!(ListContainersRequest::default(), namespace))
        .await?
        .into_inner()
        .containers;
    let mut containers = Vec::new();
    for task in tasks.iter().filter(|task| task.status == RUNNING) {
        // containerd 1.x names the init process's container in `id` only.
        let id = match task.container_id.as_str() {
            "" => &task.id,
            id => id,
        };
        let Some(container) = all.iter().find(|container| container.id == id) else {
            continue;
        };
        if container
            .labels
            .get(KIND_LABEL)
            .is_some_and(|kind| kind == "sandbox")
        {
            continue;
        }
        let Some(cgroup) = cgroup_of(i64::from(task.pid)) else {
            continue;
        };
        let labels: std::collections::BTreeMap<String, String> = container
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let name = labels
            .get(NAME_LABEL)
            .cloned()
            .unwrap_or_else(|| container.id.clone());
        containers.push(Container::new(
            ENGINE,
            container.id.clone(),
            name,
            labels,
            cgroup,
        ));
    }
    Ok(containers)
}
