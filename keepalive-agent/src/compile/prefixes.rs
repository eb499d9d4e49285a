//! Prefixes: CIDRs and port ranges as LPM prefixes, and for each distinct prefix the rules
//! that cover it.

use std::collections::BTreeMap;

use keepalive_common::DIM_REMOTE_PORT;

use crate::policy::{Cidr, PortRange, Rule};

/// A set of members of a group.
pub(super) type Bits = Vec<u64>;

pub(super) fn bits_with(len: usize, members: impl IntoIterator<Item = usize>) -> Bits {
    let mut bits = vec![0; len.div_ceil(64)];
    for member in members {
        bits[member / 64] |= 1 << (member % 64);
    }
    bits
}

pub(super) fn first_in_all(sets: &[&Bits]) -> Option<usize> {
    (0..sets.first()?.len()).find_map(|word| {
        let common = sets.iter().fold(u64::MAX, |acc, set| acc & set[word]);
        (common != 0).then(|| word * 64 + common.trailing_zeros() as usize)
    })
}

/// For each distinct prefix of `keys` (the prefixes of each member), the members that cover
/// it: a member covers a prefix if one of its prefixes is that prefix or a shorter one of it.
pub(super) fn covering<P: Copy + Ord>(
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

pub(super) fn truncate_addr(bits: u128, len: u8) -> u128 {
    bits & Cidr { bits: 0, len }.mask()
}

pub(super) fn truncate_port(bits: u16, len: u8) -> u16 {
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

pub(super) fn addr_prefixes(rule: &Rule) -> Vec<(u128, u8)> {
    rule.remote
        .iter()
        .map(|cidr| (cidr.bits, cidr.len))
        .collect()
}

pub(super) fn ports_of(rule: &Rule, dim: u32) -> Vec<(u16, u8)> {
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
