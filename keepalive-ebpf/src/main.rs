//! sock_ops program: keepalive on every new TCP connection of the cgroups it is attached to.
//!
//! It acts on two callbacks only: ACTIVE_ESTABLISHED (a socket of the cgroup connected) and
//! PASSIVE_ESTABLISHED (a listener of the cgroup accepted; the child socket belongs to the
//! listener's cgroup, so the attachment that runs is the listener's, whoever is on the CPU).
//! Every other callback returns at once.
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

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    Global,
    helpers::generated::bpf_setsockopt,
    macros::{map, sock_ops},
    maps::{CgroupStorage, PerCpuArray},
    programs::SockOpsContext,
};
use aya_log_ebpf::warn;
use keepalive_common::{
    HANDLED_MARK, PolicyRecord, Stage, Stat,
    sock_ops::{ACTIVE_ESTABLISHED_CB, PASSIVE_ESTABLISHED_CB},
    sockopt::{
        SO_KEEPALIVE, SOL_SOCKET, SOL_TCP, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL,
        TCP_USER_TIMEOUT,
    },
};

/// The policy of each attachment; see [`PolicyRecord`].
#[map]
static KA_ATTACH: CgroupStorage<PolicyRecord> = CgroupStorage::new();

#[map]
static KA_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// The policy the agent loaded the program with. It covers the moment between an attachment
/// and the agent's first write to that attachment's (zeroed) storage.
#[unsafe(no_mangle)]
static KA_INITIAL: Global<PolicyRecord> = Global::new(PolicyRecord {
    flags: 0,
    idle_secs: 0,
    interval_secs: 0,
    count: 0,
    user_timeout_ms: 0,
    generation: 0,
});

/// Benchmark-only: stop after a step to measure what the steps before it cost (see
/// [`keepalive_common::Stage`]). 0 in production; the value is a load-time constant, so the
/// verifier removes these checks as dead code.
#[unsafe(no_mangle)]
static KA_STAGE: Global<u32> = Global::new(0);

#[sock_ops]
fn ka_sockops(ctx: SockOpsContext) -> u32 {
    let stage = KA_STAGE.load();
    if stage == Stage::Attached as u32 {
        return 1;
    }
    let applied = match ctx.op() {
        ACTIVE_ESTABLISHED_CB => Stat::ActiveApplied,
        PASSIVE_ESTABLISHED_CB => Stat::PassiveApplied,
        _ => return 1,
    };
    if reply(&ctx) == HANDLED_MARK {
        bump(Stat::Deferred);
        return 1;
    }
    ctx.set_reply(HANDLED_MARK);

    // SAFETY: bpf_get_local_storage never fails for a program using cgroup storage; the buffer
    // it points to is replaced, not modified, by user-space updates (RCU), so it stays whole.
    let stored = unsafe { &*KA_ATTACH.get_ptr_mut() };
    let policy = if stored.is_valid() {
        *stored
    } else {
        KA_INITIAL.load()
    };
    if !policy.is_valid() || stage == Stage::Lookup as u32 {
        return 1;
    }

    // The TCP values go first: while SO_KEEPALIVE is still off they are plain stores, and
    // turning it on last arms the keepalive timer once, with the final idle time.
    let mut ok = set(&ctx, SOL_TCP, TCP_KEEPIDLE, policy.idle_secs, Stat::ErrIdle);
    ok &= set(
        &ctx,
        SOL_TCP,
        TCP_KEEPINTVL,
        policy.interval_secs,
        Stat::ErrInterval,
    );
    ok &= set(&ctx, SOL_TCP, TCP_KEEPCNT, policy.count, Stat::ErrCount);
    if policy.has_user_timeout() {
        ok &= set(
            &ctx,
            SOL_TCP,
            TCP_USER_TIMEOUT,
            policy.user_timeout_ms,
            Stat::ErrUserTimeout,
        );
    }
    if stage != Stage::TcpValues as u32 {
        ok &= set(&ctx, SOL_SOCKET, SO_KEEPALIVE, 1, Stat::ErrKeepalive);
    }
    bump(if ok { applied } else { Stat::Failed });
    1
}

#[inline(always)]
fn reply(ctx: &SockOpsContext) -> u32 {
    // SAFETY: `ops` is the context pointer the kernel passed in; `reply` is readable for every op.
    unsafe { (*ctx.ops).__bindgen_anon_1.reply }
}

/// `sizeof(int)`: every option we set is an int.
const OPTLEN: i32 = 4;

/// Sets one option; a failure is counted and logged, never silent.
#[inline(always)]
fn set(ctx: &SockOpsContext, level: i32, name: i32, value: u32, failure: Stat) -> bool {
    let mut value = value as i32;
    // SAFETY: `ctx.ops` is the program's context and `value` a 4-byte stack slot.
    let ret = unsafe {
        bpf_setsockopt(
            ctx.ops.cast::<c_void>(),
            level,
            name,
            (&raw mut value).cast::<c_void>(),
            OPTLEN,
        )
    };
    if ret == 0 {
        return true;
    }
    bump(failure);
    warn!(ctx, "bpf_setsockopt({}, {}) failed: {}", level, name, ret);
    false
}

#[inline(always)]
fn bump(stat: Stat) {
    if let Some(counter) = KA_STATS.get_ptr_mut(stat as u32) {
        // A softirq run can interrupt a process-context run on the same CPU (backlog processing
        // in release_sock), so even this CPU's slot needs an atomic add to never lose a count.
        // The BPF target has no `AtomicU64::fetch_add` (no CAS); the intrinsic lowers to the
        // BPF atomic add instruction.
        // SAFETY: the pointer is this CPU's slot of a live map value, aligned for u64.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
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
