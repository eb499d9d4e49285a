//! The running agent's live status, shared with the metrics endpoint: the [`State`] it also
//! writes to the state file (with the faults it has not repaired), and the figures only a
//! running agent has. `/readyz` answers from it, `/metrics` from the [`super::Snapshot`] made
//! of it.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::{debug, warn};

use super::{AgentTelemetry, state::State};
use crate::{
    policy::CgroupPath,
    without_keepalive::{CountIterator, count},
};

/// What the running agent shares with its endpoint and its count of connections without
/// keepalive: the state of the policy in force (with the faults) and its own figures.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    /// The state of the policy in force (None until the first apply: not ready).
    pub state: Option<State>,
    /// Ids of the agent's programs, for their kernel accounting.
    pub program_ids: Vec<u32>,
    /// The agent's own figures (their `programs` filled in when a snapshot is taken).
    pub agent: AgentTelemetry,
}

pub type Shared = Arc<Mutex<Telemetry>>;

impl Telemetry {
    /// Ready: a policy is in force and every attachment it needs is in the kernel; else why
    /// not.
    pub fn readiness(&self) -> Result<(), String> {
        let Some(state) = &self.state else {
            return Err("no policy applied yet".to_owned());
        };
        if state.faults.is_empty() {
            Ok(())
        } else {
            Err(format!("enforcement missing: {}", state.faults.join("; ")))
        }
    }
}

/// Counts every `period` while the agent runs, for the scopes of the policy in force, into the
/// telemetry the metrics endpoint reads.
pub async fn count_without_keepalive(
    shared: Shared,
    mount: PathBuf,
    period: Duration,
    counter: Option<Arc<CountIterator>>,
) {
    let mut warned = false;
    loop {
        let scopes: Option<Vec<CgroupPath>> = shared.lock().ok().and_then(|telemetry| {
            let state = telemetry.state.as_ref()?;
            Some(
                state
                    .scopes
                    .iter()
                    .filter_map(|scope| CgroupPath::parse(scope).ok())
                    .collect(),
            )
        });
        let Some(scopes) = scopes else {
            // No policy yet: look again soon rather than a whole period later.
            tokio::time::sleep(period.min(Duration::from_millis(200))).await;
            continue;
        };
        let mount = mount.clone();
        let counter = counter.clone();
        let counted =
            tokio::task::spawn_blocking(move || count(&mount, &scopes, counter.as_deref())).await;
        match counted {
            Ok(Ok(counts)) => {
                debug!(?counts, "counted connections without keepalive");
                if let Ok(mut telemetry) = shared.lock() {
                    telemetry.agent.without_keepalive = Some(counts);
                }
            }
            Ok(Err(error)) if !warned => {
                warned = true;
                warn!(%error, "cannot count connections without keepalive; retrying each period");
            }
            _ => {}
        }
        tokio::time::sleep(period).await;
    }
}
