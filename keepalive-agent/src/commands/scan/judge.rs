//! What the policy would do to one socket: `Policy::decide`, then the mode code the kernel runs
//! (`keepalive_common::enforce::apply`) against a copy of the socket's options, so nothing is
//! changed and the outcome is exactly the one `run` would count.

use keepalive_common::{
    Outcome,
    enforce::{Socket, apply},
    sockopt::{
        SO_KEEPALIVE, SOL_SOCKET, SOL_TCP, TCP_KEEPCNT, TCP_KEEPIDLE, TCP_KEEPINTVL,
        TCP_USER_TIMEOUT,
    },
};

use crate::policy::{Connection, Decision, Mode, Policy};

/// A socket's keepalive options as getsockopt(2) reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub keepalive: bool,
    pub idle_secs: u32,
    pub interval_secs: u32,
    pub count: u32,
    pub user_timeout_ms: u32,
}

impl Options {
    /// Reads them from `socket`.
    pub fn read(socket: &mut impl Socket) -> Result<Self, i64> {
        let mut get = |level, name| {
            socket
                .get(level, name)
                .map(|value| u32::try_from(value).unwrap_or(0))
        };
        Ok(Self {
            keepalive: get(SOL_SOCKET, SO_KEEPALIVE)? != 0,
            idle_secs: get(SOL_TCP, TCP_KEEPIDLE)?,
            interval_secs: get(SOL_TCP, TCP_KEEPINTVL)?,
            count: get(SOL_TCP, TCP_KEEPCNT)?,
            user_timeout_ms: get(SOL_TCP, TCP_USER_TIMEOUT)?,
        })
    }

    fn slot(&mut self, level: i32, name: i32) -> Option<&mut u32> {
        match (level, name) {
            (SOL_TCP, TCP_KEEPIDLE) => Some(&mut self.idle_secs),
            (SOL_TCP, TCP_KEEPINTVL) => Some(&mut self.interval_secs),
            (SOL_TCP, TCP_KEEPCNT) => Some(&mut self.count),
            (SOL_TCP, TCP_USER_TIMEOUT) => Some(&mut self.user_timeout_ms),
            _ => None,
        }
    }
}

/// A socket that is only a copy of one's options (or of nothing, when they could not be read):
/// `apply` reads the copy and its sets change the copy, noting whether a value would change.
struct Copy {
    options: Option<Options>,
    changes: bool,
}

/// `EPERM`, as `Socket` reports errors: a socket whose options are unknown.
const UNREADABLE: i64 = -1;

impl Socket for Copy {
    fn get(&mut self, level: i32, name: i32) -> Result<i32, i64> {
        let options = self.options.as_mut().ok_or(UNREADABLE)?;
        if (level, name) == (SOL_SOCKET, SO_KEEPALIVE) {
            return Ok(i32::from(options.keepalive));
        }
        let value = options.slot(level, name).ok_or(UNREADABLE)?;
        Ok(i32::try_from(*value).unwrap_or(i32::MAX))
    }

    fn set(&mut self, level: i32, name: i32, value: i32) -> Result<(), i64> {
        let Some(options) = self.options.as_mut() else {
            return Ok(());
        };
        let value = u32::try_from(value).unwrap_or(0);
        if (level, name) == (SOL_SOCKET, SO_KEEPALIVE) {
            self.changes |= options.keepalive != (value != 0);
            options.keepalive = value != 0;
        } else if let Some(slot) = options.slot(level, name) {
            self.changes |= *slot != value;
            *slot = value;
        }
        Ok(())
    }
}

/// The policy's verdict on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The deciding rule's name, `default`, or None outside every enforced cgroup.
    pub rule: Option<String>,
    pub mode: Option<Mode>,
    /// What `run` would do: an outcome's name (`set`, `kept`, `capped`, `compliant`,
    /// `exempted`, `audited`), `none` outside every enforced cgroup, or `unknown` when the
    /// mode needs the socket's options and they could not be read.
    pub action: &'static str,
    /// Whether any option would change; None when that is not known.
    pub changes: Option<bool>,
}

/// What `policy` would do to `conn`, whose socket has `options`.
pub fn judge(policy: &Policy, conn: &Connection, options: Option<Options>) -> Verdict {
    let decision = policy.decide(conn);
    let Some(action) = policy.action(decision) else {
        return Verdict {
            rule: None,
            mode: None,
            action: "none",
            changes: Some(false),
        };
    };
    let rule = match decision {
        Decision::Rule(i) => policy.rules[i].name.clone(),
        Decision::Default | Decision::Outside => "default".to_string(),
    };
    let known = options.is_some();
    let mut copy = Copy {
        options,
        changes: false,
    };
    let applied = apply(&action.record(Policy::slot(decision)), &mut copy);
    // audit changes nothing: whether enforce would have is its outcome, audited.
    let changes = match applied.outcome {
        Outcome::Failed => None,
        Outcome::Exempted | Outcome::Audited => Some(false),
        _ => known.then_some(copy.changes),
    };
    Verdict {
        rule: Some(rule),
        mode: Some(action.mode),
        action: match applied.outcome {
            Outcome::Failed => "unknown",
            outcome => outcome.name(),
        },
        changes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CgroupPath, Direction, Values};

    fn conn() -> Connection {
        Connection {
            cgroup: CgroupPath::root(),
            direction: Direction::Outbound,
            remote: std::net::Ipv4Addr::LOCALHOST.into(),
            remote_port: 1,
            local_port: 2,
        }
    }

    fn options(keepalive: bool, idle: u32, interval: u32, count: u32) -> Options {
        Options {
            keepalive,
            idle_secs: idle,
            interval_secs: interval,
            count,
            user_timeout_ms: 0,
        }
    }

    fn policy(mode: Mode) -> Policy {
        let mut policy = Policy::enforce(Values::default(), vec![CgroupPath::root()]);
        policy.default.mode = mode;
        policy
    }

    #[test]
    fn each_mode_is_judged_by_the_kernels_code() {
        let off = options(false, 7200, 75, 9);
        let app = options(true, 60, 5, 3);
        let lax = options(true, 900, 30, 9);
        for (mode, socket, action, changes) in [
            (Mode::Enforce, off, "set", Some(true)),
            (Mode::Enforce, app, "set", Some(false)),
            (Mode::Fill, off, "set", Some(true)),
            (Mode::Fill, lax, "kept", Some(false)),
            (Mode::Cap, lax, "capped", Some(true)),
            (Mode::Cap, app, "compliant", Some(false)),
            (Mode::Audit, off, "audited", Some(false)),
            (Mode::Audit, app, "compliant", Some(false)),
            (Mode::Exempt, off, "exempted", Some(false)),
        ] {
            let verdict = judge(&policy(mode), &conn(), Some(socket));
            assert_eq!(
                (verdict.action, verdict.changes),
                (action, changes),
                "{mode:?} on {socket:?}"
            );
            assert_eq!(verdict.rule.as_deref(), Some("default"));
        }
    }

    #[test]
    fn unreadable_sockets_are_unknown_where_the_mode_reads() {
        let verdict = judge(&policy(Mode::Fill), &conn(), None);
        assert_eq!((verdict.action, verdict.changes), ("unknown", None));
        let verdict = judge(&policy(Mode::Enforce), &conn(), None);
        assert_eq!((verdict.action, verdict.changes), ("set", None));
        let mut outside = policy(Mode::Enforce);
        outside.scopes = vec![CgroupPath::parse("/elsewhere").unwrap_or_else(|e| panic!("{e}"))];
        let verdict = judge(&outside, &conn(), None);
        assert_eq!((verdict.rule, verdict.action), (None, "none"));
    }
}
