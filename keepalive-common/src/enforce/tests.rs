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
