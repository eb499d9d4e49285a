//! Harness for the privileged integration tests.
//!
//! Every resource a test creates (cgroup, network namespace, veth, process, attachment) is
//! owned by a value whose `Drop` removes it, so a failing test cleans up like a passing one.
//! Names carry the test process's pid (`ka-test-<pid>-<n>`), and [`sweep_stale`] removes what a
//! killed run left behind.
#![expect(
    clippy::expect_used,
    reason = "a harness that cannot set up panics with the reason; tests do not return Result"
)]

pub mod agent;
pub mod cgroup;
pub mod connection;
pub mod engines;
pub mod fixture;
pub mod http;
pub mod image;
pub mod links;
pub mod manifests;
pub mod netns;
pub mod packages;
pub mod policy;
pub mod process;
pub mod repo;
pub mod scan;
pub mod scratch;
pub mod sockopt;
pub mod sysctl;

use std::{
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

pub use agent::AgentPlaces;
pub use cgroup::TestCgroup;
pub use connection::{Connection, connect, probe, probe_bin};
pub use fixture::Fixture;
pub use links::{kernel_links, links_per_cgroup};
pub use netns::{Netns, Routed, Veth};
pub use process::{Placement, Workload, cpu_time};
pub use scratch::{AgentCopy, TempDir};
pub use sockopt::Keepalive;

/// Prefix of everything the tests create.
pub const PREFIX: &str = "ka-test";

/// A name no other test of any run uses: `ka-test-<pid>-<n>`.
pub fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Panics with a clear sentence unless the host can run the privileged tests; on the first
/// call, removes what killed runs left behind.
pub fn require_host() -> keepalive_common::host::Host {
    static SWEEP: Once = Once::new();
    let host = keepalive_common::host::check().unwrap_or_else(|error| {
        panic!("these tests load eBPF programs into the running kernel: {error}")
    });
    SWEEP.call_once(|| sweep_stale(&host));
    host
}

/// From this release the agent's iterator program loads: bpf_setsockopt in TCP iterators
/// (5.14, 3cee6fb8e69e) and the socket's cgroup pointer where it reads it (5.15, 8520e224f547).
const ITERATOR_FROM: (u32, u32) = (5, 15);

/// Whether the running kernel offers the in-kernel sweep of existing connections.
pub fn kernel_offers_iterator() -> bool {
    let release = require_host().kernel_release;
    keepalive_common::host::parse_kernel_version(&release)
        .unwrap_or_else(|| panic!("unreadable kernel release {release:?}"))
        >= ITERATOR_FROM
}

/// Removes cgroups and network namespaces of earlier test runs whose process is gone.
fn sweep_stale(host: &keepalive_common::host::Host) {
    let stale = |name: &str| {
        let pid = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        pid.is_some_and(|pid| {
            pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
    };
    if let Ok(entries) = std::fs::read_dir(&host.cgroup2_mount) {
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(stale) {
                cgroup::remove_tree(&entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(stale) {
                let _ignored = agent::remove(&entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str().filter(|name| stale(name)) {
                netns::delete(name);
            }
        }
    }
}

/// Polls `probe` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, probe: impl FnMut() -> Option<T>) -> T {
    poll(timeout, probe).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `probe` every 10 ms until it returns `Some`, or returns `None` after `timeout`.
pub fn poll<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reports a failed clean-up: a panic, unless the test is already failing (a second panic
/// would abort the whole test binary and hide the first failure).
pub(crate) fn cleanup_failed(what: &str) {
    if std::thread::panicking() {
        #[expect(clippy::print_stderr, reason = "the only channel left while unwinding")]
        {
            eprintln!("clean-up failed: {what}");
        }
    } else {
        panic!("clean-up failed: {what}");
    }
}

/// The programs loaded into the kernel, nothing attached (dropping it detaches everything).
pub fn load_enforcer(stage: keepalive_common::Stage) -> keepalive_agent::Enforcer {
    let host = require_host();
    keepalive_agent::Enforcer::with_stage(&host.cgroup2_mount, stage).expect("load the programs")
}

/// `values` enforced on every connection of `cgroups`, no rules.
pub fn enforce(
    values: keepalive_agent::Values,
    cgroups: &[&TestCgroup],
) -> keepalive_agent::Policy {
    keepalive_agent::Policy::enforce(
        values,
        cgroups.iter().map(|cgroup| cgroup.scope()).collect(),
    )
}

/// The agent binary: `$KEEPALIVE_AGENT_BIN` (set by `cargo xtask test`), else the one in the
/// test binary's target directory.
pub fn agent_bin() -> std::path::PathBuf {
    match std::env::var_os("KEEPALIVE_AGENT_BIN") {
        Some(path) => path.into(),
        None => target_bin("keepalive-agent"),
    }
}

/// Runs `command` to its end; panics with the command and its stderr unless it succeeded.
pub fn succeeds(command: &mut std::process::Command) -> std::process::Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the agent binary with `args`, as [`succeeds`].
pub fn agent_succeeds<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> std::process::Output {
    succeeds(std::process::Command::new(agent_bin()).args(args))
}

/// A binary of the workspace in the running binary's target directory: beside it (a benchmark
/// in target/<profile>/) or one level up (a test in target/<profile>/deps/).
pub(crate) fn target_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dirs = exe.ancestors().skip(1).take(2);
    let candidates: Vec<std::path::PathBuf> = dirs.map(|dir| dir.join(name)).collect();
    candidates
        .iter()
        .find(|candidate| candidate.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("{name} is not in {candidates:?}: build it first (`cargo xtask test` does)")
        })
}
