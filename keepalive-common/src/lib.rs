//! Types and names shared by the sock_ops program (`keepalive-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding and integer flags (never `bool`), so
//! the kernel and user space agree on the layout byte for byte.
#![no_std]

#[cfg(feature = "host")]
extern crate std;

#[cfg(feature = "host")]
pub mod host;

/// Name of the sock_ops program in the object file (kernel object names hold at most 15 bytes).
pub const PROGRAM_NAME: &str = "ka_sockops";
/// Per-attachment cgroup storage holding the [`PolicyRecord`] of that attachment.
pub const ATTACH_MAP: &str = "KA_ATTACH";
/// Per-CPU counters indexed by [`Stat`].
pub const STATS_MAP: &str = "KA_STATS";
/// Read-only global with the policy the program was loaded with (see [`PolicyRecord`]).
pub const INITIAL_POLICY: &str = "KA_INITIAL";

/// `bpf_sock_ops.reply` value a program run leaves behind once it has handled a socket.
///
/// Every program attached along a cgroup's path runs for its sockets, the innermost cgroup's
/// first. `reply` is shared by those runs and ignored by the kernel for the callbacks we act
/// on, so it tells the runs for ancestor cgroups that a more specific policy already applied.
pub const HANDLED_MARK: u32 = 0x4b41_4c56; // "KALV"

/// `PolicyRecord::flags`: the record holds a policy (a fresh attachment's storage is zeroed).
pub const POLICY_VALID: u32 = 1 << 0;
/// `PolicyRecord::flags`: set `TCP_USER_TIMEOUT` to `user_timeout_ms`.
pub const POLICY_USER_TIMEOUT: u32 = 1 << 1;

/// The keepalive policy of one attachment, as the program reads it.
///
/// The agent replaces the whole record in one map update; the kernel swaps cgroup storage
/// buffers under RCU, so a program run sees either the old or the new record, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyRecord {
    /// `POLICY_*` bits.
    pub flags: u32,
    /// `TCP_KEEPIDLE`, seconds.
    pub idle_secs: u32,
    /// `TCP_KEEPINTVL`, seconds.
    pub interval_secs: u32,
    /// `TCP_KEEPCNT`, probes.
    pub count: u32,
    /// `TCP_USER_TIMEOUT`, milliseconds (used when `POLICY_USER_TIMEOUT` is set).
    pub user_timeout_ms: u32,
    /// Increases with every policy the agent pushes; lets tools tell records apart.
    pub generation: u32,
}

impl PolicyRecord {
    /// Whether the record holds a policy rather than a fresh attachment's zeroed storage.
    #[inline(always)]
    pub const fn is_valid(&self) -> bool {
        self.flags & POLICY_VALID != 0
    }

    /// Whether `TCP_USER_TIMEOUT` is part of the policy.
    #[inline(always)]
    pub const fn has_user_timeout(&self) -> bool {
        self.flags & POLICY_USER_TIMEOUT != 0
    }
}

#[cfg(feature = "user")]
// SAFETY: `PolicyRecord` is `repr(C)`, made only of `u32`s, and has no padding.
unsafe impl aya::Pod for PolicyRecord {}

/// Read-only global selecting a [`Stage`]; benchmarks only.
pub const STAGE: &str = "KA_STAGE";

/// Where the program stops, for measuring what each step costs. Production loads use
/// [`Stage::Full`]; the benchmark loads the others side by side.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Everything: the policy's options on every new connection.
    Full = 0,
    /// Return at once from every callback: the cost of having a sock_ops program at all.
    Attached = 1,
    /// Return after finding the policy, before any bpf_setsockopt.
    Lookup = 2,
    /// Set the TCP values but not SO_KEEPALIVE.
    TcpValues = 3,
}

/// Indices into the per-CPU counters map ([`STATS_MAP`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Client sockets (ACTIVE_ESTABLISHED) that got every option of the policy.
    ActiveApplied = 0,
    /// Server sockets (PASSIVE_ESTABLISHED) that got every option of the policy.
    PassiveApplied = 1,
    /// Sockets left alone because a program run for a more specific cgroup handled them.
    Deferred = 2,
    /// Sockets where at least one `bpf_setsockopt` failed.
    Failed = 3,
    /// `bpf_setsockopt(SO_KEEPALIVE)` failures.
    ErrKeepalive = 4,
    /// `bpf_setsockopt(TCP_KEEPIDLE)` failures.
    ErrIdle = 5,
    /// `bpf_setsockopt(TCP_KEEPINTVL)` failures.
    ErrInterval = 6,
    /// `bpf_setsockopt(TCP_KEEPCNT)` failures.
    ErrCount = 7,
    /// `bpf_setsockopt(TCP_USER_TIMEOUT)` failures.
    ErrUserTimeout = 8,
}

impl Stat {
    /// Number of counters (the map's `max_entries`).
    pub const COUNT: u32 = 9;
    /// Every counter, in index order.
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::ActiveApplied,
        Self::PassiveApplied,
        Self::Deferred,
        Self::Failed,
        Self::ErrKeepalive,
        Self::ErrIdle,
        Self::ErrInterval,
        Self::ErrCount,
        Self::ErrUserTimeout,
    ];

    /// Stable snake_case name, used in logs and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ActiveApplied => "active_applied",
            Self::PassiveApplied => "passive_applied",
            Self::Deferred => "deferred",
            Self::Failed => "failed",
            Self::ErrKeepalive => "err_so_keepalive",
            Self::ErrIdle => "err_tcp_keepidle",
            Self::ErrInterval => "err_tcp_keepintvl",
            Self::ErrCount => "err_tcp_keepcnt",
            Self::ErrUserTimeout => "err_tcp_user_timeout",
        }
    }
}

/// Socket option numbers from the Linux UAPI (`<asm-generic/socket.h>`, `<linux/tcp.h>`).
pub mod sockopt {
    pub const SOL_SOCKET: i32 = 1;
    pub const SO_KEEPALIVE: i32 = 9;
    pub const SOL_TCP: i32 = 6;
    pub const TCP_KEEPIDLE: i32 = 4;
    pub const TCP_KEEPINTVL: i32 = 5;
    pub const TCP_KEEPCNT: i32 = 6;
    pub const TCP_USER_TIMEOUT: i32 = 18;
}

/// `bpf_sock_ops.op` values and attach types from the Linux UAPI (`<linux/bpf.h>`).
pub mod sock_ops {
    /// `BPF_CGROUP_SOCK_OPS`, the attach type that keys our cgroup storage entries.
    pub const ATTACH_TYPE: u32 = 3;
    pub const ACTIVE_ESTABLISHED_CB: u32 = 4;
    pub const PASSIVE_ESTABLISHED_CB: u32 = 5;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_record_has_no_padding() {
        assert_eq!(size_of::<PolicyRecord>(), 6 * 4);
        assert_eq!(align_of::<PolicyRecord>(), 4);
    }

    #[test]
    fn stat_table_matches_indices() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i, "{} is out of order", stat.name());
        }
    }

    #[test]
    fn map_names_fit_the_kernel() {
        // BPF_OBJ_NAME_LEN is 16 including the terminating NUL.
        for name in [PROGRAM_NAME, ATTACH_MAP, STATS_MAP, INITIAL_POLICY, STAGE] {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }
}
