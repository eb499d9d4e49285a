//! `ka_setsockopt` (cgroup/setsockopt): an application's later setsockopt on a keepalive option
//! of an established socket is held to the socket's rule (`enforce::on_app_setsockopt`).
//!
//! The rule level is found from the calling task's cgroup and its ancestors (setsockopt runs
//! in the caller's context, unlike the sock_ops callbacks), so the agent attaches this program
//! once per scope, at its literal prefix, above every cgroup the scope matches now or later;
//! nested scopes share the outermost link, so no chain of runs has to agree. The task's cgroup
//! is the socket's unless the socket came from another cgroup (a passed descriptor);
//! documented.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, BPF_TCP_ESTABLISHED, bpf_sock},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_pid_tgid, bpf_sk_storage_get,
    },
    macros::cgroup_sockopt,
    programs::{SockOpsContext, SockoptContext},
};
use keepalive_common::{
    AttachRecord, INBOUND, OUTBOUND, Outcome, REMEMBER_DIRECTION, Stat,
    enforce::{AppSetsockopt, on_app_setsockopt},
    limits,
    sockopt::{
        SO_KEEPALIVE, SOL_SOCKET, SOL_TCP, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL,
        TCP_USER_TIMEOUT,
    },
};

use crate::{
    KA_AGENT, KA_CGROUPS, KA_DIRECTION, bpf_maps,
    counters::{bump, count_outcome},
};

/// `IPPROTO_TCP` (`<linux/in.h>`; aya-ebpf-bindings does not carry the protocol numbers).
const IPPROTO_TCP: u32 = 6;

#[inline(always)]
fn direction_map() -> *mut c_void {
    // The map's address is what the loader relocates into the map's descriptor.
    (&raw const KA_DIRECTION).cast_mut().cast()
}

/// Records the direction of a socket whose ruleset distinguishes directions.
#[inline(always)]
pub(crate) fn remember_direction(ctx: &SockOpsContext, direction: u32) {
    // SAFETY: the context the kernel passed in; `sk` may be null and is checked.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let mut value = direction;
    // SAFETY: a full socket, the map, and a 4-byte initial value on the stack.
    let slot = unsafe {
        bpf_sk_storage_get(
            direction_map(),
            sk.cast(),
            (&raw mut value).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    if slot.is_null() {
        bump(Stat::ErrReadState);
    }
}

#[cgroup_sockopt(setsockopt)]
fn ka_setsockopt(ctx: SockoptContext) -> i32 {
    hold_to_rule(&ctx);
    // 1: let the call proceed (with the value the hook may have replaced).
    1
}

#[inline(always)]
fn governed(level: i32, name: i32) -> bool {
    (level == SOL_SOCKET && name == SO_KEEPALIVE)
        || (level == SOL_TCP
            && (name == TCP_KEEPIDLE
                || name == TCP_KEEPINTVL
                || name == TCP_KEEPCNT
                || name == TCP_USER_TIMEOUT))
}

#[inline(always)]
fn hold_to_rule(ctx: &SockoptContext) {
    // SAFETY: the context the kernel passed in.
    let sockopt = unsafe { &*ctx.sockopt };
    let (level, name) = (sockopt.level, sockopt.optname);
    if !governed(level, name) {
        return;
    }
    // SAFETY: union field of the context; may be null, checked.
    let sk = unsafe { sockopt.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: non-null full socket of the context.
    let socket: &bpf_sock = unsafe { &*sk };
    // Before the connection is established the sock_ops program will decide anyway.
    if socket.protocol != IPPROTO_TCP || socket.state != BPF_TCP_ESTABLISHED {
        return;
    }
    // SAFETY: a helper without arguments.
    let tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    if KA_AGENT.get(0).is_some_and(|agent| *agent == tgid) {
        return;
    }
    // SAFETY: union fields of the context.
    let (optval, end) = unsafe {
        (
            sockopt.__bindgen_anon_2.optval.cast::<u8>(),
            sockopt.__bindgen_anon_3.optval_end.cast::<u8>(),
        )
    };
    // SAFETY: only compared; the verifier checks the access below against `end`.
    if unsafe { optval.add(4) } > end {
        return;
    }
    let Some(record) = cgroup_record() else {
        return;
    };
    bump(Stat::AppSetsockopt);
    let peer = bpf_maps::bpf_sock_peer(socket);
    let rule = if record.has(REMEMBER_DIRECTION) {
        match remembered_direction(sk) {
            Some(direction) => bpf_maps::decide(&record, &peer, direction),
            None => {
                // Not remembered: both directions lead to the same rule (sock_ops remembers
                // only where they differ), or the socket predates the policy; act only when
                // they agree.
                let outbound = bpf_maps::decide(&record, &peer, OUTBOUND);
                if outbound != bpf_maps::decide(&record, &peer, INBOUND) {
                    return;
                }
                outbound
            }
        }
    } else {
        // No locked rule depends on the direction: either gives the same verdict.
        bpf_maps::decide(&record, &peer, OUTBOUND)
    };
    // SAFETY: 4 bytes within [optval, optval_end), checked above.
    let value = unsafe { optval.cast::<i32>().read_unaligned() };
    match on_app_setsockopt(&rule, level, name, value) {
        AppSetsockopt::Pass => {}
        AppSetsockopt::Replace(replacement) => {
            // SAFETY: as above; the kernel applies the buffer as the program leaves it.
            unsafe { optval.cast::<i32>().write_unaligned(replacement) };
            count_outcome(rule.slot, Outcome::Overridden);
        }
        AppSetsockopt::Audit => count_outcome(rule.slot, Outcome::Overridden),
    }
}

/// The record of the innermost cgroup, from the calling task's cgroup up, that has one.
#[inline(always)]
fn cgroup_record() -> Option<AttachRecord> {
    let mut level = limits::CGROUP_DEPTH as i32;
    while level > 0 {
        level -= 1;
        // SAFETY: a helper taking a level; 0 when the task's cgroup is shallower.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            continue;
        }
        // SAFETY: the element is replaced, not modified, by updates; copied out at once.
        if let Some(record) = unsafe { KA_CGROUPS.get(&id) } {
            return Some(*record);
        }
    }
    None
}

#[inline(always)]
fn remembered_direction(sk: *mut bpf_sock) -> Option<u32> {
    // SAFETY: a full socket and the map; no creation, so no initial value.
    let slot = unsafe { bpf_sk_storage_get(direction_map(), sk.cast(), core::ptr::null_mut(), 0) };
    if slot.is_null() {
        None
    } else {
        // SAFETY: the storage value is a u32 written by `remember_direction`.
        Some(unsafe { *slot.cast::<u32>() })
    }
}
