//! The loaded programs, their attachments and their maps; applying a policy atomically.
#![expect(
    deprecated,
    reason = "cgroup storage (BPF_MAP_TYPE_CGROUP_STORAGE) is per attachment, which the policy needs"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, CgroupStorage, CgroupStorageKey, HashMap, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupSockopt, ProgramError, SockOps, cgroup_sockopt::CgroupSockoptLinkId,
        links::CgroupAttachMode, sock_ops::SockOpsLinkId,
    },
};
use keepalive_common::{
    ADDR_MAP, AGENT_MAP, ATTACH_MAP, AddrKey, AttachRecord, CGROUPS_MAP, DECISIONS_MAP,
    DecisionKey, Hit, Outcome, PORT_MAP, PROGRAM_NAME, PortKey, RULE_STATS_MAP, SETSOCKOPT_PROGRAM,
    STAGE, STATS_MAP, Stage, Stat, rule_stat_index, sock_ops::ATTACH_TYPE,
};

use crate::{
    cgroup::{Cgroup, CgroupError},
    compile::{CompileError, Tables, compile},
    existing::{Sweep, sweep},
    policy::{CgroupPath, Policy},
};

/// The compiled programs, built by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keepalive"));

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error("cannot load the eBPF object")]
    Load(#[source] EbpfError),
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
    #[error("enforced cgroup {scope}")]
    Scope {
        scope: CgroupPath,
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
        source: ProgramError,
    },
    #[error("cannot detach {program} from cgroup {cgroup}")]
    Detach {
        program: &'static str,
        cgroup: String,
        #[source]
        source: ProgramError,
    },
}

/// Global counters summed over CPUs, in [`Stat`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; Stat::COUNT as usize]);

impl Counters {
    pub fn get(&self, stat: Stat) -> u64 {
        self.0[stat as usize]
    }
}

/// One rule slot's outcomes summed over CPUs, in [`Outcome`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes(pub [u64; Outcome::COUNT as usize]);

impl Outcomes {
    pub fn get(&self, outcome: Outcome) -> u64 {
        self.0[outcome as usize]
    }

    /// Connections the slot's rule decided (the hook's overrides are not connections).
    pub fn seen(&self) -> u64 {
        Outcome::ALL
            .iter()
            .filter(|outcome| **outcome != Outcome::Overridden)
            .map(|outcome| self.get(*outcome))
            .sum()
    }
}

/// The kernel's own accounting of the sock_ops program (with BPF run-time stats on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    pub id: u32,
    pub run_count: u64,
    pub run_time: Duration,
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
}

/// The programs loaded into the kernel and the policy they enforce.
///
/// Dropping it detaches every attachment (the links are file descriptors it owns).
#[derive(Debug)]
pub struct Enforcer {
    ebpf: Ebpf,
    mount: PathBuf,
    sock_ops: BTreeMap<CgroupPath, (Cgroup, SockOpsLinkId)>,
    setsockopt: BTreeMap<CgroupPath, (Cgroup, CgroupSockoptLinkId)>,
    current: Option<(Policy, Tables)>,
    generation: u32,
}

impl Enforcer {
    /// Loads the programs; nothing is attached until [`Self::apply`].
    pub fn new(cgroup2_mount: &Path) -> Result<Self, EnforcerError> {
        Self::with_stage(cgroup2_mount, Stage::Full)
    }

    /// Loads programs that stop after `stage`, for benchmarks that measure what each step
    /// costs. Only [`Stage::Full`] enforces anything.
    pub fn with_stage(cgroup2_mount: &Path, stage: Stage) -> Result<Self, EnforcerError> {
        let stage = stage as u32;
        let mut ebpf = EbpfLoader::new()
            .override_global(STAGE, &stage, true)
            .load(PROGRAM_OBJECT)
            .map_err(EnforcerError::Load)?;
        let program = |source| EnforcerError::Program {
            program: PROGRAM_NAME,
            source,
        };
        sock_ops(&mut ebpf)?.load().map_err(program)?;
        setsockopt(&mut ebpf)?
            .load()
            .map_err(|source| EnforcerError::Program {
                program: SETSOCKOPT_PROGRAM,
                source,
            })?;
        let mut agent = Array::<&mut MapData, u32>::try_from(map_mut(&mut ebpf, AGENT_MAP)?)
            .map_err(map_error(AGENT_MAP))?;
        agent
            .set(0, &std::process::id(), 0)
            .map_err(map_error(AGENT_MAP))?;
        Ok(Self {
            ebpf,
            mount: cgroup2_mount.to_path_buf(),
            sock_ops: BTreeMap::new(),
            setsockopt: BTreeMap::new(),
            current: None,
            generation: 0,
        })
    }

    /// The policy in force, if any.
    pub fn policy(&self) -> Option<&Policy> {
        self.current.as_ref().map(|(policy, _)| policy)
    }

    /// The tables of the policy in force.
    pub fn tables(&self) -> Option<&Tables> {
        self.current.as_ref().map(|(_, tables)| tables)
    }

    /// The cgroups the sock_ops program is attached to.
    pub fn attachments(&self) -> impl Iterator<Item = &Cgroup> {
        self.sock_ops.values().map(|(cgroup, _)| cgroup)
    }

    /// Makes `policy` the one in force.
    ///
    /// Nothing changes unless it compiles and fits. The new generation's lookup entries go in
    /// beside the old ones, then each attachment's record is replaced (one atomic update each:
    /// a connection is decided from one record, so it sees the old or the new policy whole),
    /// then attachments no longer needed go, then the old entries.
    pub fn apply(&mut self, policy: &Policy) -> Result<Applied, EnforcerError> {
        let (points, missing) = self.attach_points(policy)?;
        let generation = self.generation.wrapping_add(1);
        let paths: Vec<CgroupPath> = points.keys().cloned().collect();
        let tables = compile(policy, &paths, generation)?;

        if let Err(error) = self.insert_entries(&tables) {
            // Best effort: what went in is unreachable (no record points at it) either way.
            let _ignored = self.remove_entries(&tables);
            return Err(error);
        }
        let mut report = Applied {
            generation,
            missing,
            ..Applied::default()
        };
        // Deepest first: a new nested attachment starts zeroed and defers to its ancestors,
        // which still hold a whole (old) policy until their own record is replaced.
        let mut ordered: Vec<(&CgroupPath, &Cgroup)> = points.iter().collect();
        ordered.sort_by_key(|(path, _)| std::cmp::Reverse(path.depth()));
        for (path, cgroup) in ordered {
            if !self.sock_ops.contains_key(path) {
                let link = attach_sock_ops(&mut self.ebpf, cgroup)?;
                self.sock_ops.insert(path.clone(), (cgroup.clone(), link));
                report.attached.push(cgroup.clone());
            }
            let record = tables.attachments[path];
            self.write_record(cgroup.id, &record)?;
        }
        self.sync_setsockopt(&scopes_only(&policy.scopes, &points))?;
        let stale: Vec<CgroupPath> = self
            .sock_ops
            .keys()
            .filter(|path| !points.contains_key(*path))
            .cloned()
            .collect();
        for path in stale {
            if let Some(cgroup) = self.detach_sock_ops(&path)? {
                report.detached.push(cgroup);
            }
        }
        if let Some((_, old)) = self.current.take() {
            self.remove_entries(&old)?;
        }
        self.current = Some((policy.clone(), tables));
        self.generation = generation;
        if policy.existing {
            let scopes = scopes_only(&policy.scopes, &points);
            let scopes: Vec<&Cgroup> = scopes.values().collect();
            report.existing = Some(sweep(policy, &self.mount, &scopes).map_err(|e| e.to_string()));
        }
        Ok(report)
    }

    /// Detaches everything; new connections are no longer touched.
    pub fn detach_all(&mut self) -> Result<Vec<Cgroup>, EnforcerError> {
        self.sync_setsockopt(&BTreeMap::new())?;
        let paths: Vec<CgroupPath> = self.sock_ops.keys().cloned().collect();
        let mut detached = Vec::with_capacity(paths.len());
        for path in paths {
            detached.extend(self.detach_sock_ops(&path)?);
        }
        if let Some((_, old)) = self.current.take() {
            self.remove_entries(&old)?;
        }
        Ok(detached)
    }

    /// The record the sock_ops program reads at the attachment to this cgroup.
    pub fn record(&self, cgroup_id: u64) -> Result<AttachRecord, EnforcerError> {
        let storage =
            CgroupStorage::<&MapData, AttachRecord>::try_from(map(&self.ebpf, ATTACH_MAP)?)
                .map_err(map_error(ATTACH_MAP))?;
        storage
            .get(CgroupStorageKey::new(cgroup_id, ATTACH_TYPE), 0)
            .map_err(map_error(ATTACH_MAP))
    }

    /// The global counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, EnforcerError> {
        let stats = PerCpuArray::<&MapData, u64>::try_from(map(&self.ebpf, STATS_MAP)?)
            .map_err(map_error(STATS_MAP))?;
        let mut counters = Counters::default();
        for stat in Stat::ALL {
            let per_cpu = stats.get(&(stat as u32), 0).map_err(map_error(STATS_MAP))?;
            counters.0[stat as usize] = per_cpu.iter().sum();
        }
        Ok(counters)
    }

    /// The outcomes counted in a rule slot (0: the default; `i + 1`: rule `i`), summed over
    /// CPUs.
    pub fn outcomes(&self, slot: u32) -> Result<Outcomes, EnforcerError> {
        let stats = PerCpuArray::<&MapData, u64>::try_from(map(&self.ebpf, RULE_STATS_MAP)?)
            .map_err(map_error(RULE_STATS_MAP))?;
        let mut outcomes = Outcomes::default();
        for outcome in Outcome::ALL {
            let per_cpu = stats
                .get(&rule_stat_index(slot, outcome), 0)
                .map_err(map_error(RULE_STATS_MAP))?;
            outcomes.0[outcome as usize] = per_cpu.iter().sum();
        }
        Ok(outcomes)
    }

    /// Run count and run time of the sock_ops program as the kernel accounts them.
    pub fn program_stats(&self) -> Result<ProgramStats, EnforcerError> {
        let program: &SockOps = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or(EnforcerError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(|source| EnforcerError::Program {
                program: PROGRAM_NAME,
                source,
            })?;
        let info = program.info().map_err(|source| EnforcerError::Program {
            program: PROGRAM_NAME,
            source,
        })?;
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

    /// Enforced cgroups and the existing rule cgroups inside them; rules whose cgroup does not
    /// exist are reported, not fatal (containers come and go).
    #[expect(clippy::type_complexity, reason = "a private pair of results")]
    fn attach_points(
        &self,
        policy: &Policy,
    ) -> Result<(BTreeMap<CgroupPath, Cgroup>, Vec<(String, CgroupPath)>), EnforcerError> {
        let mut points = BTreeMap::new();
        for scope in outermost(&policy.scopes) {
            let cgroup =
                Cgroup::resolve(&self.mount, Path::new(scope.as_str())).map_err(|source| {
                    EnforcerError::Scope {
                        scope: scope.clone(),
                        source,
                    }
                })?;
            points.insert(scope.clone(), cgroup);
        }
        let mut missing = Vec::new();
        for rule in &policy.rules {
            let Some(cgroup) = &rule.cgroup else {
                continue;
            };
            if points.contains_key(cgroup)
                || !policy.scopes.iter().any(|scope| scope.contains(cgroup))
            {
                continue;
            }
            match Cgroup::resolve(&self.mount, Path::new(cgroup.as_str())) {
                Ok(resolved) => {
                    points.insert(cgroup.clone(), resolved);
                }
                Err(CgroupError::NotFound { .. }) => {
                    missing.push((rule.name.clone(), cgroup.clone()))
                }
                Err(source) => {
                    return Err(EnforcerError::Scope {
                        scope: cgroup.clone(),
                        source,
                    });
                }
            }
        }
        Ok((points, missing))
    }

    /// The lookup maps of the program, typed.
    #[expect(
        clippy::type_complexity,
        reason = "three typed views of the maps, private"
    )]
    fn lookup_maps(
        &mut self,
    ) -> Result<
        (
            LpmTrie<&mut MapData, AddrKey, Hit>,
            LpmTrie<&mut MapData, PortKey, Hit>,
            HashMap<&mut MapData, DecisionKey, Hit>,
        ),
        EnforcerError,
    > {
        let [addr, ports, decisions] =
            self.ebpf
                .maps_disjoint_mut([ADDR_MAP, PORT_MAP, DECISIONS_MAP]);
        Ok((
            LpmTrie::try_from(addr.ok_or(EnforcerError::Missing(ADDR_MAP))?)
                .map_err(map_error(ADDR_MAP))?,
            LpmTrie::try_from(ports.ok_or(EnforcerError::Missing(PORT_MAP))?)
                .map_err(map_error(PORT_MAP))?,
            HashMap::try_from(decisions.ok_or(EnforcerError::Missing(DECISIONS_MAP))?)
                .map_err(map_error(DECISIONS_MAP))?,
        ))
    }

    fn insert_entries(&mut self, tables: &Tables) -> Result<(), EnforcerError> {
        let (mut addr, mut ports, mut decisions) = self.lookup_maps()?;
        for (key, len, hit) in &tables.addr {
            addr.insert(&Key::new(*len, *key), hit, 0)
                .map_err(map_error(ADDR_MAP))?;
        }
        for (key, len, hit) in &tables.ports {
            ports
                .insert(&Key::new(*len, *key), hit, 0)
                .map_err(map_error(PORT_MAP))?;
        }
        for (key, hit) in &tables.decisions {
            decisions
                .insert(key, hit, 0)
                .map_err(map_error(DECISIONS_MAP))?;
        }
        Ok(())
    }

    /// Removes a generation's entries (missing ones are fine: a failed insert leaves gaps).
    fn remove_entries(&mut self, tables: &Tables) -> Result<(), EnforcerError> {
        let (mut addr, mut ports, mut decisions) = self.lookup_maps()?;
        for (key, len, _) in &tables.addr {
            gone(addr.remove(&Key::new(*len, *key)), ADDR_MAP)?;
        }
        for (key, len, _) in &tables.ports {
            gone(ports.remove(&Key::new(*len, *key)), PORT_MAP)?;
        }
        for (key, _) in &tables.decisions {
            gone(decisions.remove(key), DECISIONS_MAP)?;
        }
        Ok(())
    }

    /// The attachment's storage (sock_ops) and the by-id copy (setsockopt hook).
    fn write_record(&mut self, cgroup_id: u64, record: &AttachRecord) -> Result<(), EnforcerError> {
        let mut storage = CgroupStorage::<&mut MapData, AttachRecord>::try_from(map_mut(
            &mut self.ebpf,
            ATTACH_MAP,
        )?)
        .map_err(map_error(ATTACH_MAP))?;
        storage
            .insert(CgroupStorageKey::new(cgroup_id, ATTACH_TYPE), record, 0)
            .map_err(map_error(ATTACH_MAP))?;
        let mut by_id = HashMap::<&mut MapData, u64, AttachRecord>::try_from(map_mut(
            &mut self.ebpf,
            CGROUPS_MAP,
        )?)
        .map_err(map_error(CGROUPS_MAP))?;
        by_id
            .insert(&cgroup_id, record, 0)
            .map_err(map_error(CGROUPS_MAP))
    }

    fn detach_sock_ops(&mut self, path: &CgroupPath) -> Result<Option<Cgroup>, EnforcerError> {
        let Some((cgroup, link)) = self.sock_ops.remove(path) else {
            return Ok(None);
        };
        sock_ops(&mut self.ebpf)?
            .detach(link)
            .map_err(|source| EnforcerError::Detach {
                program: PROGRAM_NAME,
                cgroup: cgroup.to_string(),
                source,
            })?;
        let mut by_id = HashMap::<&mut MapData, u64, AttachRecord>::try_from(map_mut(
            &mut self.ebpf,
            CGROUPS_MAP,
        )?)
        .map_err(map_error(CGROUPS_MAP))?;
        match by_id.remove(&cgroup.id) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(EnforcerError::Map {
                    map: CGROUPS_MAP,
                    source,
                });
            }
        }
        Ok(Some(cgroup))
    }

    /// Attaches the setsockopt hook to exactly `scopes`.
    fn sync_setsockopt(
        &mut self,
        scopes: &BTreeMap<CgroupPath, Cgroup>,
    ) -> Result<(), EnforcerError> {
        let stale: Vec<CgroupPath> = self
            .setsockopt
            .keys()
            .filter(|path| !scopes.contains_key(*path))
            .cloned()
            .collect();
        for path in stale {
            if let Some((cgroup, link)) = self.setsockopt.remove(&path) {
                setsockopt(&mut self.ebpf)?.detach(link).map_err(|source| {
                    EnforcerError::Detach {
                        program: SETSOCKOPT_PROGRAM,
                        cgroup: cgroup.to_string(),
                        source,
                    }
                })?;
            }
        }
        for (path, cgroup) in scopes {
            if self.setsockopt.contains_key(path) {
                continue;
            }
            let dir = open(cgroup)?;
            let link = setsockopt(&mut self.ebpf)?
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| EnforcerError::Attach {
                    program: SETSOCKOPT_PROGRAM,
                    cgroup: cgroup.to_string(),
                    source,
                })?;
            self.setsockopt.insert(path.clone(), (cgroup.clone(), link));
        }
        Ok(())
    }
}

/// Scopes without the ones nested in another scope (those add nothing).
fn outermost(scopes: &[CgroupPath]) -> BTreeSet<CgroupPath> {
    scopes
        .iter()
        .filter(|scope| {
            !scopes
                .iter()
                .any(|other| other != *scope && other.contains(scope))
        })
        .cloned()
        .collect()
}

fn scopes_only(
    scopes: &[CgroupPath],
    points: &BTreeMap<CgroupPath, Cgroup>,
) -> BTreeMap<CgroupPath, Cgroup> {
    outermost(scopes)
        .into_iter()
        .filter_map(|scope| points.get(&scope).map(|cgroup| (scope, cgroup.clone())))
        .collect()
}

fn open(cgroup: &Cgroup) -> Result<File, EnforcerError> {
    File::open(&cgroup.path).map_err(|source| EnforcerError::OpenCgroup {
        cgroup: cgroup.to_string(),
        source,
    })
}

fn attach_sock_ops(ebpf: &mut Ebpf, cgroup: &Cgroup) -> Result<SockOpsLinkId, EnforcerError> {
    let dir = open(cgroup)?;
    sock_ops(ebpf)?
        .attach(&dir, CgroupAttachMode::Single)
        .map_err(|source| EnforcerError::Attach {
            program: PROGRAM_NAME,
            cgroup: cgroup.to_string(),
            source,
        })
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
        .map_err(|source| EnforcerError::Program {
            program: PROGRAM_NAME,
            source,
        })
}

fn setsockopt(ebpf: &mut Ebpf) -> Result<&mut CgroupSockopt, EnforcerError> {
    ebpf.program_mut(SETSOCKOPT_PROGRAM)
        .ok_or(EnforcerError::Missing(SETSOCKOPT_PROGRAM))?
        .try_into()
        .map_err(|source| EnforcerError::Program {
            program: SETSOCKOPT_PROGRAM,
            source,
        })
}

fn map<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, EnforcerError> {
    ebpf.map(name).ok_or(EnforcerError::Missing(name))
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, EnforcerError> {
    ebpf.map_mut(name).ok_or(EnforcerError::Missing(name))
}

/// A removal whose key is already gone is no error.
fn gone(result: Result<(), MapError>, map: &'static str) -> Result<(), EnforcerError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(EnforcerError::Map { map, source }),
    }
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> EnforcerError {
    move |source| EnforcerError::Map { map, source }
}
