//! The count of established connections without keepalive, per enforced scope, taken on a
//! period by the running agent ([`crate::status::count_without_keepalive`]) for the gauge
//! `keepalive_connections_without_keepalive`.
//!
//! Cheap on purpose: one read per network namespace of the scopes' processes, and no
//! descriptor is touched. Where the kernel takes the count iterator (`ka_count`, iter/tcp,
//! Linux 5.15 with BTF), the kernel walks its connections (ESTABLISHED and CLOSE_WAIT) and
//! reports each one's cgroup and SO_KEEPALIVE flag: exact, and cheaper than a dump (100,000
//! connections: ~80 ms of CPU per count, ~110 ms by dump, on our test machines); and a period
//! whose figures show nothing counted can have changed keeps the last count ([`Unchanged`]).
//! Elsewhere one socket dump (inet_diag)
//! reports each socket's cgroup (`INET_DIAG_CGROUP_ID`) and which of its timers is pending
//! (`idiag_timer`), and a socket counts as without keepalive when no timer is pending. That is
//! exact for idle connections, the ones keepalive is for; a connection with data in flight
//! shows its retransmit (or zero-window probe) timer instead, whatever its keepalive, and is
//! counted as established but not as missing.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use keepalive_common::CountRecord;

pub use unchanged::{CountedNamespaces, TcpFigures, Unchanged};

mod unchanged;

use crate::{
    existing::{
        diag::{ESTABLISHED, TIMER_OFF},
        procs::{Population, in_namespace, sockets_in},
    },
    policy::{CgroupPath, Pattern},
    sys::{iterator_link, read_iterator},
};

/// The period when neither `--missing-interval` nor its variable says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// One scope's connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    /// Established connections whose socket belongs to a cgroup of the scope.
    pub established: u64,
    /// Of those, the ones with no timer pending: no keepalive (and no data in flight).
    pub without_keepalive: u64,
}

/// The loaded count program's iterator link: each read in a network namespace is one
/// [`CountRecord`] per established connection there.
#[derive(Debug)]
pub struct CountIterator {
    link: OwnedFd,
}

impl CountIterator {
    pub(crate) fn new(program: &aya::programs::ProgramFd) -> io::Result<Self> {
        Ok(Self {
            link: iterator_link(program.as_fd())?,
        })
    }

    /// The established connections of the calling thread's namespace: (cgroup id, whether
    /// SO_KEEPALIVE is on).
    fn connections(&self) -> io::Result<Vec<(u64, bool)>> {
        Ok(records(&read_iterator(self.link.as_fd())?))
    }
}

/// The iterator's output as (cgroup id, keepalive) pairs; a short tail is ignored.
fn records(output: &[u8]) -> Vec<(u64, bool)> {
    const RECORD: usize = size_of::<CountRecord>();
    output
        .as_chunks::<RECORD>()
        .0
        .iter()
        .map(|record| {
            let (id, rest) = record.split_at(8);
            let id = u64::from_ne_bytes(id.try_into().unwrap_or_default());
            let keepalive = u32::from_ne_bytes(rest[..4].try_into().unwrap_or_default());
            (id, keepalive != 0)
        })
        .collect()
}

/// The established connections of the namespace `netns`: (cgroup id, whether keepalive is
/// on), through the kernel's count where there is one, else a socket dump (keepalive: a timer
/// is pending).
fn connections_in(netns: &Path, counter: Option<&CountIterator>) -> io::Result<Vec<(u64, bool)>> {
    if let Some(counter) = counter
        && let Ok(connections) = in_namespace(netns, || counter.connections())
    {
        return Ok(connections);
    }
    // A count needs no direction: the dump's established sockets as they are.
    Ok(sockets_in(netns, None)?
        .iter()
        .filter(|socket| socket.state == ESTABLISHED)
        .map(|socket| (socket.cgroup_id, socket.timer != TIMER_OFF))
        .collect())
}

/// Counts per scope (its text as the policy gives it, e.g. `/` or `/kubepods.slice/**`). A
/// connection of a cgroup several scopes cover counts for the first of them. `counter`: the
/// enforcer's count iterator, if the kernel took it.
pub fn count(
    mount: &Path,
    scopes: &[CgroupPath],
    counter: Option<&CountIterator>,
) -> io::Result<BTreeMap<String, Count>> {
    Ok(count_with_namespaces(mount, scopes, counter)?.0)
}

/// [`count`], and the network namespaces it counted in (inode -> `/proc/PID/ns/net` and
/// their TCP figures, read just before each was counted: see [`Unchanged`]).
pub fn count_with_namespaces(
    mount: &Path,
    scopes: &[CgroupPath],
    counter: Option<&CountIterator>,
) -> io::Result<(BTreeMap<String, Count>, CountedNamespaces)> {
    let mut counts: BTreeMap<String, Count> = scopes
        .iter()
        .map(|scope| (scope.to_string(), Count::default()))
        .collect();
    let roots: Vec<PathBuf> = scopes
        .iter()
        .map(|scope| mount.join(scope.literal_prefix().relative()))
        .filter(|root| root.is_dir())
        .collect();
    let Population { cgroups, holders } =
        Population::walk(mount, roots.iter().map(PathBuf::as_path), false)?;
    // Each cgroup's scope, decided once, by patterns compiled once (`CgroupPath::covers`
    // compiles its pattern each call: ~100 us, at 10,000 cgroups a second per count).
    let patterns: Vec<(String, Pattern)> = scopes
        .iter()
        .map(|scope| (scope.to_string(), Pattern::new(scope)))
        .collect();
    let owner: HashMap<u64, &str> = cgroups
        .into_iter()
        .filter_map(|(id, path)| {
            let (scope, _) = patterns.iter().find(|(_, pattern)| pattern.covers(&path))?;
            Some((id, scope.as_str()))
        })
        .collect();
    let mut counted = BTreeMap::new();
    for (inode, netns) in holders.namespaces {
        counted.insert(
            inode,
            (netns.clone(), unchanged::tcp_figures(inode, &netns)),
        );
        let connections = match connections_in(&netns, counter) {
            Ok(connections) => connections,
            // The namespace went away with its last process.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        for (cgroup_id, keepalive) in connections {
            let Some(scope) = owner.get(&cgroup_id) else {
                continue;
            };
            // Every scope has its entry from the start: no allocation per connection.
            let Some(count) = counts.get_mut(*scope) else {
                continue;
            };
            count.established += 1;
            if !keepalive {
                count.without_keepalive += 1;
            }
        }
    }
    Ok((counts, counted))
}

#[cfg(test)]
mod tests {
    use keepalive_common::CountRecord;

    use super::records;

    #[test]
    fn records_read_as_the_kernel_writes_them() {
        let mut output = Vec::new();
        for (cgroup_id, keepalive) in [(7_u64, 1_u32), (1 << 40, 0)] {
            output.extend_from_slice(&cgroup_id.to_ne_bytes());
            output.extend_from_slice(&keepalive.to_ne_bytes());
            output.extend_from_slice(&[0; 4]);
        }
        assert_eq!(output.len(), 2 * size_of::<CountRecord>());
        // A torn tail (never written by the kernel, which writes whole records) is ignored.
        output.push(1);
        assert_eq!(records(&output), vec![(7, true), (1 << 40, false)]);
    }
}
