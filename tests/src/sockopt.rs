//! Reading a socket's keepalive settings back from the kernel.

use std::os::fd::AsFd;

use keepalive_agent::Values;
use keepalive_common::sockopt::{
    SO_KEEPALIVE, SOL_SOCKET, SOL_TCP, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_USER_TIMEOUT,
};

use crate::Netns;

/// What getsockopt(2) reports for one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub enabled: bool,
    pub idle_secs: u32,
    pub interval_secs: u32,
    pub count: u32,
    pub user_timeout_ms: u32,
}

impl Keepalive {
    /// Reads the socket behind `fd`.
    pub fn of(fd: impl AsFd) -> Self {
        let fd = fd.as_fd();
        let get = |level, name| {
            let value = keepalive_agent::sockopt::get_int(fd, level, name)
                .unwrap_or_else(|error| panic!("getsockopt({level}, {name}): {error}"));
            u32::try_from(value).unwrap_or_else(|_| panic!("getsockopt({level}, {name}) = {value}"))
        };
        Self {
            enabled: get(SOL_SOCKET, SO_KEEPALIVE) != 0,
            idle_secs: get(SOL_TCP, TCP_KEEPIDLE),
            interval_secs: get(SOL_TCP, TCP_KEEPINTVL),
            count: get(SOL_TCP, TCP_KEEPCNT),
            user_timeout_ms: get(SOL_TCP, TCP_USER_TIMEOUT),
        }
    }

    /// What a socket enforced with `policy` reports.
    pub fn enforced(policy: &Values) -> Self {
        Self {
            enabled: true,
            idle_secs: policy.idle_secs,
            interval_secs: policy.interval_secs,
            count: policy.count,
            user_timeout_ms: policy.user_timeout_ms.unwrap_or(0),
        }
    }

    /// What an untouched socket of `netns` reports: keepalive off, the namespace's sysctl
    /// defaults, no user timeout.
    pub fn untouched(netns: &Netns) -> Self {
        let sysctl = |key: &str| {
            let value = netns.sysctl(key);
            value
                .parse()
                .unwrap_or_else(|_| panic!("{key} = {value:?}"))
        };
        Self {
            enabled: false,
            idle_secs: sysctl("net/ipv4/tcp_keepalive_time"),
            interval_secs: sysctl("net/ipv4/tcp_keepalive_intvl"),
            count: sysctl("net/ipv4/tcp_keepalive_probes"),
            user_timeout_ms: 0,
        }
    }
}
