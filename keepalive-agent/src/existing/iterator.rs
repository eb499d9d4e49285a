//! Existing connections updated in the kernel: the sweep program (`ka_sweep`, a TCP iterator)
//! is read once per network namespace and applies each connection's rule itself, so no
//! process's descriptors are touched (no pidfd_getfd, no CAP_SYS_PTRACE for it).
//!
//! Before a run the agent lists the cgroups the sweep covers, each with the record of the
//! attachment that governs it (`KA_SWEEP`); the program finds a socket's cgroup in the kernel
//! and leaves the sockets of other cgroups alone. The output is one byte per connection: its
//! `keepalive_common::Outcome`.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::Mutex,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use keepalive_common::{AttachRecord, limits};

use super::{
    Sweep,
    procs::{Population, in_namespace},
};
use crate::{cgroup::Cgroup, policy::CgroupPath};

/// The loaded sweep program's link and the maps it reads, shared with the sweep thread.
#[derive(Debug)]
pub struct IteratorSweep {
    link: OwnedFd,
    maps: Mutex<SweepMaps>,
}

#[derive(Debug)]
struct SweepMaps {
    /// Attachment records by cgroup id (`KA_CGROUPS`), read at each run: the policy in force.
    records: BpfHashMap<MapData, u64, AttachRecord>,
    sweep: BpfHashMap<MapData, u64, AttachRecord>,
    listen: BpfHashMap<MapData, u32, u32>,
}

/// A second handle on a loaded map: the enforcer keeps its own.
pub(crate) fn reopen(map: &Map) -> io::Result<Map> {
    let Map::HashMap(data) = map else {
        return Err(io::Error::other("not a hash map"));
    };
    let fd = data.fd().as_fd().try_clone_to_owned()?;
    Ok(Map::HashMap(
        MapData::from_fd(fd).map_err(io::Error::other)?,
    ))
}

impl IteratorSweep {
    /// Links the loaded program `program` (an iter/tcp program); `records`, `sweep` and
    /// `listen` are its maps.
    pub(crate) fn new(
        program: &aya::programs::ProgramFd,
        records: Map,
        sweep: Map,
        listen: Map,
    ) -> io::Result<Self> {
        let link = crate::sys::iterator_link(program.as_fd())?;
        let maps = SweepMaps {
            records: BpfHashMap::try_from(records).map_err(io::Error::other)?,
            sweep: BpfHashMap::try_from(sweep).map_err(io::Error::other)?,
            listen: BpfHashMap::try_from(listen).map_err(io::Error::other)?,
        };
        Ok(Self {
            link,
            maps: Mutex::new(maps),
        })
    }

    /// Applies the policy in force to the established connections of the cgroups below
    /// `scopes`, in every namespace their processes are in that the agent can enter.
    pub fn sweep(&self, mount: &Path, scopes: &[&Cgroup]) -> io::Result<Sweep> {
        let Population { cgroups, holders } = Population::walk(
            mount,
            scopes.iter().map(|scope| scope.path.as_path()),
            false,
        )?;
        let mut maps = self
            .maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let governed = governing_records(&cgroups, &maps.records);
        let mut sweep = Sweep {
            namespaces: holders.namespaces.len(),
            unlisted: holders.unlisted,
            in_kernel: true,
            ..Sweep::default()
        };
        // More cgroups than the map holds: a run of every namespace per map-full of them.
        for chunk in governed.chunks(limits::SWEEP_CGROUPS as usize) {
            let result = chunk
                .iter()
                .try_for_each(|(id, record)| maps.sweep.insert(id, record, 0))
                .map_err(io::Error::other)
                .and_then(|()| {
                    holders.namespaces.values().try_for_each(|netns| {
                        let outcomes = in_namespace(netns, || self.run());
                        clear(&mut maps.listen);
                        for outcome in outcomes? {
                            if let Some(count) = sweep.outcomes.get_mut(usize::from(outcome)) {
                                *count += 1;
                                sweep.connections += 1;
                            }
                        }
                        Ok(())
                    })
                });
            clear(&mut maps.sweep);
            result?;
        }
        Ok(sweep)
    }

    /// One run of the iterator in the calling thread's namespace: its outcome bytes.
    fn run(&self) -> io::Result<Vec<u8>> {
        crate::sys::read_iterator(self.link.as_fd())
    }
}

/// Empties a map the sweep fills.
fn clear<V: aya::Pod>(map: &mut BpfHashMap<MapData, impl aya::Pod, V>) {
    let keys: Vec<_> = map.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _gone = map.remove(&key);
    }
}

/// Each cgroup of `cgroups` with the record of the innermost attachment at or above it among
/// them (the sock_ops run that decides for its new connections).
fn governing_records(
    cgroups: &HashMap<u64, CgroupPath>,
    records: &BpfHashMap<MapData, u64, AttachRecord>,
) -> Vec<(u64, AttachRecord)> {
    let by_path: HashMap<&str, u64> = cgroups
        .iter()
        .map(|(id, path)| (path.as_str(), *id))
        .collect();
    let record_of = |id: u64| records.get(&id, 0).ok().filter(AttachRecord::is_valid);
    cgroups
        .iter()
        .filter_map(|(&id, path)| {
            let mut at = path.as_str();
            loop {
                if let Some(record) = by_path.get(at).and_then(|&id| record_of(id)) {
                    return Some((id, record));
                }
                at = match at.rsplit_once('/') {
                    Some(("", _)) if at != "/" => "/",
                    Some((parent, _)) if !parent.is_empty() => parent,
                    _ => return None,
                };
            }
        })
        .collect()
}
