//! bpf_links to cgroups, pinned in bpffs, and the few `bpf(2)` commands aya does not expose for
//! them (create a cgroup link for any program type, pin it, open a pin, swap its program).
//!
//! Pinned, a link outlives the agent (even SIGKILL): enforcement stays, and the next agent
//! opens the pins and swaps its own programs in (BPF_LINK_UPDATE, atomic), without a second
//! attachment and without a moment where connections go unenforced.

use std::{
    ffi::CString,
    fs, io,
    os::unix::fs::PermissionsExt as _,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// `BPF_CGROUP_SOCK_OPS`.
pub const SOCK_OPS: u32 = 3;
/// `BPF_CGROUP_SETSOCKOPT`.
pub const SETSOCKOPT: u32 = 22;

fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the given size.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a descriptor the kernel just returned to us.
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

/// A bpf_link attaching `program` to the cgroup open as `cgroup` (multi-program, like every
/// cgroup link).
pub fn link_cgroup(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    // link_create: prog_fd, target_fd, attach_type, flags.
    let mut attr = [
        pair(fd_u32(program), fd_u32(cgroup)),
        pair(u64::from(attach_type), 0),
        0,
        0,
    ];
    owned(bpf(BPF_LINK_CREATE, &mut attr)?)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Pins a BPF object (here: a link) at `path` in bpffs.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    // obj: pathname (u64), bpf_fd, file_flags.
    let mut attr = [path.as_ptr() as u64, pair(fd_u32(fd), 0), 0];
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens a pinned BPF object.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = [c.as_ptr() as u64, 0, 0];
    owned(bpf(BPF_OBJ_GET, &mut attr)?)
}

/// Swaps the program of a link, atomically.
pub fn update_link(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    // link_update: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [pair(fd_u32(link), fd_u32(program)), 0];
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// What the kernel says a cgroup link is attached to now (aya's `LinkInfo` does not give the
/// cgroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    /// The program the link runs.
    pub program_id: u32,
    /// The cgroup it is attached to; 0 once detached (`bpftool link detach`, cgroup removed).
    pub cgroup_id: u64,
}

/// Reads a cgroup link's program and cgroup from the kernel (BPF_OBJ_GET_INFO_BY_FD).
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then the union at offset 16, whose
    // cgroup member is cgroup_id (u64), attach_type (u32).
    let mut info = [0u64; 8];
    let mut attr = [
        pair(fd_u32(link), u64::try_from(size_of_val(&info)).unwrap_or(0)),
        info.as_mut_ptr() as u64,
    ];
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let [a, b, c, d, ..] = info[1].to_ne_bytes();
    Ok(CgroupLinkInfo {
        program_id: u32::from_ne_bytes([a, b, c, d]),
        cgroup_id: info[2],
    })
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = c_path(path)?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer the size of `struct statfs`.
    if unsafe { libc::statfs(c.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled the buffer.
    let f_type = unsafe { stat.assume_init() }.f_type;
    // `f_type` is signed in glibc and unsigned in musl (the image's static agent).
    Ok(u64::try_from(f_type).is_ok_and(|f_type| f_type == BPF_FS_MAGIC))
}

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "bpffs is not mounted at {} and mounting it failed ({error}): mount it with \
         `mount -t bpf bpf {}`", path.display(), path.display()
    )]
    Mount { path: PathBuf, error: io::Error },
    #[error("cannot prepare the agent's bpffs directory {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
}

/// The agent's directory in bpffs: `<bpffs>/keepalive-agent`, with `maps/` and `links/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    pub root: PathBuf,
}

impl PinDir {
    /// Mounts bpffs at `bpffs` if it is not there yet, and makes the agent's directories.
    pub fn prepare(bpffs: &Path) -> Result<Self, BpffsError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |error| BpffsError::Io { path, error }
        };
        fs::create_dir_all(bpffs).map_err(io_error(bpffs))?;
        if !is_bpffs(bpffs).map_err(io_error(bpffs))? {
            let target = c_path(bpffs).map_err(io_error(bpffs))?;
            // SAFETY: NUL-terminated strings for source, target, type and options.
            let ret = unsafe {
                libc::mount(
                    c"bpf".as_ptr(),
                    target.as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    c"mode=0700".as_ptr().cast(),
                )
            };
            if ret != 0 {
                return Err(BpffsError::Mount {
                    path: bpffs.to_path_buf(),
                    error: io::Error::last_os_error(),
                });
            }
        }
        let dir = Self::at(bpffs);
        for sub in [dir.maps(), dir.links()] {
            fs::create_dir_all(&sub).map_err(io_error(&sub))?;
        }
        // Root only: whoever can open a pinned map can rewrite the policy, and whoever can
        // unlink a pinned link can stop enforcement. The pins themselves are 0600.
        for sub in [&dir.root, &dir.maps(), &dir.links()] {
            fs::set_permissions(sub, fs::Permissions::from_mode(0o700)).map_err(io_error(sub))?;
        }
        Ok(dir)
    }

    /// The directory for `bpffs`, without touching anything.
    pub fn at(bpffs: &Path) -> Self {
        Self {
            root: bpffs.join("keepalive-agent"),
        }
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// The pin of the link of `kind` (`sockops`, `setsockopt`) to the cgroup with `id`.
    pub fn link(&self, kind: &str, cgroup_id: u64) -> PathBuf {
        self.links().join(format!("{kind}-{cgroup_id}"))
    }

    /// The pinned links: (kind, cgroup id, path).
    pub fn pinned_links(&self) -> Vec<(String, u64, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.links()) else {
            return Vec::new();
        };
        let mut links: Vec<(String, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let (kind, id) = name.rsplit_once('-')?;
                Some((kind.to_string(), id.parse().ok()?, entry.path()))
            })
            .collect();
        links.sort();
        links
    }

    /// Removes every pin (detaching the links no process holds) and the directories.
    pub fn remove(&self) -> io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for dir in [self.links(), self.maps()] {
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    fs::remove_file(entry.path())?;
                    removed.push(entry.path());
                }
            }
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match fs::remove_dir(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(removed)
    }
}
