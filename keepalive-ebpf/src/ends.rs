//! How connections end (`keepalive_common::ends`). At establishment, where the connection's
//! rule says so (`RULE_ENDS`), the program asks the kernel for the socket's state changes and
//! retransmission timeouts (per-socket callback flags: other sockets pay nothing more); then:
//! - RTO with `expired` set: retransmissions (or TCP_USER_TIMEOUT) ran out and the kernel
//!   kills the connection right after (`tcp_write_err`): a timeout. The state flag is cleared
//!   so its close is not counted again.
//! - the change to TCP_CLOSE: sorted by the socket's error (`End::at_close`), read from the
//!   `tcp_sock` at the offset the agent took from the kernel's BTF.
//!
//! The rule is decided again at the end (the record in force then): no per-socket storage. An
//! accepted socket also asks for retransmission callbacks (which return at once): the flag
//! tells the end which way the connection was opened, for the failure's destination.

use aya_ebpf::{
    Global,
    bindings::{
        BPF_SOCK_OPS_RETRANS_CB_FLAG, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_ns, bpf_skc_to_tcp_sock},
    macros::map,
    maps::{PerCpuArray, RingBuf},
    programs::SockOpsContext,
};
use keepalive_common::{
    AttachRecord, INBOUND, OUTBOUND, RULE_ENDS, RuleRecord,
    ends::{End, EndEvent, EndOffsets, end_index},
    limits,
    lookup::Peer,
};

use crate::{bpf_maps, counters::add};

/// `TCP_CLOSE` (`<net/tcp_states.h>`).
const TCP_CLOSE: u32 = 7;
const FOLLOW: u32 = BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG;
/// Set on accepted sockets only: the direction, kept where the socket keeps its flags.
const ACCEPTED: u32 = BPF_SOCK_OPS_RETRANS_CB_FLAG;

/// Set at load time; all 0 where the agent does not follow ends or the kernel refused it.
#[unsafe(no_mangle)]
static KA_END_OFFSETS: Global<EndOffsets> = Global::new(EndOffsets {
    enabled: 0,
    err: 0,
    rcv_tstamp: 0,
    retrans_stamp: 0,
});

#[map]
static KA_ENDS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(limits::COUNTED_SLOTS * End::COUNT, 0);

/// Failures only: rare next to connections, and a full buffer loses events, never counts.
#[map]
static KA_END_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Whether this kernel and agent follow ends: a load-time constant.
#[inline(always)]
pub(crate) fn enabled() -> bool {
    KA_END_OFFSETS.load().enabled != 0
}

/// At establishment, where the rule follows ends: the socket's later state changes and
/// retransmission timeouts call the program too.
#[inline(always)]
pub(crate) fn follow(ctx: &SockOpsContext, rule: &RuleRecord, direction: u32) {
    if enabled() && rule.flags & RULE_ENDS != 0 {
        let accepted = if direction == INBOUND { ACCEPTED } else { 0 };
        #[expect(clippy::cast_possible_wrap, reason = "flag bits, far below i32::MAX")]
        let _ = ctx.set_cb_flags((ctx.cb_flags() | FOLLOW | accepted) as i32);
    }
}

/// A state change or a retransmission timeout: the end it is, if any.
#[inline(always)]
pub(crate) fn end_of(ctx: &SockOpsContext, op: u32) -> Option<End> {
    if op == BPF_SOCK_OPS_RTO_CB {
        if ctx.arg(2) == 0 {
            return None;
        }
        // STATE off, ACCEPTED kept for `count`.
        #[expect(clippy::cast_possible_wrap, reason = "flag bits, far below i32::MAX")]
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        return Some(End::Timeout);
    }
    if ctx.arg(1) != TCP_CLOSE {
        return None;
    }
    let tcp = tcp_sock(ctx)?;
    Some(End::at_close(read::<i32>(tcp, KA_END_OFFSETS.load().err)))
}

/// Counts `end` under the rule the attachment gives the connection, and reports a failure.
#[inline(always)]
pub(crate) fn count(ctx: &SockOpsContext, record: &AttachRecord, end: End) {
    let peer = bpf_maps::sock_ops_peer(ctx);
    let direction = if ctx.cb_flags() & ACCEPTED != 0 {
        INBOUND
    } else {
        OUTBOUND
    };
    let rule = bpf_maps::decide(record, &peer, direction);
    add(KA_ENDS.get_ptr_mut(end_index(rule.slot, end)));
    if end.failed() {
        report(ctx, rule.slot, end, &peer, direction);
    }
}

#[inline(always)]
fn report(ctx: &SockOpsContext, slot: u32, end: End, peer: &Peer, direction: u32) {
    let Some(tcp) = tcp_sock(ctx) else {
        return;
    };
    let offsets = KA_END_OFFSETS.load();
    // SAFETY: helpers without arguments.
    let (jiffies, now_ms) = unsafe { (bpf_jiffies64(), bpf_ktime_get_ns() / 1_000_000) };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the kernel keeps both stamps as u32 and compares them modulo 2^32"
    )]
    let (jiffies, now_ms) = (jiffies as u32, now_ms as u32);
    let silent_jiffies = jiffies.wrapping_sub(read::<u32>(tcp, offsets.rcv_tstamp));
    let unanswered_ms = if end == End::Timeout {
        now_ms.wrapping_sub(read::<u32>(tcp, offsets.retrans_stamp))
    } else {
        0
    };
    let event = EndEvent {
        slot,
        end: end as u32,
        remote: peer.addr,
        remote_port: peer.remote_port,
        local_port: peer.local_port,
        silent_jiffies,
        unanswered_ms,
        direction,
    };
    let _ = KA_END_EVENTS.output(&event, 0);
}

/// The callback's socket as a `tcp_sock` (a BTF pointer the verifier lets us read at constant
/// offsets).
#[inline(always)]
fn tcp_sock(ctx: &SockOpsContext) -> Option<*const u8> {
    // SAFETY: the context the kernel passed in; `sk` may be null, checked by the helper.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket pointer; the helper returns null when it is not a full TCP socket.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    (!tcp.is_null()).then_some(tcp.cast_const().cast())
}

/// A field at `offset` bytes into the `tcp_sock`: the offset is a load-time constant, so the
/// verifier checks the access against the kernel's BTF like a CO-RE-relocated one.
#[inline(always)]
fn read<T: Copy>(tcp: *const u8, offset: u32) -> T {
    // SAFETY: `tcp` is a live tcp_sock (BTF pointer); the offset is a field's, from BTF.
    unsafe { core::ptr::read_volatile(tcp.add(offset as usize).cast::<T>()) }
}
