//! The agent's status, one model: the [`State`] of the policy in force (the running agent
//! keeps it, with the faults it has not repaired, and writes it to the state file:
//! [`state`]), the running agent's [`Telemetry`] (that state and its own figures, shared with
//! the endpoint: [`live`]), and the [`Snapshot`] taken of either and rendered three ways:
//! `status --json` (this type, serialised), the `status` table (`commands/status.rs`) and the
//! Prometheus endpoint (`metrics/render.rs`); `/readyz` answers [`Telemetry::readiness`].
//! `status` takes its snapshot from the pins and the state file, the endpoint from the agent's
//! telemetry and the pinned maps.
//!
//! A new figure is a field here, filled in [`Snapshot::from_pins`] and/or
//! [`Snapshot::from_agent`], and a line where it is rendered.

mod live;
pub mod state;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use keepalive_common::{Outcome, Stat, ends::End};
use serde::{Serialize, Serializer, ser::SerializeMap as _};

pub use self::{
    live::{Shared, Telemetry, count_without_keepalive},
    state::{RuleState, State},
};
use crate::{
    bpffs::PinDir,
    enforcer::{Counters, Ends, MissingFeature, Outcomes, PinnedMaps},
};

/// What is enforced, where, and what it counted.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// The agent's pin directory.
    pub pins: PathBuf,
    pub agent_running: bool,
    pub agent_pid: Option<u32>,
    /// Where enforcement is missing though it should be there (attachments removed by
    /// someone else); `missing` in `status --json`.
    #[serde(rename = "missing")]
    pub faults: Vec<String>,
    /// The policy in force (None: no agent state).
    pub policy: Option<PolicyInForce>,
    /// Optional parts this kernel lacks.
    pub missing_features: Vec<MissingFeature>,
    /// Cgroups with pinned links (read by `status`; the agent counts them in
    /// [`AgentTelemetry::attached_cgroups`] instead).
    pub attached: Vec<Attachment>,
    /// Policy records in the kernel, one per attachment with rules or enforcement.
    pub records: usize,
    /// The programs' global counters (None: the maps are not there).
    pub counters: Option<Counters>,
    /// Every rule with its counters, the default first.
    pub rules: Vec<RuleCounters>,
    /// What only the running agent knows (the endpoint's snapshot); not in `status`.
    #[serde(skip)]
    pub agent: Option<AgentTelemetry>,
}

/// The policy in force and its history.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyInForce {
    /// The policy file, or `command line`.
    pub source: String,
    pub generation: u32,
    /// Seconds since the epoch of the last apply.
    pub applied_at: u64,
    pub scopes: Vec<String>,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
}

/// A cgroup and the agent's programs attached to it.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    /// Its path in the hierarchy (None: removed since).
    pub cgroup: Option<String>,
    pub id: u64,
    /// The pin names of the links (`sock_ops`, `setsockopt`).
    pub programs: Vec<String>,
}

/// A rule and what its counter slot counted (rules past the counted limit share one slot).
#[derive(Debug, Clone, Serialize)]
pub struct RuleCounters {
    pub slot: u32,
    pub name: String,
    /// Line in the policy file (0: not from a file).
    pub line: usize,
    pub action: String,
    /// For a rule with `labels` or `container`: what it selects and the cgroups of the
    /// containers it applies to now, or that it applies to nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containers: Option<String>,
    pub counters: Outcomes,
    /// How its connections ended (`ends = true` in the policy).
    pub ends: Ends,
}

/// The running agent's own figures.
#[derive(Debug, Clone, Default)]
pub struct AgentTelemetry {
    /// Cgroups the sock_ops program is attached to.
    pub attached_cgroups: usize,
    /// Attachments removed by someone else and put back.
    pub healed: u64,
    /// Times the cgroup watch lost events and the tree was scanned again.
    pub watch_overflows: u64,
    /// Pods whose keepalive annotations the policy refused (each pod and reason once).
    pub annotations_refused: u64,
    /// The failures the kernel reported (`ends = true` in the policy).
    pub failures: crate::ends::Failures,
    /// Whether the last reload applied (or kept) a policy.
    pub last_reload_ok: bool,
    /// The kernel's accounting of the agent's programs (filled when a snapshot is taken).
    pub programs: Vec<ProgramRuns>,
    /// The last count of connections without keepalive, per enforced scope (None: not
    /// counted yet, or never: `--missing-interval 0`).
    pub without_keepalive: Option<BTreeMap<String, crate::without_keepalive::Count>>,
    /// Rises each time the agent changes what it covers or sets outside a policy's apply:
    /// cgroups followed, a sweep of existing connections done (the count of connections
    /// without keepalive looks again).
    pub changes: u64,
    /// A sweep of existing connections is queued or running.
    pub sweeping: bool,
}

/// The kernel's accounting of one of the agent's programs (with `--program-stats`).
#[derive(Debug, Clone)]
pub struct ProgramRuns {
    pub name: String,
    pub runs: u64,
    pub seconds: f64,
}

impl Snapshot {
    /// For `status`: from the pins under `bpffs`, the state file in `state_dir` and the cgroup
    /// tree. With no links pinned, missing maps are no error.
    pub fn from_pins(bpffs: &Path, state_dir: &Path, mount: &Path) -> anyhow::Result<Self> {
        let pins = PinDir::at(bpffs);
        let state = State::read(state_dir);
        let holder = crate::instance::holder(&pins.root);
        let running = holder.is_some() || state.as_ref().is_some_and(|s| state::alive(s.pid));
        let links = pins.pinned_links();
        let by_id = if links.is_empty() {
            HashMap::new()
        } else {
            crate::cgroup::by_id(mount)
        };
        let maps = match PinnedMaps::open(&pins.maps()) {
            Ok(maps) => Some(maps),
            Err(_) if links.is_empty() => None,
            Err(error) => return Err(error.into()),
        };
        let (records, counters, rules) = match &maps {
            Some(maps) if !links.is_empty() => (
                maps.records()?.len(),
                Some(maps.counters()?),
                rule_counters(state.as_ref(), maps)?,
            ),
            Some(maps) => (
                maps.records().map_or(0, |records| records.len()),
                None,
                Vec::new(),
            ),
            None => (0, None, Vec::new()),
        };
        Ok(Self {
            faults: faults(&links, &by_id, mount, state.as_ref(), running),
            attached: attachments(&links, &by_id, mount),
            agent_pid: holder.or(state.as_ref().map(|state| state.pid)),
            policy: state.as_ref().map(PolicyInForce::from),
            missing_features: state
                .map(|state| state.missing_features)
                .unwrap_or_default(),
            pins: pins.root,
            agent_running: running,
            records,
            counters,
            rules,
            agent: None,
        })
    }

    /// For the endpoint: from the running agent's telemetry and the maps in `maps_dir`. Before
    /// the first apply there is no policy, and the maps are not read.
    pub fn from_agent(telemetry: &Telemetry, maps_dir: &Path) -> anyhow::Result<Self> {
        let state = telemetry.state.as_ref();
        let maps = state.map(|_| PinnedMaps::open(maps_dir)).transpose()?;
        let (records, counters, rules) = match &maps {
            Some(maps) => (
                maps.records()?.len(),
                Some(maps.counters()?),
                rule_counters(state, maps)?,
            ),
            None => (0, None, Vec::new()),
        };
        Ok(Self {
            pins: maps_dir.parent().unwrap_or(maps_dir).to_path_buf(),
            agent_running: true,
            agent_pid: Some(std::process::id()),
            faults: state.map(|state| state.faults.clone()).unwrap_or_default(),
            policy: state.map(PolicyInForce::from),
            missing_features: state
                .map(|s| s.missing_features.clone())
                .unwrap_or_default(),
            attached: Vec::new(),
            records,
            counters,
            rules,
            agent: Some(AgentTelemetry {
                programs: program_runs(&telemetry.program_ids),
                ..telemetry.agent.clone()
            }),
        })
    }
}

impl From<&State> for PolicyInForce {
    fn from(state: &State) -> Self {
        Self {
            source: state.source.clone(),
            generation: state.generation,
            applied_at: state.applied_at,
            scopes: state.scopes.clone(),
            reloads_succeeded: state.reloads_succeeded,
            reloads_failed: state.reloads_failed,
        }
    }
}

/// Each rule with its slot's counters (each slot read once: rules past the counted limit share
/// the last).
fn rule_counters(state: Option<&State>, maps: &PinnedMaps) -> anyhow::Result<Vec<RuleCounters>> {
    let mut slots: BTreeMap<u32, (Outcomes, Ends)> = BTreeMap::new();
    let mut rules = Vec::new();
    for RuleState {
        slot,
        name,
        line,
        action,
        containers,
        ..
    } in state.map_or(&[][..], |state| &state.rules)
    {
        let (counters, ends) = match slots.get(slot) {
            Some(counted) => *counted,
            None => {
                let counted = (maps.outcomes(*slot)?, maps.ends(*slot)?);
                slots.insert(*slot, counted);
                counted
            }
        };
        rules.push(RuleCounters {
            slot: *slot,
            name: name.clone(),
            line: *line,
            action: action.clone(),
            containers: containers.clone(),
            counters,
            ends,
        });
    }
    Ok(rules)
}

/// The cgroups with pinned links, by id.
fn attachments(
    links: &[(String, u64, PathBuf)],
    by_id: &HashMap<u64, PathBuf>,
    mount: &Path,
) -> Vec<Attachment> {
    let mut attached: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (name, id, _) in links {
        attached.entry(*id).or_default().push(name.clone());
    }
    attached
        .into_iter()
        .map(|(id, programs)| Attachment {
            cgroup: by_id.get(&id).map(|path| in_hierarchy(path, mount)),
            id,
            programs,
        })
        .collect()
}

fn in_hierarchy(path: &Path, mount: &Path) -> String {
    format!("/{}", path.strip_prefix(mount).unwrap_or(path).display())
}

/// Where enforcement is missing: pinned links the kernel no longer has attached (checked
/// here), and what the running agent found missing and has not put back yet.
fn faults(
    links: &[(String, u64, PathBuf)],
    by_id: &HashMap<u64, PathBuf>,
    mount: &Path,
    state: Option<&State>,
    running: bool,
) -> Vec<String> {
    let mut faults: Vec<String> = links
        .iter()
        .filter_map(|(name, id, pin)| {
            let attached = crate::sys::open_pinned(pin)
                .and_then(|link| crate::sys::cgroup_link_info(std::os::fd::AsFd::as_fd(&link)))
                .is_ok_and(|info| info.cgroup_id == *id);
            if attached {
                return None;
            }
            let cgroup = by_id.get(id).map_or_else(
                || format!("cgroup id {id}"),
                |path| in_hierarchy(path, mount),
            );
            Some(format!("{name} at {cgroup}: link detached"))
        })
        .collect();
    if running && let Some(state) = state {
        faults.extend(state.faults.iter().cloned());
    }
    faults.sort();
    faults.dedup();
    faults
}

/// The kernel's accounting of the programs with these ids, by program name.
fn program_runs(ids: &[u32]) -> Vec<ProgramRuns> {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|program| ids.contains(&program.id()))
        .filter_map(|program| {
            Some(ProgramRuns {
                name: program.name_as_str()?.to_string(),
                runs: program.run_count(),
                seconds: program.run_time().as_secs_f64(),
            })
        })
        .collect()
}

/// `{"deferred": 3, ...}`, in [`Stat`] order.
impl Serialize for Counters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(Stat::ALL.len()))?;
        for stat in Stat::ALL {
            map.serialize_entry(stat.name(), &self.get(stat))?;
        }
        map.end()
    }
}

/// `{"closed": 2, "reset": 1, "keepalive": 0, "timeout": 0}`, in [`End`] order.
impl Serialize for Ends {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(End::ALL.len()))?;
        for end in End::ALL {
            map.serialize_entry(end.name(), &self.get(end))?;
        }
        map.end()
    }
}

/// `{"set": 2, ..., "seen": 5}`, in [`Outcome`] order, then the connections decided.
impl Serialize for Outcomes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(Outcome::ALL.len() + 1))?;
        for outcome in Outcome::ALL {
            map.serialize_entry(outcome.name(), &self.get(outcome))?;
        }
        map.serialize_entry("seen", &self.seen())?;
        map.end()
    }
}
