//! Finding a connection's rule: a few lookups per group of rules, whatever the number of rules
//! (the agent compiled them; see keepalive-agent's compile.rs).

use aya_ebpf::{bindings::bpf_sock, maps::lpm_trie::Key, programs::SockOpsContext};
use keepalive_common::{
    AddrKey, AttachRecord, DIM_LOCAL_PORT, DIM_REMOTE, DIM_REMOTE_PORT, DecisionKey, Hit, NO_RULE,
    PortKey, RuleRecord, kind_dir,
};

use crate::{KA_ADDR, KA_DECIDE, KA_PORT};

const AF_INET: u32 = 2;

/// What rules match on, besides the cgroup and the direction.
pub(crate) struct Peer {
    /// Remote address, IPv6, IPv4 mapped (`::ffff:a.b.c.d`), network byte order.
    pub(crate) addr: [u8; 16],
    pub(crate) remote_port: u16,
    pub(crate) local_port: u16,
}

#[inline(always)]
fn mapped(family: u32, ip4: u32, ip6: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    if family == AF_INET {
        addr[10] = 0xff;
        addr[11] = 0xff;
        // Stored in network byte order: the bytes in memory are the address's bytes.
        let v4 = ip4.to_ne_bytes();
        addr[12] = v4[0];
        addr[13] = v4[1];
        addr[14] = v4[2];
        addr[15] = v4[3];
    } else {
        for (i, word) in ip6.iter().enumerate() {
            let bytes = word.to_ne_bytes();
            addr[i * 4] = bytes[0];
            addr[i * 4 + 1] = bytes[1];
            addr[i * 4 + 2] = bytes[2];
            addr[i * 4 + 3] = bytes[3];
        }
    }
    addr
}

/// Reads four u32 context fields one by one: the verifier allows only 4-byte accesses to
/// them, and LLVM would otherwise merge neighbouring loads into 8-byte ones.
#[inline(always)]
fn words(field: *const [u32; 4]) -> [u32; 4] {
    let first = field.cast::<u32>();
    // SAFETY: `field` points at a [u32; 4] inside the program's context.
    unsafe {
        [
            core::ptr::read_volatile(first),
            core::ptr::read_volatile(first.add(1)),
            core::ptr::read_volatile(first.add(2)),
            core::ptr::read_volatile(first.add(3)),
        ]
    }
}

/// The peer of a sock_ops callback.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "ports are 16-bit values in u32 fields"
)]
pub(crate) fn sock_ops_peer(ctx: &SockOpsContext) -> Peer {
    // SAFETY: the context the kernel passed in.
    let ip6 = words(unsafe { &raw const (*ctx.ops).remote_ip6 });
    Peer {
        addr: mapped(ctx.family(), ctx.remote_ip4(), ip6),
        // bpf_sock_ops.remote_port is the port in network byte order in the high half of a
        // host-order u32 (the kernel shifts skc_dport left by 16 on little-endian), so the u32
        // read as big-endian is the port; local_port is in host byte order.
        remote_port: u32::from_be(ctx.remote_port()) as u16,
        local_port: ctx.local_port() as u16,
    }
}

/// The peer of a full socket (`struct bpf_sock`).
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "ports are 16-bit values in u32 fields"
)]
pub(crate) fn bpf_sock_peer(sk: &bpf_sock) -> Peer {
    Peer {
        addr: mapped(sk.family, sk.dst_ip4, words(&raw const sk.dst_ip6)),
        // bpf_sock.dst_port is a __be16; src_port is in host byte order.
        remote_port: u16::from_be(sk.dst_port),
        local_port: sk.src_port as u16,
    }
}

/// The rule for a connection at the attachment whose record is `record`: one lookup per group
/// of rules the ruleset has (see keepalive-agent's compile.rs); the lowest index wins.
#[inline(always)]
pub(crate) fn decide(record: &AttachRecord, peer: &Peer, direction: u32) -> RuleRecord {
    let mut best = Best {
        index: NO_RULE,
        record: record.fallback,
    };
    if record.kinds == 0 {
        return best.record;
    }
    let ruleset = record.ruleset;
    if record.has_kind(0, direction) {
        best.take(decision(&DecisionKey {
            ruleset,
            kind_dir: kind_dir(0, 0, direction),
            remote: 0,
            remote_port: 0,
            local_port: 0,
        }));
    }
    if record.has_kind(DIM_REMOTE, direction) {
        best.take(addr(
            ruleset,
            kind_dir(DIM_REMOTE, DIM_REMOTE, direction),
            peer,
        ));
    }
    if record.has_kind(DIM_REMOTE_PORT, direction) {
        let key_dir = kind_dir(DIM_REMOTE_PORT, DIM_REMOTE_PORT, direction);
        best.take(port(ruleset, key_dir, peer.remote_port));
    }
    if record.has_kind(DIM_LOCAL_PORT, direction) {
        let key_dir = kind_dir(DIM_LOCAL_PORT, DIM_LOCAL_PORT, direction);
        best.take(port(ruleset, key_dir, peer.local_port));
    }
    for group in [
        DIM_REMOTE | DIM_REMOTE_PORT,
        DIM_REMOTE | DIM_LOCAL_PORT,
        DIM_REMOTE_PORT | DIM_LOCAL_PORT,
        DIM_REMOTE | DIM_REMOTE_PORT | DIM_LOCAL_PORT,
    ] {
        if record.has_kind(group, direction) {
            best.take(multi(ruleset, group, direction, peer));
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
        if let Some(hit) = hit
            && hit.index < self.index
        {
            self.index = hit.index;
            self.record = hit.record;
        }
    }
}

#[inline(always)]
fn addr(ruleset: u32, kind_dir: u32, peer: &Peer) -> Option<Hit> {
    let key = Key::new(
        64 + 128,
        AddrKey {
            ruleset,
            kind_dir,
            addr: peer.addr,
        },
    );
    KA_ADDR.get(&key).copied()
}

#[inline(always)]
fn port(ruleset: u32, kind_dir: u32, port: u16) -> Option<Hit> {
    let key = Key::new(
        64 + 16,
        PortKey {
            ruleset,
            kind_dir,
            port: port.to_be_bytes(),
            _pad: [0; 2],
        },
    );
    KA_PORT.get(&key).copied()
}

#[inline(always)]
fn decision(key: &DecisionKey) -> Option<Hit> {
    // SAFETY: the element is replaced, not modified, by updates (no-prealloc hash map, RCU);
    // it is copied out at once.
    unsafe { KA_DECIDE.get(key) }.copied()
}

/// A group of several keys: each key's class, then the combination's entry.
#[inline(always)]
fn multi(ruleset: u32, group: u32, direction: u32, peer: &Peer) -> Option<Hit> {
    let mut key = DecisionKey {
        ruleset,
        kind_dir: kind_dir(group, 0, direction),
        remote: 0,
        remote_port: 0,
        local_port: 0,
    };
    if group & DIM_REMOTE != 0 {
        key.remote = addr(ruleset, kind_dir(group, DIM_REMOTE, direction), peer)?.class;
    }
    if group & DIM_REMOTE_PORT != 0 {
        key.remote_port = port(
            ruleset,
            kind_dir(group, DIM_REMOTE_PORT, direction),
            peer.remote_port,
        )?
        .class;
    }
    if group & DIM_LOCAL_PORT != 0 {
        key.local_port = port(
            ruleset,
            kind_dir(group, DIM_LOCAL_PORT, direction),
            peer.local_port,
        )?
        .class;
    }
    decision(&key)
}
