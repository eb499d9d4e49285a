//! Loading the programs into the kernel, and taking over what an earlier agent pinned.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use tracing::debug;

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockopt, Iter, SockOps},
};
use keepalive_common::{
    CGROUPS_MAP, COUNT_PROGRAM, LINK_OFFSETS, LISTEN_MAP, LinkOffsets, PROGRAM_NAME,
    SETSOCKOPT_PROGRAM, SOCK_OFFSETS, STAGE, SWEEP_MAP, SWEEP_PROGRAM, SockOffsets, Stage,
    ends::{END_OFFSETS, EndOffsets},
};

use super::{
    Enforcer, EnforcerError, MissingFeature,
    changes::{self, Changes},
    features::{self, verifier_reason},
    links::{Attachment, SETSOCKOPT, SOCK_OPS},
    maps, program_error,
};
use crate::{
    bpffs::PinDir,
    cgroup::Cgroup,
    existing::{
        btf::Btf,
        iterator::{IteratorSweep, reopen},
    },
    policy::CgroupPath,
    without_keepalive::CountIterator,
};

/// The compiled programs, built by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keepalive"));

impl Enforcer {
    /// Loads the programs, unpinned; nothing is attached until [`Self::apply`]. The programs
    /// stop after `stage`, for benchmarks that measure what each step costs; only
    /// [`Stage::Full`] enforces anything. For tests and benchmarks: the agent runs
    /// [`Self::pinned`].
    pub fn with_stage(cgroup2_mount: &Path, stage: Stage) -> Result<Self, EnforcerError> {
        Self::load(cgroup2_mount, stage, None, true)
    }

    /// Loads the programs with their maps and links pinned under `<bpffs>/keepalive-agent`
    /// (mounting bpffs there if needed), and takes over what an earlier agent pinned: its links
    /// get these programs (an atomic swap; enforcement never stops) and its policy stays in
    /// force until [`Self::apply`].
    pub fn pinned(cgroup2_mount: &Path, bpffs: &Path) -> Result<Self, EnforcerError> {
        Self::pinned_sweeping(cgroup2_mount, bpffs, true)
    }

    /// [`Self::pinned`]; `sweeps` false (an agent told never to touch existing connections)
    /// skips reading the kernel's BTF and loading the sweep program, which start-up would
    /// otherwise spend time on.
    pub fn pinned_sweeping(
        cgroup2_mount: &Path,
        bpffs: &Path,
        sweeps: bool,
    ) -> Result<Self, EnforcerError> {
        let pins = PinDir::prepare(bpffs)?;
        let mut enforcer = Self::load(cgroup2_mount, Stage::Full, Some(pins), sweeps)?;
        enforcer.adopt()?;
        Ok(enforcer)
    }

    fn load(
        cgroup2_mount: &Path,
        stage: Stage,
        pins: Option<PinDir>,
        sweeps: bool,
    ) -> Result<Self, EnforcerError> {
        let stage = stage as u32;
        // The kernel side's log level is a load-time constant: statements above it are removed
        // by the verifier. Debug (per-connection events) only when our log shows debug.
        let kernel_log: u8 = if log::max_level() >= log::LevelFilter::Debug {
            4
        } else {
            2
        };
        // The offsets the sweep reads sockets at (None: the agent never sweeps, not a kernel's
        // lack) and those the link iterator reads links at, from the kernel's BTF.
        let kernel_btf = Btf::kernel().map_err(|error| error.to_string());
        let sock_offsets = kernel_btf
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|btf| btf.sock_offsets().map_err(|error| error.to_string()));
        let counts = sock_offsets.is_ok();
        let offsets = sweeps.then_some(sock_offsets);
        let link_offsets = kernel_btf
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|btf| btf.link_offsets().map_err(|error| error.to_string()));
        // Connection ends are followed where the kernel lets the sock_ops program read its
        // socket; where the verifier refuses that, the program loads again without it.
        let end_offsets = kernel_btf
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|btf| btf.end_offsets().map_err(|error| error.to_string()))
            .map(|offsets| EndOffsets {
                tracked_silence: one_second_of_jiffies(),
                ..offsets
            });
        let globals = Globals {
            stage,
            kernel_log,
            sock: found_sock_offsets(offsets.as_ref()),
            links: link_offsets.as_ref().copied().unwrap_or_default(),
            ends: end_offsets.as_ref().copied().unwrap_or_default(),
        };
        // Half the descriptors for held links, half for everything else.
        super::links::hold_links_up_to(features::raise_descriptor_limit() / 2);
        let mut missing = Vec::new();
        let mut ebpf = open(&globals, pins.as_ref())?;
        if let Err(error) = sock_ops(&mut ebpf)?.load() {
            if globals.ends.enabled == 0 {
                return Err(program_error(PROGRAM_NAME)(error));
            }
            missing.push(MissingFeature::ends(verifier_reason(&error)));
            drop(ebpf);
            let without = Globals {
                ends: EndOffsets::default(),
                ..globals
            };
            ebpf = open(&without, pins.as_ref())?;
            sock_ops(&mut ebpf)?
                .load()
                .map_err(program_error(PROGRAM_NAME))?;
        } else if let Err(error) = &end_offsets {
            missing.push(MissingFeature::ends(error.clone()));
        }
        if let Err(error) = setsockopt(&mut ebpf)?.load() {
            missing.push(MissingFeature::lock(&error));
        }
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        missing.extend(MissingFeature::reads(release.trim()));
        // aya parses the kernel's BTF again (its own types), once for the programs that need
        // it: the sweep (only where the offsets were found) and the link watch's fentries.
        let btf = aya::Btf::from_sys_fs().map_err(|error| error.to_string());
        let iterator = match offsets {
            Some(Ok(_)) => sweep_program(&mut ebpf, &btf)
                .map_err(|refused| missing.push(refused))
                .ok(),
            Some(Err(error)) => {
                missing.push(MissingFeature::iterator_because(error));
                None
            }
            None => None,
        }
        .map(Arc::new);
        // The gauge counts through the kernel where it can, else with inet_diag dumps.
        let counter = counts
            .then(|| count_program(&mut ebpf, &btf))
            .and_then(|loaded| {
                loaded
                    .map_err(|error| debug!(%error, "the connection count iterator did not load"))
                    .ok()
            })
            .map(Arc::new);
        let link_changes = changes::load_link_watch(&mut ebpf, &btf, link_offsets.map(|_| ()))
            .map_err(|refused| missing.push(refused))
            .ok();
        maps::set_agent_pid(&mut ebpf)?;
        let changes = Changes::new(link_changes, pins.as_ref().map(PinDir::links));
        Ok(Self {
            ebpf,
            mount: cgroup2_mount.to_path_buf(),
            pins,
            sock_ops: BTreeMap::new(),
            setsockopt: BTreeMap::new(),
            current: None,
            generation: 0,
            missing_features: missing,
            iterator,
            counter,
            changes,
        })
    }

    /// Takes over the links an earlier agent pinned; forgets those of removed cgroups.
    fn adopt(&mut self) -> Result<(), EnforcerError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        let by_id = crate::cgroup::by_id(&self.mount);
        for (pin_name, id, pin) in pins.pinned_links() {
            let hook = match pin_name.as_str() {
                "sockops" => SOCK_OPS,
                "setsockopt" if self.has_lock() => SETSOCKOPT,
                _ => continue,
            };
            let cgroup = by_id
                .get(&id)
                .and_then(|path| Cgroup::find(&self.mount, path).ok());
            let Some(cgroup) = cgroup else {
                // The cgroup is gone, and with it the attachment: drop the pin.
                let _ignored = std::fs::remove_file(&pin);
                continue;
            };
            let Ok(path) = CgroupPath::parse(&cgroup.name) else {
                continue;
            };
            let attachment = Attachment::adopt(hook, self.program_fd(hook)?, cgroup, pin)?;
            self.attachments_mut(hook).insert(path, attachment);
        }
        self.generation = maps::cgroup_records(&self.ebpf)?
            .iter()
            .map(|(_, record)| record.generation)
            .max()
            .unwrap_or(0);
        Ok(())
    }
}

/// The load-time constants of the object.
#[derive(Debug, Clone, Copy)]
struct Globals {
    stage: u32,
    kernel_log: u8,
    sock: SockOffsets,
    links: LinkOffsets,
    ends: EndOffsets,
}

/// The silence the program starts tracking at: a second, in the kernel's ticks (1,000 where
/// its tick rate is unknown: a second at most rates, ten at 100 Hz).
fn one_second_of_jiffies() -> u32 {
    crate::ends::kernel_hz()
        .and_then(|hz| u32::try_from(hz).ok())
        .unwrap_or(1000)
}

/// The sweep's offsets where it runs and they were found, else zeros.
fn found_sock_offsets(offsets: Option<&Result<SockOffsets, String>>) -> SockOffsets {
    offsets
        .and_then(|offsets| offsets.as_ref().ok())
        .copied()
        .unwrap_or_default()
}

/// The object with `globals` set and its maps created (pinned ones reused); no program loaded.
fn open(globals: &Globals, pins: Option<&PinDir>) -> Result<Ebpf, EnforcerError> {
    let mut loader = EbpfLoader::new();
    loader.override_global(STAGE, &globals.stage, true);
    loader.override_global(SOCK_OFFSETS, &globals.sock, true);
    loader.override_global(LINK_OFFSETS, &globals.links, true);
    loader.override_global(END_OFFSETS, &globals.ends, true);
    loader.override_global(aya_log::LEVEL, &globals.kernel_log, false);
    if let Some(pins) = pins {
        for name in maps::PINNED {
            loader.map_pin_path(name, pins.map(name));
        }
    }
    // Kernels before 5.11 charge maps to RLIMIT_MEMLOCK; newer ones ignore it, so a refusal
    // (no CAP_SYS_RESOURCE) only matters if the maps then fail to load.
    let memlock = features::raise_memlock_limit();
    loader.load(PROGRAM_OBJECT).map_err(|error| match &memlock {
        Ok(()) => EnforcerError::Load(error),
        Err(memlock) => EnforcerError::Memlock {
            memlock: memlock.to_string(),
            source: Box::new(error),
        },
    })
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

/// Loads and links the connection count program (the way in for the gauge of connections without keepalive).
fn count_program(ebpf: &mut Ebpf, btf: &Result<aya::Btf, String>) -> Result<CountIterator, String> {
    let btf = btf.as_ref().map_err(Clone::clone)?;
    let program: &mut Iter = ebpf
        .program_mut(COUNT_PROGRAM)
        .ok_or_else(|| format!("the eBPF object has no {COUNT_PROGRAM}"))?
        .try_into()
        .map_err(|error: aya::programs::ProgramError| error.to_string())?;
    program
        .load("tcp", btf)
        .map_err(|error| verifier_reason(&error))?;
    let fd = program.fd().map_err(|error| error.to_string())?;
    CountIterator::new(fd).map_err(|error| error.to_string())
}

/// Loads and links the sweep program: the in-kernel path for existing connections.
fn sweep_program(
    ebpf: &mut Ebpf,
    btf: &Result<aya::Btf, String>,
) -> Result<IteratorSweep, MissingFeature> {
    let refused = |error: String| MissingFeature::iterator_because(error);
    let btf = btf.as_ref().map_err(|error| refused(error.clone()))?;
    let program: &mut Iter = ebpf
        .program_mut(SWEEP_PROGRAM)
        .ok_or_else(|| refused(format!("the eBPF object has no {SWEEP_PROGRAM}")))?
        .try_into()
        .map_err(|error: aya::programs::ProgramError| refused(error.to_string()))?;
    program
        .load("tcp", btf)
        .map_err(|error| MissingFeature::iterator(&error))?;
    let map = |name: &'static str| {
        ebpf.map(name)
            .ok_or_else(|| refused(format!("the eBPF object has no {name}")))
            .and_then(|map| reopen(map).map_err(|error| refused(format!("{name}: {error}"))))
    };
    let (records, sweep, listen) = (map(CGROUPS_MAP)?, map(SWEEP_MAP)?, map(LISTEN_MAP)?);
    let program: &Iter = ebpf
        .program(SWEEP_PROGRAM)
        .and_then(|program| program.try_into().ok())
        .ok_or_else(|| refused(format!("the eBPF object has no {SWEEP_PROGRAM}")))?;
    let fd = program.fd().map_err(|error| refused(error.to_string()))?;
    IteratorSweep::new(fd, records, sweep, listen).map_err(|error| refused(error.to_string()))
}
