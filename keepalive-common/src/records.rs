//! Map keys and values. All `repr(C)`, all fields `u32` or byte arrays: no implicit padding.

/// What a rule does to a connection.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Always set the policy's values.
    Enforce = 1,
    /// Set them only when the application has not enabled keepalive itself.
    Fill = 2,
    /// Keep the application's keepalive, but never let idle or interval x count exceed the
    /// policy's; a socket without keepalive gets the policy.
    Cap = 3,
    /// Leave the connection untouched.
    Exempt = 4,
    /// Change nothing; count what enforce would have changed.
    Audit = 5,
}

impl Mode {
    pub const ALL: [Self; 5] = [
        Self::Enforce,
        Self::Fill,
        Self::Cap,
        Self::Exempt,
        Self::Audit,
    ];

    #[inline(always)]
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Enforce),
            2 => Some(Self::Fill),
            3 => Some(Self::Cap),
            4 => Some(Self::Exempt),
            5 => Some(Self::Audit),
            _ => None,
        }
    }

    /// The name used in policy files.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Fill => "fill",
            Self::Cap => "cap",
            Self::Exempt => "exempt",
            Self::Audit => "audit",
        }
    }
}

/// `RuleRecord::flags`: the rule sets `TCP_USER_TIMEOUT`.
pub const RULE_USER_TIMEOUT: u32 = 1 << 0;
/// `RuleRecord::flags`: applications' later setsockopt calls are overridden (enforce, cap) or
/// counted (audit).
pub const RULE_LOCK: u32 = 1 << 1;
/// `RuleRecord::flags`: follow how the connection ends (`crate::ends`).
pub const RULE_ENDS: u32 = 1 << 2;

/// One rule's decision: its mode and values (the default is a rule too).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleRecord {
    /// [`Mode`] as `u32`; 0 is not a valid mode.
    pub mode: u32,
    /// `RULE_*` bits.
    pub flags: u32,
    /// `TCP_KEEPIDLE`, seconds.
    pub idle_secs: u32,
    /// `TCP_KEEPINTVL`, seconds.
    pub interval_secs: u32,
    /// `TCP_KEEPCNT`, probes.
    pub count: u32,
    /// `TCP_USER_TIMEOUT`, milliseconds (used when `RULE_USER_TIMEOUT` is set).
    pub user_timeout_ms: u32,
    /// Counter slot of the rule (0: the default).
    pub slot: u32,
    pub _pad: u32,
}

impl RuleRecord {
    #[inline(always)]
    pub const fn mode(&self) -> Option<Mode> {
        Mode::from_u32(self.mode)
    }

    #[inline(always)]
    pub const fn has_user_timeout(&self) -> bool {
        self.flags & RULE_USER_TIMEOUT != 0
    }

    #[inline(always)]
    pub const fn locked(&self) -> bool {
        self.flags & RULE_LOCK != 0
    }
}

/// `AttachRecord::flags`: the record holds a policy (a fresh attachment's storage is zeroed,
/// and such a program run leaves the socket to the programs of ancestor cgroups).
pub const ATTACH_VALID: u32 = 1 << 0;
/// `AttachRecord::flags`: the setsockopt hook needs each socket's direction, so the sock_ops
/// program records it in socket storage.
pub const REMEMBER_DIRECTION: u32 = 1 << 1;

/// A match dimension. Rules are grouped by the set of dimensions they match on (tuple space
/// search), each group looked up on its own; a group is the OR of its dimensions' bits.
pub const DIM_REMOTE: u32 = 1 << 0;
pub const DIM_REMOTE_PORT: u32 = 1 << 1;
pub const DIM_LOCAL_PORT: u32 = 1 << 2;
/// Number of groups: every subset of the three dimensions; group 0 is direction-only rules.
pub const GROUPS: u32 = 8;

/// The bit of [`AttachRecord::groups`] for rules of `group` in `direction`.
#[inline(always)]
pub const fn group_bit(group: u32, direction: u32) -> u32 {
    if direction == INBOUND {
        1 << (8 + group)
    } else {
        1 << group
    }
}

/// The key part that says which group, dimension and direction an entry of the shared lookup
/// maps belongs to.
#[inline(always)]
pub const fn selector(group: u32, dim: u32, direction: u32) -> u32 {
    (group << 16) | (dim << 8) | direction
}

/// The policy of one attachment (one cgroup with rules, or an enforced cgroup).
///
/// The agent replaces the whole record in one map update; the kernel swaps cgroup storage
/// buffers (and hash map elements) under RCU, so a program run sees the old or the new record,
/// never a mix. Everything a connection's decision needs hangs off this one record, so a reload
/// is atomic per connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AttachRecord {
    /// `ATTACH_VALID`, `REMEMBER_DIRECTION` bits.
    pub flags: u32,
    /// Prefix of this attachment's entries in the lookup maps.
    pub ruleset: u32,
    /// Bit `g` (outbound) or `8 + g` (inbound) set: the ruleset has rules of group `g` (see
    /// [`GROUPS`]) for that direction. 0: nothing to look up.
    pub groups: u32,
    /// The policy generation the record belongs to.
    pub generation: u32,
    /// The decision when no rule matches (or there are none): the default, or the first rule
    /// without match keys.
    pub fallback: RuleRecord,
}

impl AttachRecord {
    #[inline(always)]
    pub const fn is_valid(&self) -> bool {
        self.flags & ATTACH_VALID != 0
    }

    #[inline(always)]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    #[inline(always)]
    pub const fn has_group(&self, group: u32, direction: u32) -> bool {
        self.groups & group_bit(group, direction) != 0
    }
}

/// Connection direction as rules see it.
pub const OUTBOUND: u32 = 1;
/// Connection direction as rules see it.
pub const INBOUND: u32 = 2;

/// Data of an [`ADDR_MAP`](crate::ADDR_MAP) LPM key: prefix length = 64 + address prefix
/// length. Addresses are IPv6; IPv4 is mapped (`::ffff:a.b.c.d`), so a mapped IPv6 peer matches
/// the IPv4 rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// Matched in full, like `selector` (the first 64 bits of every prefix).
    pub ruleset: u32,
    /// [`selector`]: group, dimension, direction.
    pub selector: u32,
    /// Network byte order.
    pub addr: [u8; 16],
}

/// Data of a [`PORT_MAP`](crate::PORT_MAP) LPM key: prefix length = 64 + port prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub ruleset: u32,
    pub selector: u32,
    /// Network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}

/// Key of the [`DECISIONS_MAP`](crate::DECISIONS_MAP): a group of several dimensions (its
/// classes), or a direction-only group (classes 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecisionKey {
    pub ruleset: u32,
    pub selector: u32,
    pub remote: u32,
    pub remote_port: u32,
    pub local_port: u32,
}

/// `Hit::index` of an entry that only carries a class.
pub const NO_RULE: u32 = u32::MAX;

/// What a lookup finds: the best (first in precedence order) rule of a group for that prefix
/// or combination, or, for a dimension of a multi-dimension group, the prefix's class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Hit {
    /// Position of the rule in the ruleset's precedence order; lower wins. [`NO_RULE`] for
    /// class entries.
    pub index: u32,
    pub class: u32,
    pub record: RuleRecord,
}

/// Where the sweep program finds a socket's fields in the running kernel's structures, in bytes
/// from the start of the structure named: read from the kernel's BTF by the agent (Rust eBPF
/// programs have no CO-RE relocations) and set as a load-time constant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `sock_common.skc_family` (u16).
    pub family: u32,
    /// `sock_common.skc_state` (u8).
    pub state: u32,
    /// `sock_common.skc_dport` (__be16).
    pub remote_port: u32,
    /// `sock_common.skc_num` (u16, host order).
    pub local_port: u32,
    /// `sock_common.skc_daddr` (__be32).
    pub remote_ip4: u32,
    /// `sock_common.skc_v6_daddr` (16 bytes).
    pub remote_ip6: u32,
    /// `sock.sk_cgrp_data.cgroup` (the socket's cgroup v2 pointer).
    pub cgroup: u32,
    /// `cgroup.kn` (its kernfs node).
    pub cgroup_kn: u32,
    /// `kernfs_node.id` (u64: the cgroup id).
    pub kn_id: u32,
    /// `sock_common.skc_flags` (`sk_flags`, unsigned long; bit `SOCK_KEEPOPEN` is SO_KEEPALIVE).
    pub flags: u32,
}

/// What the connection count (`ka_count`) writes per established TCP socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountRecord {
    /// The cgroup the socket belongs to (`sk_cgrp_data`).
    pub cgroup_id: u64,
    /// 1 when SO_KEEPALIVE is on.
    pub keepalive: u32,
    pub _pad: u32,
}

/// Where the link iterator finds a cgroup link's program and cgroup in the running kernel's
/// structures (bytes from the start of the structure named), from its BTF like [`SockOffsets`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkOffsets {
    /// `bpf_link.type` (enum bpf_link_type, 4 bytes).
    pub link_type: u32,
    /// `bpf_link.prog`.
    pub prog: u32,
    /// `bpf_prog.aux`.
    pub prog_aux: u32,
    /// `bpf_prog_aux.id` (u32).
    pub prog_id: u32,
    /// `bpf_cgroup_link.cgroup` (null once the link is detached).
    pub cgroup: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only u32 fields, no padding.
    unsafe impl aya::Pod for super::SockOffsets {}
    // SAFETY: repr(C), only u32 fields, no padding.
    unsafe impl aya::Pod for super::LinkOffsets {}
    // SAFETY: repr(C), only u32 fields, no padding.
    unsafe impl aya::Pod for crate::ends::EndOffsets {}
    // SAFETY: repr(C), u32 and u16 fields and a byte array, no padding (size checked by tests).
    unsafe impl aya::Pod for crate::ends::EndEvent {}
    // SAFETY: as above; read from the count iterator's output.
    unsafe impl aya::Pod for super::CountRecord {}
    // SAFETY: repr(C), only u32 fields, no padding (checked by tests).
    unsafe impl aya::Pod for super::RuleRecord {}
    // SAFETY: repr(C), u32 fields and a RuleRecord, no padding (checked by tests).
    unsafe impl aya::Pod for super::AttachRecord {}
    // SAFETY: repr(C), a u32 and a byte array, no padding (checked by tests).
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: repr(C), a u32 and byte arrays, no padding (checked by tests).
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: repr(C), only u32 fields, no padding (checked by tests).
    unsafe impl aya::Pod for super::DecisionKey {}
    // SAFETY: repr(C), u32 fields and a RuleRecord, no padding (checked by tests).
    unsafe impl aya::Pod for super::Hit {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    #[test]
    fn records_have_no_implicit_padding() {
        assert_eq!(size_of::<RuleRecord>(), 8 * 4);
        assert_eq!(size_of::<AttachRecord>(), 4 * 4 + size_of::<RuleRecord>());
        assert_eq!(size_of::<AddrKey>(), 4 + 4 + 16);
        assert_eq!(size_of::<PortKey>(), 4 + 4 + 2 + 2);
        assert_eq!(size_of::<DecisionKey>(), 5 * 4);
        assert_eq!(size_of::<Hit>(), 2 * 4 + size_of::<RuleRecord>());
        assert_eq!(align_of::<AttachRecord>(), 4);
    }

    #[test]
    fn modes_round_trip() {
        for mode in Mode::ALL {
            assert_eq!(Mode::from_u32(mode as u32), Some(mode));
        }
        assert_eq!(Mode::from_u32(0), None, "zeroed memory is no mode");
    }
}
