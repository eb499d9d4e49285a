//! Typed access to the programs' maps: lookup entries, records, counters.
#![expect(
    deprecated,
    reason = "cgroup storage (BPF_MAP_TYPE_CGROUP_STORAGE) is per attachment, which the policy needs"
)]

use std::collections::BTreeSet;

use aya::{
    Ebpf,
    maps::{
        Array, CgroupStorage, CgroupStorageKey, HashMap, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use aya_obj::generated::bpf_attach_type::BPF_CGROUP_SOCK_OPS;
use keepalive_common::{
    ADDR_MAP, AGENT_MAP, ATTACH_MAP, AddrKey, AttachRecord, CGROUPS_MAP, DECISIONS_MAP,
    DecisionKey, Hit, Outcome, PORT_MAP, PortKey, RULE_STATS_MAP, STATS_MAP, Stat,
    ends::{ENDS_MAP, End, end_index},
    rule_stat_index,
};

use super::{Counters, Ends, EnforcerError, Outcomes};
use crate::compile::Tables;

/// The maps pinned in bpffs, so a restarted agent finds the policy and the counters where the
/// running programs use them (the rest is per process: the log ring buffer, socket storage).
pub(super) const PINNED: [&str; 9] = [
    ATTACH_MAP,
    CGROUPS_MAP,
    ADDR_MAP,
    PORT_MAP,
    DECISIONS_MAP,
    STATS_MAP,
    RULE_STATS_MAP,
    AGENT_MAP,
    ENDS_MAP,
];

/// Pins an agent of an earlier version did not make: `status` reads zeros for them.
const NEWER_PINS: [&str; 1] = [ENDS_MAP];

/// `KA_AGENT` slots.
const AGENT_PID: u32 = 0;

/// Where maps are read from: the loaded object, or the pins of a running agent.
pub(crate) trait Maps {
    fn get(&self, name: &str) -> Option<&aya::maps::Map>;
}

impl Maps for Ebpf {
    fn get(&self, name: &str) -> Option<&aya::maps::Map> {
        self.map(name)
    }
}

/// The pinned maps of an agent, opened read-only for `status`.
#[derive(Debug)]
pub struct PinnedMaps(std::collections::HashMap<&'static str, aya::maps::Map>);

impl PinnedMaps {
    /// Opens every pinned map under `maps_dir`.
    pub fn open(maps_dir: &std::path::Path) -> Result<Self, EnforcerError> {
        let mut maps = std::collections::HashMap::new();
        for name in PINNED {
            let pin = maps_dir.join(name);
            if NEWER_PINS.contains(&name) && !pin.exists() {
                continue;
            }
            let data = MapData::from_pin(pin).map_err(map_error(name))?;
            maps.insert(
                name,
                aya::maps::Map::from_map_data(data).map_err(map_error(name))?,
            );
        }
        Ok(Self(maps))
    }
}

impl Maps for PinnedMaps {
    fn get(&self, name: &str) -> Option<&aya::maps::Map> {
        self.0.get(name)
    }
}

fn map<'a>(maps: &'a impl Maps, name: &'static str) -> Result<&'a aya::maps::Map, EnforcerError> {
    maps.get(name).ok_or(EnforcerError::Missing(name))
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, EnforcerError> {
    ebpf.map_mut(name).ok_or(EnforcerError::Missing(name))
}

pub(super) fn map_error(map: &'static str) -> impl FnOnce(MapError) -> EnforcerError {
    move |source| EnforcerError::Map { map, source }
}

/// A removal whose key is already gone is no error.
fn gone(result: Result<(), MapError>, map: &'static str) -> Result<(), EnforcerError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(EnforcerError::Map { map, source }),
    }
}

/// Tells the setsockopt hook which process is the agent (its own calls are not the
/// application's).
pub(super) fn set_agent_pid(ebpf: &mut Ebpf) -> Result<(), EnforcerError> {
    let mut agent = Array::<&mut MapData, u32>::try_from(map_mut(ebpf, AGENT_MAP)?)
        .map_err(map_error(AGENT_MAP))?;
    agent
        .set(AGENT_PID, &std::process::id(), 0)
        .map_err(map_error(AGENT_MAP))
}

#[expect(
    clippy::type_complexity,
    reason = "three typed views of the maps, private"
)]
fn lookup_maps(
    ebpf: &mut Ebpf,
) -> Result<
    (
        LpmTrie<&mut MapData, AddrKey, Hit>,
        LpmTrie<&mut MapData, PortKey, Hit>,
        HashMap<&mut MapData, DecisionKey, Hit>,
    ),
    EnforcerError,
> {
    let [addr, ports, decisions] = ebpf.maps_disjoint_mut([ADDR_MAP, PORT_MAP, DECISIONS_MAP]);
    Ok((
        LpmTrie::try_from(addr.ok_or(EnforcerError::Missing(ADDR_MAP))?)
            .map_err(map_error(ADDR_MAP))?,
        LpmTrie::try_from(ports.ok_or(EnforcerError::Missing(PORT_MAP))?)
            .map_err(map_error(PORT_MAP))?,
        HashMap::try_from(decisions.ok_or(EnforcerError::Missing(DECISIONS_MAP))?)
            .map_err(map_error(DECISIONS_MAP))?,
    ))
}

/// Inserts a generation's lookup entries (beside whatever is there).
pub(super) fn insert_entries(ebpf: &mut Ebpf, tables: &Tables) -> Result<(), EnforcerError> {
    let (mut addr, mut ports, mut decisions) = lookup_maps(ebpf)?;
    for (key, len, hit) in &tables.addr {
        addr.insert(&Key::new(*len, *key), hit, 0)
            .map_err(map_error(ADDR_MAP))?;
    }
    for (key, len, hit) in &tables.ports {
        ports
            .insert(&Key::new(*len, *key), hit, 0)
            .map_err(map_error(PORT_MAP))?;
    }
    for (key, hit) in &tables.decisions {
        decisions
            .insert(key, hit, 0)
            .map_err(map_error(DECISIONS_MAP))?;
    }
    Ok(())
}

/// Removes every lookup entry whose ruleset is not in `keep`: the previous generation's, and
/// anything a killed agent or a failed apply left behind.
pub(super) fn prune_entries(ebpf: &mut Ebpf, keep: &BTreeSet<u32>) -> Result<(), EnforcerError> {
    let (mut addr, mut ports, mut decisions) = lookup_maps(ebpf)?;
    let stale: Vec<Key<AddrKey>> = addr
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !keep.contains(&key.data().ruleset))
        .collect();
    for key in stale {
        gone(addr.remove(&key), ADDR_MAP)?;
    }
    let stale: Vec<Key<PortKey>> = ports
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !keep.contains(&key.data().ruleset))
        .collect();
    for key in stale {
        gone(ports.remove(&key), PORT_MAP)?;
    }
    let stale: Vec<DecisionKey> = decisions
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !keep.contains(&key.ruleset))
        .collect();
    for key in stale {
        gone(decisions.remove(&key), DECISIONS_MAP)?;
    }
    Ok(())
}

/// The attachment's storage (sock_ops) and the by-id copy (setsockopt hook).
pub(super) fn write_record(
    ebpf: &mut Ebpf,
    cgroup_id: u64,
    record: &AttachRecord,
) -> Result<(), EnforcerError> {
    let mut storage =
        CgroupStorage::<&mut MapData, AttachRecord>::try_from(map_mut(ebpf, ATTACH_MAP)?)
            .map_err(map_error(ATTACH_MAP))?;
    storage
        .insert(
            CgroupStorageKey::new(cgroup_id, BPF_CGROUP_SOCK_OPS as u32),
            record,
            0,
        )
        .map_err(map_error(ATTACH_MAP))?;
    let mut by_id =
        HashMap::<&mut MapData, u64, AttachRecord>::try_from(map_mut(ebpf, CGROUPS_MAP)?)
            .map_err(map_error(CGROUPS_MAP))?;
    by_id
        .insert(&cgroup_id, record, 0)
        .map_err(map_error(CGROUPS_MAP))
}

/// The by-id records (cgroup id, record).
pub(crate) fn cgroup_records(ebpf: &impl Maps) -> Result<Vec<(u64, AttachRecord)>, EnforcerError> {
    let by_id = HashMap::<&MapData, u64, AttachRecord>::try_from(map(ebpf, CGROUPS_MAP)?)
        .map_err(map_error(CGROUPS_MAP))?;
    Ok(by_id.iter().filter_map(Result::ok).collect())
}

/// Forgets the by-id records of cgroups not in `keep`.
pub(super) fn prune_cgroups(ebpf: &mut Ebpf, keep: &BTreeSet<u64>) -> Result<(), EnforcerError> {
    let stale: Vec<u64> = cgroup_records(ebpf)?
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !keep.contains(id))
        .collect();
    let mut by_id =
        HashMap::<&mut MapData, u64, AttachRecord>::try_from(map_mut(ebpf, CGROUPS_MAP)?)
            .map_err(map_error(CGROUPS_MAP))?;
    for id in stale {
        gone(by_id.remove(&id), CGROUPS_MAP)?;
    }
    Ok(())
}

pub(crate) fn record(ebpf: &impl Maps, cgroup_id: u64) -> Result<AttachRecord, EnforcerError> {
    let storage = CgroupStorage::<&MapData, AttachRecord>::try_from(map(ebpf, ATTACH_MAP)?)
        .map_err(map_error(ATTACH_MAP))?;
    storage
        .get(
            CgroupStorageKey::new(cgroup_id, BPF_CGROUP_SOCK_OPS as u32),
            0,
        )
        .map_err(map_error(ATTACH_MAP))
}

/// The elements `indices` of the per-CPU counter array `name`, each summed over CPUs.
fn per_cpu_sums<const N: usize>(
    map: &aya::maps::Map,
    name: &'static str,
    indices: [u32; N],
) -> Result<[u64; N], EnforcerError> {
    let stats = PerCpuArray::<&MapData, u64>::try_from(map).map_err(map_error(name))?;
    let mut sums = [0; N];
    for (sum, index) in sums.iter_mut().zip(indices) {
        *sum = stats.get(&index, 0).map_err(map_error(name))?.iter().sum();
    }
    Ok(sums)
}

pub(crate) fn counters(ebpf: &impl Maps) -> Result<Counters, EnforcerError> {
    let indices = Stat::ALL.map(|stat| stat as u32);
    per_cpu_sums(map(ebpf, STATS_MAP)?, STATS_MAP, indices).map(Counters)
}

/// A rule slot's ends, summed over CPUs (zeros where the map is not there: an agent of an
/// earlier version).
pub(crate) fn ends(ebpf: &impl Maps, slot: u32) -> Result<Ends, EnforcerError> {
    let Some(map) = ebpf.get(ENDS_MAP) else {
        return Ok(Ends::default());
    };
    per_cpu_sums(map, ENDS_MAP, End::ALL.map(|end| end_index(slot, end))).map(Ends)
}

pub(crate) fn outcomes(ebpf: &impl Maps, slot: u32) -> Result<Outcomes, EnforcerError> {
    let indices = Outcome::ALL.map(|outcome| rule_stat_index(slot, outcome));
    per_cpu_sums(map(ebpf, RULE_STATS_MAP)?, RULE_STATS_MAP, indices).map(Outcomes)
}
