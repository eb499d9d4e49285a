//! What both targets check on a policy that parsed: the compiler does not panic, and where it
//! accepts, the tables decide every probe connection as the reference model does.

use std::net::{IpAddr, Ipv6Addr};

use keepalive_agent::{
    CgroupPath, Policy,
    compile::compile,
    plan::{Named, attach_points},
    policy::{Connection, Direction},
};

/// At most this many probe connections per policy, to keep runs fast.
const PROBES: usize = 256;

pub fn check(policy: &Policy) {
    // The agent's plan, as if the cgroups named and probed existed.
    let mut named = Named::of(policy);
    named.extend(probe_cgroups(policy));
    let Ok(plan) = attach_points(policy, &named);
    let Ok(tables) = compile(policy, &plan.paths(), 1) else {
        return;
    };
    for conn in probes(policy).take(PROBES) {
        assert_eq!(
            tables.decide(&conn),
            policy.record_for(&conn),
            "compiled tables and the model disagree on {conn:?} for {policy:#?}"
        );
    }
}

/// The root, the policy's plain cgroups and a child of each.
fn probe_cgroups(policy: &Policy) -> Vec<CgroupPath> {
    let mut cgroups: Vec<CgroupPath> = vec![CgroupPath::root()];
    for path in policy
        .scopes
        .iter()
        .chain(policy.rules.iter().filter_map(|rule| rule.cgroup.as_ref()))
        .filter(|path| !path.is_pattern())
    {
        cgroups.push(path.clone());
        if let Ok(child) = CgroupPath::parse(&format!("{}/x", path.as_str().trim_end_matches('/')))
        {
            cgroups.push(child);
        }
    }
    cgroups
}

/// Connections at the edges of what the policy names: its cgroups and a child of each, the
/// first and last address of each CIDR, each port range's ends, both directions.
fn probes(policy: &Policy) -> impl Iterator<Item = Connection> {
    let cgroups = probe_cgroups(policy);
    let mut addrs: Vec<IpAddr> = vec!["127.0.0.1".parse().ok(), "::1".parse().ok()]
        .into_iter()
        .flatten()
        .collect();
    let mut ports: Vec<u16> = vec![1, 80, 65535];
    for rule in &policy.rules {
        for cidr in &rule.remote {
            for bits in [cidr.bits, cidr.bits | !cidr.mask()] {
                let v6 = Ipv6Addr::from(bits);
                addrs.push(IpAddr::V6(v6));
                if let Some(v4) = v6.to_ipv4_mapped() {
                    addrs.push(IpAddr::V4(v4));
                }
            }
        }
        for range in rule.remote_ports.iter().chain(&rule.local_ports) {
            ports.extend([range.first, range.last, range.first.saturating_sub(1)]);
        }
    }
    ports.sort_unstable();
    ports.dedup();
    let (addrs, ports) = (addrs, ports);
    cgroups.into_iter().flat_map(move |cgroup| {
        let (addrs, ports) = (addrs.clone(), ports.clone());
        addrs.into_iter().flat_map(move |remote| {
            let (cgroup, ports) = (cgroup.clone(), ports.clone());
            ports.clone().into_iter().flat_map(move |port| {
                let cgroup = cgroup.clone();
                [Direction::Outbound, Direction::Inbound]
                    .into_iter()
                    .map(move |direction| Connection {
                        cgroup: cgroup.clone(),
                        direction,
                        remote,
                        remote_port: port,
                        local_port: port.rotate_left(3),
                    })
            })
        })
    })
}
