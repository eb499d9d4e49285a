//! The missing-keepalive count: established connections without keepalive, per enforced scope,
//! counted on a period by the running agent (`keepalive_connections_without_keepalive`).
//!
//! Cheap on purpose: one socket dump per network namespace of the scopes' processes, and no
//! descriptor is touched. The dump reports each socket's cgroup (`INET_DIAG_CGROUP_ID`) and
//! which of its timers is pending (`idiag_timer`). A socket counts as without keepalive when
//! no timer is pending. That is exact for idle connections, the ones keepalive is for; a
//! connection with data in flight shows its retransmit (or zero-window probe) timer instead,
//! whatever its keepalive, and is counted as established but not as missing.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::Path,
    time::Duration,
};

use tracing::{debug, warn};

use crate::{
    existing::{
        diag::{ESTABLISHED, TIMER_OFF},
        procs::{Holders, sockets_in, walk},
    },
    metrics,
    policy::CgroupPath,
};

/// The period when neither `--missing-interval` nor its variable says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// One scope's connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    /// Established connections whose socket belongs to a cgroup of the scope.
    pub established: u64,
    /// Of those, the ones with no timer pending: no keepalive (and no data in flight).
    pub without_keepalive: u64,
}

/// Counts per scope (its text as the policy gives it, e.g. `/` or `/kubepods.slice/**`). A
/// connection of a cgroup several scopes cover counts for the first of them.
pub fn count(mount: &Path, scopes: &[CgroupPath]) -> io::Result<BTreeMap<String, Count>> {
    let mut counts: BTreeMap<String, Count> = scopes
        .iter()
        .map(|scope| (scope.to_string(), Count::default()))
        .collect();
    let mut cgroups = HashMap::new();
    let mut pids = Vec::new();
    for scope in scopes {
        let root = mount.join(scope.literal_prefix().relative());
        if root.is_dir() {
            walk(mount, &root, &mut cgroups, &mut pids)?;
        }
    }
    pids.sort_unstable();
    pids.dedup();
    // Each cgroup's scope, decided once.
    let owner: HashMap<u64, String> = cgroups
        .into_iter()
        .filter_map(|(id, path)| {
            let scope = scopes.iter().find(|scope| scope.covers(&path))?;
            Some((id, scope.to_string()))
        })
        .collect();
    for netns in Holders::of(&pids, false).namespaces.values() {
        let sockets = match sockets_in(netns, None) {
            Ok(sockets) => sockets,
            // The namespace went away with its last process.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        for socket in sockets.iter().filter(|socket| socket.state == ESTABLISHED) {
            let Some(scope) = owner.get(&socket.cgroup_id) else {
                continue;
            };
            let count = counts.entry(scope.clone()).or_default();
            count.established += 1;
            if socket.timer == TIMER_OFF {
                count.without_keepalive += 1;
            }
        }
    }
    Ok(counts)
}

/// Counts every `period` while the agent runs, for the scopes of the policy in force, into the
/// telemetry the metrics endpoint reads.
pub async fn watch(shared: metrics::Shared, mount: std::path::PathBuf, period: Duration) {
    let mut warned = false;
    loop {
        let scopes: Option<Vec<CgroupPath>> = shared.lock().ok().and_then(|telemetry| {
            let state = telemetry.state.as_ref()?;
            Some(
                state
                    .scopes
                    .iter()
                    .filter_map(|scope| CgroupPath::parse(scope).ok())
                    .collect(),
            )
        });
        let Some(scopes) = scopes else {
            // No policy yet: look again soon rather than a whole period later.
            tokio::time::sleep(period.min(Duration::from_millis(200))).await;
            continue;
        };
        let mount = mount.clone();
        let counted = tokio::task::spawn_blocking(move || count(&mount, &scopes)).await;
        match counted {
            Ok(Ok(counts)) => {
                debug!(?counts, "counted connections without keepalive");
                if let Ok(mut telemetry) = shared.lock() {
                    telemetry.missing_keepalive = Some(counts);
                }
            }
            Ok(Err(error)) if !warned => {
                warned = true;
                warn!(%error, "cannot count connections without keepalive; retrying each period");
            }
            _ => {}
        }
        tokio::time::sleep(period).await;
    }
}
