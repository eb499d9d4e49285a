//! `keepalive-agent run`: enforce until told to stop; reload on SIGHUP and file changes.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    cli::RunArgs,
    enforcer::{Applied, Enforcer},
    metrics,
    notify::notify,
    policy::{CgroupPath, Policy},
    state::State,
    watch::{CgroupWatch, Watch},
};

/// How long the policy file must have been left alone before it is read (an editor or a
/// ConfigMap update is several events; a tool that truncates and then writes must not be read
/// half-way: a truncated file may still parse).
const SETTLE: Duration = Duration::from_millis(100);

/// The same for cgroups: a container runtime makes several in a row. Short, because a new
/// container's cgroup should be covered within 100 ms.
const SETTLE_CGROUPS: Duration = Duration::from_millis(10);

/// The reload trigger of an inotify event in the policy file's directory.
const FILE_CHANGED: &str = "file changed";

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let host = keepalive_common::host::check()?;
    let mount: PathBuf = host.cgroup2_mount.clone();
    // A bad policy, or a cgroup that does not exist, is refused before anything is loaded.
    let policy = args.policy(&mount)?;
    for scope in policy.scopes.iter().filter(|scope| !scope.is_pattern()) {
        crate::cgroup::Cgroup::resolve(&mount, std::path::Path::new(scope.as_str()))?;
    }

    // Listen before attaching, so a signal that arrives during start-up still detaches.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut watch = match &args.config {
        Some(path) => {
            Some(Watch::new(path).with_context(|| format!("cannot watch {}", path.display()))?)
        }
        None => None,
    };

    let telemetry = metrics::Shared::default();
    let metrics = match args.metrics_addr.as_str() {
        "none" => None,
        addr => {
            let addr = addr.parse().with_context(|| {
                format!("--metrics-addr {addr}: not an address like 127.0.0.1:9477")
            })?;
            let listener = metrics::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            info!(addr = %listener.local_addr()?, "metrics endpoint");
            Some(listener)
        }
    };
    let _stats = match args.program_stats {
        true => {
            Some(crate::enforcer::enable_run_time_stats().context("cannot turn on program stats")?)
        }
        false => None,
    };

    let mut enforcer = Enforcer::pinned(&mount, &args.places.bpffs)
        .context("cannot load the keepalive programs")?;
    for missing in enforcer.missing_features() {
        warn!(feature = %missing.feature, since = %missing.since, "{missing}");
    }
    if let (Some(listener), Some(pins)) = (metrics, enforcer.pins()) {
        tokio::spawn(metrics::serve(listener, telemetry.clone(), pins.maps()));
    }
    // Enforcement in these never stopped: an earlier agent's links now run our programs.
    for cgroup in enforcer.attachments() {
        info!(
            cgroup = %cgroup.name,
            id = cgroup.id,
            adopted = true,
            "attached (taken over from an earlier agent)"
        );
    }
    forward_kernel_logs(&mut enforcer);
    // Watch before applying: a cgroup created meanwhile is an event, not missed.
    let mut cgroups = watch_cgroups(&mount, &policy)?;
    let applied = enforcer.apply(&policy).context("cannot apply the policy")?;
    report(&applied, &policy);
    let source = args.config.as_ref().map_or_else(
        || "command line".to_string(),
        |path| path.display().to_string(),
    );
    let scopes: Vec<&str> = policy.scopes.iter().map(CgroupPath::as_str).collect();
    info!(
        generation = applied.generation,
        scopes = scopes.join(" "),
        rules = policy.rules.len(),
        source,
        "policy applied"
    );
    let mut state = State::new(&policy, &source, applied.generation);
    state.missing_features = enforcer.missing_features().to_vec();
    publish(&state, &args, &enforcer, &telemetry);
    notify(&format!(
        "READY=1\nSTATUS=enforcing generation {}",
        applied.generation
    ));

    // The version of the file last refused: events in its directory (an editor's temporary
    // files, a ConfigMap's symlink swap) do not read, log and count it again; SIGHUP does.
    let mut refused: Option<FileVersion> = None;
    let signal = loop {
        let why = tokio::select! {
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            _ = sighup.recv() => "SIGHUP",
            changed = changed(&mut watch) => {
                changed.context("watching the policy file failed")?;
                FILE_CHANGED
            }
            changed = cgroups.changed() => {
                changed.context("watching the cgroup tree failed")?;
                tokio::time::sleep(SETTLE_CGROUPS).await;
                follow_cgroups(&mut enforcer, &mut state);
                publish(&state, &args, &enforcer, &telemetry);
                continue;
            }
        };
        let version = || args.config.as_deref().map(FileVersion::of);
        if why == FILE_CHANGED && refused.is_some() && refused == version() {
            continue;
        }
        let (loaded, read) = load_settled(&args, &mount).await;
        refused = None;
        match reload(loaded, &mut enforcer, why) {
            Reload::Applied(reloaded) => {
                state = State {
                    reloads_succeeded: state.reloads_succeeded + 1,
                    reloads_failed: state.reloads_failed,
                    missing_features: enforcer.missing_features().to_vec(),
                    ..State::new(&reloaded, &source, enforcer.generation())
                };
                cgroups = watch_cgroups(&mount, &reloaded)?;
            }
            Reload::Unchanged => {}
            Reload::Refused => {
                refused = read;
                state.reloads_failed += 1;
            }
        }
        publish(&state, &args, &enforcer, &telemetry);
    };
    notify("STOPPING=1");
    if args.persist {
        info!(
            signal,
            pins = %args.places.bpffs.join("keepalive-agent").display(),
            "stopping; enforcement stays in place (`keepalive-agent detach` removes it)"
        );
        return Ok(());
    }
    info!(signal, "stopping");
    for cgroup in enforcer.detach_all().context("cannot detach")? {
        info!(cgroup = %cgroup.name, id = cgroup.id, "detached");
    }
    State::remove(&args.places.state_dir);
    Ok(())
}

/// Watches the sub-trees where the policy's cgroups (patterns, rule cgroups) can appear.
fn watch_cgroups(mount: &std::path::Path, policy: &Policy) -> anyhow::Result<CgroupWatch> {
    let roots: Vec<PathBuf> = policy
        .scopes
        .iter()
        .map(|scope| mount.join(scope.literal_prefix().relative()))
        .collect();
    CgroupWatch::new(&roots).context("cannot watch the cgroup tree")
}

/// Attaches to new matching cgroups and forgets removed ones.
fn follow_cgroups(enforcer: &mut Enforcer, state: &mut State) {
    match enforcer.refresh() {
        Ok(Some(applied)) => {
            if let Some(policy) = enforcer.policy().cloned() {
                report(&applied, &policy);
            }
            state.generation = applied.generation;
        }
        Ok(None) => {}
        Err(error) => error!(
            error = format!("{error:#}"),
            "cannot follow the cgroup tree"
        ),
    }
}

/// The state file for `status`, and the numbers for the metrics endpoint.
fn publish(state: &State, args: &RunArgs, enforcer: &Enforcer, telemetry: &metrics::Shared) {
    save(state, args);
    if let Ok(mut shared) = telemetry.lock() {
        shared.state = Some(state.clone());
        shared.attached = enforcer.attachments().count();
        shared.programs = enforcer.program_ids();
    }
}

fn save(state: &State, args: &RunArgs) {
    if let Err(error) = state.write(&args.places.state_dir) {
        warn!(%error, dir = %args.places.state_dir.display(), "cannot write the state file; status will lack rule names");
    }
}

async fn changed(watch: &mut Option<Watch>) -> std::io::Result<()> {
    match watch {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
    }
}

/// What a reload did.
enum Reload {
    Applied(Policy),
    Unchanged,
    Refused,
}

/// Reads the policy again, from a file nobody has touched for [`SETTLE`] before or after the
/// read, and not replaced during it: a writer that truncates and then writes in place is never
/// caught half-way, and the version read is known. A file rewritten without pause is read
/// after ten rounds anyway, and checked like any other (its version unknown).
async fn load_settled(
    args: &RunArgs,
    mount: &std::path::Path,
) -> (anyhow::Result<Policy>, Option<FileVersion>) {
    let Some(config) = &args.config else {
        return (args.policy(mount), None);
    };
    for _ in 0..10 {
        if let Some(wait) = unsettled(config) {
            tokio::time::sleep(wait).await;
            continue;
        }
        let before = FileVersion::of(config);
        let policy = args.policy(mount);
        if unsettled(config).is_none() && FileVersion::of(config) == before {
            return (policy, Some(before));
        }
    }
    (args.policy(mount), None)
}

/// How much longer `path` must be left alone to count as settled, if it is not yet.
fn unsettled(path: &std::path::Path) -> Option<Duration> {
    let modified = std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()?;
    let age = std::time::SystemTime::now().duration_since(modified).ok()?;
    SETTLE.checked_sub(age).filter(|wait| !wait.is_zero())
}

/// A version of a file on disk: another file renamed over it, or a write to it, is a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileVersion {
    Missing,
    At {
        dev: u64,
        ino: u64,
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
}

impl FileVersion {
    fn of(path: &std::path::Path) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        match std::fs::metadata(path) {
            Ok(meta) => Self::At {
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
            },
            Err(_) => Self::Missing,
        }
    }
}

/// Applies a policy read again; one that does not check, or does not apply, leaves the
/// running one in force.
fn reload(loaded: anyhow::Result<Policy>, enforcer: &mut Enforcer, why: &str) -> Reload {
    let policy = match loaded {
        Ok(policy) => policy,
        Err(error) => {
            error!(
                trigger = why,
                error = format!("{error:#}"),
                "policy refused; the running policy stays"
            );
            return Reload::Refused;
        }
    };
    if enforcer.policy() == Some(&policy) {
        info!(trigger = why, "policy unchanged");
        return Reload::Unchanged;
    }
    match enforcer.apply(&policy) {
        Ok(applied) => {
            info!(
                trigger = why,
                generation = applied.generation,
                rules = policy.rules.len(),
                "policy reloaded"
            );
            report(&applied, &policy);
            Reload::Applied(policy)
        }
        Err(error) => {
            error!(
                trigger = why,
                error = format!("{error:#}"),
                "policy not applied; the running policy stays"
            );
            Reload::Refused
        }
    }
}

fn report(applied: &Applied, policy: &Policy) {
    for cgroup in &applied.attached {
        info!(cgroup = %cgroup.name, id = cgroup.id, default = %policy.default, rules = policy.rules.len(), "attached");
    }
    for cgroup in &applied.detached {
        info!(cgroup = %cgroup.name, id = cgroup.id, "detached");
    }
    match &applied.existing {
        Some(Ok(sweep)) => {
            let outcomes: Vec<String> = keepalive_common::Outcome::ALL
                .iter()
                .filter(|outcome| sweep.outcomes[**outcome as usize] > 0)
                .map(|outcome| format!("{}={}", outcome.name(), sweep.outcomes[*outcome as usize]))
                .collect();
            info!(
                connections = sweep.connections,
                outcomes = outcomes.join(" "),
                unreachable = sweep.unreachable,
                namespaces = sweep.namespaces,
                "existing connections"
            );
        }
        Some(Err(error)) => {
            warn!(%error, "existing connections could not be updated; new ones are")
        }
        None => {}
    }
    for (rule, cgroup) in &applied.missing {
        warn!(rule, cgroup = %cgroup, "cgroup does not exist (yet); it is covered as soon as it does");
    }
    for sentence in &applied.unsupported {
        warn!("{sentence}");
    }
}

/// Forwards the programs' aya-log records (failed `bpf_setsockopt` calls) to our log.
fn forward_kernel_logs(enforcer: &mut Enforcer) {
    let logger = match enforcer.logger() {
        Ok(logger) => logger,
        Err(error) => {
            warn!(%error, "kernel-side log records will not be shown");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer map fd; flushing neither closes nor replaces it.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(error) => {
            warn!(error = %error, "kernel-side log records will not be shown");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
