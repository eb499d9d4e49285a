//! Finding a connection's rule in the lookup maps, written once: the kernel runs it over its
//! BPF maps, the agent's tests and the fuzzer over the compiled tables (keepalive-agent's
//! `compile` module explains how they are built). A few lookups per group of rules the ruleset has, whatever the
//! number of rules; the lowest rule index wins.
//!
//! Everything here is `inline(always)` with bounded loops, so the verifier sees straight-line
//! code.

use crate::{
    AddrKey, AttachRecord, DIM_LOCAL_PORT, DIM_REMOTE, DIM_REMOTE_PORT, DecisionKey, Hit, NO_RULE,
    PortKey, RuleRecord, selector,
};

/// What rules match on, besides the cgroup and the direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Remote address, IPv6, IPv4 mapped (`::ffff:a.b.c.d`), network byte order.
    pub addr: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
}

/// How the three lookup maps are read (the kernel's maps, or the agent's compiled tables).
pub trait Maps {
    /// The entry of the longest prefix of `key.addr` among the entries with `key.ruleset`
    /// and `key.selector` (`ADDR_MAP`, an LPM trie).
    fn addr(&self, key: &AddrKey) -> Option<Hit>;
    /// The entry of the longest prefix of `key.port` among the entries with `key.ruleset` and
    /// `key.selector` (`PORT_MAP`, an LPM trie).
    fn port(&self, key: &PortKey) -> Option<Hit>;
    /// The entry of exactly `key` (`DECISIONS_MAP`, a hash map).
    fn decision(&self, key: &DecisionKey) -> Option<Hit>;
}

/// The rule for a connection at the attachment whose record is `record`: one lookup per group
/// of rules the ruleset has for `direction`; the lowest index wins, else the fallback.
#[inline(always)]
pub fn decide<M: Maps>(maps: &M, record: &AttachRecord, peer: &Peer, direction: u32) -> RuleRecord {
    let mut best = Best {
        index: NO_RULE,
        record: record.fallback,
    };
    if record.groups == 0 {
        return best.record;
    }
    let ruleset = record.ruleset;
    if record.has_group(0, direction) {
        best.take(maps.decision(&DecisionKey {
            ruleset,
            selector: selector(0, 0, direction),
            remote: 0,
            remote_port: 0,
            local_port: 0,
        }));
    }
    if record.has_group(DIM_REMOTE, direction) {
        let key_dir = selector(DIM_REMOTE, DIM_REMOTE, direction);
        best.take(addr(maps, ruleset, key_dir, peer));
    }
    if record.has_group(DIM_REMOTE_PORT, direction) {
        let key_dir = selector(DIM_REMOTE_PORT, DIM_REMOTE_PORT, direction);
        best.take(port(maps, ruleset, key_dir, peer.remote_port));
    }
    if record.has_group(DIM_LOCAL_PORT, direction) {
        let key_dir = selector(DIM_LOCAL_PORT, DIM_LOCAL_PORT, direction);
        best.take(port(maps, ruleset, key_dir, peer.local_port));
    }
    for group in [
        DIM_REMOTE | DIM_REMOTE_PORT,
        DIM_REMOTE | DIM_LOCAL_PORT,
        DIM_REMOTE_PORT | DIM_LOCAL_PORT,
        DIM_REMOTE | DIM_REMOTE_PORT | DIM_LOCAL_PORT,
    ] {
        if record.has_group(group, direction) {
            best.take(multi(maps, ruleset, group, direction, peer));
        }
    }
    best.record
}

/// The lowest-index hit so far.
struct Best {
    index: u32,
    record: RuleRecord,
}

impl Best {
    #[inline(always)]
    fn take(&mut self, hit: Option<Hit>) {
        if let Some(hit) = hit.filter(|hit| hit.index < self.index) {
            self.index = hit.index;
            self.record = hit.record;
        }
    }
}

#[inline(always)]
fn addr<M: Maps>(maps: &M, ruleset: u32, selector: u32, peer: &Peer) -> Option<Hit> {
    maps.addr(&AddrKey {
        ruleset,
        selector,
        addr: peer.addr,
    })
}

#[inline(always)]
fn port<M: Maps>(maps: &M, ruleset: u32, selector: u32, port: u16) -> Option<Hit> {
    maps.port(&PortKey {
        ruleset,
        selector,
        port: port.to_be_bytes(),
        _pad: [0; 2],
    })
}

/// A group of several keys: each key's class, then the combination's entry.
#[inline(always)]
fn multi<M: Maps>(maps: &M, ruleset: u32, group: u32, direction: u32, peer: &Peer) -> Option<Hit> {
    let mut key = DecisionKey {
        ruleset,
        selector: selector(group, 0, direction),
        remote: 0,
        remote_port: 0,
        local_port: 0,
    };
    if group & DIM_REMOTE != 0 {
        key.remote = addr(maps, ruleset, selector(group, DIM_REMOTE, direction), peer)?.class;
    }
    if group & DIM_REMOTE_PORT != 0 {
        let key_dir = selector(group, DIM_REMOTE_PORT, direction);
        key.remote_port = port(maps, ruleset, key_dir, peer.remote_port)?.class;
    }
    if group & DIM_LOCAL_PORT != 0 {
        let key_dir = selector(group, DIM_LOCAL_PORT, direction);
        key.local_port = port(maps, ruleset, key_dir, peer.local_port)?.class;
    }
    maps.decision(&key)
}
