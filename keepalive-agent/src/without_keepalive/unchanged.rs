//! Whether a count of connections without keepalive can differ from the last one, learnt
//! without walking cgroups or sockets. A count walks the scopes' cgroups and every socket of
//! their namespaces (100,000 connections: ~80 ms of the kernel's time, each minute); these
//! figures cost a few map reads and one small read per namespace counted, whatever the
//! connections and cgroups.
//!
//! A count can change only when
//! - a connection enters or leaves the counted states (ESTABLISHED, CLOSE_WAIT) in a namespace
//!   counted last time: that namespace's TCP figures move (`/proc/PID/net/snmp`: CurrEstab is
//!   the number in those states; ActiveOpens and PassiveOpens rise at each open, so a close
//!   and an open between two reads still show; EstabResets rises at each reset);
//! - a connection of the scopes opens in a namespace not counted last time: the sock_ops
//!   program decides every new connection of the scopes and counts its outcome;
//! - an application turns keepalive on or off on a connection: the lock's hook (cgroup/
//!   setsockopt) counts those calls (`app_setsockopt`); without the hook nothing is skipped;
//! - the agent changes what it covers or sets: cgroups followed, a sweep of existing
//!   connections done, a policy applied ([`crate::status::AgentTelemetry::changes`]).
//!
//! Anything unreadable counts as a change.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use keepalive_common::Stat;

use crate::enforcer::PinnedMaps;

/// The Tcp figures of `/proc/PID/net/snmp` that move when the count of a namespace can.
const TCP_FIGURES: [&str; 4] = ["ActiveOpens", "PassiveOpens", "EstabResets", "CurrEstab"];

/// Everything a count depends on, as read before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unchanged {
    /// The agent's side: the scopes, the policy's generation, and its count of changes.
    agent: (Vec<String>, u32, u64),
    /// New connections decided in the scopes (every rule's outcomes) and applications'
    /// keepalive calls there.
    kernel: u64,
    /// Each namespace counted: its TCP figures.
    namespaces: BTreeMap<u64, TcpFigures>,
}

/// A namespace's [`TCP_FIGURES`] (None: gone or unreadable).
pub type TcpFigures = Option<[u64; TCP_FIGURES.len()]>;

/// The namespaces a count visited: inode -> (`/proc/PID/ns/net`, its figures before the count).
pub type CountedNamespaces = BTreeMap<u64, (PathBuf, TcpFigures)>;

impl Unchanged {
    /// The agent's and the kernel's figures now, to read before a count; `slots`: the rule
    /// slots in force. None when a map cannot be read.
    pub fn before_count(
        agent: (Vec<String>, u32, u64),
        maps: &PinnedMaps,
        slots: &[u32],
    ) -> Option<Self> {
        let mut kernel = maps.counters().ok()?.get(Stat::AppSetsockopt);
        for slot in slots {
            let outcomes = maps.outcomes(*slot).ok()?;
            kernel = outcomes
                .0
                .iter()
                .fold(kernel, |sum, n| sum.wrapping_add(*n));
        }
        Some(Self {
            agent,
            kernel,
            namespaces: BTreeMap::new(),
        })
    }

    /// With the namespaces' figures as the count read them, each just before counting it.
    #[must_use]
    pub fn counted_in(mut self, namespaces: &CountedNamespaces) -> Self {
        self.namespaces = namespaces
            .iter()
            .map(|(inode, (_, figures))| (*inode, *figures))
            .collect();
        self
    }

    /// The figures now, for the namespaces the last count visited: equal to the ones that
    /// count made ([`Self::before_count`], [`Self::counted_in`]) when it would count the same.
    pub fn now(
        agent: (Vec<String>, u32, u64),
        maps: &PinnedMaps,
        slots: &[u32],
        namespaces: &CountedNamespaces,
    ) -> Option<Self> {
        let mut now = Self::before_count(agent, maps, slots)?;
        now.namespaces = namespaces
            .iter()
            .map(|(inode, (entry, _))| (*inode, tcp_figures(*inode, entry)))
            .collect();
        Some(now)
    }
}

/// The namespace's TCP figures, read through the process `entry` (`/proc/PID/ns/net`)
/// names, if it is still in the namespace `inode`.
pub(super) fn tcp_figures(inode: u64, entry: &Path) -> TcpFigures {
    let snmp = entry.parent()?.parent()?.join("net/snmp");
    let text = fs::read_to_string(snmp).ok()?;
    // Read after the figures: a process that left the namespace meanwhile is seen.
    (fs::metadata(entry).ok()?.ino() == inode).then_some(())?;
    parse_tcp(&text)
}

/// The [`TCP_FIGURES`] of an snmp file: a `Tcp:` line of names, then one of values.
fn parse_tcp(snmp: &str) -> Option<[u64; TCP_FIGURES.len()]> {
    let mut tcp = snmp.lines().filter_map(|line| line.strip_prefix("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let named: BTreeMap<&str, &str> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .collect();
    let mut figures = [0; TCP_FIGURES.len()];
    for (figure, name) in figures.iter_mut().zip(TCP_FIGURES) {
        *figure = named.get(name)?.parse().ok()?;
    }
    Some(figures)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

    use super::*;

    const SNMP: &str = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
        Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails \
        EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n\
        Tcp: 1 200 120000 -1 41 37 2 5 12 900 880 3 0 7 0\n\
        Udp: InDatagrams\nUdp: 4\n";

    #[test]
    fn the_tcp_figures_are_read_by_name() {
        assert_eq!(parse_tcp(SNMP), Some([41, 37, 5, 12]));
        // A kernel that lacks a figure, or a torn file: no answer, so a count.
        assert_eq!(parse_tcp(&SNMP.replace("CurrEstab", "Other")), None);
        assert_eq!(parse_tcp("Tcp: ActiveOpens\n"), None);
    }

    #[test]
    fn this_processs_namespace_is_read_and_a_wrong_inode_is_no_answer() {
        let entry = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
        let inode = fs::metadata(&entry).unwrap().ino();
        let figures = tcp_figures(inode, &entry).unwrap();
        // CurrEstab cannot exceed the connections ever opened since the namespace began.
        assert!(figures[3] <= figures[0] + figures[1], "{figures:?}");
        assert_eq!(tcp_figures(inode + 1, &entry), None);
        assert_eq!(tcp_figures(inode, Path::new("/proc/0/ns/net")), None);
    }
}
