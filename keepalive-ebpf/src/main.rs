//! The kernel side: keepalive on every new TCP connection of the cgroups it is attached to.
//!
//! `ka_sockops` acts on two sock_ops callbacks: ACTIVE_ESTABLISHED (a socket of the cgroup
//! connected: outbound) and PASSIVE_ESTABLISHED (a listener of the cgroup accepted: inbound; the
//! child socket belongs to the listener's cgroup, so the attachment that runs is the listener's,
//! whoever is on the CPU). Every other callback returns at once. It finds the rule in the
//! attachment's record and the lookup maps, then applies the rule's mode
//! (`keepalive_common::enforce`).
//!
//! `ka_setsockopt` (cgroup/setsockopt) keeps applications from undoing a locked rule later.
//! `ka_sweep` (iter/tcp) applies the policy to connections that existed before it took effect;
//! `ka_count` (iter/tcp) tells the agent's missing-keepalive gauge which connections lack it.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd: the only atomic add the BPF target offers"
)]
#![expect(
    deprecated,
    reason = "CgroupStorage (BPF_MAP_TYPE_CGROUP_STORAGE) is the storage of the attachment, which \
              is what we need; its replacement is keyed by a cgroup pointer sock_ops cannot get"
)]

mod bpf_maps;
mod count;
mod counters;
mod ends;
mod link_watch;
mod setsockopt;
mod socket;
mod sweep;

use aya_ebpf::{
    Global,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_STATE_CB,
    },
    btf_maps::SkStorage,
    macros::{btf_map, map, sock_ops},
    maps::{Array, CgroupStorage, HashMap, LpmTrie, PerCpuArray},
    programs::SockOpsContext,
};
use keepalive_common::{
    AddrKey, AttachRecord, DecisionKey, HANDLED_MARK, Hit, INBOUND, OUTBOUND, Outcome, PortKey,
    REMEMBER_DIRECTION, RuleRecord, Stage, Stat,
    enforce::{self, Applied},
    limits,
};

use crate::{
    counters::{bump, count_outcome},
    socket::HelperSocket,
};

/// LPM tries require it; for hash maps it also makes an update replace the element under RCU,
/// so a reader sees the old or the new value whole.
const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;

/// The record of each attachment; see [`AttachRecord`].
#[map]
static KA_ATTACH: CgroupStorage<AttachRecord> = CgroupStorage::new();

/// The same records by cgroup id, for the setsockopt hook.
#[map]
static KA_CGROUPS: HashMap<u64, AttachRecord> =
    HashMap::with_max_entries(2 * limits::CGROUPS, NO_PREALLOC);

#[map]
static KA_ADDR: LpmTrie<AddrKey, Hit> =
    LpmTrie::with_max_entries(2 * limits::ADDR_ENTRIES, NO_PREALLOC);

#[map]
static KA_PORT: LpmTrie<PortKey, Hit> =
    LpmTrie::with_max_entries(2 * limits::PORT_ENTRIES, NO_PREALLOC);

#[map]
static KA_DECIDE: HashMap<DecisionKey, Hit> =
    HashMap::with_max_entries(2 * limits::DECISIONS, NO_PREALLOC);

#[map]
static KA_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

#[map]
static KA_RULE_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(limits::COUNTED_SLOTS * Outcome::COUNT, 0);

/// The agent's process id: its own setsockopt calls (on connections that existed before it
/// attached) are not the application's.
#[map]
static KA_AGENT: Array<u32> = Array::with_max_entries(1, 0);

/// Direction of sockets whose rules need it in the setsockopt hook ([`REMEMBER_DIRECTION`]).
#[btf_map]
static KA_DIRECTION: SkStorage<u32> = SkStorage::new();

/// Benchmark-only: stop after a step to measure what the steps before it cost (see
/// [`Stage`]). 0 in production; the value is a load-time constant, so the verifier removes
/// these checks as dead code.
#[unsafe(no_mangle)]
static KA_STAGE: Global<u32> = Global::new(0);

#[sock_ops]
fn ka_sockops(ctx: SockOpsContext) -> u32 {
    let stage = KA_STAGE.load();
    if stage == Stage::Attached as u32 {
        return 1;
    }
    let op = ctx.op();
    let direction = match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => OUTBOUND,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => INBOUND,
        BPF_SOCK_OPS_STATE_CB | BPF_SOCK_OPS_RTO_CB if ends::enabled() => {
            ended(&ctx, op);
            return 1;
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB if ends::enabled() => {
            ends::sending(&ctx);
            return 1;
        }
        _ => return 1,
    };
    // SAFETY: `ops` is the context the kernel passed in; `reply` is readable for every op.
    if unsafe { (*ctx.ops).__bindgen_anon_1.reply } == HANDLED_MARK {
        bump(Stat::Deferred);
        return 1;
    }
    // SAFETY: bpf_get_local_storage never fails for a program using cgroup storage; the buffer
    // it points to is replaced, not modified, by user-space updates (RCU), so it stays whole.
    let record = unsafe { &*KA_ATTACH.get_ptr_mut() };
    if !record.is_valid() {
        // A fresh attachment the agent has not written yet: leave the socket to the programs
        // of ancestor cgroups, which hold a whole policy.
        bump(Stat::Unconfigured);
        return 1;
    }
    ctx.set_reply(HANDLED_MARK);

    let peer = bpf_maps::sock_ops_peer(&ctx);
    let rule = bpf_maps::decide(record, &peer, direction);
    ends::follow(&ctx, &rule, direction);
    if stage == Stage::Lookup as u32 {
        return 1;
    }
    // The setsockopt hook needs the direction only where the other one leads elsewhere (it
    // acts on a socket without one only when both agree). Socket storage is allocated per
    // socket (~200 ns); the other direction's lookups cost less, and usually agree.
    if record.has(REMEMBER_DIRECTION) {
        let other = if direction == OUTBOUND {
            INBOUND
        } else {
            OUTBOUND
        };
        if bpf_maps::decide(record, &peer, other) != rule {
            setsockopt::remember_direction(&ctx, direction);
        }
    }
    let mut socket = HelperSocket::sock_ops(&ctx);
    let applied = if stage == Stage::TcpValues as u32 {
        enforce::set_all(&rule, &mut socket, false)
    } else {
        enforce::apply(&rule, &mut socket)
    };
    report(&ctx, &rule, applied);
    1
}

/// A state change or retransmission timeout of a socket whose ends are followed.
#[inline(always)]
fn ended(ctx: &SockOpsContext, op: u32) {
    let Some((end, socket)) = ends::end_of(ctx, op) else {
        return;
    };
    // SAFETY: as in `ka_sockops`.
    if unsafe { (*ctx.ops).__bindgen_anon_1.reply } == HANDLED_MARK {
        return;
    }
    // SAFETY: as in `ka_sockops`.
    let record = unsafe { &*KA_ATTACH.get_ptr_mut() };
    if !record.is_valid() {
        return;
    }
    ctx.set_reply(HANDLED_MARK);
    ends::count(ctx, record, end, socket);
}

/// Counts the outcome in the rule's slot and every failed option, and logs failures.
#[inline(always)]
fn report(ctx: &SockOpsContext, rule: &RuleRecord, applied: Applied) {
    count_outcome(rule.slot, applied.outcome);
    // Removed by the verifier unless the agent logs at debug level (AYA_LOG_LEVEL).
    aya_log_ebpf::debug!(
        ctx,
        "keepalive: op {} rule slot {} outcome {}",
        ctx.op(),
        rule.slot,
        applied.outcome as u32
    );
    if applied.failed != 0 {
        counters::count_failures(applied.failed);
        aya_log_ebpf::warn!(
            ctx,
            "keepalive: setting options failed (bits {:x}, rule slot {})",
            applied.failed,
            rule.slot
        );
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
