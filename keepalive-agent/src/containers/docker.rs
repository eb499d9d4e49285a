//! The Docker Engine API (Docker, and podman's compatible service) through bollard.

use std::{collections::HashMap, path::PathBuf};

use bollard::{
    API_DEFAULT_VERSION, Docker,
    query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder},
};
use futures_util::StreamExt as _;

use super::{Container, Ended, EngineError, Sink, cgroup_of, connected};

/// Seconds a request may take (the event stream itself is not bounded).
const TIMEOUT_SECS: u64 = 30;

/// One connection: subscribe, list, then list again on every container event.
pub(super) async fn session(engine: &'static str, socket: PathBuf, sink: Sink) -> Ended {
    let mut up = false;
    let result = run(engine, &socket, &sink, &mut up).await;
    Ended::from(up, result)
}

async fn run(
    engine: &'static str,
    socket: &std::path::Path,
    sink: &Sink,
    up: &mut bool,
) -> Result<(), EngineError> {
    let docker =
        Docker::connect_with_unix(&socket.to_string_lossy(), TIMEOUT_SECS, API_DEFAULT_VERSION)?
            .negotiate_version()
            .await?;
    // Events since just before the list: a container that starts in between is an event.
    let since = now_secs();
    let filters = HashMap::from([("type", vec!["container"])]);
    let options = EventsOptionsBuilder::new().filters(&filters).since(&since);
    let mut events = docker.events(Some(options.build()));
    let mut known = list(engine, &docker, &[]).await?;
    connected(engine, socket, known.len());
    *up = true;
    sink.set(engine, known.clone());
    while let Some(event) = events.next().await {
        let event = event?;
        let relevant = matches!(
            event.action.as_deref(),
            Some("start" | "die" | "stop" | "destroy" | "update" | "rename" | "pause" | "unpause")
        );
        if relevant {
            known = list(engine, &docker, &known).await?;
            sink.set(engine, known.clone());
        }
    }
    Err(EngineError::Ended)
}

/// The running containers, listed once (`scan`).
pub(super) async fn list_once(
    engine: &str,
    socket: &std::path::Path,
) -> Result<Vec<Container>, EngineError> {
    let docker =
        Docker::connect_with_unix(&socket.to_string_lossy(), TIMEOUT_SECS, API_DEFAULT_VERSION)?
            .negotiate_version()
            .await?;
    list(engine, &docker, &[]).await
}

fn now_secs() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs().saturating_sub(1))
        .to_string()
}

/// The running containers; those already known keep their cgroup, new ones are inspected
/// for their init process.
async fn list(
    engine: &str,
    docker: &Docker,
    known: &[Container],
) -> Result<Vec<Container>, EngineError> {
    let running = docker
        .list_containers(Some(ListContainersOptionsBuilder::new().all(false).build()))
        .await?;
    let mut containers = Vec::with_capacity(running.len());
    for summary in running {
        let Some(id) = summary.id else {
            continue;
        };
        let name = summary
            .names
            .and_then(|names| names.into_iter().next())
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string();
        let labels = summary.labels.unwrap_or_default().into_iter().collect();
        let cgroup = match known.iter().find(|container| container.id == id) {
            Some(container) => Some(container.cgroup.clone()),
            None => {
                // It may have ended since the list: skip it, its events follow.
                let Ok(inspected) = docker.inspect_container(&id, None).await else {
                    continue;
                };
                inspected
                    .state
                    .and_then(|state| state.pid)
                    .filter(|pid| *pid > 0)
                    .and_then(cgroup_of)
            }
        };
        if let Some(cgroup) = cgroup {
            containers.push(Container::new(engine, id, name, labels, cgroup));
        }
    }
    Ok(containers)
}
