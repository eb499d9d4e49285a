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
mod tests {
    use super::*;
    use crate::{RULE_LOCK, RULE_USER_TIMEOUT};

    /// A socket as the kernel keeps it: keepalive off, the sysctl defaults.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Model {
        keepalive: i32,
        idle: i32,
        interval: i32,
        count: i32,
        user_timeout: i32,
        sets: u32,
        fail_set: Option<i32>,
    }

    impl Model {
        fn fresh() -> Self {
            Self {
                keepalive: 0,
                idle: 7200,
                interval: 75,
                count: 9,
                user_timeout: 0,
                sets: 0,
                fail_set: None,
            }
        }

        fn with_app_keepalive(idle: i32, interval: i32, count: i32) -> Self {
            Self {
                keepalive: 1,
                idle,
                interval,
                count,
                ..Self::fresh()
            }
        }

        fn slot(&mut self, level: i32, name: i32) -> &mut i32 {
            match (level, name) {
                (SOL_SOCKET, SO_KEEPALIVE) => &mut self.keepalive,
                (SOL_TCP, TCP_KEEPIDLE) => &mut self.idle,
                (SOL_TCP, TCP_KEEPINTVL) => &mut self.interval,
                (SOL_TCP, TCP_KEEPCNT) => &mut self.count,
                (SOL_TCP, TCP_USER_TIMEOUT) => &mut self.user_timeout,
                _ => panic!("unexpected option {level}/{name}"),
            }
        }
    }

    impl Socket for Model {
        fn get(&mut self, level: i32, name: i32) -> Result<i32, i64> {
            Ok(*self.slot(level, name))
        }

        fn set(&mut self, level: i32, name: i32, value: i32) -> Result<(), i64> {
            if self.fail_set == Some(name) {
                return Err(-22);
            }
            self.sets += 1;
            *self.slot(level, name) = value;
            Ok(())
        }
    }

    fn rule(mode: Mode, user_timeout: Option<u32>) -> RuleRecord {
        RuleRecord {
            mode: mode as u32,
            flags: RULE_LOCK | user_timeout.map_or(0, |_| RULE_USER_TIMEOUT),
            idle_secs: 60,
            interval_secs: 5,
            count: 3,
            user_timeout_ms: user_timeout.unwrap_or(0),
            slot: 0,
            _pad: 0,
        }
    }

    fn enforced(user_timeout: i32) -> Model {
        Model {
            keepalive: 1,
            idle: 60,
            interval: 5,
            count: 3,
            user_timeout,
            ..Model::fresh()
        }
    }

    fn same_values(a: Model, b: Model) -> bool {
        (a.keepalive, a.idle, a.interval, a.count, a.user_timeout)
            == (b.keepalive, b.idle, b.interval, b.count, b.user_timeout)
    }

    #[test]
    fn enforce_sets_everything_and_keepalive_last() {
        let mut socket = Model::fresh();
        let applied = apply(&rule(Mode::Enforce, Some(1500)), &mut socket);
        assert_eq!(applied, Applied::new(Outcome::Set, 0));
        assert!(same_values(socket, enforced(1500)), "{socket:?}");
        assert_eq!(socket.sets, 5);
        let mut app = Model::with_app_keepalive(10, 10, 10);
        apply(&rule(Mode::Enforce, None), &mut app);
        assert!(
            same_values(app, enforced(0)),
            "overrides the application: {app:?}"
        );
    }

    #[test]
    fn fill_only_fills_sockets_without_keepalive() {
        let mut fresh = Model::fresh();
        assert_eq!(
            apply(&rule(Mode::Fill, None), &mut fresh).outcome,
            Outcome::Set
        );
        assert!(same_values(fresh, enforced(0)));
        let mut app = Model::with_app_keepalive(900, 30, 4);
        let before = app;
        assert_eq!(
            apply(&rule(Mode::Fill, None), &mut app).outcome,
            Outcome::Kept
        );
        assert_eq!(app, before);
    }

    #[test]
    fn cap_lowers_only_what_exceeds() {
        let mut long = Model::with_app_keepalive(900, 30, 4);
        assert_eq!(
            apply(&rule(Mode::Cap, None), &mut long).outcome,
            Outcome::Capped
        );
        assert_eq!((long.idle, long.interval, long.count), (60, 5, 3));

        let mut short = Model::with_app_keepalive(30, 2, 5);
        let before = short;
        assert_eq!(
            apply(&rule(Mode::Cap, None), &mut short).outcome,
            Outcome::Compliant,
            "2 x 5 = 10 s <= 5 x 3 = 15 s and 30 s <= 60 s"
        );
        assert_eq!(short, before);

        let mut none = Model::fresh();
        assert_eq!(
            apply(&rule(Mode::Cap, Some(9000)), &mut none).outcome,
            Outcome::Set
        );
        assert!(same_values(none, enforced(9000)));

        let mut unbounded = Model::with_app_keepalive(30, 2, 5);
        assert_eq!(
            apply(&rule(Mode::Cap, Some(9000)), &mut unbounded).outcome,
            Outcome::Capped,
            "user timeout 0 is unbounded"
        );
        assert_eq!(unbounded.user_timeout, 9000);
    }

    #[test]
    fn audit_and_exempt_change_nothing() {
        for (socket, outcome) in [
            (Model::fresh(), Outcome::Audited),
            (enforced(0), Outcome::Compliant),
        ] {
            let mut audited = socket;
            assert_eq!(
                apply(&rule(Mode::Audit, None), &mut audited).outcome,
                outcome
            );
            assert_eq!(audited, socket);
            let mut exempt = socket;
            assert_eq!(
                apply(&rule(Mode::Exempt, None), &mut exempt).outcome,
                Outcome::Exempted
            );
            assert_eq!(exempt, socket);
        }
    }

    #[test]
    fn failures_are_reported_per_option_and_the_rest_still_applies() {
        let mut socket = Model {
            fail_set: Some(TCP_KEEPINTVL),
            ..Model::fresh()
        };
        let applied = apply(&rule(Mode::Enforce, None), &mut socket);
        assert_eq!(applied, Applied::new(Outcome::Failed, FAILED_INTERVAL));
        assert_eq!((socket.keepalive, socket.idle, socket.count), (1, 60, 3));
    }

    #[test]
    fn the_hook_keeps_enforced_values() {
        let enforce = rule(Mode::Enforce, Some(1500));
        let check = |level, name, value| on_app_setsockopt(&enforce, level, name, value);
        assert_eq!(
            check(SOL_SOCKET, SO_KEEPALIVE, 0),
            AppSetsockopt::Replace(1)
        );
        assert_eq!(check(SOL_SOCKET, SO_KEEPALIVE, 1), AppSetsockopt::Pass);
        assert_eq!(
            check(SOL_TCP, TCP_KEEPIDLE, 7200),
            AppSetsockopt::Replace(60)
        );
        assert_eq!(
            check(SOL_TCP, TCP_USER_TIMEOUT, 0),
            AppSetsockopt::Replace(1500)
        );
        assert_eq!(check(SOL_TCP, 1 /* TCP_NODELAY */, 1), AppSetsockopt::Pass);
        let unlocked = RuleRecord {
            flags: 0,
            ..enforce
        };
        assert_eq!(
            on_app_setsockopt(&unlocked, SOL_SOCKET, SO_KEEPALIVE, 0),
            AppSetsockopt::Pass
        );
    }

    #[test]
    fn the_hook_caps_audits_and_leaves_fill_alone() {
        let cap = rule(Mode::Cap, None);
        assert_eq!(
            on_app_setsockopt(&cap, SOL_TCP, TCP_KEEPIDLE, 900),
            AppSetsockopt::Replace(60)
        );
        assert_eq!(
            on_app_setsockopt(&cap, SOL_TCP, TCP_KEEPIDLE, 30),
            AppSetsockopt::Pass
        );
        assert_eq!(
            on_app_setsockopt(&cap, SOL_SOCKET, SO_KEEPALIVE, 0),
            AppSetsockopt::Replace(1)
        );
        assert_eq!(
            on_app_setsockopt(&cap, SOL_TCP, TCP_USER_TIMEOUT, 0),
            AppSetsockopt::Pass,
            "no user timeout in the rule: not governed"
        );
        let audit = rule(Mode::Audit, None);
        assert_eq!(
            on_app_setsockopt(&audit, SOL_SOCKET, SO_KEEPALIVE, 0),
            AppSetsockopt::Audit
        );
        assert_eq!(
            on_app_setsockopt(&audit, SOL_TCP, TCP_KEEPIDLE, 60),
            AppSetsockopt::Pass
        );
        let fill = rule(Mode::Fill, None);
        assert_eq!(
            on_app_setsockopt(&fill, SOL_SOCKET, SO_KEEPALIVE, 0),
            AppSetsockopt::Pass
        );
    }
}
