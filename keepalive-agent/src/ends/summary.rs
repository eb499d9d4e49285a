//! What the agent keeps of the ends the kernel reports: per rule slot, a histogram of how long
//! connections had been silent before they failed; per destination (the peer's /24 or /64 and
//! the service port), a bounded summary for `keepalive-agent report`: the failures, and the
//! longest silence a connection survived.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use keepalive_common::ends::End;
use serde::{Deserialize, Serialize};

/// Upper bounds of the idle histogram, in seconds: around the timeouts middleboxes are known
/// for (Azure 4 min, AWS 350 s, GCP 10 min, IPVS 900 s) and a rule's usual idle values.
pub const IDLE_BUCKETS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 240.0, 350.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
];

/// Destinations kept; past that, one that only saw survivals makes room, else the one that
/// failed least recently. A flood of one-off peers cannot grow the summary.
pub const MAX_DESTINATIONS: usize = 512;

/// One connection's end the kernel reported: a failure, or a normal close after a silence it
/// survived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub slot: u32,
    pub end: End,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub local_port: u16,
    /// The connection was accepted here.
    pub inbound: bool,
    /// Silence before the event that killed the connection: the reset, the first unanswered
    /// segment, or the first unanswered keepalive probe's wait included.
    pub idle: Duration,
    /// The longest silence the connection sent data after and had an answer (zero: none of a
    /// second or more).
    pub survived: Duration,
}

/// A histogram of idle seconds (counts per bucket of [`IDLE_BUCKETS`], then above the last).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; IDLE_BUCKETS.len() + 1];
        }
        let bucket = IDLE_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(IDLE_BUCKETS.len());
        self.counts[bucket] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

/// Where failed connections went: the peer's network and the service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Destination {
    /// `198.18.2.0/24` or `2001:db8:1:2::/64`.
    pub network: String,
    /// The service's port: the peer's for connections this host opened, ours for those it
    /// accepted.
    pub port: u16,
    /// The connections were accepted here (the peers are clients).
    pub inbound: bool,
}

impl Destination {
    pub fn of(ended: &Ended) -> Self {
        let Ended {
            remote,
            remote_port,
            local_port,
            inbound,
            ..
        } = *ended;
        let network = match canonical(remote) {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                format!("{}/24", Ipv4Addr::new(a, b, c, 0))
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                format!("{}/64", Ipv6Addr::from(bits))
            }
        };
        Self {
            network,
            port: if inbound { local_port } else { remote_port },
            inbound,
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.inbound {
            write!(f, "clients in {} of local port {}", self.network, self.port)
        } else if self.network.contains(':') {
            write!(f, "[{}]:{}", self.network, self.port)
        } else {
            write!(f, "{}:{}", self.network, self.port)
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// What failed, and the longest silence that did not, towards one destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationFailures {
    /// The rule slot of the latest failure.
    pub slot: u32,
    pub reset: u64,
    pub keepalive: u64,
    pub timeout: u64,
    /// Shortest and longest silence before a failure, in ms.
    pub min_idle_ms: u64,
    pub max_idle_ms: u64,
    /// The longest silence a connection survived (sent after it and had an answer), in ms.
    pub max_survived_ms: u64,
    /// Order of the latest end recorded (larger: more recent).
    pub last: u64,
}

impl DestinationFailures {
    pub fn failures(&self) -> u64 {
        self.reset + self.keepalive + self.timeout
    }
}

/// The ends seen since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Failures {
    /// Per rule slot.
    pub idle: BTreeMap<u32, Histogram>,
    /// Per destination, at most [`MAX_DESTINATIONS`].
    #[serde(with = "destinations")]
    pub destinations: BTreeMap<Destination, DestinationFailures>,
    /// Destinations dropped to keep the summary within [`MAX_DESTINATIONS`].
    pub evicted: u64,
    /// Failures recorded.
    pub seen: u64,
    /// Normal closes recorded for the silence they survived.
    #[serde(default)]
    pub survivals: u64,
}

impl Failures {
    /// Records a failure, and the silence a connection survived.
    pub fn record(&mut self, ended: &Ended) {
        let failed = ended.end.failed();
        if failed {
            self.seen += 1;
            self.idle
                .entry(ended.slot)
                .or_default()
                .observe(ended.idle.as_secs_f64());
        } else if ended.survived.is_zero() {
            return;
        } else {
            self.survivals += 1;
        }
        let destination = Destination::of(ended);
        if !self.destinations.contains_key(&destination)
            && self.destinations.len() >= MAX_DESTINATIONS
        {
            self.evict();
        }
        let entry = self.destinations.entry(destination).or_default();
        let survived_ms = millis(ended.survived);
        entry.max_survived_ms = entry.max_survived_ms.max(survived_ms);
        entry.last = self.seen + self.survivals;
        if !failed {
            return;
        }
        let idle_ms = millis(ended.idle);
        if entry.failures() == 0 || idle_ms < entry.min_idle_ms {
            entry.min_idle_ms = idle_ms;
        }
        entry.max_idle_ms = entry.max_idle_ms.max(idle_ms);
        match ended.end {
            End::Reset => entry.reset += 1,
            End::Keepalive => entry.keepalive += 1,
            End::Timeout => entry.timeout += 1,
            End::Closed => {}
        }
        entry.slot = ended.slot;
    }

    /// Makes room: the least recent destination without failures, else the least recent.
    fn evict(&mut self) {
        let oldest = self
            .destinations
            .iter()
            .min_by_key(|(_, entry)| (entry.failures() > 0, entry.last))
            .map(|(destination, _)| destination.clone());
        if let Some(oldest) = oldest {
            self.destinations.remove(&oldest);
            self.evicted += 1;
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// JSON object keys are strings: the destinations as a list.
mod destinations {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Destination, DestinationFailures};

    #[derive(Serialize, Deserialize)]
    struct Entry {
        #[serde(flatten)]
        destination: Destination,
        #[serde(flatten)]
        failures: DestinationFailures,
    }

    pub(super) fn serialize<S: Serializer>(
        map: &BTreeMap<Destination, DestinationFailures>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        map.iter()
            .map(|(destination, failures)| Entry {
                destination: destination.clone(),
                failures: failures.clone(),
            })
            .collect::<Vec<_>>()
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<Destination, DestinationFailures>, D::Error> {
        Ok(Vec::<Entry>::deserialize(deserializer)?
            .into_iter()
            .map(|entry| (entry.destination, entry.failures))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

    use super::*;

    fn reset(remote: &str, port: u16, idle_ms: u64) -> Ended {
        Ended {
            slot: 0,
            end: End::Reset,
            remote: remote.parse().unwrap(),
            remote_port: port,
            local_port: 40_000,
            inbound: false,
            idle: Duration::from_millis(idle_ms),
            survived: Duration::ZERO,
        }
    }

    #[test]
    fn failures_to_one_network_and_port_are_one_destination() {
        let mut failures = Failures::default();
        failures.record(&reset("198.18.2.7", 6379, 8_300));
        failures.record(&reset("::ffff:198.18.2.9", 6379, 8_000));
        failures.record(&reset("198.18.2.9", 6380, 9_000));
        assert_eq!(failures.destinations.len(), 2);
        let redis = &failures.destinations[&Destination {
            network: "198.18.2.0/24".into(),
            port: 6379,
            inbound: false,
        }];
        assert_eq!(
            (redis.reset, redis.min_idle_ms, redis.max_idle_ms),
            (2, 8_000, 8_300)
        );
        let histogram = &failures.idle[&0];
        assert_eq!(histogram.count, 3);
        // 8 and 8.3 s fall in (5, 10], 9 s too.
        assert_eq!(histogram.counts[3], 3);
    }

    #[test]
    fn a_server_side_failure_is_keyed_by_our_port() {
        let destination = Destination::of(&Ended {
            slot: 0,
            end: End::Reset,
            remote: "2001:db8:1:2::7".parse().unwrap(),
            remote_port: 51_000,
            local_port: 5432,
            inbound: true,
            idle: Duration::ZERO,
            survived: Duration::ZERO,
        });
        assert!(destination.inbound);
        assert_eq!(destination.port, 5432);
        assert_eq!(destination.network, "2001:db8:1:2::/64");
        assert_eq!(
            destination.to_string(),
            "clients in 2001:db8:1:2::/64 of local port 5432"
        );
    }

    #[test]
    fn a_close_after_a_survived_silence_is_kept_beside_the_failures() {
        let mut failures = Failures::default();
        let survived = |ms| Ended {
            end: End::Closed,
            survived: Duration::from_millis(ms),
            ..reset("198.18.2.7", 6379, 0)
        };
        failures.record(&survived(2_100));
        failures.record(&survived(1_500));
        // A close that survived no tracked silence says nothing.
        failures.record(&survived(0));
        failures.record(&reset("198.18.2.8", 6379, 6_200));
        let entry = failures.destinations.values().next().unwrap();
        assert_eq!(
            (entry.reset, entry.max_survived_ms, entry.min_idle_ms),
            (1, 2_100, 6_200)
        );
        assert_eq!((failures.seen, failures.survivals), (1, 2));
        assert_eq!(failures.idle[&0].count, 1, "survivals are no failures");
    }

    #[test]
    fn survivals_make_room_before_failures_do() {
        let mut failures = Failures::default();
        failures.record(&reset("10.9.9.9", 443, 1_000));
        for i in 0..u32::try_from(MAX_DESTINATIONS + 10).unwrap() {
            let peer = Ipv4Addr::from(0x0a00_0000 + (i << 8));
            failures.record(&Ended {
                end: End::Closed,
                survived: Duration::from_secs(2),
                ..reset(&peer.to_string(), 443, 0)
            });
        }
        assert_eq!(failures.destinations.len(), MAX_DESTINATIONS);
        assert!(
            failures
                .destinations
                .keys()
                .any(|d| d.network == "10.9.9.0/24"),
            "the failure stays"
        );
    }

    #[test]
    fn a_flood_of_one_off_peers_stays_bounded() {
        let mut failures = Failures::default();
        for i in 0..u32::try_from(MAX_DESTINATIONS + 100).unwrap() {
            let peer = Ipv4Addr::from(0x0a00_0000 + (i << 8));
            failures.record(&reset(&peer.to_string(), 443, 1_000));
        }
        assert_eq!(failures.destinations.len(), MAX_DESTINATIONS);
        assert_eq!(failures.evicted, 100);
        // The first ones went; the latest stays.
        assert!(
            !failures
                .destinations
                .keys()
                .any(|d| d.network == "10.0.0.0/24")
        );
        let json = serde_json::to_string(&failures).unwrap();
        let back: Failures = serde_json::from_str(&json).unwrap();
        assert_eq!(back, failures);
    }
}
