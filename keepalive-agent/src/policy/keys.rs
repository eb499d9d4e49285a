//! What rules match a connection's peer on, besides the cgroup and the direction: address
//! prefixes (IPv6, IPv4 mapped) and port ranges.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
};

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
