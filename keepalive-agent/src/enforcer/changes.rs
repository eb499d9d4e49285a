//! Whether an attachment may have changed since the last health check, learnt without asking
//! each one. The kernel sends no event when a cgroup link is detached or given another
//! program, and asking a link is a syscall that takes the global cgroup mutex: at 10,000
//! cgroups (20,000 links) twice a second, percents of a core for an agent with nothing to do.
//! Two host-wide signals instead, whose cost does not grow with the host:
//! - the link watch's count of BPF_LINK_DETACH and BPF_LINK_UPDATE on any cgroup link
//!   (`keepalive-ebpf/src/link_watch.rs`: fentry programs, or a kprobe; one map read);
//! - inotify on the directory of the pinned links (a removed pin is an event).
//!
//! Where the kernel refused both ways of counting, every check is a change: each link is asked
//! every 500 ms, as before the watch (the CPU that costs grows with the cgroups followed).

use std::{io, path::PathBuf};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::{FEntry, KProbe, Program, ProgramError},
};
use inotify::{EventMask, Inotify, WatchMask};
use keepalive_common::{LINK_CHANGES_MAP, LINK_WATCH_FENTRIES, LINK_WATCH_KPROBE};

use super::{MissingFeature, features::verifier_reason};

/// What [`Changes::since_last`] found may have changed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Since {
    /// A cgroup link somewhere was detached or given another program (or nothing counts).
    pub(super) links: bool,
    /// A pin was removed (or the pin directory's watch was lost).
    pub(super) pins: bool,
}

impl Since {
    pub(super) fn any(self) -> bool {
        self.links || self.pins
    }
}

pub(super) struct Changes {
    /// The link watch's per-CPU count; None where the kernel refused it.
    count: Option<PerCpuArray<MapData, u64>>,
    /// The count at the last check (None before the first).
    seen: Option<u64>,
    /// Whether a check asked everything (false before the first, and after one went
    /// unanswered: the next looks at the pins too).
    answered: bool,
    /// The directory of the pinned links, watched while it exists.
    pins: Option<PathBuf>,
    watch: Option<Inotify>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes")
            .field("watching_links", &self.count.is_some())
            .field("seen", &self.seen)
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl Changes {
    pub(super) fn new(count: Option<PerCpuArray<MapData, u64>>, pins: Option<PathBuf>) -> Self {
        let mut changes = Self {
            count,
            seen: None,
            answered: false,
            pins,
            watch: None,
        };
        changes.watch = changes.watch_pins();
        changes
    }

    /// Makes the next [`Self::since_last`] a change: a link could not be asked this time.
    pub(super) fn ask_again(&mut self) {
        self.seen = None;
        self.answered = false;
    }

    /// Whether the link watch counts changes (false: every check asks every link).
    pub(super) fn watching_links(&self) -> bool {
        self.count.is_some()
    }

    /// What may have changed since the last call (everything, the first time). The signals
    /// are read before the caller asks the links, so a change that comes while it does is
    /// either seen by it or by the next call.
    pub(super) fn since_last(&mut self) -> Since {
        let pins = self.pins_changed();
        let count = self.count.as_ref().and_then(|count| {
            // The map read failed (out of memory): no answer, so a change.
            let values = count.get(&0, 0).ok()?;
            Some(values.iter().copied().fold(0_u64, u64::wrapping_add))
        });
        let links = count.is_none() || count != self.seen;
        let pins = pins || !self.answered;
        self.seen = count;
        self.answered = true;
        Since { links, pins }
    }

    /// Drains the pin directory's events; re-watches it when the watch was lost (the directory
    /// removed, bpffs unmounted), which counts as a change.
    fn pins_changed(&mut self) -> bool {
        if self.pins.is_none() {
            return false;
        }
        let Some(watch) = &mut self.watch else {
            self.watch = self.watch_pins();
            return true;
        };
        let mut buffer = [0_u8; 4096];
        let mut changed = false;
        loop {
            match watch.read_events(&mut buffer) {
                Ok(events) => {
                    let mut lost = false;
                    for event in events {
                        changed = true;
                        lost |= event
                            .mask
                            .intersects(EventMask::IGNORED | EventMask::UNMOUNT);
                    }
                    if lost {
                        self.watch = None;
                        return true;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return changed,
                Err(_) => {
                    self.watch = None;
                    return true;
                }
            }
        }
    }

    fn watch_pins(&self) -> Option<Inotify> {
        let dir = self.pins.as_ref()?;
        let inotify = Inotify::init().ok()?;
        let mask = WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF;
        inotify.watches().add(dir, mask).ok()?;
        Some(inotify)
    }
}

/// Loads the programs that count cgroup links detached or given another program (fentry, else
/// the kprobe) and attaches them; returns their count.
pub(super) fn load_link_watch(
    ebpf: &mut Ebpf,
    btf: &Result<aya::Btf, String>,
) -> Result<PerCpuArray<MapData, u64>, MissingFeature> {
    let fentries = btf
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|btf| link_fentries(ebpf, btf));
    if let Err(fentry) = fentries {
        link_kprobe(ebpf).map_err(|kprobe| {
            MissingFeature::link_watch(format!("fentry: {fentry}; kprobe: {kprobe}"))
        })?;
    }
    let map = ebpf.take_map(LINK_CHANGES_MAP).ok_or_else(|| {
        MissingFeature::link_watch(format!("the eBPF object has no {LINK_CHANGES_MAP}"))
    })?;
    PerCpuArray::try_from(map).map_err(|error| MissingFeature::link_watch(error.to_string()))
}

fn link_fentries(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<(), String> {
    for (name, function) in LINK_WATCH_FENTRIES {
        let program: &mut FEntry = program_mut(ebpf, name)?;
        let refused = |error: ProgramError| format!("{function}: {}", verifier_reason(&error));
        program.load(function, btf).map_err(refused)?;
        program.attach().map_err(refused)?;
    }
    Ok(())
}

fn link_kprobe(ebpf: &mut Ebpf) -> Result<(), String> {
    let program: &mut KProbe = program_mut(ebpf, LINK_WATCH_KPROBE)?;
    program.load().map_err(|error| verifier_reason(&error))?;
    for (_, function) in LINK_WATCH_FENTRIES {
        program
            .attach(function, 0)
            .map_err(|error| format!("{function}: {}", verifier_reason(&error)))?;
    }
    Ok(())
}

/// A program of the object, as its type.
fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("the eBPF object has no {name}"))?
        .try_into()
        .map_err(|error: ProgramError| error.to_string())
}
