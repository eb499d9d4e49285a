//! Command line of `keepalive-agent`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::policy::{COUNT, IDLE_SECS, INTERVAL_SECS, Policy, USER_TIMEOUT_MS};

/// Enforces TCP keepalive on every new TCP connection of chosen cgroups, without touching the
/// programs that open them.
///
/// Firewalls, NAT gateways and load balancers silently drop idle TCP connections. The kernel's
/// keepalive prevents that, but only for sockets whose program enabled SO_KEEPALIVE; the
/// net.ipv4.tcp_keepalive_* sysctls only change the defaults of those sockets. This agent
/// attaches a sock_ops eBPF program to cgroup v2 directories; for every connection a process
/// there opens or accepts, it sets SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT (and
/// TCP_USER_TIMEOUT) to the policy's values.
#[derive(Debug, Parser)]
#[command(name = "keepalive-agent", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the program, attach it, and enforce the policy until SIGINT or SIGTERM.
    ///
    /// Logs one line containing `attached` per cgroup once enforcement is live there. On SIGINT
    /// or SIGTERM it detaches from every cgroup and exits; connections opened before keep the
    /// values they got. Needs root (or CAP_BPF and CAP_NET_ADMIN). Log verbosity follows
    /// RUST_LOG (default `info`).
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// cgroup v2 to enforce in, with all its descendants; repeat for several.
    ///
    /// A path inside the hierarchy as /proc/PID/cgroup shows it (`/` is the root,
    /// `system.slice/nginx.service`), or a filesystem path under the cgroup2 mount, which is
    /// found in /proc/self/mountinfo. Default: the root, i.e. every process of the host.
    #[arg(long = "cgroup", value_name = "PATH", default_value = "/")]
    pub cgroups: Vec<PathBuf>,

    /// Seconds a connection is idle before the first probe (TCP_KEEPIDLE).
    #[arg(long, value_name = "SECS", default_value_t = Policy::default().idle_secs,
          value_parser = clap::value_parser!(u32).range(range64(IDLE_SECS)))]
    pub idle: u32,

    /// Seconds between probes (TCP_KEEPINTVL).
    #[arg(long, value_name = "SECS", default_value_t = Policy::default().interval_secs,
          value_parser = clap::value_parser!(u32).range(range64(INTERVAL_SECS)))]
    pub interval: u32,

    /// Unanswered probes before the connection is dropped and the application sees
    /// ETIMEDOUT (TCP_KEEPCNT).
    #[arg(long, value_name = "N", default_value_t = Policy::default().count,
          value_parser = clap::value_parser!(u32).range(range64(COUNT)))]
    pub count: u32,

    /// Milliseconds transmitted data may stay unacknowledged before the connection is dropped
    /// (TCP_USER_TIMEOUT; 0 is the kernel's default behaviour). Unset: left as it is.
    #[arg(long, value_name = "MS",
          value_parser = clap::value_parser!(u32).range(range64(USER_TIMEOUT_MS)))]
    pub user_timeout: Option<u32>,
}

impl RunArgs {
    /// The policy these options describe, checked against the kernel's bounds.
    pub fn policy(&self) -> Result<Policy, crate::policy::OutOfRange> {
        let policy = Policy {
            idle_secs: self.idle,
            interval_secs: self.interval,
            count: self.count,
            user_timeout_ms: self.user_timeout,
        };
        policy.validate()?;
        Ok(policy)
    }
}

const fn range64(range: std::ops::RangeInclusive<u32>) -> std::ops::RangeInclusive<i64> {
    (*range.start() as i64)..=(*range.end() as i64)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, String> {
        let mut argv = vec!["keepalive-agent", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Run(run),
            }) => Ok(run),
            Err(error) => Err(error.to_string()),
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_articles_at_the_root() {
        let run = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(run.policy().ok(), Some(Policy::default()));
        assert_eq!(run.cgroups, vec![PathBuf::from("/")]);
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_range() {
        for (args, range) in [
            (["--idle", "0"], "1..=32767"),
            (["--interval", "32768"], "1..=32767"),
            (["--count", "128"], "1..=127"),
            (["--user-timeout", "2147483648"], "0..=2147483647"),
        ] {
            let error = parse(&args).err().unwrap_or_default();
            assert!(
                error.contains(args[0]) && error.contains(range),
                "{args:?}: {error}"
            );
        }
    }

    #[test]
    fn repeated_cgroups() {
        let run = parse(&["--cgroup", "a", "--cgroup", "/sys/fs/cgroup/b"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            run.cgroups,
            vec![PathBuf::from("a"), PathBuf::from("/sys/fs/cgroup/b")]
        );
    }
}
