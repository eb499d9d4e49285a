//! `keepalive-agent explain`: which rule decides for one connection, what its socket would
//! get, and why each candidate did or did not match. The walk is `Policy::trace`, the one
//! `Policy::decide` runs.

use std::{fmt::Write as _, net::SocketAddr, path::PathBuf};

use clap::{Args, ValueEnum};

use super::source::{self, StateDir};
use crate::policy::{
    Action, CgroupPath, Connection, Decision, Direction, KeyChecks, Mode, Policy, Rule,
};

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Policy file to explain; without it, the running agent's policy, else the installed
    /// /etc/keepalive-agent/policy.toml, else the built-in default (the output says which).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The connection's cgroup: a path inside the hierarchy (`/system.slice/x.service`, as
    /// /proc/PID/cgroup shows) or a filesystem path under the cgroup2 mount. For an accepted
    /// connection, the listener's cgroup.
    #[arg(long, value_name = "PATH")]
    pub cgroup: PathBuf,

    /// The peer's address and port (`10.0.0.5:5432`, `[fd00::1]:443`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub remote: SocketAddr,

    /// The connection's local port [default: 0, i.e. not given].
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub local_port: u16,

    /// Who opened the connection, seen from the cgroup.
    #[arg(long, value_enum, default_value_t = DirectionArg::Outbound)]
    pub direction: DirectionArg,

    #[command(flatten)]
    pub state: StateDir,

    /// Where the engines listen, asked once when a rule selects containers (`labels`,
    /// `container`): such a rule applies to the cgroups of those running now.
    #[command(flatten)]
    pub engines: Box<super::engines::EngineArgs>,
}

/// `--direction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    /// The cgroup connected.
    Outbound,
    /// The cgroup accepted.
    Inbound,
}

/// The explanation, as text.
pub fn explain(args: &ExplainArgs) -> anyhow::Result<String> {
    let source = source::load(args.config.as_deref(), &args.state.state_dir)?;
    let cgroup = match keepalive_common::host::cgroup2_mount() {
        Ok(mount) => crate::cgroup::named(&mount, &args.cgroup)?,
        Err(_) => crate::cgroup::named(std::path::Path::new("/"), &args.cgroup)?,
    };
    let conn = Connection {
        cgroup,
        direction: Direction::from_outbound(args.direction == DirectionArg::Outbound),
        remote: args.remote.ip(),
        remote_port: args.remote.port(),
        local_port: args.local_port,
    };
    let mut out = String::new();
    for note in &source.notes {
        let _ = writeln!(out, "note: {note}");
    }
    let policy = if source.policy.selects_containers() {
        let (listed, notes) = crate::containers::ask_once(&args.engines.sockets())?;
        for note in &notes {
            let _ = writeln!(out, "note: {note}");
        }
        crate::containers::resolve(&source.policy, &listed.0)
    } else {
        source.policy.clone()
    };
    out.push_str(&render(&policy, &conn, &source.description));
    Ok(out)
}

/// The explanation of `conn` under `policy` (from `description`).
pub fn render(policy: &Policy, conn: &Connection, description: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "connection: {} in cgroup {}, remote {}, local port {}",
        conn.direction.name(),
        conn.cgroup,
        SocketAddr::new(conn.remote, conn.remote_port),
        conn.local_port
    );
    let scopes: Vec<&str> = policy.scopes.iter().map(CgroupPath::as_str).collect();
    let _ = writeln!(
        out,
        "policy: {description} (enforced in {})",
        scopes.join(", ")
    );
    let trace = policy.trace(conn);
    let action = policy.action(trace.decision);
    match (trace.decision, action) {
        (Decision::Rule(i), Some(action)) => {
            let rule = &policy.rules[i];
            let _ = writeln!(out, "decided by: rule {:?} ({})", rule.name, place(rule));
            let _ = writeln!(out, "the socket gets: {}", gets(action));
        }
        (Decision::Default, Some(action)) => {
            let _ = writeln!(out, "decided by: the default (no rule matched)");
            let _ = writeln!(out, "the socket gets: {}", gets(action));
        }
        _ => {
            let _ = writeln!(
                out,
                "decided by: nothing: cgroup {} is in no enforced cgroup ({}); the agent does \
                 not touch the connection",
                conn.cgroup,
                scopes.join(", ")
            );
            return out;
        }
    }
    let candidates = policy.candidates(&conn.cgroup);
    let _ = writeln!(out, "\ncandidates in precedence order:");
    if candidates.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (n, &i) in candidates.iter().enumerate() {
        let rule = &policy.rules[i];
        let verdict = match trace.steps.iter().find(|step| step.rule == i) {
            Some(step) if step.checks.matched() => {
                format!("matches: {}  <- decides", keys(rule, conn, &step.checks))
            }
            Some(step) => format!("no match: {}", keys(rule, conn, &step.checks)),
            None => "not reached (an earlier rule decided)".to_string(),
        };
        let _ = writeln!(
            out,
            "  {}. {} ({}): {verdict}",
            n + 1,
            rule.name,
            place(rule)
        );
    }
    let others: Vec<&Rule> = policy
        .rules
        .iter()
        .enumerate()
        .filter(|(i, _)| !candidates.contains(i))
        .map(|(_, rule)| rule)
        .collect();
    if !others.is_empty() {
        let _ = writeln!(
            out,
            "not candidates (their cgroup is neither {} nor an ancestor of it):",
            conn.cgroup
        );
        for rule in others {
            let _ = writeln!(out, "  {} ({})", rule.name, place(rule));
        }
    }
    out
}

/// `line N, cgroup X`, `line N, any cgroup`, or `the pod's annotations, cgroup X`.
fn place(rule: &Rule) -> String {
    let cgroup = rule.cgroup.as_ref().map_or_else(
        || "any cgroup".to_string(),
        |cgroup| format!("cgroup {cgroup}"),
    );
    if rule.annotated {
        format!("the pod's annotations, {cgroup}")
    } else if rule.line == 0 {
        cgroup
    } else {
        format!("line {}, {cgroup}", rule.line)
    }
}

/// What a socket gets from `action`, per mode.
fn gets(action: &Action) -> String {
    let values = action.values;
    let lock = if action.lock {
        "; locked: applications cannot change them later"
    } else {
        ""
    };
    match action.mode {
        Mode::Enforce => format!("enforce: keepalive on, {values}{lock}"),
        Mode::Fill => format!(
            "fill: if the application did not turn keepalive on, keepalive on, {values}; if it \
             did, its own values are kept"
        ),
        Mode::Cap => format!(
            "cap: without keepalive, keepalive on, {values}; with the application's keepalive, \
             idle lowered to at most {} s and interval x count to at most {} s{lock}",
            values.idle_secs,
            values.interval_secs * values.count
        ),
        Mode::Audit => format!(
            "audit: nothing is changed; counted as audited unless it already has keepalive on, \
             {values}"
        ),
        Mode::Exempt => "exempt: nothing, the socket is left as the application made it".into(),
    }
}

/// Each key of `rule`, and how it compared with `conn`.
fn keys(rule: &Rule, conn: &Connection, checks: &KeyChecks) -> String {
    let list = |items: Vec<String>| items.join(", ");
    let verb = |hit: bool, yes: &str, no: &str| if hit { yes.to_string() } else { no.to_string() };
    let mut parts = Vec::new();
    if let Some(hit) = checks.remote {
        let cidrs = list(rule.remote.iter().map(ToString::to_string).collect());
        parts.push(format!(
            "remote {} {} {cidrs}",
            conn.remote,
            verb(hit, "in", "not in")
        ));
    }
    if let Some(hit) = checks.remote_port {
        let ports = list(rule.remote_ports.iter().map(ToString::to_string).collect());
        parts.push(format!(
            "remote port {} {} {ports}",
            conn.remote_port,
            verb(hit, "in", "not in")
        ));
    }
    if let Some(hit) = checks.local_port {
        let ports = list(rule.local_ports.iter().map(ToString::to_string).collect());
        parts.push(format!(
            "local port {} {} {ports}",
            conn.local_port,
            verb(hit, "in", "not in")
        ));
    }
    if let (Some(hit), Some(direction)) = (checks.direction, rule.direction) {
        parts.push(format!(
            "direction {} {} {}",
            conn.direction.name(),
            verb(hit, "is", "is not"),
            direction.name()
        ));
    }
    if parts.is_empty() {
        return "no keys besides its cgroup".into();
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests;
