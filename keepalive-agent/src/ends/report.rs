//! The network's idle timeout, inferred from the failures: per destination, how many
//! connections failed after an idle period, the shortest such idle, the longest idle a
//! connection survived, what the policy gives those connections, and what to change. Served by the agent at `/ends`, printed by
//! `keepalive-agent report`.

use serde::{Deserialize, Serialize};

use super::{DestinationFailures, Failures};
use crate::status::RuleState;

/// The report, as `/ends` serves it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Failures recorded since the agent started.
    pub failures: u64,
    /// Normal closes recorded for the silence they survived.
    #[serde(default)]
    pub survivals: u64,
    /// The longest silence any connection survived, in seconds (None: none of a second).
    #[serde(default)]
    pub max_survived_secs: Option<f64>,
    /// Destinations dropped to keep the summary bounded.
    pub evicted: u64,
    /// Destinations with failures, most failures first.
    pub destinations: Vec<DestinationReport>,
}

/// One destination's failures and the advice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationReport {
    /// `198.18.2.0/24:6379`, or `clients in ... of local port ...`.
    pub destination: String,
    pub network: String,
    pub port: u16,
    pub inbound: bool,
    /// The rule of the latest failure.
    pub rule: String,
    /// The idle that rule gives (None: it leaves keepalive alone).
    pub rule_idle_secs: Option<u32>,
    pub reset: u64,
    pub keepalive: u64,
    pub timeout: u64,
    /// Shortest and longest silence before a reset or timeout, in seconds.
    pub min_idle_secs: f64,
    pub max_idle_secs: f64,
    /// The longest silence a connection to it survived, in seconds (None: none of a second).
    #[serde(default)]
    pub max_survived_secs: Option<f64>,
    /// The sentence `report` prints.
    pub advice: String,
}

impl Report {
    pub fn new(failures: &Failures, rules: &[RuleState]) -> Self {
        let mut destinations: Vec<DestinationReport> = failures
            .destinations
            .iter()
            .filter(|(_, failed)| failed.failures() > 0)
            .map(|(destination, failed)| {
                let rule = rules.iter().find(|rule| rule.slot == failed.slot);
                let name = rule.map_or_else(|| format!("slot {}", failed.slot), |r| r.name.clone());
                let rule_idle_secs = rule.and_then(|rule| rule.idle_secs);
                DestinationReport {
                    destination: destination.to_string(),
                    network: destination.network.clone(),
                    port: destination.port,
                    inbound: destination.inbound,
                    advice: advice(&destination.to_string(), failed, &name, rule_idle_secs),
                    rule: name,
                    rule_idle_secs,
                    reset: failed.reset,
                    keepalive: failed.keepalive,
                    timeout: failed.timeout,
                    min_idle_secs: seconds(failed.min_idle_ms),
                    max_idle_secs: seconds(failed.max_idle_ms),
                    max_survived_secs: survived(failed.max_survived_ms),
                }
            })
            .collect();
        destinations.sort_by(|a, b| {
            (b.reset + b.timeout + b.keepalive)
                .cmp(&(a.reset + a.timeout + a.keepalive))
                .then_with(|| a.destination.cmp(&b.destination))
        });
        let longest = failures
            .destinations
            .values()
            .map(|entry| entry.max_survived_ms)
            .max()
            .unwrap_or(0);
        Self {
            failures: failures.seen,
            survivals: failures.survivals,
            max_survived_secs: survived(longest),
            evicted: failures.evicted,
            destinations,
        }
    }

    /// The plain-words report.
    pub fn text(&self) -> String {
        if self.destinations.is_empty() {
            let survived = self.max_survived_secs.map_or_else(String::new, |longest| {
                format!("; the longest silence a connection survived was {longest:.1} s")
            });
            return format!(
                "no connection failed (reset or timed out) since the agent started{survived}\n"
            );
        }
        let mut out = String::new();
        for destination in &self.destinations {
            out.push_str(&destination.advice);
            out.push('\n');
        }
        if self.evicted > 0 {
            out.push_str(&format!(
                "({} older destinations were dropped to keep the summary bounded)\n",
                self.evicted
            ));
        }
        out
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "milliseconds of idle, far below 2^52"
)]
fn seconds(ms: u64) -> f64 {
    (ms as f64 / 100.0).round() / 10.0
}

fn survived(ms: u64) -> Option<f64> {
    (ms > 0).then(|| seconds(ms))
}

fn advice(
    destination: &str,
    failed: &DestinationFailures,
    rule: &str,
    rule_idle_secs: Option<u32>,
) -> String {
    let idle_failures = failed.reset + failed.timeout;
    let mut sentence = String::new();
    if failed.keepalive > 0 {
        sentence.push_str(&format!(
            "keepalive found {} dead peer{} at {destination} (rule `{rule}`)",
            failed.keepalive,
            if failed.keepalive == 1 { "" } else { "s" }
        ));
        if idle_failures == 0 {
            return sentence;
        }
        sentence.push_str("; ");
    }
    let how = match (failed.reset, failed.timeout) {
        (_, 0) => "reset",
        (0, _) => "timed out",
        _ => "reset or timed out",
    };
    let (low, high) = (seconds(failed.min_idle_ms), seconds(failed.max_idle_ms));
    let range = if (high - low).abs() < 0.05 {
        format!("{low:.1} s")
    } else {
        format!("{low:.1}–{high:.1} s")
    };
    sentence.push_str(&format!(
        "connections to {destination} were {how} after {range} idle ({idle_failures} time{})",
        if idle_failures == 1 { "" } else { "s" }
    ));
    match survived(failed.max_survived_ms) {
        Some(longest) if longest < low => sentence.push_str(&format!(
            ", none that idled up to {longest:.1} s: the network forgets idle flows between \
             {longest:.1} and {low:.1} s"
        )),
        Some(longest) => sentence.push_str(&format!(
            ", yet one survived {longest:.1} s idle: not one fixed timeout (several paths or \
             middleboxes)"
        )),
        None => {}
    }
    sentence.push_str("; ");
    // Whole seconds below the shortest failing idle (TCP_KEEPIDLE is in seconds, at least 1).
    let below = failed.min_idle_ms / 1000;
    match rule_idle_secs {
        Some(idle) if u64::from(idle) * 1000 < failed.min_idle_ms => sentence.push_str(&format!(
            "rule `{rule}` probes after {idle} s, sooner than that: these connections did not \
             get its keepalive (opened before it, or an application turned it off)"
        )),
        Some(idle) => sentence.push_str(&format!(
            "rule `{rule}` probes after {idle} s: set idle {}",
            below_phrase(below)
        )),
        None => sentence.push_str(&format!(
            "rule `{rule}` leaves keepalive alone: enforce idle {}",
            below_phrase(below)
        )),
    }
    sentence
}

/// "below N s", or the least TCP_KEEPIDLE takes where that is below it.
fn below_phrase(seconds: u64) -> String {
    if seconds > 1 {
        format!("below {seconds} s")
    } else {
        "to 1 s (the least TCP_KEEPIDLE takes)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

    use std::time::Duration;

    use keepalive_common::ends::End;

    use super::*;
    use crate::ends::Ended;

    fn rule(slot: u32, name: &str, idle: Option<u32>) -> RuleState {
        RuleState {
            slot,
            name: name.into(),
            line: 0,
            action: String::new(),
            idle_secs: idle,
            containers: None,
        }
    }

    fn failure(end: End, idle_ms: u64) -> Ended {
        Ended {
            slot: 0,
            end,
            remote: "198.18.2.7".parse().unwrap(),
            remote_port: 6379,
            local_port: 40_000,
            inbound: false,
            idle: Duration::from_millis(idle_ms),
            survived: Duration::ZERO,
        }
    }

    #[test]
    fn resets_after_an_idle_period_name_the_destination_and_the_idle_to_set() {
        let mut failures = Failures::default();
        for ms in [8_300, 8_000, 8_100] {
            failures.record(&failure(End::Reset, ms));
        }
        let report = Report::new(&failures, &[rule(0, "default", Some(60))]);
        assert_eq!(
            report.text(),
            "connections to 198.18.2.0/24:6379 were reset after 8.0–8.3 s idle (3 times); rule \
             `default` probes after 60 s: set idle below 8 s\n"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["destinations"][0]["min_idle_secs"], 8.0);
        assert_eq!(json["destinations"][0]["rule_idle_secs"], 60);
    }

    #[test]
    fn a_survived_silence_bounds_the_timeout_from_below() {
        let mut failures = Failures::default();
        failures.record(&failure(End::Reset, 6_100));
        failures.record(&Ended {
            end: End::Closed,
            survived: Duration::from_millis(2_040),
            ..failure(End::Closed, 0)
        });
        let report = Report::new(&failures, &[rule(0, "default", Some(60))]);
        assert_eq!(
            report.text(),
            "connections to 198.18.2.0/24:6379 were reset after 6.1 s idle (1 time), none that \
             idled up to 2.0 s: the network forgets idle flows between 2.0 and 6.1 s; rule \
             `default` probes after 60 s: set idle below 6 s\n"
        );
        assert_eq!(report.destinations[0].max_survived_secs, Some(2.0));
        // Survivals alone are no failure.
        let mut quiet = Failures::default();
        quiet.record(&Ended {
            end: End::Closed,
            survived: Duration::from_millis(9_000),
            ..failure(End::Closed, 0)
        });
        let report = Report::new(&quiet, &[]);
        assert!(report.destinations.is_empty());
        assert_eq!(
            report.text(),
            "no connection failed (reset or timed out) since the agent started; the longest \
             silence a connection survived was 9.0 s\n"
        );
    }

    #[test]
    fn dead_peers_are_not_an_idle_timeout() {
        let mut failures = Failures::default();
        failures.record(&failure(End::Keepalive, 75_000));
        let report = Report::new(&failures, &[rule(0, "default", Some(60))]);
        assert_eq!(
            report.text(),
            "keepalive found 1 dead peer at 198.18.2.0/24:6379 (rule `default`)\n"
        );
    }

    #[test]
    fn nothing_failed_says_so() {
        let report = Report::new(&Failures::default(), &[]);
        assert!(report.text().starts_with("no connection failed"));
    }
}
