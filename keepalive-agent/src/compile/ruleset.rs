//! One ruleset's entries: per group and direction, an LPM prefix per key of single-key groups
//! (holding the first rule covering it), or classes per key and one decision entry per
//! combination of classes for multi-key groups.

use std::collections::HashMap;

use keepalive_common::{
    AddrKey, DIM_LOCAL_PORT, DIM_REMOTE, DIM_REMOTE_PORT, DecisionKey, GROUPS, Hit, INBOUND,
    NO_RULE, OUTBOUND, PortKey, RuleRecord, selector,
};

use super::{
    Tables, allows, as_u32, group_of,
    prefixes::{
        Bits, addr_prefixes, bits_with, covering, first_in_all, ports_of, truncate_addr,
        truncate_port,
    },
};
use crate::policy::{Decision, Policy, Rule};

/// The rules of one ruleset, in precedence order.
pub(super) struct Ruleset<'a> {
    pub(super) policy: &'a Policy,
    pub(super) list: &'a [usize],
}

impl<'a> Ruleset<'a> {
    pub(super) fn rules(&self) -> impl Iterator<Item = &'a Rule> + '_ {
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

    pub(super) fn emit(&self, ruleset: u32, tables: &mut Tables) {
        for group in 0..GROUPS {
            for direction in [OUTBOUND, INBOUND] {
                // Positions of the group's rules that apply in this direction.
                let members: Vec<usize> = self
                    .rules()
                    .enumerate()
                    .filter(|(_, rule)| group_of(rule) == group && allows(rule, direction))
                    .map(|(position, _)| position)
                    .collect();
                if members.is_empty() {
                    continue;
                }
                match group {
                    0 => tables.decisions.push((
                        DecisionKey {
                            ruleset,
                            selector: selector(0, 0, direction),
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
        let key_dir = selector(dim, dim, direction);
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
                    selector: key_dir,
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
                    selector: key_dir,
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
            let key_dir = selector(group, dim, direction);
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
                    selector: selector(group, 0, direction),
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
