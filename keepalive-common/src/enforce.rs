//! What each [`Mode`] does to one socket, in one place.
//!
//! The sock_ops program runs [`apply`] through `bpf_getsockopt`/`bpf_setsockopt`, the agent runs
//! it through getsockopt(2)/setsockopt(2) on connections that existed before it attached, and
//! host tests run it against a model socket. [`on_app_setsockopt`] is what the cgroup setsockopt
//! hook does when an application later changes a keepalive option. Everything here is
//! `inline(always)` and loop-free so the verifier sees straight-line code.

use crate::{
    Mode, Outcome, RuleRecord,
    sockopt::{
        SO_KEEPALIVE, SOL_SOCKET, SOL_TCP, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL,
        TCP_USER_TIMEOUT,
    },
};

/// A socket's int options: get and set, with the kernel's negative errno on failure.
pub trait Socket {
    fn get(&mut self, level: i32, name: i32) -> Result<i32, i64>;
    fn set(&mut self, level: i32, name: i32, value: i32) -> Result<(), i64>;
}

/// `Applied::failed` bit: setting `SO_KEEPALIVE` failed.
pub const FAILED_KEEPALIVE: u32 = 1 << 0;
/// `Applied::failed` bit: setting `TCP_KEEPIDLE` failed.
pub const FAILED_IDLE: u32 = 1 << 1;
/// `Applied::failed` bit: setting `TCP_KEEPINTVL` failed.
pub const FAILED_INTERVAL: u32 = 1 << 2;
/// `Applied::failed` bit: setting `TCP_KEEPCNT` failed.
pub const FAILED_COUNT: u32 = 1 << 3;
/// `Applied::failed` bit: setting `TCP_USER_TIMEOUT` failed.
pub const FAILED_USER_TIMEOUT: u32 = 1 << 4;
/// `Applied::failed` bit: reading the application's settings failed.
pub const FAILED_READ: u32 = 1 << 5;

/// What [`apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    /// `FAILED_*` bits; non-zero means `outcome` is [`Outcome::Failed`].
    pub failed: u32,
}

impl Applied {
    #[inline(always)]
    const fn new(outcome: Outcome, failed: u32) -> Self {
        if failed == 0 {
            Self { outcome, failed }
        } else {
            Self {
                outcome: Outcome::Failed,
                failed,
            }
        }
    }
}

/// Applies `rule` to a socket that just became established (or, for the agent, already was).
#[inline(always)]
pub fn apply<S: Socket>(rule: &RuleRecord, socket: &mut S) -> Applied {
    match rule.mode() {
        Some(Mode::Enforce) => set_all(rule, socket, true),
        Some(Mode::Fill) => match socket.get(SOL_SOCKET, SO_KEEPALIVE) {
            Err(_) => Applied::new(Outcome::Failed, FAILED_READ),
            Ok(0) => set_all(rule, socket, true),
            Ok(_) => Applied::new(Outcome::Kept, 0),
        },
        Some(Mode::Cap) => cap(rule, socket),
        Some(Mode::Audit) => audit(rule, socket),
        Some(Mode::Exempt) | None => Applied::new(Outcome::Exempted, 0),
    }
}

/// Sets every value of `rule`; `keepalive` false leaves `SO_KEEPALIVE` alone (benchmarks).
///
/// The TCP values go first: while `SO_KEEPALIVE` is off they are plain stores, and turning it
/// on last arms the keepalive timer once, with the final idle time.
#[inline(always)]
pub fn set_all<S: Socket>(rule: &RuleRecord, socket: &mut S, keepalive: bool) -> Applied {
    let mut failed = 0;
    failed |= set(socket, SOL_TCP, TCP_KEEPIDLE, rule.idle_secs, FAILED_IDLE);
    failed |= set(
        socket,
        SOL_TCP,
        TCP_KEEPINTVL,
        rule.interval_secs,
        FAILED_INTERVAL,
    );
    failed |= set(socket, SOL_TCP, TCP_KEEPCNT, rule.count, FAILED_COUNT);
    if rule.has_user_timeout() {
        failed |= set(
            socket,
            SOL_TCP,
            TCP_USER_TIMEOUT,
            rule.user_timeout_ms,
            FAILED_USER_TIMEOUT,
        );
    }
    if keepalive {
        failed |= set(socket, SOL_SOCKET, SO_KEEPALIVE, 1, FAILED_KEEPALIVE);
    }
    Applied::new(Outcome::Set, failed)
}

#[inline(always)]
fn set<S: Socket>(socket: &mut S, level: i32, name: i32, value: u32, bit: u32) -> u32 {
    // Policy values are validated to fit in an int (the kernel's type) before they get here.
    match socket.set(level, name, value as i32) {
        Ok(()) => 0,
        Err(_) => bit,
    }
}

/// cap: a socket without keepalive gets the policy; one with keepalive keeps it, lowered to
/// the policy's idle, interval x count and user timeout where it exceeds them.
#[inline(always)]
fn cap<S: Socket>(rule: &RuleRecord, socket: &mut S) -> Applied {
    let Ok(on) = socket.get(SOL_SOCKET, SO_KEEPALIVE) else {
        return Applied::new(Outcome::Failed, FAILED_READ);
    };
    if on == 0 {
        return set_all(rule, socket, true);
    }
    let (Ok(idle), Ok(interval), Ok(count)) = (
        socket.get(SOL_TCP, TCP_KEEPIDLE),
        socket.get(SOL_TCP, TCP_KEEPINTVL),
        socket.get(SOL_TCP, TCP_KEEPCNT),
    ) else {
        return Applied::new(Outcome::Failed, FAILED_READ);
    };
    let (mut changed, mut failed) = (false, 0);
    if idle.cast_unsigned() > rule.idle_secs {
        changed = true;
        failed |= set(socket, SOL_TCP, TCP_KEEPIDLE, rule.idle_secs, FAILED_IDLE);
    }
    // Within the kernel's bounds (32767 s x 127) the products fit in u32.
    if (interval.cast_unsigned()) * (count.cast_unsigned()) > rule.interval_secs * rule.count {
        changed = true;
        failed |= set(
            socket,
            SOL_TCP,
            TCP_KEEPINTVL,
            rule.interval_secs,
            FAILED_INTERVAL,
        );
        failed |= set(socket, SOL_TCP, TCP_KEEPCNT, rule.count, FAILED_COUNT);
    }
    if rule.has_user_timeout() {
        let Ok(timeout) = socket.get(SOL_TCP, TCP_USER_TIMEOUT) else {
            return Applied::new(Outcome::Failed, failed | FAILED_READ);
        };
        // 0 means "no user timeout": unbounded, so above any cap.
        if timeout == 0 || timeout.cast_unsigned() > rule.user_timeout_ms {
            changed = true;
            failed |= set(
                socket,
                SOL_TCP,
                TCP_USER_TIMEOUT,
                rule.user_timeout_ms,
                FAILED_USER_TIMEOUT,
            );
        }
    }
    Applied::new(
        if changed {
            Outcome::Capped
        } else {
            Outcome::Compliant
        },
        failed,
    )
}

/// audit: reads everything enforce would set and reports whether it would change anything.
#[inline(always)]
fn audit<S: Socket>(rule: &RuleRecord, socket: &mut S) -> Applied {
    let (Ok(on), Ok(idle), Ok(interval), Ok(count)) = (
        socket.get(SOL_SOCKET, SO_KEEPALIVE),
        socket.get(SOL_TCP, TCP_KEEPIDLE),
        socket.get(SOL_TCP, TCP_KEEPINTVL),
        socket.get(SOL_TCP, TCP_KEEPCNT),
    ) else {
        return Applied::new(Outcome::Failed, FAILED_READ);
    };
    let mut compliant = on != 0
        && idle.cast_unsigned() == rule.idle_secs
        && interval.cast_unsigned() == rule.interval_secs
        && count.cast_unsigned() == rule.count;
    if rule.has_user_timeout() {
        match socket.get(SOL_TCP, TCP_USER_TIMEOUT) {
            Ok(timeout) => compliant &= timeout.cast_unsigned() == rule.user_timeout_ms,
            Err(_) => return Applied::new(Outcome::Failed, FAILED_READ),
        }
    }
    Applied::new(
        if compliant {
            Outcome::Compliant
        } else {
            Outcome::Audited
        },
        0,
    )
}

/// What the setsockopt hook does with an application's `setsockopt(level, name, value)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppSetsockopt {
    /// Not ours to judge: let it through unchanged.
    Pass,
    /// Let it through with this value instead.
    Replace(i32),
    /// audit: let it through unchanged, but count that enforce would have replaced it.
    Audit,
}

/// The hook's verdict on an application changing a keepalive option of an established socket
/// whose rule is `rule`. Rules without the lock, fill and exempt let everything through.
#[inline(always)]
pub fn on_app_setsockopt(rule: &RuleRecord, level: i32, name: i32, value: i32) -> AppSetsockopt {
    if !rule.locked() {
        return AppSetsockopt::Pass;
    }
    match rule.mode() {
        Some(Mode::Enforce) => match enforced_value(rule, level, name) {
            Some(target) if target != value => AppSetsockopt::Replace(target),
            _ => AppSetsockopt::Pass,
        },
        Some(Mode::Cap) => match capped_value(rule, level, name, value) {
            Some(target) => AppSetsockopt::Replace(target),
            None => AppSetsockopt::Pass,
        },
        Some(Mode::Audit) => match enforced_value(rule, level, name) {
            Some(target) if target != value => AppSetsockopt::Audit,
            _ => AppSetsockopt::Pass,
        },
        Some(Mode::Fill | Mode::Exempt) | None => AppSetsockopt::Pass,
    }
}

/// The value enforce keeps an option at, if the rule governs that option.
#[inline(always)]
fn enforced_value(rule: &RuleRecord, level: i32, name: i32) -> Option<i32> {
    let value = match (level, name) {
        (SOL_SOCKET, SO_KEEPALIVE) => 1,
        (SOL_TCP, TCP_KEEPIDLE) => rule.idle_secs,
        (SOL_TCP, TCP_KEEPINTVL) => rule.interval_secs,
        (SOL_TCP, TCP_KEEPCNT) => rule.count,
        (SOL_TCP, TCP_USER_TIMEOUT) if rule.has_user_timeout() => rule.user_timeout_ms,
        _ => return None,
    };
    Some(value as i32)
}

/// cap on one option at a time: no turning keepalive off, each value at most the policy's.
#[inline(always)]
fn capped_value(rule: &RuleRecord, level: i32, name: i32, value: i32) -> Option<i32> {
    let ceiling = match (level, name) {
        (SOL_SOCKET, SO_KEEPALIVE) => return (value == 0).then_some(1),
        (SOL_TCP, TCP_KEEPIDLE) => rule.idle_secs,
        (SOL_TCP, TCP_KEEPINTVL) => rule.interval_secs,
        (SOL_TCP, TCP_KEEPCNT) => rule.count,
        (SOL_TCP, TCP_USER_TIMEOUT) if rule.has_user_timeout() => {
            // 0 means unbounded.
            return (value == 0 || value.cast_unsigned() > rule.user_timeout_ms)
                .then_some(rule.user_timeout_ms as i32);
        }
        _ => return None,
    };
    (value.cast_unsigned() > ceiling).then_some(ceiling as i32)
}

#[cfg(test)]
mod tests;
