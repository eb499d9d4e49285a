//! `keepalive-agent run`: start-up, then the thin event loop. Signals, the policy file's and the
//! cgroup tree's inotify watches and a health timer become [`Event`]s for the agent
//! ([`crate::agent::Agent`]), which runs on a thread of its own; this loop and the metrics
//! endpoint never wait for it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal as Stream, SignalKind, signal},
    sync::watch,
};
use tracing::{info, warn};

use crate::{
    agent::{Agent, Config, Event, Signal, watch_roots},
    bpffs::PinDir,
    cli::{ExistingVia, RunArgs},
    enforcer::Enforcer,
    instance::{HAND_OVER_TIMEOUT, InstanceLock},
    metrics, notify,
    policy::Values,
    watch::{CgroupWatch, Watch},
};

/// The signals the agent handles.
struct Signals {
    interrupt: Stream,
    terminate: Stream,
    hangup: Stream,
    hand_over: Stream,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        let on = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot handle {name}"))
        };
        Ok(Self {
            interrupt: on(SignalKind::interrupt(), "SIGINT")?,
            terminate: on(SignalKind::terminate(), "SIGTERM")?,
            hangup: on(SignalKind::hangup(), "SIGHUP")?,
            hand_over: on(SignalKind::user_defined2(), "SIGUSR2")?,
        })
    }

    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Interrupt,
            _ = self.terminate.recv() => Signal::Terminate,
            _ = self.hangup.recv() => Signal::Hangup,
            _ = self.hand_over.recv() => Signal::HandOver,
        }
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let host = keepalive_common::host::check()?;
    let mount: PathBuf = host.cgroup2_mount.clone();
    // A bad policy, or a cgroup that does not exist, is refused before anything is loaded.
    let config = config(&args, &mount)?;
    let policy = config.policy()?;
    for scope in policy.scopes.iter().filter(|scope| !scope.is_pattern()) {
        crate::cgroup::Cgroup::find(&mount, Path::new(scope.as_str()))?;
    }
    let _lock = lock(&args)?;

    // Listen before attaching, so a signal that arrives during start-up still detaches.
    let mut signals = Signals::new()?;
    let mut file = match &args.config {
        Some(path) => {
            Some(Watch::new(path).with_context(|| format!("cannot watch {}", path.display()))?)
        }
        None => None,
    };
    let telemetry = crate::status::Shared::default();
    let listener = bind(&args).await?;
    let _stats = match args.program_stats {
        true => {
            Some(crate::enforcer::enable_run_time_stats().context("cannot turn on program stats")?)
        }
        false => None,
    };

    let enforcer = load(&args, &mount, listener, &telemetry)?;
    // Watch before applying: a cgroup created meanwhile is an event, not missed.
    let (roots, mut new_roots) = watch::channel(watch_roots(&mount, &policy));
    let mut cgroups =
        CgroupWatch::new(&new_roots.borrow_and_update()).context("cannot watch the cgroup tree")?;

    let (events, queue) = std::sync::mpsc::channel();
    let inventory = crate::containers::Inventory::default();
    let containers_changed = events.clone();
    crate::containers::spawn(
        &args.engines.sockets(),
        &inventory,
        std::sync::Arc::new(move |_changed| {
            let _ignored = containers_changed.send(Event::ContainersChanged);
        }),
    );
    let agent = Agent::new(enforcer, config, mount, telemetry, roots).with_containers(inventory);
    let mut agent_thread = tokio::task::spawn_blocking(move || agent.run(&policy, queue));
    let mut watchdog = notify::Watchdog::from_env();
    loop {
        let event = tokio::select! {
            signal = signals.recv() => Event::Signal(signal),
            changed = changed(&mut file) => {
                changed.context("watching the policy file failed")?;
                Event::PolicyFileChanged
            }
            changed = cgroups.changed() => {
                Event::CgroupsChanged(changed.context("watching the cgroup tree failed")?)
            }
            Ok(()) = new_roots.changed() => {
                // The policy moved: watch where its cgroups can appear now, then look once
                // (some may have appeared before the watch).
                cgroups = CgroupWatch::new(&new_roots.borrow_and_update())
                    .context("cannot watch the cgroup tree")?;
                Event::CgroupsChanged(crate::watch::Change::Events)
            }
            // The loop turning is what the service manager's watchdog checks.
            () = watchdog.ping() => continue,
            ended = &mut agent_thread => return ended.context("the agent failed")?,
        };
        let stop = matches!(event, Event::Signal(signal) if signal.stops());
        if events.send(event).is_err() || stop {
            break;
        }
    }
    agent_thread.await.context("the agent failed")?
}

/// The agent's [`Config`] from the command line: the cgroups named read once, here.
pub fn config(args: &RunArgs, mount: &Path) -> anyhow::Result<Config> {
    Ok(Config {
        file: args.config.clone(),
        values: Values {
            idle_secs: args.idle,
            interval_secs: args.interval,
            count: args.count,
            user_timeout_ms: args.user_timeout,
        },
        scopes: args
            .cgroups
            .iter()
            .map(|arg| crate::cgroup::named(mount, arg))
            .collect::<Result<_, _>>()?,
        no_existing: args.no_existing,
        persist: args.persist,
        bpffs: args.places.bpffs.clone(),
        state_dir: args.places.state_dir.clone(),
    })
}

/// The programs loaded (or taken over from an earlier agent's pins), the metrics endpoint and
/// the count of connections without keepalive served from their maps, and the kernel's log
/// records forwarded.
fn load(
    args: &RunArgs,
    mount: &Path,
    listener: Option<tokio::net::TcpListener>,
    telemetry: &crate::status::Shared,
) -> anyhow::Result<Enforcer> {
    // The sweep program only where existing connections may go through it.
    let in_kernel_sweeps = !args.no_existing && args.existing_via != ExistingVia::Descriptors;
    let mut enforcer = Enforcer::pinned_sweeping(mount, &args.places.bpffs, in_kernel_sweeps)
        .context("cannot load the keepalive programs")?;
    for missing in enforcer.missing_features() {
        warn!(feature = %missing.feature, since = %missing.since, "{missing}");
    }
    match args.existing_via {
        ExistingVia::Auto => {}
        ExistingVia::Descriptors => enforcer.sweep_with_descriptors(),
        ExistingVia::Iterator if in_kernel_sweeps && !enforcer.sweeps_in_kernel() => anyhow::bail!(
            "--existing-via iterator: this kernel refused the iterator program (see the \
             warning above); use --existing-via auto or descriptors"
        ),
        ExistingVia::Iterator => {}
    }
    if let (Some(listener), Some(pins)) = (listener, enforcer.pins()) {
        tokio::spawn(metrics::serve(listener, telemetry.clone(), pins.maps()));
        if args.missing_interval > 0 {
            let period = std::time::Duration::from_secs(args.missing_interval);
            tokio::spawn(crate::status::count_without_keepalive(
                telemetry.clone(),
                mount.to_path_buf(),
                period,
                enforcer.connection_counter(),
                pins.maps(),
            ));
        }
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
    if let Some(events) = enforcer.take_end_events() {
        tokio::spawn(crate::ends::follow(events, telemetry.clone()));
    }
    Ok(enforcer)
}

/// The single-instance lock on the pin directory; with --take-over, the running agent is asked
/// to hand over first.
fn lock(args: &RunArgs) -> anyhow::Result<InstanceLock> {
    let pins = PinDir::prepare(&args.places.bpffs)?;
    if !args.take_over {
        return Ok(InstanceLock::acquire(&pins.root)?);
    }
    let (lock, pid) = InstanceLock::replace(&pins.root, libc::SIGUSR2, HAND_OVER_TIMEOUT)?;
    if let Some(pid) = pid {
        info!(pid, "the running agent handed over");
    }
    match lock {
        Some(lock) => Ok(lock),
        // It removed its pins as it went (it was stopping anyway): start afresh.
        None => Ok(InstanceLock::acquire(
            &PinDir::prepare(&args.places.bpffs)?.root,
        )?),
    }
}

async fn bind(args: &RunArgs) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = args.metrics_addr() else {
        return Ok(None);
    };
    let listener = metrics::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    info!(addr = %listener.local_addr()?, "metrics endpoint");
    Ok(Some(listener))
}

async fn changed(watch: &mut Option<Watch>) -> std::io::Result<()> {
    match watch {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
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
