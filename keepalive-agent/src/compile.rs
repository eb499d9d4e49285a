//! Compiling a [`Policy`] into what the kernel looks up, so that the cost of a decision does not
//! grow with the number of rules.
//!
//! Each attachment (an enforced cgroup, or a cgroup with rules inside one) gets one
//! [`AttachRecord`]. Its rules are the policy's candidates for that cgroup, in precedence order,
//! cut at the first rule without match keys (which becomes the fallback). Attachments with the
//! same list share a ruleset. For each ruleset and each match dimension, the distinct prefixes
//! (remote CIDRs; remote and local port ranges split into prefixes) get a class: the set of
//! rules that match every address or port under that prefix. LPM tries map an address or port
//! to its longest prefix's class, and one hash entry per combination of classes holds the first
//! rule in the intersection. The kernel does three LPM lookups and one hash lookup at most.

use std::collections::{BTreeMap, HashMap};

use keepalive_common::{
    ATTACH_VALID, AddrKey, AttachRecord, DIM_DIRECTION, DIM_LOCAL_PORT, DIM_REMOTE,
    DIM_REMOTE_PORT, DecisionKey, INBOUND, OUTBOUND, PortKey, REMEMBER_DIRECTION, RuleRecord,
    limits,
};

use crate::policy::{
    CgroupPath, Cidr, Connection, Decision, Direction, Mode, Policy, PortRange, mapped,
};

/// Everything the kernel needs for one generation of a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub generation: u32,
    /// The record of each attachment.
    pub attachments: BTreeMap<CgroupPath, AttachRecord>,
    /// (key, prefix length, class) entries of the remote-address LPM trie.
    pub remote: Vec<(AddrKey, u32, u32)>,
    /// (key, prefix length, class) entries of the remote-port LPM trie.
    pub remote_ports: Vec<(PortKey, u32, u32)>,
    /// (key, prefix length, class) entries of the local-port LPM trie.
    pub local_ports: Vec<(PortKey, u32, u32)>,
    /// The first matching rule of each combination of classes that has one.
    pub decisions: Vec<(DecisionKey, RuleRecord)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{owner}: {source}")]
    Invalid {
        owner: String,
        #[source]
        source: crate::policy::OutOfRange,
    },
    #[error(
        "the policy needs {needed} {what}; the kernel map holds {limit} \
         (keepalive_common::limits::{constant}): {advice}"
    )]
    TooLarge {
        what: &'static str,
        needed: usize,
        limit: u32,
        constant: &'static str,
        advice: &'static str,
    },
}

/// The ruleset ids of a generation: the old and the new generation live side by side during a
/// reload, so their ids must differ; the low 16 bits number the rulesets of one generation.
fn ruleset_id(generation: u32, index: usize) -> u32 {
    ((generation & 0xffff) << 16) | (u32::try_from(index).unwrap_or(0xfffe) + 1)
}

/// Compiles `policy` for the given attachments (which must include every enforced cgroup and
/// every existing rule cgroup inside one).
pub fn compile(
    policy: &Policy,
    attach_points: &[CgroupPath],
    generation: u32,
) -> Result<Tables, CompileError> {
    let invalid = |owner: String| move |source| CompileError::Invalid { owner, source };
    policy
        .default
        .values
        .validate()
        .map_err(invalid("default".into()))?;
    for rule in &policy.rules {
        rule.action
            .values
            .validate()
            .map_err(invalid(format!("rule {:?}", rule.name)))?;
    }
    let mut tables = Tables {
        generation,
        ..Tables::default()
    };
    let mut rulesets: HashMap<Vec<usize>, u32> = HashMap::new();
    for point in attach_points {
        let candidates = policy.candidates(point);
        let catch_all = candidates
            .iter()
            .position(|&i| !policy.rules[i].has_match_keys());
        let (list, fallback) = match catch_all {
            Some(at) => {
                let rule = candidates[at];
                let decision = Decision::Rule(rule);
                (
                    candidates[..at].to_vec(),
                    policy.rules[rule].action.record(Policy::slot(decision)),
                )
            }
            None => (candidates, policy.default.record(0)),
        };
        let mut record = AttachRecord {
            flags: ATTACH_VALID,
            ruleset: 0,
            generation,
            _pad: 0,
            fallback,
        };
        if !list.is_empty() {
            let next = rulesets.len();
            let ruleset = *rulesets
                .entry(list.clone())
                .or_insert_with(|| ruleset_id(generation, next));
            let dims = Ruleset::new(policy, &list).dims();
            record.ruleset = ruleset;
            record.flags |= dims;
            let locked = list.iter().any(|&i| policy.rules[i].action.lock) || fallback.locked();
            if dims & DIM_DIRECTION != 0 && locked {
                record.flags |= REMEMBER_DIRECTION;
            }
        }
        tables.attachments.insert(point.clone(), record);
    }
    let mut ordered: Vec<(Vec<usize>, u32)> = rulesets.into_iter().collect();
    ordered.sort_by_key(|(_, id)| *id);
    for (list, id) in ordered {
        Ruleset::new(policy, &list).emit(id, &mut tables);
    }
    check_limits(&tables)?;
    Ok(tables)
}

fn check_limits(tables: &Tables) -> Result<(), CompileError> {
    let checks = [
        (
            "remote-address entries",
            tables.remote.len(),
            limits::ADDR_ENTRIES,
            "ADDR_ENTRIES",
            "use fewer distinct CIDRs, or fewer cgroups whose rules differ",
        ),
        (
            "remote-port prefixes",
            tables.remote_ports.len(),
            limits::PORT_ENTRIES,
            "PORT_ENTRIES",
            "use fewer or simpler remote_port ranges",
        ),
        (
            "local-port prefixes",
            tables.local_ports.len(),
            limits::PORT_ENTRIES,
            "PORT_ENTRIES",
            "use fewer or simpler local_port ranges",
        ),
        (
            "decision entries (combinations of distinct remote, remote_port, local_port and \
             direction keys)",
            tables.decisions.len(),
            limits::DECISIONS,
            "DECISIONS",
            "avoid rules that combine many CIDRs with many port ranges; split them by cgroup",
        ),
        (
            "attachments (enforced cgroups and cgroups with rules)",
            tables.attachments.len(),
            limits::CGROUPS,
            "CGROUPS",
            "give rules to fewer cgroups",
        ),
    ];
    for (what, needed, limit, constant, advice) in checks {
        if needed > limit as usize {
            return Err(CompileError::TooLarge {
                what,
                needed,
                limit,
                constant,
                advice,
            });
        }
    }
    Ok(())
}

/// A set of positions in a ruleset's list.
type Bits = Vec<u64>;

fn bits_with(len: usize, positions: impl IntoIterator<Item = usize>) -> Bits {
    let mut bits = vec![0; len.div_ceil(64)];
    for position in positions {
        bits[position / 64] |= 1 << (position % 64);
    }
    bits
}

fn first_in_all(sets: [&Bits; 4]) -> Option<usize> {
    (0..sets[0].len()).find_map(|word| {
        let common = sets.iter().fold(u64::MAX, |acc, set| acc & set[word]);
        (common != 0).then(|| word * 64 + common.trailing_zeros() as usize)
    })
}

/// One dimension's classes: (prefix bits, prefix length) -> class, and each class's rule set.
struct Classes<P> {
    prefixes: Vec<(P, u8, u32)>,
    sets: Vec<Bits>,
}

/// Builds the classes of one dimension. `keys[pos]` lists the prefixes of the rule at `pos`
/// (empty: matches anything). `ancestors(prefix, len)` gives the prefix cut to each length.
fn classes<P: Copy + Eq + std::hash::Hash + Ord>(
    keys: &[Vec<(P, u8)>],
    root: P,
    truncate: impl Fn(P, u8) -> P,
) -> Classes<P> {
    let n = keys.len();
    let mut by_prefix: BTreeMap<(P, u8), Vec<usize>> = BTreeMap::new();
    by_prefix.insert((root, 0), Vec::new());
    for (pos, prefixes) in keys.iter().enumerate() {
        for &prefix in prefixes {
            by_prefix.entry(prefix).or_default().push(pos);
        }
    }
    let anything: Vec<usize> = (0..n).filter(|&pos| keys[pos].is_empty()).collect();
    let mut ids: HashMap<Bits, u32> = HashMap::new();
    let mut sets = Vec::new();
    let mut prefixes = Vec::new();
    for &(bits, len) in by_prefix.keys() {
        let mut members = anything.clone();
        for shorter in 0..=len {
            if let Some(positions) = by_prefix.get(&(truncate(bits, shorter), shorter)) {
                members.extend(positions);
            }
        }
        let set = bits_with(n, members);
        let class = *ids.entry(set.clone()).or_insert_with(|| {
            sets.push(set);
            u32::try_from(sets.len() - 1).unwrap_or(u32::MAX)
        });
        prefixes.push((bits, len, class));
    }
    Classes { prefixes, sets }
}

/// A dimension no rule of the ruleset uses: one class with every rule.
fn single_class<P>(n: usize) -> Classes<P> {
    Classes {
        prefixes: Vec::new(),
        sets: vec![bits_with(n, 0..n)],
    }
}

fn truncate_addr(bits: u128, len: u8) -> u128 {
    Cidr { bits, len }.bits & Cidr { bits: 0, len }.mask()
}

fn truncate_port(bits: u16, len: u8) -> u16 {
    match len {
        0 => 0,
        len => bits & (u16::MAX << (16 - u32::from(len))),
    }
}

/// `first..=last` as the fewest aligned prefixes (port, prefix length).
pub fn port_prefixes(range: PortRange) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut low, high) = (u32::from(range.first), u32::from(range.last));
    while low <= high {
        let mut size = if low == 0 {
            1 << 16
        } else {
            low.isolate_lowest_one()
        };
        while low + size - 1 > high {
            size >>= 1;
        }
        let len = 16 - u8::try_from(size.trailing_zeros()).unwrap_or(16);
        out.push((u16::try_from(low).unwrap_or(u16::MAX), len));
        low += size;
    }
    out
}

/// The rules of one ruleset, in precedence order.
struct Ruleset<'a> {
    policy: &'a Policy,
    list: &'a [usize],
}

impl<'a> Ruleset<'a> {
    fn new(policy: &'a Policy, list: &'a [usize]) -> Self {
        Self { policy, list }
    }

    fn rules(&self) -> impl Iterator<Item = &'a crate::policy::Rule> + '_ {
        self.list.iter().map(|&i| &self.policy.rules[i])
    }

    fn dims(&self) -> u32 {
        let mut dims = 0;
        for rule in self.rules() {
            if !rule.remote.is_empty() {
                dims |= DIM_REMOTE;
            }
            if !rule.remote_ports.is_empty() {
                dims |= DIM_REMOTE_PORT;
            }
            if !rule.local_ports.is_empty() {
                dims |= DIM_LOCAL_PORT;
            }
            if rule.direction.is_some() {
                dims |= DIM_DIRECTION;
            }
        }
        dims
    }

    fn emit(&self, ruleset: u32, tables: &mut Tables) {
        let n = self.list.len();
        let dims = self.dims();
        let remote = if dims & DIM_REMOTE != 0 {
            let keys: Vec<Vec<(u128, u8)>> = self
                .rules()
                .map(|rule| {
                    rule.remote
                        .iter()
                        .map(|cidr| (cidr.bits, cidr.len))
                        .collect()
                })
                .collect();
            classes(&keys, 0, truncate_addr)
        } else {
            single_class(n)
        };
        let port_classes = |flag: u32, ports: fn(&crate::policy::Rule) -> &Vec<PortRange>| {
            if dims & flag == 0 {
                return single_class(n);
            }
            let keys: Vec<Vec<(u16, u8)>> = self
                .rules()
                .map(|rule| {
                    ports(rule)
                        .iter()
                        .flat_map(|range| port_prefixes(*range))
                        .collect()
                })
                .collect();
            classes(&keys, 0, truncate_port)
        };
        let remote_ports = port_classes(DIM_REMOTE_PORT, |rule| &rule.remote_ports);
        let local_ports = port_classes(DIM_LOCAL_PORT, |rule| &rule.local_ports);

        for &(bits, len, class) in &remote.prefixes {
            let key = AddrKey {
                ruleset,
                addr: bits.to_be_bytes(),
            };
            tables.remote.push((key, 32 + u32::from(len), class));
        }
        for (source, target) in [
            (&remote_ports, &mut tables.remote_ports),
            (&local_ports, &mut tables.local_ports),
        ] {
            for &(bits, len, class) in &source.prefixes {
                let key = PortKey {
                    ruleset,
                    port: bits.to_be_bytes(),
                    _pad: [0; 2],
                };
                target.push((key, 32 + u32::from(len), class));
            }
        }

        let directions: Vec<(u32, Bits)> = if dims & DIM_DIRECTION != 0 {
            [
                (OUTBOUND, Direction::Outbound),
                (INBOUND, Direction::Inbound),
            ]
            .into_iter()
            .map(|(code, direction)| {
                let members = self
                    .rules()
                    .enumerate()
                    .filter(|(_, rule)| rule.direction.is_none_or(|d| d == direction))
                    .map(|(pos, _)| pos);
                (code, bits_with(n, members))
            })
            .collect()
        } else {
            vec![(0, bits_with(n, 0..n))]
        };
        for (direction, direction_set) in &directions {
            for (a, a_set) in remote.sets.iter().enumerate() {
                for (rp, rp_set) in remote_ports.sets.iter().enumerate() {
                    for (lp, lp_set) in local_ports.sets.iter().enumerate() {
                        let Some(pos) = first_in_all([direction_set, a_set, rp_set, lp_set]) else {
                            continue;
                        };
                        let rule = self.list[pos];
                        let key = DecisionKey {
                            ruleset,
                            direction: *direction,
                            remote: u32::try_from(a).unwrap_or(u32::MAX),
                            remote_port: u32::try_from(rp).unwrap_or(u32::MAX),
                            local_port: u32::try_from(lp).unwrap_or(u32::MAX),
                        };
                        let record = self.policy.rules[rule]
                            .action
                            .record(Policy::slot(Decision::Rule(rule)));
                        tables.decisions.push((key, record));
                    }
                }
            }
        }
    }
}

impl Tables {
    /// The decision the kernel's lookups reach for `conn` at the attachment `point`: what
    /// `ka_sockops` computes, done on the host (tests hold it to [`Policy::decide`]).
    pub fn lookup(&self, point: &CgroupPath, conn: &Connection) -> Option<RuleRecord> {
        let record = self.attachments.get(point)?;
        if record.flags & (DIM_REMOTE | DIM_REMOTE_PORT | DIM_LOCAL_PORT | DIM_DIRECTION) == 0 {
            return Some(record.fallback);
        }
        let ruleset = record.ruleset;
        let addr = mapped(conn.remote);
        let remote = if record.has(DIM_REMOTE) {
            longest(
                self.remote
                    .iter()
                    .filter(|(key, ..)| key.ruleset == ruleset)
                    .map(|(key, len, class)| {
                        let prefix = Cidr {
                            bits: u128::from_be_bytes(key.addr),
                            len: u8::try_from(len - 32).unwrap_or(0),
                        };
                        (prefix.contains_addr(addr), *len, *class)
                    }),
            )?
        } else {
            0
        };
        let port_class = |entries: &[(PortKey, u32, u32)], flag: u32, port: u16| -> Option<u32> {
            if !record.has(flag) {
                return Some(0);
            }
            longest(
                entries
                    .iter()
                    .filter(|(key, ..)| key.ruleset == ruleset)
                    .map(|(key, len, class)| {
                        let bits = u16::from_be_bytes(key.port);
                        let prefix_len = u8::try_from(len - 32).unwrap_or(0);
                        (truncate_port(port, prefix_len) == bits, *len, *class)
                    }),
            )
        };
        let key = DecisionKey {
            ruleset,
            direction: match (record.has(DIM_DIRECTION), conn.direction) {
                (false, _) => 0,
                (true, Direction::Outbound) => OUTBOUND,
                (true, Direction::Inbound) => INBOUND,
            },
            remote,
            remote_port: port_class(&self.remote_ports, DIM_REMOTE_PORT, conn.remote_port)?,
            local_port: port_class(&self.local_ports, DIM_LOCAL_PORT, conn.local_port)?,
        };
        Some(
            self.decisions
                .iter()
                .find(|(candidate, _)| *candidate == key)
                .map_or(record.fallback, |(_, record)| *record),
        )
    }

    /// The innermost attachment containing `cgroup`, the one whose program decides.
    pub fn attachment_for(&self, cgroup: &CgroupPath) -> Option<&CgroupPath> {
        self.attachments
            .keys()
            .filter(|point| point.contains(cgroup))
            .max_by_key(|point| point.depth())
    }
}

/// The class of the longest matching prefix among (matches, prefix length, class).
fn longest(entries: impl Iterator<Item = (bool, u32, u32)>) -> Option<u32> {
    entries
        .filter(|(matches, ..)| *matches)
        .max_by_key(|(_, len, _)| *len)
        .map(|(_, _, class)| class)
}

/// Whether a mode touches sockets at all (exempt and audit change nothing).
pub fn changes_sockets(mode: Mode) -> bool {
    matches!(mode, Mode::Enforce | Mode::Fill | Mode::Cap)
}

#[cfg(test)]
mod tests;
