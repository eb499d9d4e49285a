//! Network namespaces and veth links: a small network of our own on this machine.

use std::{
    fs::File,
    os::fd::{AsFd, BorrowedFd},
    process::{Command, Output},
};

use crate::{cleanup_failed, succeeds, unique_name};

/// A fresh network namespace with `lo` up, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    #[expect(
        clippy::new_without_default,
        reason = "creating a namespace is not a default value"
    )]
    pub fn new() -> Self {
        let name = unique_name();
        succeeds(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self {
            file: File::open(format!("/run/netns/{name}"))
                .unwrap_or_else(|e| panic!("cannot open netns {name}: {e}")),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Output {
        succeeds(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs `program ARGS...` inside the namespace (`ip netns exec`), which must succeed.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        succeeds(
            Command::new("ip")
                .args(["netns", "exec", &self.name, program])
                .args(args),
        )
    }

    /// Loads an nftables ruleset into this namespace (`nft -f -`).
    pub fn nft(&self, ruleset: &str) {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nft (Debian package nftables): {e}"));
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(ruleset.as_bytes()));
        let status = child.wait().unwrap_or_else(|e| panic!("nft: {e}"));
        assert!(
            matches!(written, Some(Ok(()))) && status.success(),
            "nft -f - failed for:\n{ruleset}"
        );
    }

    /// Whether this namespace's connection tracking holds a TCP flow from source port
    /// `port` (IPv6 if `v6`): a firewall here still knows the flow.
    pub fn tracks(&self, v6: bool, port: &str) -> bool {
        let family = if v6 { "ipv6" } else { "ipv4" };
        let out = self.exec("conntrack", &["-L", "-f", family, "-p", "tcp"]);
        let needle = format!("sport={port} ");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|line| line.contains(&needle))
    }

    /// A value of this namespace's `/proc/sys`, e.g. `net/ipv4/tcp_keepalive_time`.
    pub fn sysctl(&self, key: &str) -> String {
        let out = self.exec("cat", &[&format!("/proc/sys/{key}")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Sets a value of this namespace's `/proc/sys` (only the namespace sees it).
    pub fn set_sysctl(&self, key: &str, value: &str) {
        self.exec("sh", &["-c", &format!("echo {value} > /proc/sys/{key}")]);
    }

    /// A counter of this namespace's `/proc/net/netstat`, e.g. (`TcpExt`, `TCPKeepAlive`).
    pub fn netstat(&self, group: &str, counter: &str) -> u64 {
        let out = self.exec("cat", &["/proc/net/netstat"]);
        parse_netstat(&String::from_utf8_lossy(&out.stdout), group, counter)
            .unwrap_or_else(|| panic!("no {group} {counter} in /proc/net/netstat of {}", self.name))
    }

    /// `ss -tnoH state established` in this namespace, one entry per connection.
    pub fn established(&self) -> Vec<SsEntry> {
        let out = self.exec("ss", &["-tnoH", "state", "established"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(SsEntry::parse)
            .collect()
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !delete(&self.name) {
            cleanup_failed(&format!("cannot delete netns {}", self.name));
        }
    }
}

/// Deletes a named network namespace (its veth ends go with it).
pub(crate) fn delete(name: &str) -> bool {
    Command::new("ip")
        .args(["netns", "del", name])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// A veth pair between two namespaces, with an IPv4 and an IPv6 address on each end; it goes
/// away with the namespaces.
#[derive(Debug)]
pub struct Veth {
    pub a_v4: String,
    pub b_v4: String,
    pub a_v6: String,
    pub b_v6: String,
}

impl Veth {
    /// Links `a` (10.250.0.1, fd00:250::1) and `b` (10.250.0.2, fd00:250::2). The namespaces are
    /// private to the test, so the same addresses serve every test.
    pub fn link(a: &Netns, b: &Netns) -> Self {
        Self::subnet(a, b, 0)
    }

    /// Links `a` (10.250.N.1, fd00:250:N::1, device `kaNa`) and `b` (10.250.N.2, fd00:250:N::2,
    /// device `kaNb`): one subnet per link of a bigger network.
    pub fn subnet(a: &Netns, b: &Netns, n: u8) -> Self {
        let veth = Self {
            a_v4: format!("10.250.{n}.1"),
            b_v4: format!("10.250.{n}.2"),
            a_v6: format!("fd00:250:{n}::1"),
            b_v6: format!("fd00:250:{n}::2"),
        };
        let (a_dev, b_dev) = (Self::device(n, 'a'), Self::device(n, 'b'));
        succeeds(Command::new("ip").args([
            "link",
            "add",
            &a_dev,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b_dev,
            "netns",
            b.name(),
        ]));
        for (ns, dev, v4, v6) in [
            (a, &a_dev, &veth.a_v4, &veth.a_v6),
            (b, &b_dev, &veth.b_v4, &veth.b_v6),
        ] {
            // nodad: the IPv6 address is usable at once, without duplicate address detection.
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        // Static neighbours, no ARP or neighbour discovery: the first IPv6 neighbour
        // solicitation right after link-up is lost here, so the first handshake took ~1 s, and
        // that RTT sample put the connection's retransmission timeout at ~3 s.
        let (a_mac, b_mac) = (mac(a, &a_dev), mac(b, &b_dev));
        for (ns, dev, peer_v4, peer_v6, peer_mac) in [
            (a, &a_dev, &veth.b_v4, &veth.b_v6, &b_mac),
            (b, &b_dev, &veth.a_v4, &veth.a_v6, &a_mac),
        ] {
            for peer in [peer_v4, peer_v6] {
                ns.ip(&[
                    "neigh",
                    "replace",
                    peer,
                    "lladdr",
                    peer_mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ]);
            }
        }
        veth
    }

    /// The device name of `end` (`a` or `b`) of link `n`.
    pub fn device(n: u8, end: char) -> String {
        format!("ka{n}{end}")
    }
}

/// client - router - server: the router forwards between two links, so a firewall on it sits
/// between the two ends like a middlebox on the Internet.
#[derive(Debug)]
pub struct Routed {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
    /// client (a, 10.250.1.1) to router (b, 10.250.1.2).
    pub client_link: Veth,
    /// router (a, 10.250.2.1) to server (b, 10.250.2.2).
    pub server_link: Veth,
}

impl Routed {
    #[expect(
        clippy::new_without_default,
        reason = "building a network is not a default value"
    )]
    pub fn new() -> Self {
        let (client, router, server) = (Netns::new(), Netns::new(), Netns::new());
        let client_link = Veth::subnet(&client, &router, 1);
        let server_link = Veth::subnet(&router, &server, 2);
        router.set_sysctl("net/ipv4/ip_forward", "1");
        router.set_sysctl("net/ipv6/conf/all/forwarding", "1");
        for (ns, v4, v6) in [
            (&client, &client_link.b_v4, &client_link.b_v6),
            (&server, &server_link.a_v4, &server_link.a_v6),
        ] {
            ns.ip(&["route", "add", "default", "via", v4]);
            ns.ip(&["-6", "route", "add", "default", "via", v6]);
        }
        Self {
            client,
            router,
            server,
            client_link,
            server_link,
        }
    }
}

/// One line of `ss -tnoH state established`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsEntry {
    pub local: String,
    pub peer: String,
    /// The `timer:(...)` column, e.g. `keepalive,59sec,0`, if any.
    pub timer: Option<String>,
}

impl SsEntry {
    fn parse(line: &str) -> Option<Self> {
        // Recv-Q Send-Q Local Peer [timer:(...)]
        let mut fields = line.split_whitespace().skip(2);
        let local = fields.next()?.to_string();
        let peer = fields.next()?.to_string();
        let timer = fields
            .find_map(|field| field.strip_prefix("timer:("))
            .map(|rest| rest.trim_end_matches(')').to_string());
        Some(Self { local, peer, timer })
    }

    /// Whether ss shows a keepalive timer on this connection.
    pub fn has_keepalive_timer(&self) -> bool {
        self.timer
            .as_deref()
            .is_some_and(|timer| timer.starts_with("keepalive,"))
    }
}

/// The MAC address of `dev` in `ns`.
fn mac(ns: &Netns, dev: &str) -> String {
    let out = ns.ip(&["-o", "link", "show", "dev", dev]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no MAC address for {dev}: {text}"))
}

fn parse_netstat(text: &str, group: &str, counter: &str) -> Option<u64> {
    // Pairs of lines: "TcpExt: Name1 Name2 ..." then "TcpExt: 1 2 ...".
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let index = names.split_whitespace().position(|name| name == counter);
        if let Some(index) = index {
            return values.split_whitespace().nth(index)?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_lines() {
        let entry = SsEntry::parse(
            "0      0      127.0.0.1:41234   127.0.0.1:5000  timer:(keepalive,36sec,0)",
        );
        assert_eq!(
            entry,
            Some(SsEntry {
                local: "127.0.0.1:41234".into(),
                peer: "127.0.0.1:5000".into(),
                timer: Some("keepalive,36sec,0".into()),
            })
        );
        assert!(entry.is_some_and(|e| e.has_keepalive_timer()));
        let plain = SsEntry::parse("0 0 [::1]:5000 [::1]:41234");
        assert!(plain.is_some_and(|e| e.timer.is_none()));
    }

    #[test]
    fn parses_netstat() {
        let text =
            "TcpExt: SyncookiesSent TCPKeepAlive\nTcpExt: 0 17\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(parse_netstat(text, "TcpExt", "TCPKeepAlive"), Some(17));
        assert_eq!(parse_netstat(text, "IpExt", "InNoRoutes"), Some(3));
        assert_eq!(parse_netstat(text, "TcpExt", "Missing"), None);
    }
}
