//! The keepalive values a rule sets, and the kernel's bounds for each.

use std::{fmt, ops::RangeInclusive};

/// `TCP_KEEPIDLE` bounds in seconds (`MAX_TCP_KEEPIDLE` in include/net/tcp.h).
pub const IDLE_SECS: RangeInclusive<u32> = 1..=32767;
/// `TCP_KEEPINTVL` bounds in seconds (`MAX_TCP_KEEPINTVL`).
pub const INTERVAL_SECS: RangeInclusive<u32> = 1..=32767;
/// `TCP_KEEPCNT` bounds (`MAX_TCP_KEEPCNT`).
pub const COUNT: RangeInclusive<u32> = 1..=127;
/// `TCP_USER_TIMEOUT` bounds in milliseconds: the kernel takes a non-negative `int`.
pub const USER_TIMEOUT_MS: RangeInclusive<u32> = 0..=i32::MAX as u32;

/// The keepalive values of a rule (or of the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Values {
    /// Seconds of idleness before the first probe (`TCP_KEEPIDLE`).
    pub idle_secs: u32,
    /// Seconds between probes (`TCP_KEEPINTVL`).
    pub interval_secs: u32,
    /// Unanswered probes before the connection is declared dead (`TCP_KEEPCNT`).
    pub count: u32,
    /// `TCP_USER_TIMEOUT` in milliseconds, when the policy sets one.
    pub user_timeout_ms: Option<u32>,
}

impl Default for Values {
    /// The article's values: idle 60 s, then a probe every 5 s, dead after 3 unanswered.
    fn default() -> Self {
        Self {
            idle_secs: 60,
            interval_secs: 5,
            count: 3,
            user_timeout_ms: None,
        }
    }
}

/// A policy value outside the kernel's bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value}{unit} is out of range: allowed {min}..={max}{unit} ({option})")]
pub struct OutOfRange {
    pub field: &'static str,
    pub value: u64,
    pub min: u32,
    pub max: u32,
    pub unit: &'static str,
    pub option: &'static str,
}

/// One policy field: its name for people, its unit, the socket option and the kernel's bounds.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: &'static str,
    pub unit: &'static str,
    pub option: &'static str,
    pub range: RangeInclusive<u32>,
}

impl Field {
    pub const IDLE: Self = Self {
        name: "idle",
        unit: " s",
        option: "TCP_KEEPIDLE",
        range: IDLE_SECS,
    };
    pub const INTERVAL: Self = Self {
        name: "interval",
        unit: " s",
        option: "TCP_KEEPINTVL",
        range: INTERVAL_SECS,
    };
    pub const COUNT: Self = Self {
        name: "count",
        unit: "",
        option: "TCP_KEEPCNT",
        range: COUNT,
    };
    pub const USER_TIMEOUT: Self = Self {
        name: "user_timeout",
        unit: " ms",
        option: "TCP_USER_TIMEOUT",
        range: USER_TIMEOUT_MS,
    };

    /// `value` as a `u32` within the bounds, or an error naming the field and the bounds.
    pub fn check(&self, value: u64) -> Result<u32, OutOfRange> {
        u32::try_from(value)
            .ok()
            .filter(|value| self.range.contains(value))
            .ok_or(OutOfRange {
                field: self.name,
                value,
                min: *self.range.start(),
                max: *self.range.end(),
                unit: self.unit,
                option: self.option,
            })
    }
}

impl Values {
    /// Checks every value against the kernel's bounds.
    pub fn validate(&self) -> Result<(), OutOfRange> {
        Field::IDLE.check(self.idle_secs.into())?;
        Field::INTERVAL.check(self.interval_secs.into())?;
        Field::COUNT.check(self.count.into())?;
        if let Some(ms) = self.user_timeout_ms {
            Field::USER_TIMEOUT.check(ms.into())?;
        }
        Ok(())
    }
}

impl fmt::Display for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "idle {} s, interval {} s, count {}",
            self.idle_secs, self.interval_secs, self.count
        )?;
        match self.user_timeout_ms {
            Some(ms) => write!(f, ", user_timeout {ms} ms"),
            None => f.write_str(", user_timeout unchanged"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_articles() {
        let values = Values::default();
        assert_eq!(
            (values.idle_secs, values.interval_secs, values.count),
            (60, 5, 3)
        );
        assert_eq!(values.validate(), Ok(()));
    }

    #[test]
    fn bounds_are_inclusive() {
        for (field, ok, bad) in [
            (Field::IDLE, [1, 32767], [0, 32768]),
            (Field::INTERVAL, [1, 32767], [0, 32768]),
            (Field::COUNT, [1, 127], [0, 128]),
        ] {
            for value in ok {
                assert_eq!(field.check(value), Ok(u32::try_from(value).unwrap_or(0)));
            }
            for value in bad {
                assert!(field.check(value).is_err(), "{} = {value}", field.name);
            }
        }
        assert!(Field::USER_TIMEOUT.check(0).is_ok());
        assert!(
            Field::USER_TIMEOUT
                .check(u64::from(i32::MAX as u32) + 1)
                .is_err()
        );
        assert!(
            Field::IDLE.check(u64::MAX).is_err(),
            "no truncation into range"
        );
    }

    #[test]
    fn error_names_field_value_and_range() {
        let values = Values {
            count: 200,
            ..Values::default()
        };
        let error = values.validate().err().map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("count = 200 is out of range: allowed 1..=127 (TCP_KEEPCNT)")
        );
    }
}
