//! Types, names and decision logic shared by the eBPF programs (`keepalive-ebpf`) and the agent.
//!
//! Records are `#[repr(C)]` with explicit padding and integer flags (never `bool`), so the
//! kernel and user space agree on the layout byte for byte. [`lookup`] finds a connection's
//! rule in the lookup maps and [`enforce`] holds what each mode does to a socket: each written
//! once and run by the kernel, by the agent (its compiled tables, connections that existed
//! before it attached) and by host tests.
#![no_std]

#[cfg(feature = "host")]
extern crate std;

pub mod ends;
pub mod enforce;
#[cfg(feature = "host")]
pub mod host;
pub mod lookup;
mod records;
pub mod toolchain;

pub use records::*;

/// The sock_ops program in the object file (kernel object names hold at most 15 bytes).
pub const PROGRAM_NAME: &str = "ka_sockops";
/// The cgroup setsockopt program that keeps applications from undoing the policy.
pub const SETSOCKOPT_PROGRAM: &str = "ka_setsockopt";
/// The TCP iterator program that applies the policy to connections that already exist.
pub const SWEEP_PROGRAM: &str = "ka_sweep";
/// The TCP iterator program that tells each established connection's cgroup and keepalive,
/// for the missing-keepalive gauge (a [`CountRecord`] each).
pub const COUNT_PROGRAM: &str = "ka_count";
/// The fentry programs that count cgroup links detached or given another program, host-wide,
/// each with the kernel function it is attached to: BPF_LINK_DETACH and BPF_LINK_UPDATE of a
/// cgroup link (static functions reached through the link's ops table, so never inlined; both
/// since Linux 5.9).
pub const LINK_WATCH_FENTRIES: [(&str, &str); 2] = [
    ("ka_link_detach", "bpf_cgroup_link_detach"),
    ("ka_link_update", "cgroup_bpf_replace"),
];
/// The kprobe that counts the same, on both functions, where the kernel refuses fentry programs.
pub const LINK_WATCH_KPROBE: &str = "ka_link_kprobe";
/// Per-CPU array of one `u64`: what the link watch counts.
pub const LINK_CHANGES_MAP: &str = "KA_LINK_CHANGES";
/// The link iterator (iter/bpf_link, Linux 5.19) that counts the cgroup links running the
/// agent's programs, where the kernel refuses both ways of counting changes (no kprobes,
/// trampolines denied): one read per health check instead of one question per attachment.
pub const LINK_ITER_PROGRAM: &str = "ka_link_iter";
/// Array of two `u32`: the ids of the agent's sock_ops and setsockopt programs (0: none).
pub const LINK_PROGS_MAP: &str = "KA_LINK_PROGS";
/// Read-only global: the [`LinkOffsets`] of the running kernel, from its BTF.
pub const LINK_OFFSETS: &str = "KA_LINK_OFFSETS";

/// Cgroup storage of each sock_ops attachment: its [`AttachRecord`].
pub const ATTACH_MAP: &str = "KA_ATTACH";
/// [`AttachRecord`] by cgroup id, for the setsockopt hook (which finds the level from the
/// calling task's cgroup and its ancestors).
pub const CGROUPS_MAP: &str = "KA_CGROUPS";
/// LPM trie: [`AddrKey`] (remote address) to a [`Hit`].
pub const ADDR_MAP: &str = "KA_ADDR";
/// LPM trie: [`PortKey`] (remote or local port) to a [`Hit`].
pub const PORT_MAP: &str = "KA_PORT";
/// Hash: [`DecisionKey`] to the [`Hit`] of a multi-dimension or direction-only group.
pub const DECISIONS_MAP: &str = "KA_DECIDE";
/// Socket storage: the direction of sockets whose ruleset needs it in the setsockopt hook.
pub const DIRECTION_MAP: &str = "KA_DIRECTION";
/// Per-CPU counters indexed by [`Stat`].
pub const STATS_MAP: &str = "KA_STATS";
/// Per-CPU counters indexed by `slot * Outcome::COUNT + outcome` ([`rule_stat_index`]).
pub const RULE_STATS_MAP: &str = "KA_RULE_STATS";
/// Array of one `u32`: the agent's process id, whose own setsockopt calls the hook lets through.
pub const AGENT_MAP: &str = "KA_AGENT";
/// Read-only global selecting a [`Stage`]; benchmarks only.
pub const STAGE: &str = "KA_STAGE";
/// Hash: cgroup id to the [`AttachRecord`] that governs it, for the cgroups a sweep covers.
pub const SWEEP_MAP: &str = "KA_SWEEP";
/// Hash: local ports a listener of the namespace being swept holds (their sockets count as
/// inbound).
pub const LISTEN_MAP: &str = "KA_LISTEN";
/// Read-only global: the [`SockOffsets`] of the running kernel, from its BTF.
pub const SOCK_OFFSETS: &str = "KA_SK_OFFSETS";

/// Kernel map sizes. A policy that needs more is refused when it is compiled, with an error
/// that names the limit. Lookup maps hold two generations during a reload, so they are twice
/// the size a single policy may use.
pub mod limits {
    /// Rules in one policy file.
    pub const RULES: u32 = 16_384;
    /// Rules with counters of their own; later rules share the last slot.
    pub const COUNTED_SLOTS: u32 = 1_024;
    /// Remote-address entries (distinct CIDRs per group and direction) in one policy.
    pub const ADDR_ENTRIES: u32 = 65_536;
    /// Port entries (port-range prefixes per group, dimension and direction) in one policy.
    pub const PORT_ENTRIES: u32 = 65_536;
    /// Decision entries (class combinations of multi-key groups) in one policy.
    pub const DECISIONS: u32 = 262_144;
    /// Cgroups the agent attaches to or has rules for.
    pub const CGROUPS: u32 = 16_384;
    /// Depth of the cgroup tree the setsockopt hook walks up.
    pub const CGROUP_DEPTH: u32 = 32;
    /// Cgroups one sweep of existing connections covers at a time.
    pub const SWEEP_CGROUPS: u32 = 65_536;
    /// Listening ports of one network namespace the sweep tells apart.
    pub const LISTEN_PORTS: u32 = 65_536;
}

/// `bpf_sock_ops.reply` value a program run leaves behind once it has handled a socket.
///
/// Every program attached along a cgroup's path runs for its sockets, the innermost cgroup's
/// first. `reply` is shared by those runs and ignored by the kernel for the callbacks we act
/// on, so it tells the runs for ancestor cgroups that a more specific policy already applied.
pub const HANDLED_MARK: u32 = 0x4b41_4c56; // "KALV"

/// Global counters, per CPU. Connections themselves are counted per rule ([`Outcome`]); these
/// are the rarer events, so the common path pays for one counter, not two.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Sockets left to a program run for a more specific cgroup.
    Deferred = 0,
    /// Sockets seen before the agent wrote the attachment's record (left alone).
    Unconfigured = 1,
    /// `bpf_setsockopt(SO_KEEPALIVE)` failures.
    ErrKeepalive = 2,
    /// `bpf_setsockopt(TCP_KEEPIDLE)` failures.
    ErrIdle = 3,
    /// `bpf_setsockopt(TCP_KEEPINTVL)` failures.
    ErrInterval = 4,
    /// `bpf_setsockopt(TCP_KEEPCNT)` failures.
    ErrCount = 5,
    /// `bpf_setsockopt(TCP_USER_TIMEOUT)` failures.
    ErrUserTimeout = 6,
    /// Failures to read or keep a socket's state: `bpf_getsockopt` (fill, cap and audit read
    /// the application's settings) and socket storage (remembering a socket's direction for
    /// the lock). One counter: its index and the map's size are fixed by pinned maps an earlier
    /// agent left (a take-over reuses them), and its name `err_getsockopt` by dashboards.
    ErrReadState = 7,
    /// Applications' setsockopt calls on keepalive options the hook looked at.
    AppSetsockopt = 8,
}

impl Stat {
    /// Number of counters (the map's `max_entries`).
    pub const COUNT: u32 = 9;
    /// Every counter, in index order.
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::Deferred,
        Self::Unconfigured,
        Self::ErrKeepalive,
        Self::ErrIdle,
        Self::ErrInterval,
        Self::ErrCount,
        Self::ErrUserTimeout,
        Self::ErrReadState,
        Self::AppSetsockopt,
    ];

    /// Stable snake_case name, used in logs, status and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Deferred => "deferred",
            Self::Unconfigured => "unconfigured",
            Self::ErrKeepalive => "err_so_keepalive",
            Self::ErrIdle => "err_tcp_keepidle",
            Self::ErrInterval => "err_tcp_keepintvl",
            Self::ErrCount => "err_tcp_keepcnt",
            Self::ErrUserTimeout => "err_tcp_user_timeout",
            Self::ErrReadState => "err_getsockopt",
            Self::AppSetsockopt => "app_setsockopt",
        }
    }
}

/// What happened to a connection under its rule; counted per rule slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The policy's values were set (enforce; fill or cap on a socket without keepalive).
    Set = 0,
    /// fill: the application had enabled keepalive itself; left alone.
    Kept = 1,
    /// cap: the application's keepalive exceeded the policy and was lowered.
    Capped = 2,
    /// cap or audit: the socket already complied; nothing to do.
    Compliant = 3,
    /// exempt: left untouched.
    Exempted = 4,
    /// audit: enforce would have changed this socket; nothing was changed.
    Audited = 5,
    /// At least one bpf_setsockopt or bpf_getsockopt failed.
    Failed = 6,
    /// An application's later setsockopt was overridden (enforce, cap) or, in audit mode,
    /// would have been.
    Overridden = 7,
}

impl Outcome {
    pub const COUNT: u32 = 8;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::Set,
        Self::Kept,
        Self::Capped,
        Self::Compliant,
        Self::Exempted,
        Self::Audited,
        Self::Failed,
        Self::Overridden,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Set => "set",
            Self::Kept => "kept",
            Self::Capped => "capped",
            Self::Compliant => "compliant",
            Self::Exempted => "exempted",
            Self::Audited => "audited",
            Self::Failed => "failed",
            Self::Overridden => "overridden",
        }
    }
}

/// Index of a rule slot's outcome in [`RULE_STATS_MAP`].
#[inline(always)]
pub const fn rule_stat_index(slot: u32, outcome: Outcome) -> u32 {
    slot * Outcome::COUNT + outcome as u32
}

/// Where the program stops, for measuring what each step costs. Production loads use
/// [`Stage::Full`]; the benchmark loads the others side by side.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Everything: the policy's options on every new connection.
    Full = 0,
    /// Return at once from every callback: the cost of having a sock_ops program at all.
    Attached = 1,
    /// Return after deciding the rule, before any bpf_setsockopt.
    Lookup = 2,
    /// Set the TCP values but not SO_KEEPALIVE.
    TcpValues = 3,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_outcome_tables_match_indices() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i, "{} is out of order", stat.name());
        }
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i, "{} is out of order", outcome.name());
        }
    }

    #[test]
    fn map_names_fit_the_kernel() {
        // BPF_OBJ_NAME_LEN is 16 including the terminating NUL.
        for name in [
            PROGRAM_NAME,
            SETSOCKOPT_PROGRAM,
            ATTACH_MAP,
            CGROUPS_MAP,
            ADDR_MAP,
            PORT_MAP,
            DECISIONS_MAP,
            DIRECTION_MAP,
            STATS_MAP,
            RULE_STATS_MAP,
            AGENT_MAP,
            STAGE,
        ] {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn rule_stat_indices_do_not_overlap() {
        assert_eq!(rule_stat_index(0, Outcome::Overridden), Outcome::COUNT - 1);
        assert_eq!(rule_stat_index(1, Outcome::Set), Outcome::COUNT);
    }
}
