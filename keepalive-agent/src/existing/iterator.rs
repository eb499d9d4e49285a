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
    fs,
    io::{self, Read as _},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    sync::Mutex,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use aya_obj::generated::{bpf_attach_type::BPF_TRACE_ITER, bpf_cmd};
use keepalive_common::{AttachRecord, limits};

use super::{
    Sweep,
    procs::{Holders, in_namespace, walk},
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

/// `bpf(2)` with an attribute of `words` (the fields the command reads, the rest zero).
fn bpf(command: bpf_cmd, words: &[u32]) -> io::Result<OwnedFd> {
    let mut attr = [0u32; 16];
    attr[..words.len()].copy_from_slice(words);
    // SAFETY: the attribute is a zeroed buffer of the size passed, laid out as the command's
    // struct of u32 fields (link_create: prog_fd, target_fd, attach_type, flags; iter_create:
    // link_fd, flags).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command as libc::c_long,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned no descriptor"))?;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
        let link = iterator_link(program)?;
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
        let mut cgroups: HashMap<u64, CgroupPath> = HashMap::new();
        let mut pids: Vec<u32> = Vec::new();
        for scope in scopes {
            walk(mount, &scope.path, &mut cgroups, &mut pids)?;
        }
        let holders = Holders::of(&pids, false);
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
        read_iterator(&self.link)
    }
}

/// A link of the loaded iterator program `program` (aya's `IterLink` makes one iterator only;
/// the agent reads these many times).
pub(crate) fn iterator_link(program: &aya::programs::ProgramFd) -> io::Result<OwnedFd> {
    let prog = u32::try_from(program.as_fd().as_raw_fd()).map_err(io::Error::other)?;
    bpf(
        bpf_cmd::BPF_LINK_CREATE,
        &[prog, 0, BPF_TRACE_ITER as u32, 0],
    )
}

/// One run of the iterator behind `link`: what its program wrote.
pub(crate) fn read_iterator(link: &OwnedFd) -> io::Result<Vec<u8>> {
    let link = u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?;
    let iterator = bpf(bpf_cmd::BPF_ITER_CREATE, &[link, 0])?;
    let mut output = Vec::new();
    fs::File::from(iterator).read_to_end(&mut output)?;
    Ok(output)
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
