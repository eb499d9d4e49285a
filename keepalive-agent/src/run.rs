//! `keepalive-agent run`: enforce until told to stop.

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{cgroup::Cgroup, cli::RunArgs, enforcer::Enforcer};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let policy = args.policy()?;
    let host = keepalive_common::host::check()?;
    let cgroups = args
        .cgroups
        .iter()
        .map(|arg| Cgroup::resolve(&host.cgroup2_mount, arg))
        .collect::<Result<Vec<_>, _>>()?;

    // Listen before attaching, so a signal that arrives during start-up still detaches.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let mut enforcer = Enforcer::load(&policy).context("cannot load the keepalive program")?;
    forward_kernel_logs(&mut enforcer);
    for cgroup in &cgroups {
        enforcer
            .attach(cgroup)
            .with_context(|| format!("cannot enforce in cgroup {cgroup}"))?;
        info!(cgroup = %cgroup.name, id = cgroup.id, %policy, "attached");
    }

    let signal = tokio::select! {
        _ = sigint.recv() => "SIGINT",
        _ = sigterm.recv() => "SIGTERM",
    };
    info!(signal, "stopping");
    report_counters(&enforcer);
    for cgroup in enforcer.detach_all().context("cannot detach")? {
        info!(cgroup = %cgroup.name, id = cgroup.id, "detached");
    }
    Ok(())
}

/// Forwards the program's aya-log records (failed `bpf_setsockopt` calls) to our log.
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

fn report_counters(enforcer: &Enforcer) {
    match enforcer.counters() {
        Ok(counters) => {
            let summary: Vec<String> = keepalive_common::Stat::ALL
                .iter()
                .map(|stat| format!("{}={}", stat.name(), counters.get(*stat)))
                .collect();
            info!(counters = %summary.join(" "), "connections handled");
        }
        Err(error) => warn!(error = %error, "cannot read counters"),
    }
}
