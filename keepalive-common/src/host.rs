//! What the host must offer before anything is loaded, each missing piece one clear sentence.
//!
//! Shared by the agent (before it loads the program) and `cargo xtask` (before it builds and
//! runs anything that needs the kernel).

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    string::{String, ToString},
};

/// Oldest kernel the agent can enforce on: SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL and
/// TCP_KEEPCNT in `bpf_setsockopt` arrived in 5.9 (commit f9bcf96837f1), bpf_link attachments
/// to cgroups in 5.7. The verifier accepts the calls on older kernels and they fail at run
/// time, so no load can probe this: the release decides, and the agent's per-option failure
/// counters show it on any kernel that misreports. Optional parts (the lock, from 6.1) are
/// probed by loading them.
pub const MIN_KERNEL: (u32, u32) = (5, 9);

const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// A requirement the host does not meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// Neither root nor the capabilities to load and attach eBPF programs.
    NotPrivileged,
    /// The kernel is older than [`MIN_KERNEL`] (or its release string is unreadable).
    KernelTooOld { release: String },
    /// No `/sys/kernel/btf/vmlinux`.
    NoBtf,
    /// No cgroup2 filesystem in `/proc/self/mountinfo`.
    NoCgroup2,
    /// A file the checks read could not be read.
    Unreadable { path: String, error: String },
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = MIN_KERNEL;
        match self {
            Self::NotPrivileged => f.write_str(
                "loading and attaching eBPF programs needs root (or CAP_BPF and CAP_NET_ADMIN): \
                 run it again with sudo",
            ),
            Self::KernelTooOld { release } => write!(
                f,
                "kernel {release} cannot enforce keepalive: bpf_setsockopt gained the keepalive \
                 options in Linux {major}.{minor}; use that kernel or newer"
            ),
            Self::NoBtf => write!(
                f,
                "this kernel has no BTF ({BTF_VMLINUX} is missing): use a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y"
            ),
            Self::NoCgroup2 => f.write_str(
                "no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/self/mountinfo): \
                 mount one with `mount -t cgroup2 none /sys/fs/cgroup` or boot with \
                 systemd.unified_cgroup_hierarchy=1",
            ),
            Self::Unreadable { path, error } => write!(f, "cannot read {path}: {error}"),
        }
    }
}

impl std::error::Error for HostError {}

/// What the checks found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `uname -r`.
    pub kernel_release: String,
    /// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup` on most hosts).
    pub cgroup2_mount: PathBuf,
}

/// Checks privileges, kernel version, BTF and cgroup v2, in that order.
pub fn check() -> Result<Host, HostError> {
    let status = read("/proc/self/status")?;
    if !is_privileged(&status) {
        return Err(HostError::NotPrivileged);
    }
    let kernel_release = read("/proc/sys/kernel/osrelease")?.trim().to_string();
    match parse_kernel_version(&kernel_release) {
        Some(version) if version >= MIN_KERNEL => {}
        _ => {
            return Err(HostError::KernelTooOld {
                release: kernel_release,
            });
        }
    }
    if !Path::new(BTF_VMLINUX).exists() {
        return Err(HostError::NoBtf);
    }
    let cgroup2_mount = cgroup2_mount()?;
    Ok(Host {
        kernel_release,
        cgroup2_mount,
    })
}

/// The mount point of the cgroup2 hierarchy, from `/proc/self/mountinfo`.
///
/// Hosts in hybrid mode mount it at `/sys/fs/cgroup/unified`, others at `/sys/fs/cgroup`; never
/// assume either.
pub fn cgroup2_mount() -> Result<PathBuf, HostError> {
    let mountinfo = read("/proc/self/mountinfo")?;
    pick_cgroup2_mount(&mountinfo, |path| path.join("cgroup.controllers").exists())
        .ok_or(HostError::NoCgroup2)
}

fn read(path: &str) -> Result<String, HostError> {
    fs::read_to_string(path).map_err(|error: io::Error| HostError::Unreadable {
        path: path.to_string(),
        error: error.to_string(),
    })
}

/// Root, or the capabilities the agent uses, in the effective set.
fn is_privileged(status: &str) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let euid_is_root = field("Uid:")
        .and_then(|uids| uids.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0");
    let caps = field("CapEff:")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| caps & (1 << cap) != 0;
    euid_is_root || has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN))
}

/// `"6.18.44-fc-v595"` -> `(6, 18)`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The cgroup2 mount to use: of the mounts of the hierarchy's root, the last one that is
/// `usable` (a later mount can shadow an earlier one's path); a bind mount of a sub-tree, as
/// inside some containers, only when there is nothing else.
pub fn pick_cgroup2_mount(mountinfo: &str, usable: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let (roots, subtrees) = cgroup2_mounts(mountinfo);
    roots
        .iter()
        .rev()
        .find(|path| usable(path))
        .or(roots.first())
        .or(subtrees.first())
        .cloned()
}

/// cgroup2 mounts: (of the hierarchy's root, of sub-trees), in mountinfo order.
fn cgroup2_mounts(mountinfo: &str) -> (std::vec::Vec<PathBuf>, std::vec::Vec<PathBuf>) {
    let (mut roots, mut subtrees) = (std::vec::Vec::new(), std::vec::Vec::new());
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional fields...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = left.split_whitespace();
        let (Some(root), Some(mount_point)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
        if root == "/" {
            roots.push(mount_point);
        } else {
            subtrees.push(mount_point);
        }
    }
    (roots, subtrees)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = std::vec::Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first cgroup2 mount of the hierarchy's root, as listed.
    fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
        pick_cgroup2_mount(mountinfo, |_| false)
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_hybrid_mount() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_mount_with_optional_fields() {
        let line = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(line),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn prefers_the_hierarchy_root_over_a_bind_mounted_subtree() {
        let info = "\
50 23 0:26 /kubepods.slice /host/cg rw - cgroup2 cgroup2 rw
51 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let only_subtree = "50 23 0:26 /kubepods.slice /host/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(only_subtree),
            Some(PathBuf::from("/host/cg"))
        );
    }

    #[test]
    fn a_later_usable_mount_wins_over_a_shadowed_one() {
        let info = std::format!("{HYBRID}90 23 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        let usable = |path: &Path| path == Path::new("/sys/fs/cgroup");
        assert_eq!(
            pick_cgroup2_mount(&info, usable),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            pick_cgroup2_mount(HYBRID, |_| false),
            Some(PathBuf::from("/sys/fs/cgroup/unified")),
            "nothing checks out: the first listed"
        );
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let info = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            parse_cgroup2_mount(&HYBRID.replace("cgroup2", "cgroup")),
            None
        );
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.10.0"), Some((5, 10)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!(parse_kernel_version("5.4.0-150-generic").unwrap_or_default() < MIN_KERNEL);
        assert!(parse_kernel_version("5.8.18").unwrap_or_default() < MIN_KERNEL);
        assert!(parse_kernel_version("5.10.0-32-amd64").unwrap_or_default() >= MIN_KERNEL);
        let refusal = HostError::KernelTooOld {
            release: "5.8.18".to_string(),
        }
        .to_string();
        assert!(refusal.contains("Linux 5.9"), "{refusal}");
    }

    #[test]
    fn privilege_from_status() {
        let root = "Uid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n";
        let user = "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\n";
        let caps = "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000008000001000\n";
        assert!(is_privileged(root));
        assert!(!is_privileged(user));
        assert!(is_privileged(caps), "CAP_BPF + CAP_NET_ADMIN is enough");
    }

    #[test]
    fn every_error_is_one_sentence() {
        let errors = [
            HostError::NotPrivileged,
            HostError::KernelTooOld {
                release: "4.19.0".to_string(),
            },
            HostError::NoBtf,
            HostError::NoCgroup2,
        ];
        for error in errors {
            let text = error.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(text.contains(':'), "says what to do: {text}");
        }
    }
}
