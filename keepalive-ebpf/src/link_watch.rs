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
//!
//! Where the kernel refuses both, a third way: `ka_link_iter` (iter/bpf_link, 5.19) walks every
//! link in the kernel and counts the cgroup links that are attached and run one of the agent's
//! programs. Not a count of changes but of what is in place, read per health check: the agent
//! compares it with its attachments. Its cost grows with the links on the host, but in the
//! kernel (a few tens of ns per link), not a syscall and the cgroup mutex per attachment.

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    bindings::bpf_link_type::BPF_LINK_TYPE_CGROUP,
    helpers::generated::bpf_seq_write,
    macros::{fentry, kprobe, map},
    maps::{Array, PerCpuArray},
    programs::{FEntryContext, ProbeContext},
};
use keepalive_common::LinkOffsets;

use crate::{
    counters::add,
    sweep::{IterMeta, field, read},
};

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

/// The ids of the agent's programs: sock_ops, setsockopt (0 where not loaded).
#[map]
static KA_LINK_PROGS: Array<u32> = Array::with_max_entries(2, 0);

/// The walk's count so far (one walk at a time: the agent's health check).
#[map]
static KA_LINK_SEEN: Array<u64> = Array::with_max_entries(1, 0);

/// The running kernel's field offsets, set at load time from its BTF.
#[unsafe(no_mangle)]
static KA_LINK_OFFSETS: Global<LinkOffsets> = Global::new(LinkOffsets {
    link_type: 0,
    prog: 0,
    prog_aux: 0,
    prog_id: 0,
    cgroup: 0,
});

/// `struct bpf_iter__bpf_link`, the program's context.
#[repr(C)]
struct IterLink {
    meta: *mut IterMeta,
    link: *mut c_void,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_link")]
extern "C" fn ka_link_iter(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<IterLink>();
    // SAFETY: the context the kernel passed in; `link` is null once the walk is done.
    let (meta, link) = unsafe { ((*ctx).meta, (*ctx).link) };
    let Some(seen) = KA_LINK_SEEN.get_ptr_mut(0) else {
        return 0;
    };
    if link.is_null() {
        // The end of the walk: the count is the output, and starts again from zero.
        // SAFETY: the map value, this program's alone while the walk runs; `meta` is the
        // iterator's, valid for the run; eight bytes from the stack.
        unsafe {
            let count = *seen;
            bpf_seq_write((*meta).seq.cast(), (&raw const count).cast::<c_void>(), 8);
            *seen = 0;
        }
        return 0;
    }
    if ours(link) {
        // SAFETY: as above.
        unsafe { *seen += 1 };
    }
    0
}

/// Whether `link` is a cgroup link, attached, running one of the agent's programs. Each walk
/// asks this of every link on the host, so it reads what it can as plain loads: the link, its
/// program and the program's aux are BTF pointers, and the offsets load-time constants, so
/// the verifier checks each field against the kernel's BTF (a helper read costs ~40 ns,
/// most of this program's time when it read every field that way). Only a cgroup link's
/// `cgroup`, past the `bpf_link` the verifier knows the pointer as, takes the helper, and
/// only for the agent's links.
#[inline(always)]
fn ours(link: *const c_void) -> bool {
    let offsets = KA_LINK_OFFSETS.load();
    if field::<u32>(link.cast(), offsets.link_type) != BPF_LINK_TYPE_CGROUP {
        return false;
    }
    let prog = field::<*const c_void>(link.cast(), offsets.prog);
    if prog.is_null() {
        return false;
    }
    let aux = field::<*const c_void>(prog.cast(), offsets.prog_aux);
    if aux.is_null() {
        return false;
    }
    let id = field::<u32>(aux.cast(), offsets.prog_id);
    let program = |index| KA_LINK_PROGS.get(index).copied().unwrap_or(0);
    if id == 0 || (id != program(0) && id != program(1)) {
        return false;
    }
    read::<*const c_void>(link, offsets.cgroup).is_some_and(|cgroup| !cgroup.is_null())
}
