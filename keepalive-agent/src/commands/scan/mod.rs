//! `keepalive-agent scan`: every established TCP connection of the host, in every network
//! namespace, with its process, cgroup and keepalive, and what a policy would do to it.
//! Read-only: the socket list is the sweep's (inet_diag per namespace), the options are read
//! through a duplicate of the owner's descriptor, and the verdict is `Policy::decide` plus the
//! kernel's mode code run against a copy of the options ([`judge`]).

pub mod judge;
mod render;

use std::{
    collections::HashMap,
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::Args;

use self::judge::{Options, Verdict, judge};
pub use self::render::{json_lines, table};
use super::source::{self, StateDir};
use crate::{
    containers::{ContainerInfo, Containers},
    existing::{
        diag::DiagSocket,
        procs::{FdSocket, Population, duplicate, established_in, pidfd},
    },
    policy::{CgroupPath, Connection, Direction, Policy},
};

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Policy file to judge connections by; without it, the running agent's policy, else the
    /// installed /etc/keepalive-agent/policy.toml, else the built-in default (the output says
    /// which).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Only connections of this cgroup and its descendants (repeatable): a path inside the
    /// hierarchy or under the cgroup2 mount. Default: every connection of the host.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,

    /// JSON lines: one object per connection, then one `{"summary": ...}` object.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub state: StateDir,

    /// Where the engines listen: scan names each connection's container and its labels.
    #[command(flatten)]
    pub engines: Box<crate::commands::engines::EngineArgs>,
}

/// One established connection, as seen from one of its ends.
#[derive(Debug, Clone)]
pub struct Entry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The network namespace's inode (as `lsns` and /proc/PID/ns/net show it).
    pub netns: u64,
    pub direction: Direction,
    /// The process holding the socket (the first found) and its command.
    pub pid: Option<u32>,
    /// The holder's descriptor of it (`/proc/PID/fd/FD`).
    pub fd: Option<i32>,
    pub comm: Option<String>,
    /// The socket's cgroup (an accepted socket's is its listener's); None if it is gone.
    pub cgroup: Option<CgroupPath>,
    pub container: Option<ContainerInfo>,
    /// `idiag_timer`: the kernel's pending timer.
    pub timer: u8,
    /// The socket's options, or why they could not be read.
    pub options: Result<Options, String>,
    pub verdict: Verdict,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Report {
    pub entries: Vec<Entry>,
    /// Where the policy came from, and notes about it.
    pub policy: String,
    pub notes: Vec<String>,
    /// Network namespaces read.
    pub namespaces: usize,
    /// Namespaces that could not be read, and why.
    pub skipped: Vec<String>,
    /// Processes whose namespace or descriptors could not be looked at.
    pub hidden_processes: u64,
}

/// Runs the scan and writes its report to `out`.
pub fn run(args: &ScanArgs, out: &mut impl io::Write) -> anyhow::Result<()> {
    let source = source::load(args.config.as_deref(), &args.state.state_dir)?;
    let mount = keepalive_common::host::cgroup2_mount()?;
    let filters = args
        .cgroups
        .iter()
        .map(|arg| crate::cgroup::named(&mount, arg))
        .collect::<Result<Vec<_>, _>>()?;
    let (engines, engine_notes) = crate::containers::ask_once(&args.engines.sockets())?;
    // Rules that select containers apply to the cgroups of those running now, as in `run`.
    let policy = crate::containers::resolve(&source.policy, &engines.0);
    let mut report = scan(&policy, &mount, &filters, &engines)?;
    report.policy = source.description;
    report.notes = source.notes;
    report.notes.extend(engine_notes);
    let written = if args.json {
        json_lines(&report, out)
    } else {
        table(&report, out)
    };
    written.context("cannot write the report")
}

/// Every established connection of the cgroups `filters` cover (all if none), judged by
/// `policy`.
pub fn scan(
    policy: &Policy,
    mount: &Path,
    filters: &[CgroupPath],
    engines: &impl Containers,
) -> anyhow::Result<Report> {
    let Population {
        cgroups,
        mut holders,
    } = Population::walk(mount, [mount], true)
        .with_context(|| format!("cannot read the cgroup tree at {}", mount.display()))?;
    holders.add_mounted_namespaces();
    let mut report = Report {
        namespaces: holders.namespaces.len(),
        hidden_processes: holders.unlisted,
        ..Report::default()
    };
    let mut scanner = Scanner {
        policy,
        filters,
        engines,
        cgroups,
        holders: &holders.sockets,
        comms: HashMap::new(),
        pidfds: HashMap::new(),
        containers: HashMap::new(),
    };
    for (&netns, path) in &holders.namespaces {
        let sockets = match established_in(path, None) {
            Ok(sockets) => sockets,
            Err(error) => {
                report.skipped.push(format!(
                    "network namespace {netns} ({}): {error}{}",
                    path.display(),
                    needs(&error, "CAP_SYS_ADMIN (setns)")
                ));
                continue;
            }
        };
        for (socket, direction) in &sockets {
            report
                .entries
                .extend(scanner.entry(netns, socket, *direction));
        }
    }
    report.entries.sort_by(|a, b| {
        (&a.cgroup, a.netns, a.local, a.remote).cmp(&(&b.cgroup, b.netns, b.local, b.remote))
    });
    Ok(report)
}

/// What one scan knows, and caches, while it looks at each socket.
struct Scanner<'a, C> {
    policy: &'a Policy,
    filters: &'a [CgroupPath],
    engines: &'a C,
    cgroups: HashMap<u64, CgroupPath>,
    holders: &'a HashMap<u64, (u32, i32)>,
    comms: HashMap<u32, Option<String>>,
    /// One pidfd per holder (or why there is none), for all its sockets.
    pidfds: HashMap<u32, Result<std::os::fd::OwnedFd, String>>,
    containers: HashMap<CgroupPath, Option<ContainerInfo>>,
}

impl<C: Containers> Scanner<'_, C> {
    /// The options of the socket `holder` (pid, fd) holds, or why they cannot be read.
    fn read_options(&mut self, holder: Option<(u32, i32)>) -> Result<Options, String> {
        let (pid, fd) = holder.ok_or_else(|| {
            "no process found holding it (closing, or its holder's descriptors are not \
             readable: CAP_SYS_PTRACE)"
                .to_string()
        })?;
        let pidfd = self
            .pidfds
            .entry(pid)
            .or_insert_with(|| pidfd(pid).map_err(|error| format!("pidfd_open: {error}")));
        let pidfd = pidfd.as_ref().map_err(Clone::clone)?;
        let duplicate = duplicate(pidfd, fd)
            .map_err(|error| format!("pidfd_getfd: {error}{}", needs(&error, "CAP_SYS_PTRACE")))?;
        Options::read(&mut FdSocket(duplicate)).map_err(|errno| {
            let error = io::Error::from_raw_os_error(i32::try_from(-errno).unwrap_or(0));
            format!("getsockopt: {error}")
        })
    }

    /// The entry of one established socket, unless the filters leave it out.
    fn entry(&mut self, netns: u64, socket: &DiagSocket, direction: Direction) -> Option<Entry> {
        let cgroup = self.cgroups.get(&socket.cgroup_id).cloned();
        let wanted = self.filters.is_empty()
            || cgroup
                .as_ref()
                .is_some_and(|cgroup| self.filters.iter().any(|filter| filter.contains(cgroup)));
        if !wanted {
            return None;
        }
        let holder = self.holders.get(&socket.inode).copied();
        let options = self.read_options(holder);
        let verdict = match &cgroup {
            Some(cgroup) => {
                let conn = Connection {
                    cgroup: cgroup.clone(),
                    direction,
                    remote: socket.remote,
                    remote_port: socket.remote_port,
                    local_port: socket.local_port,
                };
                judge(self.policy, &conn, options.as_ref().ok().copied())
            }
            None => unknown_cgroup(),
        };
        let pid = holder.map(|(pid, _)| pid);
        let comm = pid.and_then(|pid| self.comms.entry(pid).or_insert_with(|| comm(pid)).clone());
        let container = cgroup.as_ref().and_then(|cgroup| {
            self.containers
                .entry(cgroup.clone())
                .or_insert_with(|| self.engines.container_of(cgroup))
                .clone()
        });
        Some(Entry {
            local: SocketAddr::new(socket.local, socket.local_port),
            remote: SocketAddr::new(socket.remote, socket.remote_port),
            netns,
            direction,
            pid,
            fd: holder.map(|(_, fd)| fd),
            comm,
            cgroup,
            container,
            timer: socket.timer,
            options,
            verdict,
        })
    }
}

/// The verdict for a socket whose cgroup is not in the tree (removed meanwhile).
fn unknown_cgroup() -> Verdict {
    Verdict {
        rule: None,
        mode: None,
        action: "unknown",
        changes: None,
    }
}

/// ` (needs CAP)` for a permission error.
fn needs(error: &io::Error, capability: &str) -> String {
    match error.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => format!(" (needs {capability})"),
        _ => String::new(),
    }
}

fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|comm| comm.trim_end().to_string())
}
