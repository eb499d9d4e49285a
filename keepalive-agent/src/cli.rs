//! Command line of `keepalive-agent`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum, builder::BoolishValueParser};

use crate::policy::{COUNT, IDLE_SECS, INTERVAL_SECS, USER_TIMEOUT_MS, Values};

/// Enforces TCP keepalive on every new TCP connection of chosen cgroups, without touching the
/// programs that open them.
///
/// Firewalls, NAT gateways and load balancers silently drop idle TCP connections. The kernel's
/// keepalive prevents that, but only for sockets whose program enabled SO_KEEPALIVE; the
/// net.ipv4.tcp_keepalive_* sysctls only change the defaults of those sockets. This agent
/// attaches a sock_ops eBPF program to cgroup v2 directories; for every connection a process
/// there opens or accepts, it sets SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT (and
/// TCP_USER_TIMEOUT) as the policy says.
///
/// Options marked [env: KEEPALIVE_AGENT_...] may also be given in that environment variable
/// (for orchestrators); the command line wins.
#[derive(Debug, Parser)]
#[command(name = "keepalive-agent", version = VERSION)]
pub struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for collectors,
    /// `journald` (structured fields, for `journalctl -o verbose`) under systemd. `auto`: journald
    /// when stderr is connected to the journal (systemd sets $JOURNAL_STREAM), else text.
    #[arg(long, global = true, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Auto,
          env = "KEEPALIVE_AGENT_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Log verbosity (`debug` also shows the kernel side's per-connection events). Without
    /// it, RUST_LOG (a tracing filter such as `info,keepalive_agent=debug`) or else `info`.
    #[arg(
        long,
        global = true,
        value_name = "LEVEL",
        value_enum,
        env = "KEEPALIVE_AGENT_LOG_LEVEL"
    )]
    pub log_level: Option<LogLevel>,

    #[command(subcommand)]
    pub command: Command,
}

/// `--version`: the package version and the git commit it was built from (`unknown` for a
/// build outside a git checkout without `$KEEPALIVE_AGENT_COMMIT`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KEEPALIVE_AGENT_COMMIT"),
    ")"
);

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// journald under systemd, else text.
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
    /// Native journal entries with structured fields.
    Journald,
}

impl From<LogFormat> for crate::logs::Format {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Auto => Self::Auto,
            LogFormat::Text => Self::Text,
            LogFormat::Json => Self::Json,
            LogFormat::Journald => Self::Journald,
        }
    }
}

/// `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The level as a tracing filter directive.
    pub const fn directive(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the programs, attach them, and enforce the policy until SIGINT or SIGTERM.
    ///
    /// Logs one line containing `attached` per cgroup once enforcement is live there. SIGHUP, or
    /// a change of the --config file, reloads the policy; a file that does not check is refused
    /// (logged) and the running policy stays. On SIGINT or SIGTERM it detaches from every
    /// cgroup and exits (with --persist, enforcement stays pinned); connections keep the values
    /// they got. Needs root (or CAP_BPF and CAP_NET_ADMIN; updating connections that already
    /// exist also needs CAP_SYS_ADMIN and CAP_SYS_PTRACE). Under systemd it reports readiness
    /// and reloads (sd_notify) and pings the watchdog when one is set.
    ///
    /// One agent runs per pin directory: a second `run` is refused and names the running one
    /// (--take-over replaces it). Within a second the agent puts back what someone else removed
    /// (a detached link, a removed pin, another program in its link; it counts those with
    /// fentry programs, a kprobe or a link iterator, and inotify, and asks each attachment only
    /// then); /readyz is not ready while anything is missing.
    ///
    /// Kernels: Linux 5.9 or newer enforces. The lock (holding applications to locked rules)
    /// and the modes fill, cap and audit need Linux 6.1; updating connections that already
    /// exist in the kernel (--existing-via iterator) needs 5.15. On an older kernel the agent
    /// says so once at start, runs without them, and `status` and the metrics show it.
    Run(RunArgs),
    /// Check a policy file without loading anything: exit 0, or an error naming file, line,
    /// field and what is allowed. Also warns of rules the running kernel cannot carry out
    /// (fill, cap, audit and the lock need Linux 6.1).
    Check(CheckArgs),
    /// Show what is attached where, the policy in force and its source, and counters per rule.
    Status(StatusArgs),
    /// List every established TCP connection of the host (every network namespace) with its
    /// process, cgroup and keepalive, and what a policy would do to it; changes nothing.
    ///
    /// The policy is --config FILE, else the running agent's (read from its state directory),
    /// else the installed /etc/keepalive-agent/policy.toml, else the built-in default.
    /// Each connection's keepalive options are read from the socket itself, through a
    /// duplicate of its owner's descriptor; the action is what `run` would do (the same
    /// precedence and mode code). Below the list, a summary per cgroup. Rights: reading other
    /// network namespaces needs CAP_SYS_ADMIN (setns), listing and duplicating other processes'
    /// descriptors CAP_SYS_PTRACE; without them, what cannot be read is reported as unknown.
    Scan(crate::commands::scan::ScanArgs),
    /// Show which rule decides for one connection, the values its socket would get, and why
    /// each candidate rule, in precedence order, did or did not match.
    Explain(crate::commands::explain::ExplainArgs),
    /// Report how connections failed and the network's idle timeout, inferred: per
    /// destination, connections reset or timed out after an idle period, the shortest such
    /// idle, the idle the policy gives them and what to set. Asks the running agent (its
    /// metrics endpoint); counts the connections of rules with `ends = true`.
    Report(crate::commands::report::ReportArgs),
    /// Remove everything the agent pinned or attached; new connections are no longer touched.
    /// A running agent is stopped first (SIGTERM), since it would put back what is removed.
    Detach(DetachArgs),
}

/// What the command line asks for: the agent's commands ([`Cli`], which the man pages and
/// completions describe), or the packaging tool `generate`, which they leave out.
#[derive(Debug)]
pub enum Invocation {
    Agent(Cli),
    Generate(GenerateArgs),
}

impl Invocation {
    /// Parses the process's arguments; exits with clap's message (and status 2) on an error.
    pub fn parse() -> Self {
        Self::try_parse_from(std::env::args_os()).unwrap_or_else(|error| error.exit())
    }

    pub fn try_parse_from(
        args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
    ) -> Result<Self, clap::Error> {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let generate = GenerateArgs::augment_args(
            clap::Command::new("generate")
                .about("Write the man pages and shell completions (for packaging)")
                .hide(true),
        );
        let matches = Cli::command()
            .subcommand(generate)
            .try_get_matches_from(args)?;
        match matches.subcommand() {
            Some(("generate", generate)) => {
                GenerateArgs::from_arg_matches(generate).map(Self::Generate)
            }
            _ => Cli::from_arg_matches(&matches).map(Self::Agent),
        }
    }
}

/// `keepalive-agent generate`: the man pages and the shell completions (bash, zsh, fish)
/// generated from [`Cli`], written into a directory (`cargo xtask dist` runs it).
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Directory to write `man/*.1` and `completions/{keepalive-agent.bash,_keepalive-agent,
    /// keepalive-agent.fish}` into; created if missing.
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// Where the agent keeps what outlives it.
#[derive(Debug, Clone, Args)]
pub struct Places {
    /// bpffs mount point; the agent pins its maps and links under `<PATH>/keepalive-agent`
    /// and mounts bpffs there if it is not mounted.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/sys/fs/bpf",
        env = "KEEPALIVE_AGENT_BPFFS"
    )]
    pub bpffs: PathBuf,

    /// Where the agent writes state.json (policy source, generation, rule names) for `status`.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/run/keepalive-agent",
        env = "KEEPALIVE_AGENT_STATE_DIR"
    )]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub places: Places,

    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    #[command(flatten)]
    pub places: Places,
}

/// `run --existing-via`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExistingVia {
    Auto,
    Iterator,
    Descriptors,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file (TOML; see docs/policy.md and examples/policy.toml). Without it, the policy
    /// is --idle/--interval/--count/--user-timeout enforced on every connection.
    #[arg(long, value_name = "FILE", env = "KEEPALIVE_AGENT_CONFIG",
          conflicts_with_all = ["idle", "interval", "count", "user_timeout"])]
    pub config: Option<PathBuf>,

    /// cgroup v2 to enforce in, with all its descendants; repeat for several. Overrides the
    /// file's [agent] cgroups.
    ///
    /// A path inside the hierarchy as /proc/PID/cgroup shows it (`/` is the root,
    /// `system.slice/nginx.service`), or a filesystem path under the cgroup2 mount, which is
    /// found in /proc/self/mountinfo. Default: the file's [agent] cgroups, else the root, i.e.
    /// every process of the host.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,

    /// Seconds a connection is idle before the first probe (TCP_KEEPIDLE).
    #[arg(long, value_name = "SECS", default_value_t = Values::default().idle_secs,
          value_parser = clap::value_parser!(u32).range(range64(IDLE_SECS)))]
    pub idle: u32,

    /// Seconds between probes (TCP_KEEPINTVL).
    #[arg(long, value_name = "SECS", default_value_t = Values::default().interval_secs,
          value_parser = clap::value_parser!(u32).range(range64(INTERVAL_SECS)))]
    pub interval: u32,

    /// Unanswered probes before the connection is dropped and the application sees
    /// ETIMEDOUT (TCP_KEEPCNT).
    #[arg(long, value_name = "N", default_value_t = Values::default().count,
          value_parser = clap::value_parser!(u32).range(range64(COUNT)))]
    pub count: u32,

    /// Milliseconds transmitted data may stay unacknowledged before the connection is dropped
    /// (TCP_USER_TIMEOUT; 0 is the kernel's default behaviour). Unset: left as it is.
    #[arg(long, value_name = "MS",
          value_parser = clap::value_parser!(u32).range(range64(USER_TIMEOUT_MS)))]
    pub user_timeout: Option<u32>,

    /// Leave connections that exist when a policy takes effect as they are (by default they
    /// get it too).
    #[arg(long, env = "KEEPALIVE_AGENT_NO_EXISTING", value_parser = BoolishValueParser::new())]
    pub no_existing: bool,

    /// How connections that exist when a policy takes effect are reached: `iterator` (a TCP
    /// iterator program applies the policy in the kernel; Linux 5.15+, needs no CAP_SYS_PTRACE
    /// for the sockets), `descriptors` (through a duplicate of each owner's descriptor,
    /// pidfd_getfd: any kernel, CAP_SYS_PTRACE for processes of other users), or `auto` (the
    /// iterator where the kernel offers it).
    #[arg(long, value_enum, value_name = "PATH", default_value_t = ExistingVia::Auto,
          env = "KEEPALIVE_AGENT_EXISTING_VIA")]
    pub existing_via: ExistingVia,

    /// Address of the Prometheus endpoint (/metrics, and /healthz and /readyz for probes)
    /// [default: 127.0.0.1:9477]. Loopback unless told otherwise: the counters describe the
    /// host's connections.
    #[arg(long, value_name = "ADDR", env = "KEEPALIVE_AGENT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Serve no metrics endpoint (and no /healthz, /readyz).
    #[arg(long, env = "KEEPALIVE_AGENT_NO_METRICS", value_parser = BoolishValueParser::new(),
          conflicts_with = "metrics_addr")]
    pub no_metrics: bool,

    /// Turn on the kernel's run-time accounting of BPF programs while the agent runs
    /// (keepalive_program_run_seconds_total). It adds a few ns to every BPF program on the host.
    #[arg(long, env = "KEEPALIVE_AGENT_PROGRAM_STATS", value_parser = BoolishValueParser::new())]
    pub program_stats: bool,

    /// On SIGINT or SIGTERM, leave enforcement in place (it stays pinned; `keepalive-agent
    /// detach` removes it). For services: an upgrade or restart never leaves a gap. Without
    /// it, stopping detaches everything.
    #[arg(long, env = "KEEPALIVE_AGENT_PERSIST", value_parser = BoolishValueParser::new())]
    pub persist: bool,

    /// Replace the agent already running with these pins (an upgrade in place): it is asked
    /// to hand over (SIGUSR2: it exits leaving enforcement pinned), then this one takes its
    /// links over with an atomic program swap, without a gap. Without it, a second agent is
    /// refused and the running one named.
    #[arg(long, env = "KEEPALIVE_AGENT_TAKE_OVER", value_parser = BoolishValueParser::new())]
    pub take_over: bool,

    /// Seconds between counts of established connections without keepalive in the enforced
    /// cgroups (the gauge keepalive_connections_without_keepalive); 0: never count.
    #[arg(long, value_name = "SECS", default_value_t = crate::without_keepalive::DEFAULT_INTERVAL.as_secs(),
          env = "KEEPALIVE_AGENT_MISSING_INTERVAL")]
    pub missing_interval: u64,

    #[command(flatten)]
    pub places: Places,

    #[command(flatten)]
    pub engines: Box<crate::commands::engines::EngineArgs>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The policy file to check.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Where the metrics endpoint listens unless `--metrics-addr` says otherwise.
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9477,
));

impl RunArgs {
    /// Where to serve metrics, if at all.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        (!self.no_metrics).then(|| self.metrics_addr.unwrap_or(DEFAULT_METRICS_ADDR))
    }
}

const fn range64(range: std::ops::RangeInclusive<u32>) -> std::ops::RangeInclusive<i64> {
    (*range.start() as i64)..=(*range.end() as i64)
}

#[cfg(test)]
mod tests;
