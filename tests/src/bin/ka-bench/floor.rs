//! The floor for this job: a sock_ops program with no policy at all that sets the four options
//! on both established callbacks, the way the agent's program does (TCP values first,
//! `SO_KEEPALIVE` last). Assembled here from raw instructions and loaded through the agent's
//! `sys` module (aya loads ELF objects only), so it never enters the agent's object or its
//! production load.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use keepalive_agent::sys;
use keepalive_tests::{Netns, Placement, TestCgroup, Workload};

use crate::Bench;

/// Constants from `linux/bpf.h` (stable UAPI).
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_FUNC_SETSOCKOPT: i32 = 49;
const ACTIVE_ESTABLISHED: i32 = 4;
const PASSIVE_ESTABLISHED: i32 = 5;

/// One `struct bpf_insn` (code, dst and src registers in one byte, offset, immediate) as the
/// 8 bytes the kernel reads.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let off = off.to_ne_bytes();
    let imm = imm.to_ne_bytes();
    u64::from_ne_bytes([
        code,
        dst | (src << 4),
        off[0],
        off[1],
        imm[0],
        imm[1],
        imm[2],
        imm[3],
    ])
}

const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const LDX_W: u8 = 0x61;
const ST_W: u8 = 0x62;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

/// The options, in the order the agent sets them, with the default policy's values.
const OPTIONS: [(i32, i32, i32); 4] = [
    (libc::SOL_TCP, libc::TCP_KEEPIDLE, 60),
    (libc::SOL_TCP, libc::TCP_KEEPINTVL, 5),
    (libc::SOL_TCP, libc::TCP_KEEPCNT, 3),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
];

/// `r6 = ctx; if op is not an established callback, return 1; else bpf_setsockopt(ctx, level,
/// name, &value, 4)` for each option; return 1.
fn program() -> Vec<u64> {
    let per_option = 8;
    let skip = i16::try_from(OPTIONS.len() * per_option).unwrap_or(i16::MAX);
    let mut code = vec![
        insn(MOV64_REG, 6, 1, 0, 0),
        insn(LDX_W, 2, 1, 0, 0),
        insn(JEQ_IMM, 2, 0, 1, ACTIVE_ESTABLISHED),
        insn(JNE_IMM, 2, 0, skip, PASSIVE_ESTABLISHED),
    ];
    for (level, name, value) in OPTIONS {
        code.extend([
            insn(ST_W, 10, 0, -4, value),
            insn(MOV64_REG, 1, 6, 0, 0),
            insn(MOV64_IMM, 2, 0, 0, level),
            insn(MOV64_IMM, 3, 0, 0, name),
            insn(MOV64_REG, 4, 10, 0, 0),
            insn(ADD64_IMM, 4, 0, 0, -4),
            insn(MOV64_IMM, 5, 0, 0, 4),
            insn(CALL, 0, 0, 0, BPF_FUNC_SETSOCKOPT),
        ]);
    }
    code.extend([insn(MOV64_IMM, 0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)]);
    code
}

/// The program loaded and attached to one cgroup; dropping it detaches and unloads it.
#[derive(Debug)]
pub(crate) struct FloorProgram {
    // The link goes first: closing it detaches the program.
    _link: OwnedFd,
    program: OwnedFd,
    id: u32,
}

impl FloorProgram {
    pub(crate) fn attach(cgroup: &Path) -> Self {
        let program = sys::load_program(BPF_PROG_TYPE_SOCK_OPS, "ka_floor", &program())
            .unwrap_or_else(|(e, log)| panic!("load the floor program: {e}\n{log}"));
        let dir = std::fs::File::open(cgroup)
            .unwrap_or_else(|e| panic!("open {}: {e}", cgroup.display()));
        let link = sys::link_cgroup(program.as_fd(), dir.as_fd(), BPF_CGROUP_SOCK_OPS)
            .unwrap_or_else(|e| panic!("attach the floor program to {}: {e}", cgroup.display()));
        let id = sys::program_id(program.as_fd())
            .unwrap_or_else(|e| panic!("read the floor program's id: {e}"));
        Self {
            _link: link,
            program,
            id,
        }
    }

    /// Run time and run count so far (kernel BPF statistics, while they are enabled).
    pub(crate) fn stats(&self) -> (Duration, u64) {
        let _open = &self.program;
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|info| info.id() == self.id)
            .unwrap_or_else(|| panic!("the floor program (id {}) is not loaded", self.id));
        (info.run_time(), info.run_count())
    }
}

/// Panics unless both ends of a connection in `cgroup` (where the floor program is attached)
/// carry its values: a floor that set nothing would make every ratio to it meaningless.
pub(crate) fn check(bench: &Bench, cgroup: &TestCgroup) {
    let netns = Netns::new();
    let tally = Workload::spawn(
        &bench.probe,
        &["tally", "127.0.0.1:0", "1"],
        Placement::new(cgroup, &netns),
    );
    let seen = tally.expect("tally");
    // `tally KEEPALIVE IDLE INTERVAL COUNT ENDS`: one line, both ends alike.
    assert_eq!(
        seen,
        ["1", "60", "5", "3", "2"],
        "the floor program did not set SO_KEEPALIVE 1, idle 60, interval 5, count 3 on both ends"
    );
}
