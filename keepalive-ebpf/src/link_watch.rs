//! A count of cgroup links detached (BPF_LINK_DETACH: `bpf_cgroup_link_detach`) or given
//! another program (BPF_LINK_UPDATE: `cgroup_bpf_replace`), host-wide. The kernel sends no
//! event when that happens to a link, and asking each link costs a syscall (and the global
//! cgroup mutex) per attachment; this count is one figure the agent reads per health check,
//! and it walks its attachments only when the figure moved.
//!
//! Two ways in, the agent takes the first the kernel accepts: fentry programs (BPF
//! trampolines: no perf events, no tracefs; x86-64 from 5.5, arm64 from 6.0, and the kernel's
//! BTF) and a kprobe on both functions (kernels with CONFIG_KPROBES). Both functions are static,
//! reached through the link's ops table, so never inlined; both exist since Linux 5.9.

use aya_ebpf::{
    macros::{fentry, kprobe, map},
    maps::PerCpuArray,
    programs::{FEntryContext, ProbeContext},
};

use crate::counters::add;

#[map]
static KA_LINK_CHANGES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[fentry(function = "bpf_cgroup_link_detach")]
fn ka_link_detach(_ctx: FEntryContext) -> u32 {
    add(KA_LINK_CHANGES.get_ptr_mut(0));
    0
}

#[fentry(function = "cgroup_bpf_replace")]
fn ka_link_update(_ctx: FEntryContext) -> u32 {
    add(KA_LINK_CHANGES.get_ptr_mut(0));
    0
}

#[kprobe]
fn ka_link_kprobe(_ctx: ProbeContext) -> u32 {
    add(KA_LINK_CHANGES.get_ptr_mut(0));
    0
}
