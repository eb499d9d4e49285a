//! The `bpf(2)` commands aya (0.16) does not wrap for us, in one place; each call says why
//! aya's API does not serve. Everything else goes through aya (programs, maps, program info)
//! or rustix (pidfds, mounts, statfs).
//!
//! The attribute of every command is a prefix of `union bpf_attr` built from u64 words (two u32
//! fields share a word, in memory order); the kernel reads the size given and requires the
//! rest of what it knows to be zero.

use std::{
    ffi::CString,
    fs, io,
    io::Read as _,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attach_type::BPF_TRACE_ITER, bpf_cmd};

fn bpf(command: bpf_cmd, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the size passed; the pointers
    // inside point to memory the caller keeps alive for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command as libc::c_long,
            attr.as_mut_ptr(),
            size_of_val(attr),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a descriptor the kernel just returned to us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_u32(fd: BorrowedFd<'_>) -> u64 {
    u64::from(u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX))
}

/// Two u32 fields in one u64 word of `bpf_attr`, in memory order.
fn pair(first: u64, second: u64) -> u64 {
    u64::from_ne_bytes({
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&u32::try_from(first).unwrap_or(u32::MAX).to_ne_bytes());
        bytes[4..].copy_from_slice(&u32::try_from(second).unwrap_or(u32::MAX).to_ne_bytes());
        bytes
    })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// BPF_LINK_CREATE: prog_fd, target_fd, attach_type, flags.
fn link_create(
    program: BorrowedFd<'_>,
    target: Option<BorrowedFd<'_>>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let target = target.map_or(0, fd_u32);
    let mut attr = [
        pair(fd_u32(program), target),
        pair(u64::from(attach_type), 0),
        0,
        0,
    ];
    owned(bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)?)
}

/// A bpf_link attaching `program` to the cgroup open as `cgroup` (multi-program, like every
/// cgroup link). aya: a `CgroupSockoptLink` cannot become an `FdLink`, so it cannot be pinned;
/// and aya's links do not give their descriptor back, which [`update_link`] and
/// [`cgroup_link_info`] need. One way for both programs.
pub fn link_cgroup(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    link_create(program, Some(cgroup), attach_type)
}

/// Pins a BPF object (here: a link) at `path` in bpffs. aya: pins only an `FdLink`, which a
/// cgroup/setsockopt link cannot become.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    // obj: pathname (u64), bpf_fd, file_flags.
    let mut attr = [path.as_ptr() as u64, pair(fd_u32(fd), 0), 0];
    bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens a pinned BPF object. aya: `PinnedLink::from_pin` gives no descriptor.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = [c.as_ptr() as u64, 0, 0];
    owned(bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?)
}

/// Swaps the program of a link, atomically. aya: no BPF_LINK_UPDATE.
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    // link_update: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [pair(fd_u32(link), fd_u32(program)), 0];
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// What the kernel says a cgroup link is attached to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    /// The program the link runs.
    pub program_id: u32,
    /// The cgroup it is attached to; 0 once detached (`bpftool link detach`, cgroup removed).
    pub cgroup_id: u64,
}

/// Reads a cgroup link's program and cgroup (BPF_OBJ_GET_INFO_BY_FD). aya: its `LinkInfo`
/// has no cgroup id.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then the union at offset 16, whose
    // cgroup member is cgroup_id (u64), attach_type (u32).
    let mut info = [0u64; 8];
    let mut attr = [
        pair(fd_u32(link), u64::try_from(size_of_val(&info)).unwrap_or(0)),
        info.as_mut_ptr() as u64,
    ];
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let [a, b, c, d, ..] = info[1].to_ne_bytes();
    Ok(CgroupLinkInfo {
        program_id: u32::from_ne_bytes([a, b, c, d]),
        cgroup_id: info[2],
    })
}

/// A link for the loaded iterator program `program`, to read again and again with
/// [`read_iterator`]. aya: `IterLink::into_file` consumes the link, one read per link.
pub fn iterator_link(program: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    link_create(program, None, BPF_TRACE_ITER as u32)
}

/// One run of the iterator behind `link` (BPF_ITER_CREATE, then read to the end): what its
/// program wrote.
pub fn read_iterator(link: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    // iter_create: link_fd, flags.
    let mut attr = [pair(fd_u32(link), 0)];
    let iterator = owned(bpf(bpf_cmd::BPF_ITER_CREATE, &mut attr)?)?;
    let mut output = Vec::new();
    fs::File::from(iterator).read_to_end(&mut output)?;
    Ok(output)
}

/// A program loaded from raw instructions (each one `struct bpf_insn`, 8 bytes), for the
/// benchmark's floor program. aya loads programs from ELF objects only. On failure, the
/// verifier's log with the error.
pub fn load_program(
    program_type: u32,
    name: &str,
    instructions: &[u64],
) -> Result<OwnedFd, (io::Error, String)> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut name_words = [0u8; 16];
    let len = name.len().min(15);
    name_words[..len].copy_from_slice(&name.as_bytes()[..len]);
    let [name_low, name_high] = [0, 8].map(|at| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&name_words[at..at + 8]);
        u64::from_ne_bytes(word)
    });
    let count = u64::try_from(instructions.len()).unwrap_or(u64::MAX);
    let log_size = u64::try_from(log.len()).unwrap_or(0);
    // prog_load: prog_type, insn_cnt, insns, license, log_level, log_size, log_buf,
    // kern_version, prog_flags, prog_name[16].
    let mut attr = [
        pair(u64::from(program_type), count),
        instructions.as_ptr() as u64,
        license.as_ptr() as u64,
        pair(1, log_size),
        log.as_mut_ptr() as u64,
        0,
        name_low,
        name_high,
    ];
    bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
        .and_then(owned)
        .map_err(|error| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            (error, String::from_utf8_lossy(&log[..end]).into_owned())
        })
}

/// The id of the loaded program `program`: the second field of `struct bpf_prog_info`. aya:
/// `ProgramInfo` comes from a pin or an aya program, not from a bare descriptor.
pub fn program_id(program: BorrowedFd<'_>) -> io::Result<u32> {
    let mut head = [0u32; 2];
    let mut attr = [pair(fd_u32(program), 8), head.as_mut_ptr() as u64];
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(head[1])
}
