//! The agent: it owns the enforcer and the state and handles typed [`Event`]s, one
//! batch at a time, on a thread of its own, and checks its attachments when none came for the
//! enforcer's health interval (its own timeout: an idle agent wakes one thread about twice a
//! second).
//! `commands::run` is the thin loop that turns signals and inotify into events, and serves the
//! metrics endpoint meanwhile: no
//! blocking work (attaching, expanding patterns, reading a policy) ever runs on it, and the
//! sweep of existing connections runs on a third thread.

mod config;
mod events;
mod reload;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use self::reload::{FileVersion, Reload, load_settled, reload, report, report_sweep};
pub use self::{
    config::Config,
    events::{Event, Signal},
};
use crate::{
    enforcer::{ApplyReport, Enforcer, Fault},
    existing::SweepJob,
    notify,
    policy::{CgroupPath, Policy},
    status::State,
    watch::Change,
};

/// A container runtime makes several cgroups in a row; short, because a new container's
/// cgroup should be covered within 20 ms among 10,000 (events that come while one is being
/// covered are taken together by the next batch anyway).
const SETTLE_CGROUPS: Duration = Duration::from_millis(2);

/// The agent: the enforcer, the state, and what it follows.
#[derive(Debug)]
pub struct Agent {
    enforcer: Enforcer,
    config: Config,
    mount: PathBuf,
    state: Option<State>,
    /// The state as last written to the state file (unchanged, it is not written again).
    written: Option<State>,
    telemetry: crate::status::Shared,
    /// The version of the file last refused: events in its directory (an editor's temporary
    /// files, a ConfigMap's symlink swap) do not read, log and count it again; SIGHUP does.
    refused: Option<FileVersion>,
    /// Attachments found missing and not put back yet (each logged once).
    faults: BTreeSet<Fault>,
    /// Where the loop watches for cgroups (they follow the policy).
    roots: watch::Sender<Vec<PathBuf>>,
    sweeps: mpsc::Sender<SweepJob>,
    /// What the engines report, and the policy as read (before its container rules are
    /// resolved against it).
    containers: crate::containers::Inventory,
    unresolved: Option<Policy>,
    /// Pods whose annotations are refused now, with the reason (each logged and counted once).
    refused_pods: BTreeSet<(String, String)>,
}

/// Where a policy's cgroups (patterns, rule cgroups) can appear.
pub fn watch_roots(mount: &std::path::Path, policy: &Policy) -> Vec<PathBuf> {
    policy
        .scopes
        .iter()
        .map(|scope| mount.join(scope.literal_prefix().relative()))
        .collect()
}

impl Agent {
    pub fn new(
        enforcer: Enforcer,
        config: Config,
        mount: PathBuf,
        telemetry: crate::status::Shared,
        roots: watch::Sender<Vec<PathBuf>>,
    ) -> Self {
        let sweeps = spawn_sweeper(telemetry.clone());
        Self {
            enforcer,
            config,
            mount,
            state: None,
            written: None,
            telemetry,
            refused: None,
            faults: BTreeSet::new(),
            roots,
            sweeps,
            containers: crate::containers::Inventory::default(),
            unresolved: None,
            refused_pods: BTreeSet::new(),
        }
    }

    /// Resolves container rules against what `inventory` holds.
    pub fn with_containers(mut self, inventory: crate::containers::Inventory) -> Self {
        self.containers = inventory;
        self
    }

    /// Remembers `policy` as read and returns it with its container rules resolved against the
    /// containers known now.
    fn resolve(&mut self, policy: &Policy) -> Policy {
        self.unresolved = Some(policy.clone());
        self.refuse_annotations(policy);
        self.containers.resolve(policy)
    }

    /// Logs and counts each pod whose annotations `policy` refuses, once per pod and reason.
    fn refuse_annotations(&mut self, policy: &Policy) {
        if policy.annotations.is_none() {
            return;
        }
        let containers = self.containers.all();
        let refused = crate::containers::refused_annotations(policy, &containers);
        let now: BTreeSet<(String, String)> = refused
            .iter()
            .map(|(pod, why)| (pod.id.clone(), why.clone()))
            .collect();
        let mut fresh = 0;
        for (pod, why) in &refused {
            if !self.refused_pods.contains(&(pod.id.clone(), why.clone())) {
                warn!(pod = pod.name, cgroup = %pod.cgroup, reason = why, "refusing the pod's keepalive annotations; it keeps what the policy gives it");
                fresh += 1;
            }
        }
        if fresh > 0
            && let Ok(mut telemetry) = self.telemetry.lock()
        {
            telemetry.agent.annotations_refused += fresh;
        }
        self.refused_pods = now;
    }

    /// Containers started, stopped or changed: applies the policy again if a rule now
    /// resolves to other cgroups.
    fn follow_containers(&mut self) {
        let Some(unresolved) = self.unresolved.clone() else {
            return;
        };
        self.refuse_annotations(&unresolved);
        let Some(current) = self.enforcer.policy() else {
            return;
        };
        let resolved = self.containers.resolve(&unresolved);
        if current == &resolved {
            return;
        }
        crate::containers::log_changes(current, &resolved);
        match self.enforcer.apply_later(&resolved) {
            Ok((applied, sweep)) => {
                if let Some(state) = &mut self.state {
                    let fresh = State::new(&resolved, &self.config.source(), applied.generation);
                    state.applied_at = fresh.applied_at;
                    state.rules = fresh.rules;
                }
                self.applied_again(&applied, sweep);
            }
            Err(failed) => error!(
                error = format!("{failed:#}"),
                "cannot apply the policy to the containers' cgroups"
            ),
        }
    }

    /// Applies the first policy, then handles events until one says stop.
    pub fn run(mut self, policy: &Policy, events: mpsc::Receiver<Event>) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let policy = &self.resolve(policy);
        let (applied, sweep) = self
            .enforcer
            .apply_later(policy)
            .context("cannot apply the policy")?;
        report(&applied, policy);
        self.state = Some(State {
            missing_features: self.enforcer.missing_features().to_vec(),
            ..State::new(policy, &self.config.source(), applied.generation)
        });
        // The count of connections without keepalive waits for the sweep queued below.
        sweeping(&self.telemetry, sweep.is_some());
        // Ready (/readyz) by the time the log says so.
        self.publish(Some(false));
        let scopes: Vec<&str> = policy.scopes.iter().map(CgroupPath::as_str).collect();
        info!(
            generation = applied.generation,
            scopes = scopes.join(" "),
            rules = policy.rules.len(),
            source = self.config.source(),
            "policy applied"
        );
        self.queue(sweep);
        notify::ready(&format!("enforcing generation {}", applied.generation));
        let interval = self.enforcer.health_interval();
        let mut next_check = Instant::now() + interval;
        loop {
            let first = match events
                .recv_timeout(next_check.saturating_duration_since(Instant::now()))
            {
                Ok(event) => event,
                Err(mpsc::RecvTimeoutError::Timeout) => Event::Tick,
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.stop(Signal::Terminate),
            };
            // Every batch checks the attachments: the next check is due an interval later.
            next_check = Instant::now() + interval;
            let mut batch = vec![first];
            while let Ok(event) = events.try_recv() {
                batch.push(event);
            }
            if let Some(signal) = batch.iter().find_map(|event| match event {
                Event::Signal(signal) if signal.stops() => Some(*signal),
                _ => None,
            }) {
                return self.stop(signal);
            }
            self.handle(&batch);
        }
    }

    /// One batch of events: the same event twice is handled once.
    fn handle(&mut self, batch: &[Event]) {
        let mut reloaded = None;
        let cgroup_changes: Vec<&Change> = batch
            .iter()
            .filter_map(|event| match event {
                Event::CgroupsChanged(change) => Some(change),
                _ => None,
            })
            .collect();
        if !cgroup_changes.is_empty() {
            changed(&self.telemetry);
            if cgroup_changes.contains(&&Change::Overflowed) {
                warn!("the cgroup watch lost events (inotify queue overflow); rescanning the tree");
                if let Ok(mut telemetry) = self.telemetry.lock() {
                    telemetry.agent.watch_overflows += 1;
                }
            }
            std::thread::sleep(SETTLE_CGROUPS);
            // Only cgroups that appeared: most often covered without walking the tree.
            let created: Option<Vec<PathBuf>> = cgroup_changes
                .iter()
                .map(|change| match change {
                    Change::Created(dirs) => Some(dirs.clone()),
                    Change::Events | Change::Overflowed => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(|lists| lists.concat());
            match created {
                Some(created) => self.cover_cgroups(&created),
                None => self.follow_cgroups(),
            }
        }
        if batch.contains(&Event::ContainersChanged) {
            self.follow_containers();
        }
        let hangup = batch.contains(&Event::Signal(Signal::Hangup));
        let file_changed = batch.contains(&Event::PolicyFileChanged);
        if hangup || file_changed {
            // Type=notify-reload: systemd waits for READY=1 after RELOADING=1.
            notify::reloading();
            reloaded = if hangup {
                self.reload("SIGHUP", false)
            } else {
                self.reload("file changed", true)
            };
        }
        let faulty = self.check_health();
        // A tick that found everything in place has nothing new to publish.
        if faulty || batch.iter().any(|event| *event != Event::Tick) {
            self.publish(reloaded);
        }
        if hangup || file_changed {
            notify::ready(&format!(
                "enforcing generation {}",
                self.enforcer.generation()
            ));
        }
    }

    /// Attaches to the cgroups in `created` the policy covers; plans again where that takes
    /// more than them ([`crate::Enforcer::cover_created`]).
    fn cover_cgroups(&mut self, created: &[PathBuf]) {
        match self.enforcer.cover_created(created) {
            Ok(Some((applied, sweep))) => {
                if !applied.attached.is_empty() {
                    self.applied_again(&applied, sweep);
                }
            }
            Ok(None) => self.follow_cgroups(),
            Err(error) => {
                // A cgroup gone while it was attached to, say: planning again sorts it out.
                debug!(
                    error = format!("{error:#}"),
                    "covering new cgroups: planning again"
                );
                self.follow_cgroups();
            }
        }
    }

    /// Attaches to new matching cgroups and forgets removed ones.
    fn follow_cgroups(&mut self) {
        match self.enforcer.refresh_later() {
            Ok(Some((applied, sweep))) => self.applied_again(&applied, sweep),
            Ok(None) => {}
            Err(error) => error!(
                error = format!("{error:#}"),
                "cannot follow the cgroup tree"
            ),
        }
    }

    fn applied_again(&mut self, applied: &ApplyReport, sweep: Option<SweepJob>) {
        changed(&self.telemetry);
        if let Some(policy) = self.enforcer.policy() {
            report(applied, policy);
        }
        if let Some(state) = &mut self.state {
            state.generation = applied.generation;
        }
        self.queue(sweep);
    }

    /// Reads and applies the policy again; returns whether it was refused (None: not read,
    /// the file is the version refused last).
    fn reload(&mut self, why: &str, skip_refused: bool) -> Option<bool> {
        let version = || self.config.file.as_deref().map(FileVersion::of);
        if skip_refused && self.refused.is_some() && self.refused == version() {
            return None;
        }
        let (loaded, read) = load_settled(&self.config);
        let previous = self.unresolved.clone();
        let loaded = loaded.map(|policy| self.resolve(&policy));
        self.refused = None;
        let state = self.state.as_mut()?;
        // The outcome is logged once published: whoever reads the log line and then asks
        // /metrics or `status` sees it counted.
        match reload(loaded, &mut self.enforcer) {
            Reload::Applied(applied) => {
                let (policy, applied, sweep) = *applied;
                *state = State {
                    reloads_succeeded: state.reloads_succeeded + 1,
                    reloads_failed: state.reloads_failed,
                    missing_features: self.enforcer.missing_features().to_vec(),
                    ..State::new(&policy, &self.config.source(), self.enforcer.generation())
                };
                self.roots.send_replace(watch_roots(&self.mount, &policy));
                self.publish(Some(false));
                info!(
                    trigger = why,
                    generation = self.enforcer.generation(),
                    rules = policy.rules.len(),
                    "policy reloaded"
                );
                report(&applied, &policy);
                self.queue(sweep);
                Some(false)
            }
            Reload::Unchanged => {
                info!(trigger = why, "policy unchanged");
                Some(false)
            }
            Reload::Refused { what, error } => {
                self.unresolved = previous;
                self.refused = read;
                state.reloads_failed += 1;
                self.publish(Some(true));
                error!(trigger = why, error, "{what}; the running policy stays");
                Some(true)
            }
        }
    }

    /// Asks the kernel whether every attachment is still there, when something may have
    /// changed; puts back what is not. What could not be put back stays a fault (not ready)
    /// and is tried again at every tick. Returns whether anything was (or still is) missing.
    fn check_health(&mut self) -> bool {
        let found = self.enforcer.faults_if_changed().unwrap_or_default();
        let new: Vec<&Fault> = found
            .iter()
            .filter(|fault| !self.faults.contains(fault))
            .collect();
        for fault in &new {
            warn!(
                program = fault.program,
                cgroup = fault.cgroup,
                fault = fault.what,
                "enforcement removed by someone else; re-attaching"
            );
        }
        let first_seen = !new.is_empty();
        self.faults.extend(found.iter().cloned());
        if self.faults.is_empty() {
            return false;
        }
        let healed = if found.is_empty() {
            // Earlier faults that could not be put back: attach what the policy wants again.
            self.enforcer.refresh_later()
        } else {
            self.enforcer.heal(&found)
        };
        match healed {
            Ok(outcome) => {
                if let Some((applied, sweep)) = outcome {
                    info!(
                        attachments = self.faults.len(),
                        generation = applied.generation,
                        "re-attached"
                    );
                    self.applied_again(&applied, sweep);
                }
                if let Ok(mut telemetry) = self.telemetry.lock() {
                    telemetry.agent.healed += u64::try_from(self.faults.len()).unwrap_or(u64::MAX);
                }
                self.faults = self.enforcer.faults().into_iter().collect();
            }
            Err(error) if first_seen => {
                error!(error = format!("{error:#}"), "cannot re-attach; retrying");
            }
            Err(_) => {}
        }
        true
    }

    fn queue(&self, sweep: Option<SweepJob>) {
        if let Some(job) = sweep {
            sweeping(&self.telemetry, true);
            let _ignored = self.sweeps.send(job);
        }
    }

    /// The state file for `status`, and the numbers for the metrics endpoint.
    fn publish(&mut self, refused: Option<bool>) {
        if let Some(state) = &mut self.state {
            state.faults = self.faults.iter().map(Fault::to_string).collect();
            if self.written.as_ref() != Some(state) {
                match state.write(&self.config.state_dir) {
                    Ok(()) => self.written = Some(state.clone()),
                    Err(error) => {
                        warn!(%error, dir = %self.config.state_dir.display(), "cannot write the state file; status will lack rule names");
                    }
                }
            }
        }
        if let Ok(mut shared) = self.telemetry.lock() {
            shared.state.clone_from(&self.state);
            shared.agent.attached_cgroups = self.enforcer.attachments().count();
            shared.program_ids = self.enforcer.program_ids();
            if let Some(refused) = refused {
                shared.agent.last_reload_ok = !refused;
            }
        }
    }

    fn stop(mut self, signal: Signal) -> anyhow::Result<()> {
        use anyhow::Context as _;
        notify::stopping();
        let pins = self.config.bpffs.join("keepalive-agent");
        if signal == Signal::HandOver {
            info!(signal = signal.name(), pins = %pins.display(), "handing over to a new agent; enforcement stays in place");
            return Ok(());
        }
        if self.config.persist {
            info!(
                signal = signal.name(),
                pins = %pins.display(),
                "stopping; enforcement stays in place (`keepalive-agent detach` removes it)"
            );
            return Ok(());
        }
        info!(signal = signal.name(), "stopping");
        for cgroup in self.enforcer.detach_all().context("cannot detach")? {
            info!(cgroup = %cgroup.name, id = cgroup.id, "detached");
        }
        State::remove(&self.config.state_dir);
        self.state = None;
        Ok(())
    }
}

/// The thread that applies policies to existing connections, in order; the jobs pending
/// are run as one ([`SweepJob::then`]).
fn spawn_sweeper(telemetry: crate::status::Shared) -> mpsc::Sender<SweepJob> {
    let (jobs, queue) = mpsc::channel::<SweepJob>();
    let spawned = std::thread::Builder::new()
        .name("sweep".into())
        .spawn(move || {
            while let Ok(first) = queue.recv() {
                let mut next = Some(first);
                while let Some(mut job) = next.take() {
                    while let Ok(newer) = queue.try_recv() {
                        job = job.then(newer);
                    }
                    report_sweep(&job.run());
                    changed(&telemetry);
                    next = queue.try_recv().ok();
                }
                sweeping(&telemetry, false);
            }
        });
    if let Err(error) = spawned {
        warn!(%error, "cannot start the sweep thread; existing connections are left as they are");
    }
    jobs
}

/// Whether a sweep of existing connections is queued or running (the count of connections
/// without keepalive waits for it).
fn sweeping(telemetry: &crate::status::Shared, sweeping: bool) {
    if let Ok(mut telemetry) = telemetry.lock() {
        telemetry.agent.sweeping = sweeping;
    }
}

/// Tells the count of connections without keepalive that what it counts may have changed.
fn changed(telemetry: &crate::status::Shared) {
    if let Ok(mut telemetry) = telemetry.lock() {
        telemetry.agent.changes = telemetry.agent.changes.wrapping_add(1);
    }
}
