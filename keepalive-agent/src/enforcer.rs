//! The loaded program, its attachments and its maps.
#![expect(
    deprecated,
    reason = "cgroup storage (BPF_MAP_TYPE_CGROUP_STORAGE) is per attachment, which the policy needs"
)]

use std::{collections::BTreeMap, fs::File, time::Duration};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{CgroupStorage, CgroupStorageKey, MapData, MapError, PerCpuArray},
    programs::{ProgramError, SockOps, links::CgroupAttachMode, sock_ops::SockOpsLinkId},
};
use keepalive_common::{
    ATTACH_MAP, INITIAL_POLICY, PROGRAM_NAME, PolicyRecord, STAGE, STATS_MAP, Stage, Stat,
    sock_ops::ATTACH_TYPE,
};

use crate::{
    cgroup::Cgroup,
    policy::{OutOfRange, Policy},
};

/// The compiled sock_ops object, built by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keepalive"));

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error(transparent)]
    Policy(#[from] OutOfRange),
    #[error("cannot load the eBPF object")]
    Load(#[source] EbpfError),
    #[error("the kernel refused the sock_ops program")]
    Program(#[source] ProgramError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open cgroup {cgroup}")]
    OpenCgroup {
        cgroup: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach to cgroup {cgroup}")]
    Attach {
        cgroup: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot detach from cgroup {cgroup}")]
    Detach {
        cgroup: String,
        #[source]
        source: ProgramError,
    },
    #[error("already attached to cgroup {0}")]
    AlreadyAttached(String),
}

/// Counters summed over CPUs, in [`Stat`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; Stat::COUNT as usize]);

impl Counters {
    pub fn get(&self, stat: Stat) -> u64 {
        self.0[stat as usize]
    }
}

/// The kernel's own accounting of the program (with `kernel.bpf_stats_enabled=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    pub id: u32,
    pub run_count: u64,
    pub run_time: Duration,
}

/// The sock_ops program loaded into the kernel, attached to zero or more cgroups.
///
/// Dropping it detaches every attachment (the links are file descriptors it owns).
#[derive(Debug)]
pub struct Enforcer {
    ebpf: Ebpf,
    attachments: BTreeMap<u64, Attachment>,
    policy: Policy,
    generation: u32,
}

#[derive(Debug)]
struct Attachment {
    cgroup: Cgroup,
    link: SockOpsLinkId,
}

impl Enforcer {
    /// Loads the program with `policy` as its initial policy. Nothing is attached yet.
    pub fn load(policy: &Policy) -> Result<Self, EnforcerError> {
        Self::load_stage(policy, Stage::Full)
    }

    /// Loads a program that stops after `stage`, for benchmarks that measure what each step
    /// costs. Only [`Stage::Full`] enforces anything.
    pub fn load_stage(policy: &Policy, stage: Stage) -> Result<Self, EnforcerError> {
        policy.validate()?;
        let generation = 1;
        let initial = policy.record(generation);
        let stage = stage as u32;
        let mut ebpf = EbpfLoader::new()
            .override_global(INITIAL_POLICY, &initial, true)
            .override_global(STAGE, &stage, true)
            .load(PROGRAM_OBJECT)
            .map_err(EnforcerError::Load)?;
        sock_ops(&mut ebpf)?
            .load()
            .map_err(EnforcerError::Program)?;
        Ok(Self {
            ebpf,
            attachments: BTreeMap::new(),
            policy: *policy,
            generation,
        })
    }

    /// The policy new connections get.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The cgroups the program is attached to.
    pub fn cgroups(&self) -> impl Iterator<Item = &Cgroup> {
        self.attachments
            .values()
            .map(|attachment| &attachment.cgroup)
    }

    /// Attaches to `cgroup` (a bpf_link, alongside any other program there) and writes the
    /// current policy into the attachment's storage. Until that write the program uses the
    /// policy it was loaded with, so no connection is ever left out.
    pub fn attach(&mut self, cgroup: &Cgroup) -> Result<(), EnforcerError> {
        if self.attachments.contains_key(&cgroup.id) {
            return Err(EnforcerError::AlreadyAttached(cgroup.to_string()));
        }
        let dir = File::open(&cgroup.path).map_err(|source| EnforcerError::OpenCgroup {
            cgroup: cgroup.to_string(),
            source,
        })?;
        let link = sock_ops(&mut self.ebpf)?
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|source| EnforcerError::Attach {
                cgroup: cgroup.to_string(),
                source,
            })?;
        self.attachments.insert(
            cgroup.id,
            Attachment {
                cgroup: cgroup.clone(),
                link,
            },
        );
        let record = self.policy.record(self.generation);
        if let Err(error) = self.write_record(cgroup.id, &record) {
            // Leave nothing half-done behind.
            let _ignored = self.detach(cgroup.id);
            return Err(error);
        }
        Ok(())
    }

    /// Detaches from the cgroup with this id; new connections there are no longer touched.
    pub fn detach(&mut self, cgroup_id: u64) -> Result<Option<Cgroup>, EnforcerError> {
        let Some(Attachment { cgroup, link }) = self.attachments.remove(&cgroup_id) else {
            return Ok(None);
        };
        sock_ops(&mut self.ebpf)?
            .detach(link)
            .map_err(|source| EnforcerError::Detach {
                cgroup: cgroup.to_string(),
                source,
            })?;
        Ok(Some(cgroup))
    }

    /// Detaches from every cgroup, returning them.
    pub fn detach_all(&mut self) -> Result<Vec<Cgroup>, EnforcerError> {
        let ids: Vec<u64> = self.attachments.keys().copied().collect();
        let mut detached = Vec::with_capacity(ids.len());
        for id in ids {
            detached.extend(self.detach(id)?);
        }
        Ok(detached)
    }

    /// Replaces the policy of every attachment. The next connection gets it: no reload, no
    /// re-attachment. Each connection sees the whole old or the whole new policy.
    pub fn set_policy(&mut self, policy: &Policy) -> Result<(), EnforcerError> {
        policy.validate()?;
        let generation = self.generation.wrapping_add(1);
        let record = policy.record(generation);
        let ids: Vec<u64> = self.attachments.keys().copied().collect();
        for id in ids {
            self.write_record(id, &record)?;
        }
        self.policy = *policy;
        self.generation = generation;
        Ok(())
    }

    /// The record the program reads for the attachment to the cgroup with this id.
    pub fn record(&self, cgroup_id: u64) -> Result<PolicyRecord, EnforcerError> {
        let map = self
            .ebpf
            .map(ATTACH_MAP)
            .ok_or(EnforcerError::Missing(ATTACH_MAP))?;
        let storage = CgroupStorage::<&MapData, PolicyRecord>::try_from(map)
            .map_err(map_error(ATTACH_MAP))?;
        storage
            .get(CgroupStorageKey::new(cgroup_id, ATTACH_TYPE), 0)
            .map_err(map_error(ATTACH_MAP))
    }

    /// The program's counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, EnforcerError> {
        let map = self
            .ebpf
            .map(STATS_MAP)
            .ok_or(EnforcerError::Missing(STATS_MAP))?;
        let stats = PerCpuArray::<&MapData, u64>::try_from(map).map_err(map_error(STATS_MAP))?;
        let mut counters = Counters::default();
        for stat in Stat::ALL {
            let per_cpu = stats.get(&(stat as u32), 0).map_err(map_error(STATS_MAP))?;
            counters.0[stat as usize] = per_cpu.iter().sum();
        }
        Ok(counters)
    }

    /// Run count and run time of the program as the kernel accounts them.
    pub fn program_stats(&self) -> Result<ProgramStats, EnforcerError> {
        let program: &SockOps = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or(EnforcerError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(EnforcerError::Program)?;
        let info = program.info().map_err(EnforcerError::Program)?;
        Ok(ProgramStats {
            id: info.id(),
            run_count: info.run_count(),
            run_time: info.run_time(),
        })
    }

    /// Starts forwarding the program's aya-log records to the `log` crate.
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    fn write_record(&mut self, cgroup_id: u64, record: &PolicyRecord) -> Result<(), EnforcerError> {
        let map = self
            .ebpf
            .map_mut(ATTACH_MAP)
            .ok_or(EnforcerError::Missing(ATTACH_MAP))?;
        let mut storage = CgroupStorage::<&mut MapData, PolicyRecord>::try_from(map)
            .map_err(map_error(ATTACH_MAP))?;
        storage
            .insert(CgroupStorageKey::new(cgroup_id, ATTACH_TYPE), record, 0)
            .map_err(map_error(ATTACH_MAP))
    }
}

/// Turns on the kernel's run-time accounting of BPF programs (`run_time_ns`, `run_cnt`) for as
/// long as the returned descriptor is open (BPF_ENABLE_STATS): nothing global to restore.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, aya::sys::SyscallError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
}

fn sock_ops(ebpf: &mut Ebpf) -> Result<&mut SockOps, EnforcerError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or(EnforcerError::Missing(PROGRAM_NAME))?
        .try_into()
        .map_err(EnforcerError::Program)
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> EnforcerError {
    move |source| EnforcerError::Map { map, source }
}
