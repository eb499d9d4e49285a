//! The loaded programs, their attachments and their maps; applying a policy atomically.
//!
//! Modules: [`load`] loads the programs and takes over an earlier agent's pins; [`apply`] makes
//! a policy the one in force; [`follow`] brings it to cgroups that came or went, touching only
//! them; [`hierarchy`] is the mounted cgroup hierarchy the attach-point
//! planner ([`crate::plan`]) works on; [`links`] the attachments; [`maps`] the maps; [`health`]
//! puts back what someone else removed, [`changes`] tells it when to look; [`features`] what
//! this kernel lacks.

mod apply;
mod changes;
pub mod features;
mod follow;
mod health;
mod hierarchy;
mod links;
mod load;
mod maps;
mod stats;

pub use features::MissingFeature;
pub use health::Fault;
pub use maps::PinnedMaps;
pub use stats::{Counters, Ends, Outcomes, ProgramStats, enable_run_time_stats};

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, BorrowedFd},
    path::PathBuf,
    sync::Arc,
};

use aya::{
    Ebpf, EbpfError,
    maps::MapError,
    programs::{ProgramError, SockOps},
};
use keepalive_common::{AttachRecord, PROGRAM_NAME, SETSOCKOPT_PROGRAM, SWEEP_PROGRAM};

use self::links::{Attachment, Hook, SOCK_OPS};
use crate::{
    bpffs::{BpffsError, PinDir},
    cgroup::{Cgroup, CgroupError},
    compile::{CompileError, Tables},
    existing::{Sweep, iterator::IteratorSweep},
    policy::{CgroupPath, Policy},
};

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
pub struct ApplyReport {
    pub generation: u32,
    /// Cgroups newly attached to.
    pub attached: Vec<Cgroup>,
    /// Cgroups no longer attached to.
    pub detached: Vec<Cgroup>,
    /// Rules whose cgroup does not exist (now): (rule name, cgroup). They take effect once the
    /// policy is applied again with the cgroup present.
    pub absent: Vec<(String, CgroupPath)>,
    /// The connections that already existed, when the policy asks for them: what was done, or
    /// why the sweep failed (the policy is in force for new connections either way).
    pub existing: Option<Result<Sweep, String>>,
    /// Rules whose mode this kernel cannot carry out ([`Enforcer::unsupported`]).
    pub unsupported: Vec<String>,
}

/// The programs loaded into the kernel and the policy they enforce.
///
/// Unpinned (`with_stage`), dropping it detaches everything: the links are descriptors it owns.
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
    missing_features: Vec<MissingFeature>,
    /// The in-kernel path for existing connections, unless this kernel refused it.
    iterator: Option<Arc<IteratorSweep>>,
    /// The count of connections without keepalive through the kernel, unless this kernel
    /// refused it.
    counter: Option<Arc<crate::without_keepalive::CountIterator>>,
    /// Whether an attachment may have changed behind our back since the last health check.
    changes: changes::Changes,
}

impl Enforcer {
    /// The optional parts this kernel refused to load, each with what follows.
    pub fn missing_features(&self) -> &[MissingFeature] {
        &self.missing_features
    }

    /// One sentence per rule of `policy` (the default first) that this kernel cannot carry out
    /// whole ([`features::unsupported`]).
    pub fn unsupported(&self, policy: &Policy) -> Vec<String> {
        features::unsupported(policy, &self.missing_features)
    }

    /// Whether this kernel refused `feature` ([`features::LOCK`], [`features::READS`]).
    pub fn lacks(&self, feature: &str) -> bool {
        features::lacks(&self.missing_features, feature)
    }

    /// Whether the lock (the cgroup/setsockopt hook holding applications to locked rules)
    /// loaded on this kernel.
    pub fn has_lock(&self) -> bool {
        !self.lacks(features::LOCK)
    }

    /// Existing connections go through descriptors (pidfd_getfd) even where the kernel offers
    /// the iterator.
    pub fn sweep_with_descriptors(&mut self) {
        self.iterator = None;
    }

    /// Whether existing connections are updated in the kernel (the iterator loaded and is used).
    pub fn sweeps_in_kernel(&self) -> bool {
        self.iterator.is_some()
    }

    /// The count iterator for the gauge of connections without keepalive (None: it counts
    /// with inet_diag).
    pub fn connection_counter(&self) -> Option<Arc<crate::without_keepalive::CountIterator>> {
        self.counter.clone()
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

    /// The ring buffer the kernel reports connection failures on; None where ends are not
    /// followed on this kernel (or it was taken already).
    pub fn take_end_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        if features::lacks(&self.missing_features, features::ENDS) {
            return None;
        }
        let map = self.ebpf.take_map(keepalive_common::ends::END_EVENTS_MAP)?;
        aya::maps::RingBuf::try_from(map).ok()
    }

    /// Ids of the loaded programs.
    pub fn program_ids(&self) -> Vec<u32> {
        [PROGRAM_NAME, SETSOCKOPT_PROGRAM, SWEEP_PROGRAM]
            .into_iter()
            .filter_map(|name| self.ebpf.program(name)?.info().ok())
            .map(|info| info.id())
            .collect()
    }

    fn program_fd(&self, hook: Hook) -> Result<BorrowedFd<'_>, EnforcerError> {
        let program = self
            .ebpf
            .program(hook.program)
            .ok_or(EnforcerError::Missing(hook.program))?;
        program
            .fd()
            .map(|fd| fd.as_fd())
            .map_err(program_error(hook.program))
    }

    fn attachments_of(&self, hook: Hook) -> &BTreeMap<CgroupPath, Attachment> {
        if hook == SOCK_OPS {
            &self.sock_ops
        } else {
            &self.setsockopt
        }
    }

    fn attachments_mut(&mut self, hook: Hook) -> &mut BTreeMap<CgroupPath, Attachment> {
        if hook == SOCK_OPS {
            &mut self.sock_ops
        } else {
            &mut self.setsockopt
        }
    }
}

fn program_error(program: &'static str) -> impl FnOnce(ProgramError) -> EnforcerError {
    move |source| EnforcerError::Program { program, source }
}
