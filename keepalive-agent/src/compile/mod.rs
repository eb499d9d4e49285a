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
//! the cost grows with the groups of rules, not their number, and the entries with the rules
//! (a cross product only inside a multi-key group).
//!
//! Modules: [`prefixes`] turns CIDRs and port ranges into LPM prefixes and the rules covering
//! each; [`ruleset`] emits one ruleset's entries; `lookup` reads the tables back through the
//! kernel's own lookup algorithm (`keepalive_common::lookup`), for tests and the fuzzer (feature
//! `test-support`).

mod prefixes;
mod ruleset;
#[cfg(any(test, feature = "test-support"))]
mod tables_as_maps;

use std::collections::{BTreeMap, HashMap};

use keepalive_common::{
    ATTACH_VALID, AddrKey, AttachRecord, DIM_LOCAL_PORT, DIM_REMOTE, DIM_REMOTE_PORT, DecisionKey,
    Hit, INBOUND, OUTBOUND, PortKey, REMEMBER_DIRECTION, group_bit, limits,
};

pub use self::prefixes::port_prefixes;
use self::ruleset::Ruleset;
use crate::policy::{CgroupPath, Decision, Direction, Policy, Rule};

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
    /// The id of each ruleset (rule indices in precedence order) the entries hold.
    pub rulesets: BTreeMap<Vec<usize>, u32>,
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
        let record = attach_record(policy, point, generation, |list| {
            let next = rulesets.len();
            Some(
                *rulesets
                    .entry(list.to_vec())
                    .or_insert_with(|| ruleset_id(generation, next)),
            )
        });
        if let Some(record) = record {
            tables.attachments.insert(point.clone(), record);
        }
    }
    tables.rulesets = rulesets
        .iter()
        .map(|(list, id)| (list.clone(), *id))
        .collect();
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

/// The record of one more attachment, at `point`, under `tables` compiled from `policy`: None
/// when its rules make a ruleset the tables do not hold (compile the policy again).
pub fn record_for(policy: &Policy, tables: &Tables, point: &CgroupPath) -> Option<AttachRecord> {
    attach_record(policy, point, tables.generation, |list| {
        tables.rulesets.get(list).copied()
    })
}

/// The record of the attachment at `point`: its rules (the candidates before the first catch-all,
/// which becomes the fallback) get a ruleset id from `ruleset_of`, shared with attachments of
/// the same list (None: no id for them).
fn attach_record(
    policy: &Policy,
    point: &CgroupPath,
    generation: u32,
    ruleset_of: impl FnOnce(&[usize]) -> Option<u32>,
) -> Option<AttachRecord> {
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
        groups: 0,
        generation,
        fallback,
    };
    if list.is_empty() {
        return Some(record);
    }
    record.ruleset = ruleset_of(&list)?;
    let rules = Ruleset {
        policy,
        list: &list,
    };
    record.groups = rules.rules().fold(0, |groups, rule| {
        [OUTBOUND, INBOUND]
            .into_iter()
            .filter(|&direction| allows(rule, direction))
            .fold(groups, |groups, direction| {
                groups | group_bit(group_of(rule), direction)
            })
    });
    let directional = rules.rules().any(|rule| rule.direction.is_some());
    let locked = rules.rules().any(|rule| rule.action.lock) || fallback.locked();
    if directional && locked {
        record.flags |= REMEMBER_DIRECTION;
    }
    Some(record)
}

/// The group of a rule: the bits of the keys it uses (`DIM_*`); 0 for direction only.
pub(super) fn group_of(rule: &Rule) -> u32 {
    let mut group = 0;
    if !rule.remote.is_empty() {
        group |= DIM_REMOTE;
    }
    if !rule.remote_ports.is_empty() {
        group |= DIM_REMOTE_PORT;
    }
    if !rule.local_ports.is_empty() {
        group |= DIM_LOCAL_PORT;
    }
    group
}

pub(super) fn allows(rule: &Rule, direction: u32) -> bool {
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

pub(super) fn as_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
