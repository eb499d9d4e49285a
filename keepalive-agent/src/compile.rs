//! Compiling a [`Policy`] into what the kernel looks up, so that the cost of a decision does not
//! grow with the number of rules.
//!
//! Each attachment (an enforced cgroup, or a cgroup with rules inside one) gets one
//! [`AttachRecord`]. Its rules are the policy's candidates for that cgroup, in precedence order
//! (their position is their index), cut at the first rule without match keys, which becomes the
//! fallback. Attachments with the same list share a ruleset.
//!
//! Within a ruleset, rules are grouped by the keys they use (tuple space search, as in Open
//! vSwitch): remote CIDR, remote port, local port, any combination, or direction only. A group
//! with one key is one LPM trie per direction whose entries hold the first rule covering each
//! prefix; a group with several keys gets a class per prefix of each key (the rules covering
//! it) and one hash entry per combination of classes that has a rule. The kernel looks up each
//! group the ruleset has (at most eight, in practice two or three) and keeps the lowest index:
//! the cost grows with the kinds of rules, not their number, and the entries with the rules
//! (a cross product only inside a multi-key group).

use std::collections::{BTreeMap, HashMap};

use keepalive_common::{
    ATTACH_VALID, AddrKey, AttachRecord, DIM_LOCAL_PORT, DIM_REMOTE, DIM_REMOTE_PORT, DecisionKey,
    Hit, INBOUND, KINDS, NO_RULE, OUTBOUND, PortKey, REMEMBER_DIRECTION, RuleRecord, kind_bit,
    kind_dir, limits,
};

use crate::policy::{
    CgroupPath, Cidr, Connection, Decision, Direction, Policy, PortRange, Rule, mapped,
};

/// Everything the kernel needs for one generation of a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub generation: u32,
    /// The record of each attachment.
    pub attachments: BTreeMap<CgroupPath, AttachRecord>,
    /// (key, prefix length, hit) entries of the remote-address LPM trie.
    pub addr: Vec<(AddrKey, u32, Hit)>,
    /// (key, prefix length, hit) entries of the port LPM trie (remote and local ports).
    pub ports: Vec<(PortKey, u32, Hit)>,
    /// Entries of multi-key and direction-only groups.
    pub decisions: Vec<(DecisionKey, Hit)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{owner}: {error}")]
    Invalid {
        owner: String,
        error: crate::policy::OutOfRange,
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
    let invalid = |owner: String| move |error| CompileError::Invalid { owner, error };
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
                let slot = Policy::slot(Decision::Rule(rule));
                (
                    candidates[..at].to_vec(),
                    policy.rules[rule].action.record(slot),
                )
            }
            None => (candidates, policy.default.record(0)),
        };
        let mut record = AttachRecord {
            flags: ATTACH_VALID,
            ruleset: 0,
            kinds: 0,
            generation,
            fallback,
        };
        if !list.is_empty() {
            let next = rulesets.len();
            record.ruleset = *rulesets
                .entry(list.clone())
                .or_insert_with(|| ruleset_id(generation, next));
            let rules = Ruleset {
                policy,
                list: &list,
            };
            record.kinds = rules.rules().fold(0, |kinds, rule| {
                [OUTBOUND, INBOUND]
                    .into_iter()
                    .filter(|&direction| allows(rule, direction))
                    .fold(kinds, |kinds, direction| {
                        kinds | kind_bit(kind(rule), direction)
                    })
            });
            let directional = rules.rules().any(|rule| rule.direction.is_some());
            let locked = rules.rules().any(|rule| rule.action.lock) || fallback.locked();
            if directional && locked {
                record.flags |= REMEMBER_DIRECTION;
            }
        }
        tables.attachments.insert(point.clone(), record);
    }
    let mut ordered: Vec<(Vec<usize>, u32)> = rulesets.into_iter().collect();
    ordered.sort_by_key(|(_, id)| *id);
    for (list, id) in ordered {
        Ruleset {
            policy,
            list: &list,
        }
        .emit(id, &mut tables);
    }
    check_limits(&tables)?;
    Ok(tables)
}

/// The group of a rule: the bits of the keys it uses (`DIM_*`); 0 for direction only.
fn kind(rule: &Rule) -> u32 {
    let mut kind = 0;
    if !rule.remote.is_empty() {
        kind |= DIM_REMOTE;
    }
    if !rule.remote_ports.is_empty() {
        kind |= DIM_REMOTE_PORT;
    }
    if !rule.local_ports.is_empty() {
        kind |= DIM_LOCAL_PORT;
    }
    kind
}

fn allows(rule: &Rule, direction: u32) -> bool {
    match rule.direction {
        None => true,
        Some(Direction::Outbound) => direction == OUTBOUND,
        Some(Direction::Inbound) => direction == INBOUND,
    }
}

fn check_limits(tables: &Tables) -> Result<(), CompileError> {
    let checks = [
        (
            "remote-address entries (distinct CIDRs per rule group and direction)",
            tables.addr.len(),
            limits::ADDR_ENTRIES,
            "ADDR_ENTRIES",
            "use fewer distinct CIDRs, or fewer cgroups whose rules differ",
        ),
        (
            "port entries (port-range prefixes per rule group and direction)",
            tables.ports.len(),
            limits::PORT_ENTRIES,
            "PORT_ENTRIES",
            "use fewer or simpler port ranges",
        ),
        (
            "decision entries (class combinations of rules that use several keys)",
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

/// A set of members of a group.
type Bits = Vec<u64>;

fn bits_with(len: usize, members: impl IntoIterator<Item = usize>) -> Bits {
    let mut bits = vec![0; len.div_ceil(64)];
    for member in members {
        bits[member / 64] |= 1 << (member % 64);
    }
    bits
}

fn first_in_all(sets: &[&Bits]) -> Option<usize> {
    (0..sets.first()?.len()).find_map(|word| {
        let common = sets.iter().fold(u64::MAX, |acc, set| acc & set[word]);
        (common != 0).then(|| word * 64 + common.trailing_zeros() as usize)
    })
}

/// For each distinct prefix of `keys` (the prefixes of each member), the members that cover
/// it: a member covers a prefix if one of its prefixes is that prefix or a shorter one of it.
fn covering<P: Copy + Ord>(
    keys: &[Vec<(P, u8)>],
    truncate: impl Fn(P, u8) -> P,
) -> Vec<((P, u8), Vec<usize>)> {
    let mut by_prefix: BTreeMap<(P, u8), Vec<usize>> = BTreeMap::new();
    for (member, prefixes) in keys.iter().enumerate() {
        for &prefix in prefixes {
            by_prefix.entry(prefix).or_default().push(member);
        }
    }
    by_prefix
        .keys()
        .map(|&(bits, len)| {
            let mut members: Vec<usize> = (0..=len)
                .filter_map(|shorter| by_prefix.get(&(truncate(bits, shorter), shorter)))
                .flatten()
                .copied()
                .collect();
            members.sort_unstable();
            members.dedup();
            ((bits, len), members)
        })
        .collect()
}

fn truncate_addr(bits: u128, len: u8) -> u128 {
    bits & Cidr { bits: 0, len }.mask()
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

fn addr_prefixes(rule: &Rule) -> Vec<(u128, u8)> {
    rule.remote
        .iter()
        .map(|cidr| (cidr.bits, cidr.len))
        .collect()
}

fn ports_of(rule: &Rule, dim: u32) -> Vec<(u16, u8)> {
    let ranges = if dim == DIM_REMOTE_PORT {
        &rule.remote_ports
    } else {
        &rule.local_ports
    };
    ranges
        .iter()
        .flat_map(|range| port_prefixes(*range))
        .collect()
}

fn as_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// The rules of one ruleset, in precedence order.
struct Ruleset<'a> {
    policy: &'a Policy,
    list: &'a [usize],
}

impl<'a> Ruleset<'a> {
    fn rules(&self) -> impl Iterator<Item = &'a Rule> + '_ {
        self.list.iter().map(|&i| &self.policy.rules[i])
    }

    fn hit(&self, position: usize) -> Hit {
        let rule = self.list[position];
        Hit {
            index: as_u32(position),
            class: 0,
            record: self.policy.rules[rule]
                .action
                .record(Policy::slot(Decision::Rule(rule))),
        }
    }

    fn emit(&self, ruleset: u32, tables: &mut Tables) {
        for group in 0..KINDS {
            for direction in [OUTBOUND, INBOUND] {
                // Positions of the group's rules that apply in this direction.
                let members: Vec<usize> = self
                    .rules()
                    .enumerate()
                    .filter(|(_, rule)| kind(rule) == group && allows(rule, direction))
                    .map(|(position, _)| position)
                    .collect();
                if members.is_empty() {
                    continue;
                }
                match group {
                    0 => tables.decisions.push((
                        DecisionKey {
                            ruleset,
                            kind_dir: kind_dir(0, 0, direction),
                            ..DecisionKey::default()
                        },
                        self.hit(members[0]),
                    )),
                    DIM_REMOTE | DIM_REMOTE_PORT | DIM_LOCAL_PORT => {
                        self.emit_single(ruleset, group, direction, &members, tables);
                    }
                    _ => self.emit_multi(ruleset, group, direction, &members, tables),
                }
            }
        }
    }

    fn rule_at(&self, position: usize) -> &'a Rule {
        &self.policy.rules[self.list[position]]
    }

    /// One key: each prefix holds the first rule covering it.
    fn emit_single(
        &self,
        ruleset: u32,
        dim: u32,
        direction: u32,
        members: &[usize],
        tables: &mut Tables,
    ) {
        let key_dir = kind_dir(dim, dim, direction);
        self.emit_prefixes(ruleset, key_dir, dim, members, tables, |covered| {
            self.hit(members[covered[0]])
        });
    }

    /// The prefixes of key `dim` of the `members`' rules, each with the hit `hit` gives for
    /// the positions (in `members`) of the rules covering it.
    fn emit_prefixes(
        &self,
        ruleset: u32,
        key_dir: u32,
        dim: u32,
        members: &[usize],
        tables: &mut Tables,
        mut hit: impl FnMut(Vec<usize>) -> Hit,
    ) {
        if dim == DIM_REMOTE {
            let keys: Vec<Vec<(u128, u8)>> = members
                .iter()
                .map(|&p| addr_prefixes(self.rule_at(p)))
                .collect();
            for ((bits, len), covered) in covering(&keys, truncate_addr) {
                let key = AddrKey {
                    ruleset,
                    kind_dir: key_dir,
                    addr: bits.to_be_bytes(),
                };
                tables.addr.push((key, 64 + u32::from(len), hit(covered)));
            }
        } else {
            let keys: Vec<Vec<(u16, u8)>> = members
                .iter()
                .map(|&p| ports_of(self.rule_at(p), dim))
                .collect();
            for ((bits, len), covered) in covering(&keys, truncate_port) {
                let key = PortKey {
                    ruleset,
                    kind_dir: key_dir,
                    port: bits.to_be_bytes(),
                    _pad: [0; 2],
                };
                tables.ports.push((key, 64 + u32::from(len), hit(covered)));
            }
        }
    }

    /// Several keys: classes per key, and the first rule of each combination of classes.
    fn emit_multi(
        &self,
        ruleset: u32,
        group: u32,
        direction: u32,
        members: &[usize],
        tables: &mut Tables,
    ) {
        let n = members.len();
        let mut dims: Vec<(u32, Vec<Bits>)> = Vec::new();
        for dim in [DIM_REMOTE, DIM_REMOTE_PORT, DIM_LOCAL_PORT] {
            if group & dim == 0 {
                continue;
            }
            let mut ids: HashMap<Vec<usize>, u32> = HashMap::new();
            let mut sets: Vec<Bits> = Vec::new();
            let mut class_of = |covered: Vec<usize>| -> u32 {
                let next = as_u32(ids.len());
                *ids.entry(covered.clone()).or_insert_with(|| {
                    sets.push(bits_with(n, covered));
                    next
                })
            };
            let key_dir = kind_dir(group, dim, direction);
            self.emit_prefixes(ruleset, key_dir, dim, members, tables, |covered| Hit {
                index: NO_RULE,
                class: class_of(covered),
                record: RuleRecord::default(),
            });
            dims.push((dim, sets));
        }
        // Every combination of one class per key.
        let mut combination = vec![0usize; dims.len()];
        loop {
            let sets: Vec<&Bits> = dims
                .iter()
                .zip(&combination)
                .map(|((_, sets), &c)| &sets[c])
                .collect();
            if let Some(member) = first_in_all(&sets) {
                let mut key = DecisionKey {
                    ruleset,
                    kind_dir: kind_dir(group, 0, direction),
                    ..DecisionKey::default()
                };
                for ((dim, _), &class) in dims.iter().zip(&combination) {
                    match *dim {
                        DIM_REMOTE => key.remote = as_u32(class),
                        DIM_REMOTE_PORT => key.remote_port = as_u32(class),
                        _ => key.local_port = as_u32(class),
                    }
                }
                tables.decisions.push((key, self.hit(members[member])));
            }
            // Next combination (odometer).
            let mut at = 0;
            loop {
                if at == dims.len() {
                    return;
                }
                combination[at] += 1;
                if combination[at] < dims[at].1.len() {
                    break;
                }
                combination[at] = 0;
                at += 1;
            }
        }
    }
}

impl Tables {
    /// The decision the kernel's lookups reach for `conn` at the attachment `point`: what
    /// `ka_sockops` computes, done on the host (tests hold it to [`Policy::decide`]).
    pub fn lookup(&self, point: &CgroupPath, conn: &Connection) -> Option<RuleRecord> {
        let record = self.attachments.get(point)?;
        let direction = match conn.direction {
            Direction::Outbound => OUTBOUND,
            Direction::Inbound => INBOUND,
        };
        let ruleset = record.ruleset;
        let addr = mapped(conn.remote);
        let addr_hit = |key_dir: u32| -> Option<Hit> {
            longest(
                self.addr
                    .iter()
                    .filter(|(key, ..)| key.ruleset == ruleset && key.kind_dir == key_dir)
                    .map(|(key, len, hit)| {
                        let prefix = Cidr {
                            bits: u128::from_be_bytes(key.addr),
                            len: u8::try_from(len - 64).unwrap_or(0),
                        };
                        (prefix.contains_addr(addr), *len, *hit)
                    }),
            )
        };
        let port_hit = |key_dir: u32, port: u16| -> Option<Hit> {
            longest(
                self.ports
                    .iter()
                    .filter(|(key, ..)| key.ruleset == ruleset && key.kind_dir == key_dir)
                    .map(|(key, len, hit)| {
                        let prefix_len = u8::try_from(len - 64).unwrap_or(0);
                        (
                            truncate_port(port, prefix_len) == u16::from_be_bytes(key.port),
                            *len,
                            *hit,
                        )
                    }),
            )
        };
        let decision = |key: DecisionKey| {
            self.decisions
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, hit)| *hit)
        };
        let mut best: Option<Hit> = None;
        for group in 0..KINDS {
            if !record.has_kind(group, direction) {
                continue;
            }
            let found = match group {
                0 => decision(DecisionKey {
                    ruleset,
                    kind_dir: kind_dir(0, 0, direction),
                    ..DecisionKey::default()
                }),
                DIM_REMOTE => addr_hit(kind_dir(group, group, direction)),
                DIM_REMOTE_PORT => port_hit(kind_dir(group, group, direction), conn.remote_port),
                DIM_LOCAL_PORT => port_hit(kind_dir(group, group, direction), conn.local_port),
                _ => (|| {
                    let mut key = DecisionKey {
                        ruleset,
                        kind_dir: kind_dir(group, 0, direction),
                        ..DecisionKey::default()
                    };
                    if group & DIM_REMOTE != 0 {
                        key.remote = addr_hit(kind_dir(group, DIM_REMOTE, direction))?.class;
                    }
                    if group & DIM_REMOTE_PORT != 0 {
                        key.remote_port = port_hit(
                            kind_dir(group, DIM_REMOTE_PORT, direction),
                            conn.remote_port,
                        )?
                        .class;
                    }
                    if group & DIM_LOCAL_PORT != 0 {
                        key.local_port =
                            port_hit(kind_dir(group, DIM_LOCAL_PORT, direction), conn.local_port)?
                                .class;
                    }
                    decision(key)
                })(),
            };
            if let Some(hit) = found
                && best.is_none_or(|b| hit.index < b.index)
            {
                best = Some(hit);
            }
        }
        Some(best.map_or(record.fallback, |hit| hit.record))
    }

    /// What the kernel decides for `conn` with these tables (the lookups of the program,
    /// simulated), or None where no attachment covers it. [`Policy::record_for`] must agree.
    pub fn decide(&self, conn: &Connection) -> Option<RuleRecord> {
        self.lookup(self.attachment_for(&conn.cgroup)?, conn)
    }

    /// The innermost attachment containing `cgroup`, the one whose program decides.
    pub fn attachment_for(&self, cgroup: &CgroupPath) -> Option<&CgroupPath> {
        self.attachments
            .keys()
            .filter(|point| point.contains(cgroup))
            .max_by_key(|point| point.depth())
    }
}

/// The hit of the longest matching prefix among (matches, prefix length, hit).
fn longest(entries: impl Iterator<Item = (bool, u32, Hit)>) -> Option<Hit> {
    entries
        .filter(|(matches, ..)| *matches)
        .max_by_key(|(_, len, _)| *len)
        .map(|(_, _, hit)| hit)
}

#[cfg(test)]
mod tests;
