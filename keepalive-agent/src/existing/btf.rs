//! Field offsets of the running kernel's structures, from its BTF (`/sys/kernel/btf/vmlinux`):
//! what CO-RE relocations give a C program, for the sweep program, which Rust compiles without
//! them. Only what that needs: structs, unions and their members, through anonymous members
//! and typedefs.

use std::{fs, io, path::Path};

use keepalive_common::{LinkOffsets, SockOffsets, ends::EndOffsets};

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// One type of the BTF; members stay in the blob and are read when asked for.
#[derive(Debug, Clone, Copy)]
struct Type {
    kind: u32,
    name: u32,
    /// The type it refers to (typedef, qualifiers).
    referred: u32,
    /// Where its member records start in the blob (structs, unions), and how many.
    members: usize,
    vlen: usize,
    /// Bitfield members: the top 8 bits of a member's offset are its size.
    kind_flag: bool,
}

/// The types of a BTF blob, by id (index 0 is `void`).
#[derive(Debug)]
pub(crate) struct Btf {
    bytes: Vec<u8>,
    /// The string section's range in `bytes`.
    strings: std::ops::Range<usize>,
    types: Vec<Type>,
}

/// Why the offsets could not be found.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("not BTF, or a BTF this agent cannot read: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no {0}")]
    NoField(String),
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, BtfError> {
    bytes
        .get(at..at + 4)
        .and_then(|word| word.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// The running kernel's BTF.
    pub(crate) fn kernel() -> Result<Self, BtfError> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let bytes = fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(bytes)
    }

    /// Parses a little-endian BTF blob: one pass over the type records, no copies.
    pub(crate) fn parse(bytes: Vec<u8>) -> Result<Self, BtfError> {
        if bytes.get(..2) != Some(&MAGIC.to_le_bytes()[..]) {
            return Err(BtfError::Malformed("no BTF magic (or big-endian)"));
        }
        let header = u32_at(&bytes, 4)? as usize;
        let (type_off, type_len) = (u32_at(&bytes, 8)? as usize, u32_at(&bytes, 12)? as usize);
        let (str_off, str_len) = (u32_at(&bytes, 16)? as usize, u32_at(&bytes, 20)? as usize);
        let strings = header + str_off..header + str_off + str_len;
        if bytes.get(strings.clone()).is_none() {
            return Err(BtfError::Malformed("string section out of bounds"));
        }
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            referred: 0,
            members: 0,
            vlen: 0,
            kind_flag: false,
        }];
        let (mut at, end) = (header + type_off, header + type_off + type_len);
        while at < end {
            let (name, info, referred) = (
                u32_at(&bytes, at)?,
                u32_at(&bytes, at + 4)?,
                u32_at(&bytes, at + 8)?,
            );
            at += 12;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            types.push(Type {
                kind,
                name,
                referred,
                members: at,
                vlen,
                kind_flag: info >> 31 == 1,
            });
            at += match kind {
                1 | 14 | 17 => 4,             // int, var, decl tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => vlen * 12, // struct, union, datasec, enum64
                6 | 13 => vlen * 8,           // enum, func proto
                0..=19 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
        }
        if at != end || bytes.len() < end {
            return Err(BtfError::Malformed("type section out of bounds"));
        }
        Ok(Self {
            bytes,
            strings,
            types,
        })
    }

    /// The string at `offset` of the string section.
    fn name(&self, offset: u32) -> &[u8] {
        let section = &self.bytes[self.strings.clone()];
        let rest = section.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// The first struct named `name` that has members (not a forward declaration).
    fn find_struct(&self, name: &str) -> Option<Type> {
        self.types
            .iter()
            .find(|ty| {
                ty.kind == KIND_STRUCT && ty.vlen > 0 && self.name(ty.name) == name.as_bytes()
            })
            .copied()
    }

    /// The struct or union `id` refers to, through typedefs and qualifiers.
    fn concrete(&self, mut id: u32) -> Option<Type> {
        for _ in 0..16 {
            let ty = *self.types.get(id as usize)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.referred;
                }
                KIND_STRUCT | KIND_UNION => return Some(ty),
                _ => return None,
            }
        }
        None
    }

    /// Bit offset and type of member `name` of `ty`, looking inside anonymous members.
    fn member(&self, ty: Type, name: &str) -> Option<(u32, u32)> {
        for i in 0..ty.vlen {
            let record = ty.members + i * 12;
            let (member, type_id, offset) = (
                u32_at(&self.bytes, record).ok()?,
                u32_at(&self.bytes, record + 4).ok()?,
                u32_at(&self.bytes, record + 8).ok()?,
            );
            let bits = if ty.kind_flag {
                offset & 0x00ff_ffff
            } else {
                offset
            };
            let member = self.name(member);
            if member == name.as_bytes() {
                return Some((bits, type_id));
            }
            if member.is_empty() {
                let inner = self.concrete(type_id)?;
                if let Some((inner_bits, id)) = self.member(inner, name) {
                    return Some((bits + inner_bits, id));
                }
            }
        }
        None
    }

    /// Byte offset of `path` (member names, each inside the previous) in struct `root`.
    pub(crate) fn offset(&self, root: &str, path: &[&str]) -> Result<u32, BtfError> {
        let missing = || BtfError::NoField(format!("{root}.{}", path.join(".")));
        let mut ty = self.find_struct(root).ok_or_else(missing)?;
        let mut bits = 0;
        for (i, name) in path.iter().enumerate() {
            let (member_bits, id) = self.member(ty, name).ok_or_else(missing)?;
            bits += member_bits;
            if i + 1 < path.len() {
                ty = self.concrete(id).ok_or_else(missing)?;
            }
        }
        if bits % 8 != 0 {
            return Err(missing());
        }
        Ok(bits / 8)
    }

    /// The offsets the sweep program reads a socket at. `sock_cgroup_data.cgroup` is the
    /// layout from Linux 5.15 (8520e224f547); before it the pointer shared a word with flags.
    pub(crate) fn sock_offsets(&self) -> Result<SockOffsets, BtfError> {
        let common = |field: &str| self.offset("sock", &["__sk_common", field]);
        Ok(SockOffsets {
            family: common("skc_family")?,
            state: common("skc_state")?,
            remote_port: common("skc_dport")?,
            local_port: common("skc_num")?,
            remote_ip4: common("skc_daddr")?,
            remote_ip6: common("skc_v6_daddr")?,
            cgroup: self.offset("sock", &["sk_cgrp_data", "cgroup"])?,
            cgroup_kn: self.offset("cgroup", &["kn"])?,
            kn_id: self.offset("kernfs_node", &["id"])?,
            flags: common("skc_flags")?,
        })
    }
    /// The offsets the sock_ops program reads a connection's end at (`tcp_sock`).
    pub(crate) fn end_offsets(&self) -> Result<EndOffsets, BtfError> {
        let tcp = |path: &[&str]| self.offset("tcp_sock", path);
        Ok(EndOffsets {
            enabled: 1,
            err: tcp(&["inet_conn", "icsk_inet", "sk", "sk_err"])?,
            rcv_tstamp: tcp(&["rcv_tstamp"])?,
            retrans_stamp: tcp(&["retrans_stamp"])?,
            tracked_silence: 0,
        })
    }

    /// The offsets the link iterator reads a cgroup link at.
    pub(crate) fn link_offsets(&self) -> Result<LinkOffsets, BtfError> {
        Ok(LinkOffsets {
            link_type: self.offset("bpf_link", &["type"])?,
            prog: self.offset("bpf_link", &["prog"])?,
            prog_aux: self.offset("bpf_prog", &["aux"])?,
            prog_id: self.offset("bpf_prog_aux", &["id"])?,
            cgroup: self.offset("bpf_cgroup_link", &["cgroup"])?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

    use super::Btf;

    #[test]
    fn the_running_kernels_socket_fields_are_found() {
        let btf = Btf::kernel().unwrap();
        let offsets = btf.sock_offsets().unwrap();
        // The socket's first fields are the address and port pairs, then the family and
        // state; the address pair comes first in sock_common (struct sock starts with it).
        assert_eq!(offsets.remote_ip4, 0);
        assert!(offsets.local_port == offsets.remote_port + 2, "{offsets:?}");
        assert!(offsets.state > offsets.family, "{offsets:?}");
        assert!(offsets.remote_ip6 > offsets.state, "{offsets:?}");
        assert!(offsets.cgroup > offsets.remote_ip6, "{offsets:?}");
    }

    #[test]
    fn the_running_kernels_link_fields_are_found() {
        let offsets = Btf::kernel().unwrap().link_offsets().unwrap();
        // A link starts with its reference count and id, then its type, ops and program; a
        // cgroup link's cgroup comes after the whole link it starts with.
        assert!(offsets.link_type >= 12, "{offsets:?}");
        assert!(offsets.prog > offsets.link_type, "{offsets:?}");
        assert!(offsets.cgroup > offsets.prog, "{offsets:?}");
    }

    #[test]
    fn a_missing_field_is_named() {
        let btf = Btf::kernel().unwrap();
        let error = btf
            .offset("sock", &["sk_cgrp_data", "no_such"])
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the kernel's BTF has no sock.sk_cgrp_data.no_such"
        );
    }

    #[test]
    fn garbage_is_refused_not_misread() {
        assert!(Btf::parse(b"not btf at all".to_vec()).is_err());
        assert!(Btf::parse(vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 99, 0, 0, 0]).is_err());
    }
}
