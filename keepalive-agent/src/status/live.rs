//! The running agent's live status, shared with the metrics endpoint: the [`State`] it also
//! writes to the state file (with the faults it has not repaired), and the figures only a
//! running agent has. `/readyz` answers from it, `/metrics` from the [`super::Snapshot`] made
//! of it.

use std::sync::{Arc, Mutex};

use super::{AgentTelemetry, state::State};

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
