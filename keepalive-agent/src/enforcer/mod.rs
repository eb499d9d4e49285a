//! The loaded programs, their attachments and their maps; applying a policy atomically.

pub mod features;
mod health;
mod hierarchy;
mod links;
mod maps;
mod stats;

pub use features::MissingFeature;
pub use health::Fault;
pub use maps::PinnedMaps;
pub use stats::{Counters, Outcomes, ProgramStats, enable_run_time_stats};

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapError,
    programs::{CgroupSockopt, ProgramError, SockOps},
};
use keepalive_common::{AttachRecord, PROGRAM_NAME, SETSOCKOPT_PROGRAM, STAGE, Stage};

use self::links::{Attachment, Kind, SETSOCKOPT, SOCK_OPS};
use crate::{
    bpffs::{BpffsError, PinDir},
    cgroup::{Cgroup, CgroupError},
    compile::{CompileError, Tables, compile},
    existing::{Sweep, SweepJob},
    plan::Plan,
    policy::{CgroupPath, Policy},
};
/// The compiled programs, built by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keepalive"));

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error("cannot load the eBPF object")]
    Load(#[source] EbpfError),
    #[error(
        "cannot load the eBPF object, and RLIMIT_MEMLOCK could not be raised ({memlock}): \
         kernels before 5.11 charge BPF maps to it; give the agent CAP_SYS_RESOURCE or run it \
         with LimitMEMLOCK=infinity (systemd) / ulimit -l unlimited"
    )]
    Memlock {
        memlock: String,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("the kernel refused program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    /// A cgroup the policy names (enforced, or a rule's) that cannot be read.
    #[error("cgroup {cgroup}")]
    Cgroup {
        cgroup: CgroupPath,
        #[source]
        source: CgroupError,
    },
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("cannot open cgroup {cgroup}")]
    OpenCgroup {
        cgroup: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach {program} to cgroup {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot detach {program} from cgroup {cgroup}")]
    Detach {
        program: &'static str,
        cgroup: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
}

/// What an [`Enforcer::apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub generation: u32,
    /// Cgroups newly attached to.
    pub attached: Vec<Cgroup>,
    /// Cgroups no longer attached to.
    pub detached: Vec<Cgroup>,
    /// Rules whose cgroup does not exist (now): (rule name, cgroup). They take effect once the
    /// policy is applied again with the cgroup present.
    pub missing: Vec<(String, CgroupPath)>,
    /// The connections that already existed, when the policy asks for them: what was done, or
    /// why the sweep failed (the policy is in force for new connections either way).
    pub existing: Option<Result<Sweep, String>>,
    /// Rules whose mode this kernel cannot carry out ([`Enforcer::unsupported`]).
    pub unsupported: Vec<String>,
}

/// The programs loaded into the kernel and the policy they enforce.
///
/// Unpinned (`new`), dropping it detaches everything: the links are descriptors it owns.
/// Pinned (`pinned`), links and maps live in bpffs and outlive it; [`Self::detach_all`] removes
/// them.
#[derive(Debug)]
pub struct Enforcer {
    ebpf: Ebpf,
    mount: PathBuf,
    pins: Option<PinDir>,
    sock_ops: BTreeMap<CgroupPath, Attachment>,
    setsockopt: BTreeMap<CgroupPath, Attachment>,
    current: Option<(Policy, Tables)>,
    generation: u32,
    /// Optional parts this kernel refused; the rest works without them.
    missing: Vec<MissingFeature>,
}

impl Enforcer {
    /// Loads the programs, unpinned; nothing is attached until [`Self::apply`].
    pub fn new(cgroup2_mount: &Path) -> Result<Self, EnforcerError> {
        Self::with_stage(cgroup2_mount, Stage::Full)
    }

    /// Loads programs that stop after `stage`, for benchmarks that measure what each step
    /// costs. Only [`Stage::Full`] enforces anything.
    pub fn with_stage(cgroup2_mount: &Path, stage: Stage) -> Result<Self, EnforcerError> {
        Self::load(cgroup2_mount, stage, None)
    }

    /// Loads the programs with their maps and links pinned under `<bpffs>/keepalive-agent`
    /// (mounting bpffs there if needed), and takes over what an earlier agent pinned: its links
    /// get these programs (an atomic swap; enforcement never stops) and its policy stays in
    /// force until [`Self::apply`].
    pub fn pinned(cgroup2_mount: &Path, bpffs: &Path) -> Result<Self, EnforcerError> {
        let pins = PinDir::prepare(bpffs)?;
        let mut enforcer = Self::load(cgroup2_mount, Stage::Full, Some(pins))?;
        enforcer.adopt()?;
        Ok(enforcer)
    }

    fn load(
        cgroup2_mount: &Path,
        stage: Stage,
        pins: Option<PinDir>,
    ) -> Result<Self, EnforcerError> {
        let stage = stage as u32;
        // The kernel side's log level is a load-time constant: statements above it are removed
        // by the verifier. Debug (per-connection events) only when our log shows debug.
        let kernel_log: u8 = if log::max_level() >= log::LevelFilter::Debug {
            4
        } else {
            2
        };
        let mut loader = EbpfLoader::new();
        loader.override_global(STAGE, &stage, true);
        loader.override_global(aya_log::LEVEL, &kernel_log, false);
        if let Some(pins) = &pins {
            for name in maps::PINNED {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        // Kernels before 5.11 charge maps to RLIMIT_MEMLOCK; newer ones ignore it, so a refusal
        // (no CAP_SYS_RESOURCE) only matters if the maps then fail to load.
        let memlock = features::raise_memlock_limit();
        let mut ebpf = loader
            .load(PROGRAM_OBJECT)
            .map_err(|error| match &memlock {
                Ok(()) => EnforcerError::Load(error),
                Err(memlock) => EnforcerError::Memlock {
                    memlock: memlock.to_string(),
                    source: Box::new(error),
                },
            })?;
        sock_ops(&mut ebpf)?
            .load()
            .map_err(program_error(PROGRAM_NAME))?;
        let mut missing = Vec::new();
        if let Err(error) = setsockopt(&mut ebpf)?.load() {
            missing.push(MissingFeature::lock(&error));
        }
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        missing.extend(MissingFeature::reads(release.trim()));
        maps::set_agent_pid(&mut ebpf)?;
        Ok(Self {
            ebpf,
            mount: cgroup2_mount.to_path_buf(),
            pins,
            sock_ops: BTreeMap::new(),
            setsockopt: BTreeMap::new(),
            current: None,
            generation: 0,
            missing,
        })
    }

    /// The optional parts this kernel refused to load, each with what follows.
    pub fn missing_features(&self) -> &[MissingFeature] {
        &self.missing
    }

    /// The policy in force applied again (cgroups came or went, an attachment was put back):
    /// what it cannot do on this kernel was said when it was first applied.
    pub(crate) fn reapply(
        &mut self,
        policy: &Policy,
    ) -> Result<(Applied, Option<SweepJob>), EnforcerError> {
        let (applied, sweep) = self.apply_later(policy)?;
        Ok((
            Applied {
                unsupported: Vec::new(),
                ..applied
            },
            sweep,
        ))
    }

    /// One sentence per rule of `policy` (the default first) that this kernel cannot carry out
    /// whole ([`features::unsupported`]).
    pub fn unsupported(&self, policy: &Policy) -> Vec<String> {
        features::unsupported(policy, &self.missing)
    }

    /// Whether this kernel refused `feature` ([`features::LOCK`], [`features::READS`]).
    pub fn lacks(&self, feature: &str) -> bool {
        features::lacks(&self.missing, feature)
    }

    /// Whether the lock (the cgroup/setsockopt hook holding applications to locked rules)
    /// loaded on this kernel.
    pub fn has_lock(&self) -> bool {
        !self.lacks(features::LOCK)
    }

    /// Takes over the links an earlier agent pinned; forgets those of removed cgroups.
    fn adopt(&mut self) -> Result<(), EnforcerError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        let by_id = crate::cgroup::by_id(&self.mount);
        for (pin_name, id, pin) in pins.pinned_links() {
            let kind = match pin_name.as_str() {
                "sockops" => SOCK_OPS,
                "setsockopt" if self.has_lock() => SETSOCKOPT,
                _ => continue,
            };
            let cgroup = by_id
                .get(&id)
                .and_then(|path| Cgroup::resolve(&self.mount, path).ok());
            let Some(cgroup) = cgroup else {
                // The cgroup is gone, and with it the attachment: drop the pin.
                let _ignored = std::fs::remove_file(&pin);
                continue;
            };
            let Ok(path) = CgroupPath::parse(&cgroup.name) else {
                continue;
            };
            let attachment = Attachment::adopt(kind, self.program_fd(kind)?, cgroup, pin)?;
            self.attachments_mut(kind).insert(path, attachment);
        }
        self.generation = maps::cgroup_records(&self.ebpf)?
            .iter()
            .map(|(_, record)| record.generation)
            .max()
            .unwrap_or(0);
        Ok(())
    }

    /// The policy in force, if this agent applied one.
    pub fn policy(&self) -> Option<&Policy> {
        self.current.as_ref().map(|(policy, _)| policy)
    }

    /// The tables of the policy in force.
    pub fn tables(&self) -> Option<&Tables> {
        self.current.as_ref().map(|(_, tables)| tables)
    }

    /// The generation of the policy in force.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The pin directory, when pinned.
    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// The cgroups the sock_ops program is attached to.
    pub fn attachments(&self) -> impl Iterator<Item = &Cgroup> {
        self.sock_ops.values().map(|attachment| &attachment.cgroup)
    }

    /// Makes `policy` the one in force.
    ///
    /// Nothing changes unless it compiles and fits. The new generation's lookup entries go in
    /// beside the old ones, then each attachment's record is replaced (one atomic update each:
    /// a connection is decided from one record, so it sees the old or the new policy whole),
    /// then attachments no longer needed go, then every entry of other generations.
    pub fn apply(&mut self, policy: &Policy) -> Result<Applied, EnforcerError> {
        let (mut report, sweep) = self.apply_later(policy)?;
        report.existing = sweep.map(|job| job.run());
        Ok(report)
    }

    /// [`Self::apply`], leaving the sweep of existing connections (when the policy asks for
    /// it) to the caller: `existing` is None and the job is returned.
    pub fn apply_later(
        &mut self,
        policy: &Policy,
    ) -> Result<(Applied, Option<SweepJob>), EnforcerError> {
        let plan = self.plan(policy)?;
        let generation = self.generation.wrapping_add(1);
        let tables = compile(policy, &plan.paths(), generation)?;
        let Plan {
            attachments: points,
            enforced: scopes,
            missing,
        } = plan;

        let mut keep: BTreeSet<u32> = self
            .tables()
            .map(|old| {
                old.attachments
                    .values()
                    .map(|record| record.ruleset)
                    .collect()
            })
            .unwrap_or_default();
        if let Err(error) = maps::insert_entries(&mut self.ebpf, &tables) {
            // What went in is unreachable (no record points at it); take it out again.
            let _ignored = maps::prune_entries(&mut self.ebpf, &keep);
            return Err(error);
        }
        let mut report = Applied {
            generation,
            missing,
            unsupported: self.unsupported(policy),
            ..Applied::default()
        };
        // Deepest first: a new nested attachment starts zeroed and defers to its ancestors,
        // which still hold a whole (old) policy until their own record is replaced.
        let mut ordered: Vec<(&CgroupPath, &Cgroup)> = points.iter().collect();
        ordered.sort_by_key(|(path, _)| std::cmp::Reverse(path.depth()));
        for (path, cgroup) in ordered {
            if !self.sock_ops.contains_key(path) {
                let attachment = Attachment::create(
                    SOCK_OPS,
                    self.program_fd(SOCK_OPS)?,
                    cgroup,
                    self.pins.as_ref(),
                )?;
                self.sock_ops.insert(path.clone(), attachment);
                report.attached.push(cgroup.clone());
            }
            maps::write_record(&mut self.ebpf, cgroup.id, &tables.attachments[path])?;
        }
        if self.has_lock() {
            self.sync(SETSOCKOPT, &scopes)?;
        }
        report.detached = self.sync(SOCK_OPS, &points)?;
        keep = tables
            .attachments
            .values()
            .map(|record| record.ruleset)
            .collect();
        maps::prune_entries(&mut self.ebpf, &keep)?;
        maps::prune_cgroups(
            &mut self.ebpf,
            &points.values().map(|cgroup| cgroup.id).collect(),
        )?;
        self.current = Some((policy.clone(), tables));
        self.generation = generation;
        let sweep = policy.existing.then(|| SweepJob {
            policy: policy.clone(),
            mount: self.mount.clone(),
            scopes: scopes.into_values().collect(),
        });
        Ok((report, sweep))
    }

    /// Detaches everything and, when pinned, removes the pins; new connections are no longer
    /// touched.
    pub fn detach_all(&mut self) -> Result<Vec<Cgroup>, EnforcerError> {
        self.sync(SETSOCKOPT, &BTreeMap::new())?;
        let detached = self.sync(SOCK_OPS, &BTreeMap::new())?;
        maps::prune_entries(&mut self.ebpf, &BTreeSet::new())?;
        maps::prune_cgroups(&mut self.ebpf, &BTreeSet::new())?;
        if let Some(pins) = &self.pins {
            pins.remove().map_err(|error| {
                EnforcerError::Bpffs(BpffsError::Io {
                    path: pins.root.clone(),
                    error,
                })
            })?;
        }
        self.current = None;
        Ok(detached)
    }

    /// The record the sock_ops program reads at the attachment to this cgroup.
    pub fn record(&self, cgroup_id: u64) -> Result<AttachRecord, EnforcerError> {
        maps::record(&self.ebpf, cgroup_id)
    }

    /// The global counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, EnforcerError> {
        maps::counters(&self.ebpf)
    }

    /// The outcomes counted in a rule slot (0: the default; `i + 1`: rule `i`), summed over
    /// CPUs.
    pub fn outcomes(&self, slot: u32) -> Result<Outcomes, EnforcerError> {
        maps::outcomes(&self.ebpf, slot)
    }

    /// Run count and run time of the sock_ops program as the kernel accounts them.
    pub fn program_stats(&self) -> Result<ProgramStats, EnforcerError> {
        let program: &SockOps = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or(EnforcerError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(program_error(PROGRAM_NAME))?;
        let info = program.info().map_err(program_error(PROGRAM_NAME))?;
        Ok(ProgramStats {
            id: info.id(),
            run_count: info.run_count(),
            run_time: info.run_time(),
        })
    }

    /// Starts forwarding the programs' aya-log records to the `log` crate.
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    /// Ids of the loaded programs.
    pub fn program_ids(&self) -> Vec<u32> {
        [PROGRAM_NAME, SETSOCKOPT_PROGRAM]
            .into_iter()
            .filter_map(|name| self.ebpf.program(name)?.info().ok())
            .map(|info| info.id())
            .collect()
    }

    fn program_fd(&self, kind: Kind) -> Result<BorrowedFd<'_>, EnforcerError> {
        let program = self
            .ebpf
            .program(kind.program)
            .ok_or(EnforcerError::Missing(kind.program))?;
        program
            .fd()
            .map(|fd| fd.as_fd())
            .map_err(program_error(kind.program))
    }

    fn attachments_of(&self, kind: Kind) -> &BTreeMap<CgroupPath, Attachment> {
        if kind == SOCK_OPS {
            &self.sock_ops
        } else {
            &self.setsockopt
        }
    }

    fn attachments_mut(&mut self, kind: Kind) -> &mut BTreeMap<CgroupPath, Attachment> {
        if kind == SOCK_OPS {
            &mut self.sock_ops
        } else {
            &mut self.setsockopt
        }
    }

    /// Attaches `kind` to exactly `wanted`: new cgroups get a link, others lose theirs.
    fn sync(
        &mut self,
        kind: Kind,
        wanted: &BTreeMap<CgroupPath, Cgroup>,
    ) -> Result<Vec<Cgroup>, EnforcerError> {
        let stale: Vec<CgroupPath> = self
            .attachments_mut(kind)
            .keys()
            .filter(|path| !wanted.contains_key(*path))
            .cloned()
            .collect();
        let mut detached = Vec::with_capacity(stale.len());
        for path in stale {
            if let Some(attachment) = self.attachments_mut(kind).remove(&path) {
                detached.push(attachment.detach(kind)?);
            }
        }
        for (path, cgroup) in wanted {
            if !self.attachments_mut(kind).contains_key(path) {
                let attachment =
                    Attachment::create(kind, self.program_fd(kind)?, cgroup, self.pins.as_ref())?;
                self.attachments_mut(kind).insert(path.clone(), attachment);
            }
        }
        Ok(detached)
    }

    /// Applies the policy in force again if the cgroups it covers changed (a cgroup matching a
    /// pattern or named by a rule appeared, or one went). `None`: nothing to do.
    pub fn refresh(&mut self) -> Result<Option<Applied>, EnforcerError> {
        let refreshed = self.refresh_later()?;
        Ok(refreshed.map(|(mut report, sweep)| {
            report.existing = sweep.map(|job| job.run());
            report
        }))
    }

    /// [`Self::refresh`], leaving the sweep to the caller as [`Self::apply_later`] does.
    pub fn refresh_later(&mut self) -> Result<Option<(Applied, Option<SweepJob>)>, EnforcerError> {
        let Some((policy, _)) = &self.current else {
            return Ok(None);
        };
        let plan = self.plan(policy)?;
        let same = |ours: &BTreeMap<CgroupPath, Attachment>,
                    wanted: &BTreeMap<CgroupPath, Cgroup>| {
            ours.len() == wanted.len()
                && ours.iter().all(|(path, attachment)| {
                    wanted
                        .get(path)
                        .is_some_and(|cgroup| cgroup.id == attachment.cgroup.id)
                })
        };
        if same(&self.sock_ops, &plan.attachments)
            && (!self.has_lock() || same(&self.setsockopt, &plan.enforced))
        {
            return Ok(None);
        }
        let policy = policy.clone();
        self.reapply(&policy).map(Some)
    }
}

fn program_error(program: &'static str) -> impl FnOnce(ProgramError) -> EnforcerError {
    move |source| EnforcerError::Program { program, source }
}

fn sock_ops(ebpf: &mut Ebpf) -> Result<&mut SockOps, EnforcerError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or(EnforcerError::Missing(PROGRAM_NAME))?
        .try_into()
        .map_err(program_error(PROGRAM_NAME))
}

fn setsockopt(ebpf: &mut Ebpf) -> Result<&mut CgroupSockopt, EnforcerError> {
    ebpf.program_mut(SETSOCKOPT_PROGRAM)
        .ok_or(EnforcerError::Missing(SETSOCKOPT_PROGRAM))?
        .try_into()
        .map_err(program_error(SETSOCKOPT_PROGRAM))
}
