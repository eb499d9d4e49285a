//! The floor for this job: a sock_ops program with no policy at all that sets the four options
//! on both established callbacks, the way the agent's program does (TCP values first,
//! `SO_KEEPALIVE` last). Assembled here from raw instructions and loaded with the `bpf(2)`
//! system call, so it never enters the agent's object or its production load.

use std::{
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use keepalive_tests::{Netns, Placement, TestCgroup, Workload};

use crate::Bench;

/// `bpf(2)` commands and constants from `linux/bpf.h` (stable UAPI).
const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_LINK_CREATE: i64 = 28;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_FUNC_SETSOCKOPT: i32 = 49;
const ACTIVE_ESTABLISHED: i32 = 4;
const PASSIVE_ESTABLISHED: i32 = 5;

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
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
fn program() -> Vec<Insn> {
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

/// The prefix of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel zero-fills the rest.
#[repr(C)]
#[derive(Debug, Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Debug, Default)]
struct GetInfo {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `bpf(cmd, attr)`, returning the new descriptor.
fn bpf<T>(cmd: i64, attr: &mut T) -> std::io::Result<i64> {
    let size = size_of::<T>();
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` of `size` bytes, alive for the
    // call; every pointer inside points to memory that outlives it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

fn owned(fd: i64) -> OwnedFd {
    let fd = i32::try_from(fd).unwrap_or_else(|_| panic!("bpf(2) returned {fd}"));
    // SAFETY: a descriptor the kernel just returned to us, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
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
        let code = program();
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..8].copy_from_slice(b"ka_floor");
        let mut load = ProgLoad {
            prog_type: BPF_PROG_TYPE_SOCK_OPS,
            insn_cnt: u32::try_from(code.len()).unwrap_or(u32::MAX),
            insns: code.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: u32::try_from(log.len()).unwrap_or(u32::MAX),
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name,
            ..ProgLoad::default()
        };
        let program = bpf(BPF_PROG_LOAD, &mut load)
            .map(owned)
            .unwrap_or_else(|e| {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                panic!(
                    "load the floor program: {e}\n{}",
                    String::from_utf8_lossy(&log[..end])
                )
            });
        let dir = std::fs::File::open(cgroup)
            .unwrap_or_else(|e| panic!("open {}: {e}", cgroup.display()));
        let mut create = LinkCreate {
            prog_fd: raw(&program),
            target_fd: raw(&dir),
            attach_type: BPF_CGROUP_SOCK_OPS,
            flags: 0,
        };
        let link = bpf(BPF_LINK_CREATE, &mut create)
            .map(owned)
            .unwrap_or_else(|e| panic!("attach the floor program to {}: {e}", cgroup.display()));
        let id = program_id(&program);
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

fn raw(fd: &impl AsRawFd) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// The program's id: the first two fields of `struct bpf_prog_info` (type, id).
fn program_id(program: &OwnedFd) -> u32 {
    let mut head = [0u32; 2];
    let mut get = GetInfo {
        bpf_fd: raw(program),
        info_len: 8,
        info: head.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get)
        .unwrap_or_else(|e| panic!("read the floor program's id: {e}"));
    head[1]
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
