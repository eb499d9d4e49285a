//! Whether an attachment may have changed since the last health check, learnt without asking
//! each one. The kernel sends no event when a cgroup link is detached or given another
//! program, and asking a link is a syscall that takes the global cgroup mutex: at 10,000
//! cgroups (10,000 links and the locks) twice a second, percents of a core for an agent with
//! nothing to do.
//! Two host-wide signals instead, whose cost does not grow with the host:
//! - the link watch's count of BPF_LINK_DETACH and BPF_LINK_UPDATE on any cgroup link
//!   (`keepalive-ebpf/src/link_watch.rs`: fentry programs, or a kprobe; one map read);
//! - inotify on the directory of the pinned links (a removed pin is an event).
//!
//! Where the kernel refuses both ways of counting (no kprobes, trampolines denied), the link
//! iterator (5.19) counts in one read the attached links that run the agent's programs: a
//! count other than the agent's attachments is a change. Its cost grows with the links on the
//! host, but in the kernel, without a syscall or the cgroup mutex per link. Where the kernel
//! refuses that too, every check is a change: each link is asked every 500 ms.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray},
    programs::{FEntry, Iter, KProbe, Program, ProgramError},
};
use inotify::{EventMask, Inotify, WatchMask};
use keepalive_common::{
    LINK_CHANGES_MAP, LINK_ITER_PROGRAM, LINK_PROGS_MAP, LINK_WATCH_FENTRIES, LINK_WATCH_KPROBE,
    PROGRAM_NAME, SETSOCKOPT_PROGRAM,
};

use super::{MissingFeature, features::verifier_reason};
use crate::sys::{iterator_link, read_iterator};

/// How often the health check runs where its signals cost the same whatever the host holds.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// How often it runs where the link iterator is the signal: each read walks every link on the
/// host, most of its cost the kernel's own step from link to link (`bpf_link_get_curr_or_next`
/// takes each link's reference), ~0.2 µs a link: 10,000 links (10,000 cgroups under one
/// pattern, their lock one link above them) read at this cadence are a quarter of a percent of
/// a core on our 2-core test machines, a third less than twice a second, and
/// what someone removed is still put back within a second with room to spare (the check after
/// a removal asks each attachment: 1,000 of them take a few ms more).
const WALK_EVERY: Duration = Duration::from_millis(800);

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

/// How the health check learns that links may have changed.
pub(super) enum LinkSignal {
    /// The link watch's per-CPU count of detaches and updates (fentry or kprobe).
    Count(PerCpuArray<MapData, u64>),
    /// The link iterator's link: each read counts the attached links running the agent's
    /// programs, to compare with the attachments the agent holds.
    Walk(OwnedFd),
}

pub(super) struct Changes {
    /// None where the kernel refused every way.
    links: Option<LinkSignal>,
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
            .field("watching_links", &self.links.is_some())
            .field("seen", &self.seen)
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl Changes {
    pub(super) fn new(links: Option<LinkSignal>, pins: Option<PathBuf>) -> Self {
        let mut changes = Self {
            links,
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
        self.answered = false;
    }

    /// Whether the kernel tells of link changes (false: every check asks every link).
    pub(super) fn watching_links(&self) -> bool {
        self.links.is_some()
    }

    /// How often [`Self::since_last`] should be asked.
    pub(super) fn interval(&self) -> Duration {
        match self.links {
            Some(LinkSignal::Walk(_)) => WALK_EVERY,
            Some(LinkSignal::Count(_)) | None => CHECK_EVERY,
        }
    }

    /// What may have changed since the last call (everything, the first time); `attached`:
    /// the links the agent holds. The signals are read before the caller asks the links, so a
    /// change that comes while it does is either seen by it or by the next call.
    pub(super) fn since_last(&mut self, attached: usize) -> Since {
        let pins = self.pins_changed();
        let links = match &self.links {
            Some(LinkSignal::Count(count)) => {
                // The map read failed (out of memory): no answer, so a change.
                let count = count
                    .get(&0, 0)
                    .ok()
                    .map(|values| values.iter().copied().fold(0_u64, u64::wrapping_add));
                let changed = count.is_none() || count != self.seen;
                self.seen = count;
                changed
            }
            Some(LinkSignal::Walk(link)) => walked(link).ok() != u64::try_from(attached).ok(),
            None => true,
        };
        let links = links || !self.answered;
        let pins = pins || !self.answered;
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
/// the kprobe) and attaches them, else the link iterator (`offsets`: whether its load-time
/// offsets were found in the kernel's BTF); returns the signal.
pub(super) fn load_link_watch(
    ebpf: &mut Ebpf,
    btf: &Result<aya::Btf, String>,
    offsets: Result<(), String>,
) -> Result<LinkSignal, MissingFeature> {
    let btf = btf.as_ref().map_err(Clone::clone);
    let Err(fentry) = btf.clone().and_then(|btf| link_fentries(ebpf, btf)) else {
        return link_count(ebpf);
    };
    let Err(kprobe) = link_kprobe(ebpf) else {
        return link_count(ebpf);
    };
    offsets
        .and(btf)
        .and_then(|btf| link_walk(ebpf, btf))
        .map(LinkSignal::Walk)
        .map_err(|walk| {
            MissingFeature::link_watch(format!(
                "fentry: {fentry}; kprobe: {kprobe}; link iterator: {walk}"
            ))
        })
}

fn link_count(ebpf: &mut Ebpf) -> Result<LinkSignal, MissingFeature> {
    let map = ebpf.take_map(LINK_CHANGES_MAP).ok_or_else(|| {
        MissingFeature::link_watch(format!("the eBPF object has no {LINK_CHANGES_MAP}"))
    })?;
    PerCpuArray::try_from(map)
        .map(LinkSignal::Count)
        .map_err(|error| MissingFeature::link_watch(error.to_string()))
}

/// Loads the link iterator, tells it the agent's program ids, and reads it once.
fn link_walk(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<OwnedFd, String> {
    let ids: Vec<u32> = [PROGRAM_NAME, SETSOCKOPT_PROGRAM]
        .into_iter()
        .map(|name| {
            ebpf.program(name)
                .and_then(|program| program.info().ok())
                .map_or(0, |info| info.id())
        })
        .collect();
    let mut programs: Array<_, u32> = ebpf
        .map_mut(LINK_PROGS_MAP)
        .ok_or_else(|| format!("the eBPF object has no {LINK_PROGS_MAP}"))?
        .try_into()
        .map_err(|error: aya::maps::MapError| error.to_string())?;
    for (index, id) in (0_u32..).zip(ids) {
        programs
            .set(index, &id, 0)
            .map_err(|error| error.to_string())?;
    }
    let program: &mut Iter = program_mut(ebpf, LINK_ITER_PROGRAM)?;
    program
        .load("bpf_link", btf)
        .map_err(|error| verifier_reason(&error))?;
    let fd = program.fd().map_err(|error| error.to_string())?;
    let link = iterator_link(fd.as_fd()).map_err(|error| error.to_string())?;
    walked(&link).map_err(|error| error.to_string())?;
    Ok(link)
}

/// One walk of the link iterator: the number of attached links running the agent's programs.
fn walked(link: &OwnedFd) -> io::Result<u64> {
    let output = read_iterator(link.as_fd())?;
    let count = output
        .first_chunk::<8>()
        .ok_or_else(|| io::Error::other("the link iterator wrote no count"))?;
    Ok(u64::from_ne_bytes(*count))
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
