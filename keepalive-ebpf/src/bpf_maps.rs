//! A connection's peer read from the program's context, and the kernel's lookup maps behind
//! `keepalive_common::lookup`, which finds the rule (the same code the agent's tests and the
//! fuzzer run over the compiled tables).

use aya_ebpf::{bindings::bpf_sock, maps::lpm_trie::Key, programs::SockOpsContext};
use keepalive_common::{
    AddrKey, AttachRecord, DecisionKey, Hit, PortKey, RuleRecord,
    lookup::{self, Maps, Peer},
};

use crate::{KA_ADDR, KA_DECIDE, KA_PORT};

/// `AF_INET` (`<linux/socket.h>`; aya-ebpf-bindings does not carry the address families).
const AF_INET: u32 = 2;

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

/// The peer of a socket the TCP iterator visits, from its `sock_common` fields: `remote_port`
/// in network byte order, `local_port` in host byte order (skc_dport, skc_num).
#[inline(always)]
pub(crate) fn sock_common_peer(
    family: u16,
    remote_ip4: u32,
    remote_ip6: [u32; 4],
    remote_port: u16,
    local_port: u16,
) -> Peer {
    Peer {
        addr: mapped(u32::from(family), remote_ip4, remote_ip6),
        remote_port: u16::from_be(remote_port),
        local_port,
    }
}

/// The kernel's lookup maps, read through `keepalive_common::lookup`.
struct KernelMaps;

impl Maps for KernelMaps {
    #[inline(always)]
    fn addr(&self, key: &AddrKey) -> Option<Hit> {
        KA_ADDR.get(&Key::new(64 + 128, *key)).copied()
    }

    #[inline(always)]
    fn port(&self, key: &PortKey) -> Option<Hit> {
        KA_PORT.get(&Key::new(64 + 16, *key)).copied()
    }

    #[inline(always)]
    fn decision(&self, key: &DecisionKey) -> Option<Hit> {
        // SAFETY: the element is replaced, not modified, by updates (no-prealloc hash map,
        // RCU); it is copied out at once.
        unsafe { KA_DECIDE.get(key) }.copied()
    }
}

/// The rule for a connection at the attachment whose record is `record`
/// (`keepalive_common::lookup::decide` over the kernel's maps).
#[inline(always)]
pub(crate) fn decide(record: &AttachRecord, peer: &Peer, direction: u32) -> RuleRecord {
    lookup::decide(&KernelMaps, record, peer, direction)
}
