//! The kernel's socket list (NETLINK_SOCK_DIAG, inet_diag): the TCP sockets of one network
//! namespace with their state, addresses, inode and cgroup id. Established ones can be asked
//! for by cgroup (a bytecode filter the kernel runs, `INET_DIAG_BC_CGROUP_COND`, from the same
//! kernels as the cgroup id attribute): a sweep of one new cgroup then reads its own sockets,
//! not every socket of a busy namespace.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
};

use rustix::net;

/// `AF_INET`, `AF_INET6` and `IPPROTO_TCP` as the one-byte fields of inet_diag carry them.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_CGROUP_ID: u16 = 21;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_CGROUP_COND: u8 = 13;
/// More cgroups than this are not filtered in the kernel (the filter is one netlink attribute,
/// at most 64 KiB; 16 bytes a cgroup).
const MAX_FILTERED: usize = 2048;
const NLMSG_HDRLEN: usize = 16;
const INET_DIAG_MSG_LEN: usize = 72;

/// `TCP_ESTABLISHED` and `TCP_LISTEN` in `enum tcp_state` (include/net/tcp_states.h).
pub(crate) const ESTABLISHED: u8 = 1;
pub(crate) const LISTEN: u8 = 10;

/// `idiag_timer`: which timer of the socket is pending (net/ipv4/inet_diag.c). The kernel
/// reports one: the retransmit (or loss probe) timer and the zero-window probe timer take
/// precedence over the keepalive timer, so a socket with data in flight shows those even when
/// keepalive is on. Off means neither: no data in flight and no keepalive.
pub(crate) const TIMER_OFF: u8 = 0;
pub(crate) const TIMER_RETRANSMIT: u8 = 1;
pub(crate) const TIMER_KEEPALIVE: u8 = 2;
pub(crate) const TIMER_PROBE0: u8 = 4;

/// One TCP socket as inet_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiagSocket {
    pub(crate) state: u8,
    /// `TIMER_*`.
    pub(crate) timer: u8,
    pub(crate) local: IpAddr,
    pub(crate) local_port: u16,
    pub(crate) remote: IpAddr,
    pub(crate) remote_port: u16,
    /// The inode of the socket, as /proc/PID/fd links show it (`socket:[inode]`).
    pub(crate) inode: u64,
    /// The cgroup the socket belongs to (0 if the kernel did not say).
    pub(crate) cgroup_id: u64,
}

/// Listening TCP sockets, and established ones (of the cgroups `only` when given), IPv4 and
/// IPv6, of the calling thread's network namespace.
pub(crate) fn tcp_sockets(only: Option<&[u64]>) -> io::Result<Vec<DiagSocket>> {
    let socket = net::socket_with(
        net::AddressFamily::NETLINK,
        net::SocketType::DGRAM,
        net::SocketFlags::CLOEXEC,
        Some(net::netlink::SOCK_DIAG),
    )?;
    let filter = only
        .filter(|ids| ids.len() <= MAX_FILTERED)
        .map(cgroup_filter);
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(&socket, family, 1 << LISTEN, &[], &mut sockets)?;
        let start = sockets.len();
        let filtered = match &filter {
            Some(bytecode) => dump(&socket, family, 1 << ESTABLISHED, bytecode, &mut sockets),
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        if filtered.is_err() {
            // A kernel without the cgroup filter: every established socket, sorted out later.
            sockets.truncate(start);
            dump(&socket, family, 1 << ESTABLISHED, &[], &mut sockets)?;
        }
    }
    Ok(sockets)
}

/// inet_diag bytecode accepting a socket of any of `ids`: for each, a cgroup test that on a
/// match falls into a jump to the end (accept) and otherwise skips it to the next test; the
/// last test's no-match jumps past the end (reject). The kernel's audit follows the match
/// branches, so every test lies on that path.
fn cgroup_filter(ids: &[u64]) -> Vec<u8> {
    const TEST: usize = 12;
    const JUMP: usize = 4;
    let op = |code: u8, yes: usize, no: usize| -> [u8; 4] {
        let no = u16::try_from(no).unwrap_or(u16::MAX).to_ne_bytes();
        [code, u8::try_from(yes).unwrap_or(u8::MAX), no[0], no[1]]
    };
    let len = ids.len() * (TEST + JUMP) - JUMP;
    let mut bytecode = Vec::with_capacity(len);
    for (i, id) in ids.iter().enumerate() {
        let last = i + 1 == ids.len();
        let left = len - bytecode.len();
        let no = if last { left + 4 } else { TEST + JUMP };
        bytecode.extend_from_slice(&op(INET_DIAG_BC_CGROUP_COND, TEST, no));
        bytecode.extend_from_slice(&id.to_ne_bytes());
        if !last {
            let left = len - bytecode.len();
            bytecode.extend_from_slice(&op(INET_DIAG_BC_JMP, JUMP, left));
        }
    }
    bytecode
}

/// One dump request: sockets of `family` in `states`, through `bytecode` if not empty.
fn dump(
    socket: &OwnedFd,
    family: u8,
    states: u32,
    bytecode: &[u8],
    out: &mut Vec<DiagSocket>,
) -> io::Result<()> {
    let mut request = vec![0u8; NLMSG_HDRLEN + 56];
    if !bytecode.is_empty() {
        let attr_len = u16::try_from(4 + bytecode.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        request.extend_from_slice(&attr_len.to_ne_bytes());
        request.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        request.extend_from_slice(bytecode);
    }
    let len = u32::try_from(request.len()).unwrap_or(u32::MAX);
    request[0..4].copy_from_slice(&len.to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed sockid.
    request[16] = family;
    request[17] = IPPROTO_TCP;
    request[20..24].copy_from_slice(&states.to_ne_bytes());
    net::send(socket, &request, net::SendFlags::empty())?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let (received, _) = net::recv(socket, &mut buffer[..], net::RecvFlags::empty())?;
        let mut at = 0;
        while at + NLMSG_HDRLEN <= received {
            let message_len = u32_at(&buffer, at) as usize;
            let kind = u16::from_ne_bytes([buffer[at + 4], buffer[at + 5]]);
            if message_len < NLMSG_HDRLEN || at + message_len > received {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes([
                        buffer[at + 16],
                        buffer[at + 17],
                        buffer[at + 18],
                        buffer[at + 19],
                    ]);
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => {
                    if let Some(socket) = parse(&buffer[at + NLMSG_HDRLEN..at + message_len]) {
                        out.push(socket);
                    }
                }
            }
            at += message_len.next_multiple_of(4);
        }
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// An `inet_diag_msg` and its attributes.
fn parse(message: &[u8]) -> Option<DiagSocket> {
    if message.len() < INET_DIAG_MSG_LEN {
        return None;
    }
    let family = message[0];
    let address = |offset: usize| -> IpAddr {
        let bytes: [u8; 16] = message[offset..offset + 16].try_into().unwrap_or([0; 16]);
        if family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
    };
    // inet_diag_sockid at 4: sport, dport (big-endian), src[16], dst[16], if, cookie[2].
    let mut socket = DiagSocket {
        state: message[1],
        timer: message[2],
        local_port: u16::from_be_bytes([message[4], message[5]]),
        remote_port: u16::from_be_bytes([message[6], message[7]]),
        local: address(8),
        remote: address(24),
        inode: u64::from(u32_at(message, 68)),
        cgroup_id: 0,
    };
    let mut at = INET_DIAG_MSG_LEN;
    while at + 4 <= message.len() {
        let len = usize::from(u16::from_ne_bytes([message[at], message[at + 1]]));
        let kind = u16::from_ne_bytes([message[at + 2], message[at + 3]]);
        if len < 4 || at + len > message.len() {
            break;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            let value: [u8; 8] = message[at + 4..at + 12].try_into().unwrap_or([0; 8]);
            socket.cgroup_id = u64::from_ne_bytes(value);
        }
        at += len.next_multiple_of(4);
    }
    Some(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_inet_diag_message_with_its_cgroup() {
        let mut message = vec![0u8; INET_DIAG_MSG_LEN];
        message[0] = AF_INET;
        message[1] = ESTABLISHED;
        message[2] = TIMER_KEEPALIVE;
        message[4..6].copy_from_slice(&40000u16.to_be_bytes());
        message[6..8].copy_from_slice(&5432u16.to_be_bytes());
        message[8..12].copy_from_slice(&[127, 0, 0, 1]);
        message[24..28].copy_from_slice(&[10, 1, 2, 3]);
        message[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        message.extend_from_slice(&12u16.to_ne_bytes());
        message.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        message.extend_from_slice(&77u64.to_ne_bytes());
        let socket = parse(&message);
        assert_eq!(
            socket,
            Some(DiagSocket {
                state: ESTABLISHED,
                timer: TIMER_KEEPALIVE,
                local: IpAddr::V4(Ipv4Addr::LOCALHOST),
                local_port: 40000,
                remote: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
                remote_port: 5432,
                inode: 4242,
                cgroup_id: 77,
            })
        );
        assert_eq!(parse(&message[..10]), None);
    }

    /// Runs `bytecode` as the kernel does (inet_diag_bc_run) for a socket of cgroup `id`.
    fn accepts(bytecode: &[u8], id: u64) -> bool {
        let mut at = 0usize;
        while at < bytecode.len() {
            let (code, yes) = (bytecode[at], usize::from(bytecode[at + 1]));
            let no = usize::from(u16::from_ne_bytes([bytecode[at + 2], bytecode[at + 3]]));
            let matched = code == INET_DIAG_BC_CGROUP_COND
                && u64::from_ne_bytes(bytecode[at + 4..at + 12].try_into().unwrap_or([0; 8])) == id;
            at += if matched { yes } else { no };
        }
        at == bytecode.len()
    }

    #[test]
    fn the_cgroup_filter_accepts_exactly_its_cgroups() {
        for ids in [vec![7], vec![7, 9], vec![3, 7, 9, 11]] {
            let bytecode = cgroup_filter(&ids);
            for id in 0..13 {
                assert_eq!(accepts(&bytecode, id), ids.contains(&id), "{ids:?} {id}");
            }
        }
    }
}
