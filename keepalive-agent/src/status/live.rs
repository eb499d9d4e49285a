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
    enforcer::{
        PinnedMaps,
        features::{self, lacks},
    },
    policy::CgroupPath,
    without_keepalive::{CountIterator, CountedNamespaces, Unchanged, count_with_namespaces},
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

/// A count at least this often, whatever the figures say: what they cannot see (a connection
/// whose process left the namespaces counted, an option set through a descriptor passed to
/// a process outside the scopes) is caught within this many periods.
const COUNT_AT_LEAST_EVERY: u32 = 10;

/// Counts every `period` while the agent runs, for the scopes of the policy in force, into the
/// telemetry the metrics endpoint reads. With the kernel's count, a period whose figures show
/// nothing could have changed ([`Unchanged`]) keeps the last count; `maps`: the pinned maps'
/// directory, where the figures are read.
pub async fn count_without_keepalive(
    shared: Shared,
    mount: PathBuf,
    period: Duration,
    counter: Option<Arc<CountIterator>>,
    maps: PathBuf,
) {
    let mut warned = false;
    // The figures the last count was made with, and the namespaces it visited.
    let mut last: Option<(Unchanged, CountedNamespaces)> = None;
    let mut skipped = 0;
    // Opened once, at start (the counters are read only beside the kernel's count): the
    // agent's descriptors stay what they are from then on.
    let mut pinned = counter.as_ref().and_then(|_| PinnedMaps::open(&maps).ok());
    let mut waited = Duration::ZERO;
    loop {
        let inputs = shared.lock().ok().and_then(|telemetry| {
            let state = telemetry.state.as_ref()?;
            // A sweep moves what is counted: count once it is done (or a period late).
            if telemetry.agent.sweeping && waited < period {
                return None;
            }
            let skips = counter.is_some() && !lacks(&state.missing_features, features::LOCK);
            let slots: Vec<u32> = state.rules.iter().map(|rule| rule.slot).collect();
            let agent = (
                state.scopes.clone(),
                state.generation,
                telemetry.agent.changes,
            );
            Some((agent, slots, skips))
        });
        let Some((agent, slots, skips)) = inputs else {
            // No policy yet, or a sweep: look again soon rather than a whole period later.
            let soon = period.min(Duration::from_millis(200));
            tokio::time::sleep(soon).await;
            waited += soon;
            continue;
        };
        waited = Duration::ZERO;
        let scopes: Vec<CgroupPath> = agent
            .0
            .iter()
            .filter_map(|scope| CgroupPath::parse(scope).ok())
            .collect();
        if pinned.is_none() && skips {
            pinned = PinnedMaps::open(&maps).ok();
        }
        // Read once, before any count (a change while it runs shows in the next period's
        // figures): compared with the last count's, and kept as this count's.
        let now = pinned
            .as_ref()
            .filter(|_| skips)
            .and_then(|maps| match &last {
                Some((_, namespaces)) => Unchanged::now(agent, maps, &slots, namespaces),
                None => Unchanged::before_count(agent, maps, &slots),
            });
        if let (Some(now), Some((before, _))) = (&now, &last)
            && skipped + 1 < COUNT_AT_LEAST_EVERY
            && now == before
        {
            skipped += 1;
            debug!("connections unchanged since the last count");
            tokio::time::sleep(period).await;
            continue;
        }
        skipped = 0;
        let mount = mount.clone();
        let counter = counter.clone();
        let counted = tokio::task::spawn_blocking(move || {
            count_with_namespaces(&mount, &scopes, counter.as_deref())
        })
        .await;
        match counted {
            Ok(Ok((counts, namespaces))) => {
                debug!(?counts, "counted connections without keepalive");
                if let Ok(mut telemetry) = shared.lock() {
                    telemetry.agent.without_keepalive = Some(counts);
                }
                last = now.map(|now| (now.counted_in(&namespaces), namespaces));
            }
            Ok(Err(error)) if !warned => {
                warned = true;
                last = None;
                warn!(%error, "cannot count connections without keepalive; retrying each period");
            }
            _ => last = None,
        }
        tokio::time::sleep(period).await;
    }
}
