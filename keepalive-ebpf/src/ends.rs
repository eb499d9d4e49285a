//! How connections end (`keepalive_common::ends`). At establishment, where the connection's
//! rule says so (`RULE_ENDS`), the program asks the kernel for the socket's state changes,
//! retransmission timeouts and outgoing segments (per-socket callback flags: other sockets pay
//! nothing more); then:
//! - a segment with data, nothing else in flight, after a silence of a second or more: the
//!   silence goes to the socket's storage ([`Silences`]), to tell at the end the longest one
//!   the connection survived. The segment's header is left as it is (no option space asked).
//! - RTO with `expired` set: retransmissions (or TCP_USER_TIMEOUT) ran out and the kernel
//!   kills the connection right after (`tcp_write_err`): a timeout. The state flag is cleared
//!   so its close is not counted again.
//! - the change to TCP_CLOSE: sorted by the socket's error (`End::at_close`), read from the
//!   `tcp_sock` at the offset the agent took from the kernel's BTF.
//!
//! The rule is decided again at the end (the record in force then), not kept per socket. An
//! accepted socket also asks for retransmission callbacks (which return at once): the flag
//! tells the end which way the connection was opened, for the failure's destination.

use aya_ebpf::{
    Global,
    bindings::{
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_RETRANS_CB_FLAG, BPF_SOCK_OPS_RTO_CB,
        BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
        bpf_sock,
    },
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_jiffies64, bpf_ktime_get_ns, bpf_sk_storage_get, bpf_skc_to_tcp_sock,
    },
    macros::{btf_map, map},
    maps::{PerCpuArray, RingBuf},
    programs::SockOpsContext,
};
use keepalive_common::{
    AttachRecord, INBOUND, OUTBOUND, RULE_ENDS, RuleRecord,
    ends::{End, EndEvent, EndOffsets, Silences, end_index},
    limits,
    lookup::Peer,
};

use crate::{bpf_maps, counters::add, sweep::field};

/// `TCP_CLOSE` (`<net/tcp_states.h>`).
const TCP_CLOSE: u32 = 7;
/// WRITE_HDR_OPT: the program runs as each segment's header is written (HDR_OPT_LEN_CB).
const FOLLOW: u32 =
    BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
/// Set on accepted sockets only: the direction, kept where the socket keeps its flags.
const ACCEPTED: u32 = BPF_SOCK_OPS_RETRANS_CB_FLAG;

/// Set at load time; all 0 where the agent does not follow ends or the kernel refused it.
#[unsafe(no_mangle)]
static KA_END_OFFSETS: Global<EndOffsets> = Global::new(EndOffsets {
    enabled: 0,
    err: 0,
    rcv_tstamp: 0,
    retrans_stamp: 0,
    tracked_silence: 0,
});

#[map]
static KA_ENDS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(limits::COUNTED_SLOTS * End::COUNT, 0);

/// Failures, and normal closes after a tracked silence: rare next to connections, and a full
/// buffer loses events, never counts.
#[map]
static KA_END_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[btf_map]
static KA_SILENCES: SkStorage<Silences> = SkStorage::new();

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

/// The callback's socket, and the same as a `tcp_sock` (a BTF pointer the verifier lets us
/// read at constant offsets).
pub(crate) type Socket = (*mut bpf_sock, *const u8);

/// A state change or a retransmission timeout: the end it is, if any, and the socket (looked
/// up once, for [`count`] too).
#[inline(always)]
pub(crate) fn end_of(ctx: &SockOpsContext, op: u32) -> Option<(End, Option<Socket>)> {
    if op == BPF_SOCK_OPS_RTO_CB {
        if ctx.arg(2) == 0 {
            return None;
        }
        // STATE off, ACCEPTED kept for `count`.
        #[expect(clippy::cast_possible_wrap, reason = "flag bits, far below i32::MAX")]
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        return Some((End::Timeout, tcp_sock(ctx)));
    }
    if ctx.arg(1) != TCP_CLOSE {
        return None;
    }
    let socket = tcp_sock(ctx)?;
    let end = End::at_close(field::<i32>(socket.1, KA_END_OFFSETS.load().err));
    Some((end, Some(socket)))
}

/// A segment about to go out (HDR_OPT_LEN_CB): where it carries data after a silence, with
/// nothing else in flight, the silence is recorded.
#[inline(always)]
pub(crate) fn sending(ctx: &SockOpsContext) {
    // SAFETY: context fields readable at every op (0 where the op has no segment or socket).
    let (data, in_flight) = unsafe { ((*ctx.ops).skb_len, (*ctx.ops).packets_out) };
    if data == 0 || in_flight != 0 {
        return;
    }
    let Some((sk, tcp)) = tcp_sock(ctx) else {
        return;
    };
    let offsets = KA_END_OFFSETS.load();
    let now = jiffies();
    let silence = now.wrapping_sub(field::<u32>(tcp, offsets.rcv_tstamp));
    if silence < offsets.tracked_silence {
        return;
    }
    let mut fresh = Silences {
        survived: 0,
        latest: silence,
        latest_at: now,
        _pad: 0,
    };
    // SAFETY: a full socket, the map, and an initial value of the map's type on the stack.
    let stored = unsafe {
        bpf_sk_storage_get(
            silences_map(),
            sk.cast(),
            (&raw mut fresh).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<Silences>();
    // SAFETY: null or the socket's storage, which the socket's lock (held here) serialises.
    if let Some(stored) = unsafe { stored.as_mut() } {
        // Same stamp: created with this send, or recorded by an ancestor's attachment.
        if stored.latest_at != now {
            stored.sent_after(silence, now);
        }
    }
}

/// Counts `end` under the rule the attachment gives the connection, and reports a failure or
/// a close after a silence the connection survived.
#[inline(always)]
pub(crate) fn count(ctx: &SockOpsContext, record: &AttachRecord, end: End, socket: Option<Socket>) {
    let peer = bpf_maps::sock_ops_peer(ctx);
    let direction = if ctx.cb_flags() & ACCEPTED != 0 {
        INBOUND
    } else {
        OUTBOUND
    };
    let rule = bpf_maps::decide(record, &peer, direction);
    add(KA_ENDS.get_ptr_mut(end_index(rule.slot, end)));
    let Some((sk, tcp)) = socket else {
        return;
    };
    let received_at = field::<u32>(tcp, KA_END_OFFSETS.load().rcv_tstamp);
    // SAFETY: a full socket and the map; no value: only an existing storage is returned.
    let silences = unsafe {
        bpf_sk_storage_get(silences_map(), sk.cast(), core::ptr::null_mut(), 0)
            .cast::<Silences>()
            .as_ref()
    };
    let survived = silences.map_or(0, |silences| silences.survived_by(received_at));
    if end.failed() || survived != 0 {
        let ended = Ended {
            slot: rule.slot,
            end,
            direction,
            received_at,
            survived,
        };
        report(tcp, &ended, &peer);
    }
}

/// What [`report`] sends about a connection's end.
struct Ended {
    slot: u32,
    end: End,
    direction: u32,
    /// `rcv_tstamp`.
    received_at: u32,
    /// Jiffies, [`Silences::survived_by`].
    survived: u32,
}

#[inline(always)]
fn report(tcp: *const u8, ended: &Ended, peer: &Peer) {
    let offsets = KA_END_OFFSETS.load();
    // SAFETY: a helper without arguments.
    let now_ms = unsafe { bpf_ktime_get_ns() } / 1_000_000;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the kernel keeps the stamp as u32 and compares it modulo 2^32"
    )]
    let now_ms = now_ms as u32;
    let silent_jiffies = jiffies().wrapping_sub(ended.received_at);
    let end = ended.end;
    let unanswered_ms = if end == End::Timeout {
        now_ms.wrapping_sub(field::<u32>(tcp, offsets.retrans_stamp))
    } else {
        0
    };
    let event = EndEvent {
        slot: ended.slot,
        end: end as u32,
        remote: peer.addr,
        remote_port: peer.remote_port,
        local_port: peer.local_port,
        silent_jiffies,
        unanswered_ms,
        direction: ended.direction,
        survived_jiffies: ended.survived,
        _pad: 0,
    };
    let _ = KA_END_EVENTS.output(&event, 0);
}

/// The low 32 bits of jiffies, as the kernel's `tcp_jiffies32` stamps keep them.
#[inline(always)]
fn jiffies() -> u32 {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "stamps compared modulo 2^32"
    )]
    let now = now as u32;
    now
}

#[inline(always)]
fn silences_map() -> *mut core::ffi::c_void {
    // The map's address is what the loader relocates into the map's descriptor.
    (&raw const KA_SILENCES).cast_mut().cast()
}

/// The callback's [`Socket`], where it is a full TCP socket.
#[inline(always)]
fn tcp_sock(ctx: &SockOpsContext) -> Option<Socket> {
    // SAFETY: the context the kernel passed in; `sk` may be null, checked by the helper.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket pointer; the helper returns null when it is not a full TCP socket.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    (!tcp.is_null()).then_some((sk, tcp.cast_const().cast()))
}
