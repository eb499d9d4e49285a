//! The policy: a default and ordered rules, and the one definition of which applies.
//!
//! [`Policy::decide`] is the reference: a plain scan, written for reading. The kernel gets the
//! same answer from lookup tables ([`crate::compile`]); tests hold the two to each other.

mod annotations;
mod cgroup_path;
mod containers;
mod explain;
pub mod file;
mod keys;
mod pattern;
mod values;

use std::{fmt, net::IpAddr};

pub use annotations::Annotations;
pub use cgroup_path::CgroupPath;
pub use containers::{Selection, Selector};
pub use explain::{KeyChecks, Step, Trace};
pub use keepalive_common::Mode;
use keepalive_common::{RULE_ENDS, RULE_LOCK, RULE_USER_TIMEOUT, RuleRecord, limits};
pub use keys::{Cidr, PortRange, mapped};
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
    /// Follow how the connection ends (`ends`): counted, and reported if it fails.
    pub ends: bool,
}

impl Action {
    /// The keepalive idle this action gives a connection (None: audit and exempt leave
    /// keepalive alone).
    pub fn idle_secs(&self) -> Option<u32> {
        (!matches!(self.mode, Mode::Audit | Mode::Exempt)).then_some(self.values.idle_secs)
    }

    /// enforce `values`, locked.
    pub const fn enforce(values: Values) -> Self {
        Self {
            mode: Mode::Enforce,
            values,
            lock: true,
            ends: false,
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
        if self.ends {
            flags |= RULE_ENDS;
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
            Mode::Exempt => f.write_str("exempt")?,
            mode => write!(f, "{} {}", mode.name(), self.values)?,
        }
        if self.ends {
            f.write_str("; ends followed")?;
        }
        Ok(())
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
    /// A rule made of a pod's annotations (at the pod's cgroup): it comes before the policy's
    /// rules of the same cgroup.
    pub annotated: bool,
}

impl Rule {
    /// A rule named `name` that does `action` everywhere its policy reaches: no cgroup, no
    /// match keys, no containers (set those with struct update syntax).
    pub fn new(name: impl Into<String>, action: Action) -> Self {
        Self {
            name: name.into(),
            line: 0,
            cgroup: None,
            remote: Vec::new(),
            remote_ports: Vec::new(),
            local_ports: Vec::new(),
            direction: None,
            containers: None,
            action,
            annotated: false,
        }
    }

    /// Whether it matches on anything besides its cgroup.
    pub fn has_match_keys(&self) -> bool {
        !self.remote.is_empty()
            || !self.remote_ports.is_empty()
            || !self.local_ports.is_empty()
            || self.direction.is_some()
    }

    /// Whether the keys besides the cgroup match `conn`.
    pub fn matches(&self, conn: &Connection) -> bool {
        self.check(conn).matched()
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
    /// What pods may set through their annotations (`[annotations]`); None: nothing.
    pub annotations: Option<Annotations>,
}

impl Policy {
    /// enforce `values` on every connection of `scopes`, no rules.
    pub fn enforce(values: Values, scopes: Vec<CgroupPath>) -> Self {
        Self {
            scopes,
            default: Action::enforce(values),
            rules: Vec::new(),
            existing: true,
            annotations: None,
        }
    }

    /// The precedence, in one place: a connection outside every scope is not touched.
    /// Otherwise the candidates are the rules whose cgroup (or the cgroup of a container they
    /// select) is the connection's cgroup or an ancestor, most specific cgroup first (a pod's
    /// annotations, then file order within a cgroup), then the rules without a cgroup or
    /// containers (file order). The
    /// first candidate whose keys all match decides; if none does, the default applies.
    pub fn decide(&self, conn: &Connection) -> Decision {
        // One walk for deciding and for explaining (`Policy::trace`).
        self.walk(conn, |_| {})
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
        // Deepest first, a pod's annotations first within one depth; stable, so file order
        // after them (one cgroup: a path of the connection's ancestry has one cgroup per depth).
        scoped.sort_by_key(|&(depth, i)| (std::cmp::Reverse(depth), !self.rules[i].annotated));
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
