//! Per-CPU counters. Increments are atomic: a softirq run can interrupt a process-context run on
//! the same CPU (backlog processing in release_sock), so even this CPU's slot needs an atomic
//! add to never lose a count.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use keepalive_common::{
    Outcome, Stat,
    enforce::{
        FAILED_COUNT, FAILED_IDLE, FAILED_INTERVAL, FAILED_KEEPALIVE, FAILED_READ,
        FAILED_USER_TIMEOUT,
    },
    rule_stat_index,
};

use crate::{KA_RULE_STATS, KA_STATS};

#[inline(always)]
pub(crate) fn add(counter: Option<*mut u64>) {
    if let Some(counter) = counter {
        // The BPF target has no `AtomicU64::fetch_add` (no CAS); the intrinsic lowers to the
        // BPF atomic add instruction.
        // SAFETY: the pointer is this CPU's slot of a live map value, aligned for u64.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
    }
}

#[inline(always)]
pub(crate) fn bump(stat: Stat) {
    add(KA_STATS.get_ptr_mut(stat as u32));
}

#[inline(always)]
pub(crate) fn count_outcome(slot: u32, outcome: Outcome) {
    add(KA_RULE_STATS.get_ptr_mut(rule_stat_index(slot, outcome)));
}

/// One count per failed option (`enforce::FAILED_*` bits).
#[inline(always)]
pub(crate) fn count_failures(failed: u32) {
    for (bit, stat) in [
        (FAILED_KEEPALIVE, Stat::ErrKeepalive),
        (FAILED_IDLE, Stat::ErrIdle),
        (FAILED_INTERVAL, Stat::ErrInterval),
        (FAILED_COUNT, Stat::ErrCount),
        (FAILED_USER_TIMEOUT, Stat::ErrUserTimeout),
        (FAILED_READ, Stat::ErrReadState),
    ] {
        if failed & bit != 0 {
            bump(stat);
        }
    }
}
