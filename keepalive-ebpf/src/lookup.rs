//! Finding a connection's rule: at most three LPM lookups and one hash lookup, whatever the
//! number of rules (the agent compiled them into classes; see keepalive-agent's compile.rs).

use aya_ebpf::{bindings::bpf_sock, maps::lpm_trie::Key, programs::SockOpsContext};
use keepalive_common::{
    AddrKey, AttachRecord, DIM_DIRECTION, DIM_LOCAL_PORT, DIM_REMOTE, DIM_REMOTE_PORT, DIMS,
    DecisionKey, PortKey, RuleRecord,
};

use crate::{KA_ADDR, KA_DECIDE, KA_LPORT, KA_RPORT};

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

/// The rule for a connection at the attachment whose record is `record`.
#[inline(always)]
pub(crate) fn decide(record: &AttachRecord, peer: &Peer, direction: u32) -> RuleRecord {
    if record.flags & DIMS == 0 {
        return record.fallback;
    }
    let ruleset = record.ruleset;
    let mut key = DecisionKey {
        ruleset,
        direction: 0,
        remote: 0,
        remote_port: 0,
        local_port: 0,
    };
    if record.has(DIM_DIRECTION) {
        key.direction = direction;
    }
    if record.has(DIM_REMOTE) {
        let addr = Key::new(
            32 + 128,
            AddrKey {
                ruleset,
                addr: peer.addr,
            },
        );
        match KA_ADDR.get(&addr) {
            Some(class) => key.remote = *class,
            // The compiler always inserts the ruleset's root prefix; absent means a reload is
            // removing this ruleset, and the fallback is a whole policy of it.
            None => return record.fallback,
        }
    }
    if record.has(DIM_REMOTE_PORT) {
        match KA_RPORT.get(&port_key(ruleset, peer.remote_port)) {
            Some(class) => key.remote_port = *class,
            None => return record.fallback,
        }
    }
    if record.has(DIM_LOCAL_PORT) {
        match KA_LPORT.get(&port_key(ruleset, peer.local_port)) {
            Some(class) => key.local_port = *class,
            None => return record.fallback,
        }
    }
    // SAFETY: the element is replaced, not modified, by updates (no-prealloc hash map, RCU);
    // it is copied out at once.
    match unsafe { KA_DECIDE.get(&key) } {
        Some(rule) => *rule,
        None => record.fallback,
    }
}

#[inline(always)]
fn port_key(ruleset: u32, port: u16) -> Key<PortKey> {
    Key::new(
        32 + 16,
        PortKey {
            ruleset,
            port: port.to_be_bytes(),
            _pad: [0; 2],
        },
    )
}
