//! `ka_sweep` (iter/tcp): the policy applied, in the kernel, to connections that already exist.
//!
//! The agent reads the iterator once per network namespace (the iterator walks the namespace
//! it is created in). The kernel hands each TCP socket over locked, listeners first, then
//! established ones, so `bpf_getsockopt`/`bpf_setsockopt` may act on it (Linux 5.14, commit
//! 3cee6fb8e69e, "bpf: tcp: Support bpf_(get|set)sockopt in bpf tcp iter"). A socket is
//! attributed to its cgroup by the kernel's own record of it (`sk_cgrp_data`, the cgroup the
//! socket was created in, which sock_ops and inet_diag use too), read at offsets the agent
//! takes from the kernel's BTF. The rule is found and applied with the same code as the
//! sock_ops program; each connection's outcome is one byte of the iterator's output.

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_seq_write, bpf_skc_to_tcp_sock},
    },
    macros::map,
    maps::HashMap,
};
use keepalive_common::{
    AttachRecord, INBOUND, OUTBOUND, SockOffsets,
    enforce::{self},
    limits,
};

use crate::{NO_PREALLOC, bpf_maps, socket::HelperSocket};

/// `TCP_ESTABLISHED` and `TCP_LISTEN` (`<net/tcp_states.h>`).
pub(crate) const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;

/// Cgroups the running sweep covers, each with the record of the attachment that governs it.
#[map]
static KA_SWEEP: HashMap<u64, AttachRecord> =
    HashMap::with_max_entries(limits::SWEEP_CGROUPS, NO_PREALLOC);

/// Local ports of the listeners of the namespace being swept (emptied between namespaces).
#[map]
static KA_LISTEN: HashMap<u32, u32> = HashMap::with_max_entries(limits::LISTEN_PORTS, NO_PREALLOC);

/// The running kernel's field offsets, set at load time from its BTF.
#[unsafe(no_mangle)]
pub(crate) static KA_SK_OFFSETS: Global<SockOffsets> = Global::new(SockOffsets {
    family: 0,
    state: 0,
    remote_port: 0,
    local_port: 0,
    remote_ip4: 0,
    remote_ip6: 0,
    cgroup: 0,
    cgroup_kn: 0,
    kn_id: 0,
    flags: 0,
});

/// `struct bpf_iter_meta`.
#[repr(C)]
pub(crate) struct IterMeta {
    pub(crate) seq: *mut c_void,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__tcp`, the program's context.
#[repr(C)]
struct IterTcp {
    meta: *mut IterMeta,
    sk_common: *mut c_void,
    uid: u32,
}

/// The iterator's metadata and the full TCP socket (`struct tcp_sock`) an iter/tcp program is
/// called with; None at the end of the walk and for request and time-wait sockets.
#[inline(always)]
pub(crate) fn tcp_sock_of(ctx: *mut c_void) -> Option<(*mut IterMeta, *mut c_void)> {
    let ctx = ctx.cast::<IterTcp>();
    // SAFETY: the context the kernel passed in; `sk_common` is null once the walk is done.
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket of the iterator; null unless it is a full TCP socket.
    let tcp_sock = unsafe { bpf_skc_to_tcp_sock(sk) }.cast::<c_void>();
    (!tcp_sock.is_null()).then_some((meta, tcp_sock))
}

/// The field at `offset` bytes into the kernel structure `base` points to, as a plain load:
/// `base` is a BTF pointer the verifier tracks and the offset a load-time constant from the
/// kernel's BTF, so the verifier checks the access like a CO-RE-relocated one (and makes it
/// fault-safe), without a helper call.
#[inline(always)]
pub(crate) fn field<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: as above: a non-null BTF pointer and a field's offset, checked by the verifier.
    unsafe { core::ptr::read_volatile(base.add(offset as usize).cast::<T>()) }
}

/// A `T` at `offset` bytes into the kernel object at `base`.
#[inline(always)]
pub(crate) fn read<T>(base: *const c_void, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel copies from any kernel address, failing (not faulting)
    // where nothing is mapped.
    unsafe { bpf_probe_read_kernel(base.cast::<u8>().add(offset as usize).cast::<T>()) }.ok()
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
extern "C" fn ka_sweep(ctx: *mut c_void) -> i32 {
    let Some((meta, tcp_sock)) = tcp_sock_of(ctx) else {
        return 0;
    };
    let offsets = KA_SK_OFFSETS.load();
    let (Some(state), Some(local_port)) = (
        read::<u8>(tcp_sock, offsets.state),
        read::<u16>(tcp_sock, offsets.local_port),
    ) else {
        return 0;
    };
    if state == TCP_LISTEN {
        // Listeners come before established sockets; a full map only loses directions.
        let _full = KA_LISTEN.insert(&u32::from(local_port), &1, 0);
        return 0;
    }
    if state != TCP_ESTABLISHED {
        return 0;
    }
    let Some(record) = cgroup_id(tcp_sock, &offsets).and_then(|id| {
        // SAFETY: the element is replaced, not modified, by updates; copied out at once.
        unsafe { KA_SWEEP.get(&id) }.copied()
    }) else {
        return 0;
    };
    // SAFETY: only tested for presence.
    let direction = if unsafe { KA_LISTEN.get(&u32::from(local_port)) }.is_some() {
        INBOUND
    } else {
        OUTBOUND
    };
    let (Some(family), Some(remote_ip4), Some(remote_ip6), Some(remote_port)) = (
        read::<u16>(tcp_sock, offsets.family),
        read::<u32>(tcp_sock, offsets.remote_ip4),
        read::<[u32; 4]>(tcp_sock, offsets.remote_ip6),
        read::<u16>(tcp_sock, offsets.remote_port),
    ) else {
        return 0;
    };
    let peer = bpf_maps::sock_common_peer(family, remote_ip4, remote_ip6, remote_port, local_port);
    let rule = bpf_maps::decide(&record, &peer, direction);
    let applied = enforce::apply(&rule, &mut HelperSocket::tcp_sock(tcp_sock));
    let outcome = applied.outcome as u8;
    // SAFETY: `meta` is the iterator's, valid for the run; one byte from the stack.
    unsafe { bpf_seq_write((*meta).seq.cast(), (&raw const outcome).cast::<c_void>(), 1) };
    0
}

/// The id of the cgroup v2 the socket belongs to: `sk->sk_cgrp_data.cgroup->kn->id`.
#[inline(always)]
pub(crate) fn cgroup_id(sock: *const c_void, offsets: &SockOffsets) -> Option<u64> {
    let cgroup = read::<*const c_void>(sock, offsets.cgroup)?;
    let node = read::<*const c_void>(cgroup, offsets.cgroup_kn)?;
    read::<u64>(node, offsets.kn_id)
}
