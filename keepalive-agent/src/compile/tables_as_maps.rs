//! The compiled tables read back the way the kernel reads its maps: the same lookup algorithm
//! (`keepalive_common::lookup::decide`) over the entries, so the tests and the fuzzer check the
//! code the kernel runs.

use keepalive_common::{
    AddrKey, DecisionKey, Hit, INBOUND, OUTBOUND, PortKey, RuleRecord,
    lookup::{self, Maps, Peer},
};

use super::{Tables, prefixes::truncate_port};
use crate::policy::{CgroupPath, Cidr, Connection, Direction, mapped};

/// The entries as the kernel's maps hold them: LPM tries answer with the longest matching
/// prefix among the entries of the key's ruleset and selector, the hash map with the exact key.
impl Maps for Tables {
    fn addr(&self, key: &AddrKey) -> Option<Hit> {
        let addr = u128::from_be_bytes(key.addr);
        longest(
            self.addr
                .iter()
                .filter(|(entry, ..)| {
                    entry.ruleset == key.ruleset && entry.selector == key.selector
                })
                .map(|(entry, len, hit)| {
                    let prefix = Cidr {
                        bits: u128::from_be_bytes(entry.addr),
                        len: u8::try_from(len - 64).unwrap_or(0),
                    };
                    (prefix.contains_addr(addr), *len, *hit)
                }),
        )
    }

    fn port(&self, key: &PortKey) -> Option<Hit> {
        let port = u16::from_be_bytes(key.port);
        longest(
            self.ports
                .iter()
                .filter(|(entry, ..)| {
                    entry.ruleset == key.ruleset && entry.selector == key.selector
                })
                .map(|(entry, len, hit)| {
                    let prefix_len = u8::try_from(len - 64).unwrap_or(0);
                    let matches = truncate_port(port, prefix_len) == u16::from_be_bytes(entry.port);
                    (matches, *len, *hit)
                }),
        )
    }

    fn decision(&self, key: &DecisionKey) -> Option<Hit> {
        self.decisions
            .iter()
            .find(|(entry, _)| entry == key)
            .map(|(_, hit)| *hit)
    }
}

/// The hit of the longest matching prefix among (matches, prefix length, hit).
fn longest(entries: impl Iterator<Item = (bool, u32, Hit)>) -> Option<Hit> {
    entries
        .filter(|(matches, ..)| *matches)
        .max_by_key(|(_, len, _)| *len)
        .map(|(_, _, hit)| hit)
}

impl Tables {
    /// The decision the kernel's lookups reach for `conn` at the attachment `point`: what
    /// `ka_sockops` computes, with the same code (tests hold it to [`crate::Policy::decide`]).
    pub fn lookup(&self, point: &CgroupPath, conn: &Connection) -> Option<RuleRecord> {
        let record = self.attachments.get(point)?;
        let direction = match conn.direction {
            Direction::Outbound => OUTBOUND,
            Direction::Inbound => INBOUND,
        };
        let peer = Peer {
            addr: mapped(conn.remote).to_be_bytes(),
            remote_port: conn.remote_port,
            local_port: conn.local_port,
        };
        Some(lookup::decide(self, record, &peer, direction))
    }

    /// What the kernel decides for `conn` with these tables, or None where no attachment
    /// covers it. [`crate::Policy::record_for`] must agree.
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
