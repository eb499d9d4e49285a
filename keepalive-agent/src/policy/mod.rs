//! The policy: a default and ordered rules, and the one definition of which applies.
//!
//! [`Policy::decide`] is the reference: a plain scan, written for reading. The kernel gets the
//! same answer from lookup tables ([`crate::compile`]); tests hold the two to each other.

mod containers;
pub mod file;
mod pattern;
mod values;

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
};

pub use containers::{Container, Selection, Selector};
pub use keepalive_common::Mode;
use keepalive_common::{RULE_LOCK, RULE_USER_TIMEOUT, RuleRecord, limits};
pub use pattern::Pattern;
pub use values::*;

/// Which side opened the connection, seen from the cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// The cgroup connected (ACTIVE_ESTABLISHED).
    Outbound,
    /// The cgroup accepted (PASSIVE_ESTABLISHED).
    Inbound,
}

impl Direction {
    /// Outbound when `outbound`, else inbound.
    pub const fn from_outbound(outbound: bool) -> Self {
        if outbound {
            Self::Outbound
        } else {
            Self::Inbound
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// What a rule (or the default) does: its mode, its values, and whether applications may
/// change them afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Action {
    pub mode: Mode,
    pub values: Values,
    /// enforce and cap override an application's later setsockopt; audit counts it.
    pub lock: bool,
}

impl Action {
    /// enforce `values`, locked.
    pub const fn enforce(values: Values) -> Self {
        Self {
            mode: Mode::Enforce,
            values,
            lock: true,
        }
    }

    /// The record the kernel reads, counting into `slot`.
    pub fn record(&self, slot: u32) -> RuleRecord {
        let mut flags = 0;
        if self.values.user_timeout_ms.is_some() {
            flags |= RULE_USER_TIMEOUT;
        }
        if self.lock {
            flags |= RULE_LOCK;
        }
        RuleRecord {
            mode: self.mode as u32,
            flags,
            idle_secs: self.values.idle_secs,
            interval_secs: self.values.interval_secs,
            count: self.values.count,
            user_timeout_ms: self.values.user_timeout_ms.unwrap_or(0),
            slot,
            _pad: 0,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            Mode::Exempt => f.write_str("exempt"),
            mode => write!(f, "{} {}", mode.name(), self.values),
        }
    }
}

/// A cgroup path inside the hierarchy, normalised: `/` or `/a/b` (as /proc/PID/cgroup shows).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// The root of the hierarchy.
    pub fn root() -> Self {
        Self("/".into())
    }

    /// Normalises `text` (leading slash optional, no `.` or `..`, no empty components).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        for part in text.split('/').filter(|part| !part.is_empty()) {
            if part == "." || part == ".." {
                return Err(format!(
                    "{text:?}: `.` and `..` are not allowed in a cgroup path"
                ));
            }
            parts.push(part);
        }
        Ok(Self(format!("/{}", parts.join("/"))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Components below the root.
    pub fn depth(&self) -> usize {
        self.0.split('/').filter(|part| !part.is_empty()).count()
    }

    /// Whether `self` is `other` or one of its ancestors.
    pub fn contains(&self, other: &Self) -> bool {
        self.0 == "/"
            || other.0 == self.0
            || (other.0.starts_with(&self.0) && other.0.as_bytes().get(self.0.len()) == Some(&b'/'))
    }

    /// The path relative to the root, for joining to the mount point.
    pub fn relative(&self) -> &str {
        self.0.trim_start_matches('/')
    }

    fn components(&self) -> Vec<&str> {
        self.0.split('/').filter(|part| !part.is_empty()).collect()
    }

    /// Whether this is a glob pattern (`*`, `?` in a component, `**` for any depth) rather
    /// than one cgroup.
    pub fn is_pattern(&self) -> bool {
        self.0.contains(['*', '?'])
    }

    /// The longest leading part without wildcards: where a pattern's matches live.
    pub fn literal_prefix(&self) -> Self {
        let literal: Vec<&str> = self
            .components()
            .into_iter()
            .take_while(|part| !part.contains(['*', '?']))
            .collect();
        Self(format!("/{}", literal.join("/")))
    }

    /// Whether the pattern (or plain path) matches `path` exactly. To match many paths,
    /// compile it once with [`Pattern::new`].
    pub fn matches(&self, path: &Self) -> bool {
        Pattern::new(self).matches(path)
    }

    /// Whether connections of `cgroup` are covered: a plain path covers itself and its
    /// descendants, a pattern every cgroup it matches and their descendants.
    pub fn covers(&self, cgroup: &Self) -> bool {
        if !self.is_pattern() {
            return self.contains(cgroup);
        }
        Pattern::new(self).covers(cgroup)
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An address prefix in IPv6 space; IPv4 prefixes are mapped (`::ffff:0:0/96` and below).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub bits: u128,
    /// 0..=128.
    pub len: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `fd00::/8`, or a bare address (a single host).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 address or CIDR"))?;
        let (max, offset) = if addr.is_ipv4() { (32, 96) } else { (128, 0) };
        let len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0..={max}"))?,
        };
        let cidr = Self {
            bits: mapped(addr),
            len: len + offset,
        };
        if cidr.bits & !cidr.mask() != 0 {
            return Err(format!(
                "{text:?} has bits set after the prefix; did you mean {}?",
                Self {
                    bits: cidr.bits & cidr.mask(),
                    ..cidr
                }
            ));
        }
        Ok(cidr)
    }

    pub fn mask(&self) -> u128 {
        match self.len {
            0 => 0,
            len => u128::MAX << (128 - u32::from(len)),
        }
    }

    pub fn contains_addr(&self, addr: u128) -> bool {
        addr & self.mask() == self.bits
    }

    /// Whether `self` covers all of `other`.
    pub fn contains(&self, other: &Self) -> bool {
        self.len <= other.len && other.bits & self.mask() == self.bits
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = Ipv6Addr::from(self.bits);
        match v6.to_ipv4_mapped() {
            Some(v4) if self.len >= 96 => write!(f, "{v4}/{}", self.len - 96),
            _ => write!(f, "{v6}/{}", self.len),
        }
    }
}

/// An address as the rules see it: IPv6, IPv4 mapped.
pub fn mapped(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// An inclusive port range; a single port is `first == last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One rule of a policy file. Every match key it has must match; absent keys match anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its `name`, or `rule N` (1-based, in file order).
    pub name: String,
    /// Line of the rule in its file (0 when not from a file).
    pub line: usize,
    /// Matches connections of this cgroup and its descendants.
    pub cgroup: Option<CgroupPath>,
    pub remote: Vec<Cidr>,
    pub remote_ports: Vec<PortRange>,
    pub local_ports: Vec<PortRange>,
    pub direction: Option<Direction>,
    /// The containers it selects (`labels`, `container`) and the cgroups they resolved to.
    pub containers: Option<Selection>,
    pub action: Action,
}

impl Rule {
    /// Whether it matches on anything besides its cgroup.
    pub fn has_match_keys(&self) -> bool {
        !self.remote.is_empty()
            || !self.remote_ports.is_empty()
            || !self.local_ports.is_empty()
            || self.direction.is_some()
    }

    /// Whether the keys besides the cgroup match `conn`.
    pub fn matches(&self, conn: &Connection) -> bool {
        let remote = mapped(conn.remote);
        (self.remote.is_empty() || self.remote.iter().any(|cidr| cidr.contains_addr(remote)))
            && (self.remote_ports.is_empty()
                || self
                    .remote_ports
                    .iter()
                    .any(|range| range.contains(conn.remote_port)))
            && (self.local_ports.is_empty()
                || self
                    .local_ports
                    .iter()
                    .any(|range| range.contains(conn.local_port)))
            && self
                .direction
                .is_none_or(|direction| direction == conn.direction)
    }
}

/// A connection as the rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The cgroup the socket belongs to (for an accepted socket, its listener's).
    pub cgroup: CgroupPath,
    pub direction: Direction,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub local_port: u16,
}

/// Which part of the policy applies to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not in any enforced cgroup: the agent does not touch it.
    Outside,
    /// `rules[i]`.
    Rule(usize),
    /// No rule matched.
    Default,
}

/// A whole policy: where it is enforced, the default, and the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The cgroups enforced in, with their descendants.
    pub scopes: Vec<CgroupPath>,
    pub default: Action,
    pub rules: Vec<Rule>,
    /// Apply the policy to connections that already exist when it takes effect.
    pub existing: bool,
}

impl Policy {
    /// enforce `values` on every connection of `scopes`, no rules.
    pub fn enforce(values: Values, scopes: Vec<CgroupPath>) -> Self {
        Self {
            scopes,
            default: Action::enforce(values),
            rules: Vec::new(),
            existing: true,
        }
    }

    /// The precedence, in one place: a connection outside every scope is not touched.
    /// Otherwise the candidates are the rules whose cgroup (or the cgroup of a container they
    /// select) is the connection's cgroup or an ancestor, most specific cgroup first (file
    /// order within a cgroup), then the rules without a cgroup or containers (file order). The first candidate whose keys all match decides; if
    /// none does, the default applies.
    pub fn decide(&self, conn: &Connection) -> Decision {
        if !self.in_scope(&conn.cgroup) {
            return Decision::Outside;
        }
        self.candidates(&conn.cgroup)
            .into_iter()
            .find(|&i| self.rules[i].matches(conn))
            .map_or(Decision::Default, Decision::Rule)
    }

    /// The record the reference model gives `conn`: the decision's action, counting into its
    /// slot; None outside every scope.
    pub fn record_for(&self, conn: &Connection) -> Option<RuleRecord> {
        let decision = self.decide(conn);
        self.action(decision)
            .map(|action| action.record(Self::slot(decision)))
    }

    /// Whether connections of `cgroup` are enforced at all.
    pub fn in_scope(&self, cgroup: &CgroupPath) -> bool {
        self.scopes.iter().any(|scope| scope.covers(cgroup))
    }

    /// Rule indices in precedence order for connections of `cgroup`.
    pub fn candidates(&self, cgroup: &CgroupPath) -> Vec<usize> {
        let mut scoped: Vec<(usize, usize)> = self
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| Some((rule.depth_for(cgroup)?, i)))
            .collect();
        // Deepest first; stable, so file order within one depth (one cgroup: a path of the
        // connection's ancestry has one cgroup per depth).
        scoped.sort_by_key(|&(depth, _)| std::cmp::Reverse(depth));
        let unscoped = (0..self.rules.len()).filter(|&i| self.rules[i].unscoped());
        scoped.into_iter().map(|(_, i)| i).chain(unscoped).collect()
    }

    /// The action of a decision.
    pub fn action(&self, decision: Decision) -> Option<&Action> {
        match decision {
            Decision::Outside => None,
            Decision::Rule(i) => self.rules.get(i).map(|rule| &rule.action),
            Decision::Default => Some(&self.default),
        }
    }

    /// Counter slot of a decision: 0 for the default, `i + 1` for `rules[i]`, the last slot
    /// shared by rules beyond it.
    pub fn slot(decision: Decision) -> u32 {
        match decision {
            Decision::Rule(i) => u32::try_from(i + 1)
                .unwrap_or(u32::MAX)
                .min(limits::COUNTED_SLOTS - 1),
            Decision::Default | Decision::Outside => 0,
        }
    }
}

#[cfg(test)]
mod tests;
