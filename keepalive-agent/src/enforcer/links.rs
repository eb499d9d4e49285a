//! Attachments: one bpf_link per program and cgroup, held as a descriptor (dropping it
//! detaches) or pinned in bpffs (it outlives the agent).

use std::{
    fs::{self, File},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use aya_obj::generated::bpf_attach_type::{BPF_CGROUP_SETSOCKOPT, BPF_CGROUP_SOCK_OPS};

use super::EnforcerError;
use crate::{bpffs::PinDir, cgroup::Cgroup, sys};

/// One program's link to one cgroup.
#[derive(Debug)]
pub(super) struct Attachment {
    pub(super) cgroup: Cgroup,
    /// Unpinned: the link lives as long as this descriptor. Pinned: kept open while the
    /// budget allows, to be asked about without opening the pin.
    link: Option<Held>,
    /// Pinned: the link lives as long as this pin.
    pin: Option<PathBuf>,
}

/// Pinned links' descriptors kept open, and how many may be. Asking a held link is one
/// syscall; asking a pinned one is an open (a path lookup in bpffs), the question and a
/// close: at 10,000 attachments asked twice a second (kernels without the link watch), most
/// of the agent's CPU. The budget is half the descriptor limit (see [`hold_links_up_to`]),
/// so a host with more attachments than that still works, asking the rest through their pins.
static HELD: AtomicUsize = AtomicUsize::new(0);
static MAX_HELD: AtomicUsize = AtomicUsize::new(0);

/// Lets up to `max` pinned links keep their descriptor open (the process-wide budget).
pub(super) fn hold_links_up_to(max: usize) {
    MAX_HELD.store(max, Ordering::Relaxed);
}

/// A link's descriptor; `counted` ones take a place in the pinned links' budget.
#[derive(Debug)]
struct Held {
    fd: OwnedFd,
    counted: bool,
}

impl Held {
    fn unpinned(fd: OwnedFd) -> Self {
        Self { fd, counted: false }
    }

    /// The descriptor of a pinned link, if the budget has room for it (else it is closed).
    fn pinned(fd: OwnedFd) -> Option<Self> {
        let max = MAX_HELD.load(Ordering::Relaxed);
        HELD.try_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            (held < max).then_some(held + 1)
        })
        .ok()
        .map(|_| Self { fd, counted: true })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.counted {
            HELD.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The kernel could not be asked about an attachment (out of descriptors or memory).
#[derive(Debug, Clone, Copy)]
pub(super) struct Unanswered;

/// A program and where it hooks in: its attach type, and the name its links' pins start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hook {
    pub(super) pin_name: &'static str,
    pub(super) attach_type: u32,
    pub(super) program: &'static str,
}

pub(super) const SOCK_OPS: Hook = Hook {
    pin_name: "sockops",
    attach_type: BPF_CGROUP_SOCK_OPS as u32,
    program: keepalive_common::PROGRAM_NAME,
};

pub(super) const SETSOCKOPT: Hook = Hook {
    pin_name: "setsockopt",
    attach_type: BPF_CGROUP_SETSOCKOPT as u32,
    program: keepalive_common::SETSOCKOPT_PROGRAM,
};

impl Attachment {
    /// Attaches `program` to `cgroup`, pinning the link when there is a pin directory.
    pub(super) fn create(
        hook: Hook,
        program: BorrowedFd<'_>,
        cgroup: &Cgroup,
        pins: Option<&PinDir>,
    ) -> Result<Self, EnforcerError> {
        let dir = File::open(&cgroup.path).map_err(|source| EnforcerError::OpenCgroup {
            cgroup: cgroup.to_string(),
            source,
        })?;
        let attach_error = |source| EnforcerError::Attach {
            program: hook.program,
            cgroup: cgroup.to_string(),
            source,
        };
        let fd = sys::link_cgroup(program, dir.as_fd(), hook.attach_type).map_err(attach_error)?;
        match pins {
            None => Ok(Self {
                cgroup: cgroup.clone(),
                link: Some(Held::unpinned(fd)),
                pin: None,
            }),
            Some(pins) => {
                let path = pins.link(hook.pin_name, cgroup.id);
                // A stale pin of a removed cgroup's id would be in the way.
                let _ignored = fs::remove_file(&path);
                sys::pin(fd.as_fd(), &path).map_err(attach_error)?;
                Ok(Self {
                    cgroup: cgroup.clone(),
                    link: Held::pinned(fd),
                    pin: Some(path),
                })
            }
        }
    }

    /// Takes over a pinned link: its program becomes `program` (an atomic swap).
    pub(super) fn adopt(
        hook: Hook,
        program: BorrowedFd<'_>,
        cgroup: Cgroup,
        pin: PathBuf,
    ) -> Result<Self, EnforcerError> {
        let attach_error = |source| EnforcerError::Attach {
            program: hook.program,
            cgroup: cgroup.to_string(),
            source,
        };
        let link = sys::open_pinned(&pin).map_err(attach_error)?;
        sys::update_link(link.as_fd(), program).map_err(attach_error)?;
        Ok(Self {
            cgroup,
            link: Held::pinned(link),
            pin: Some(pin),
        })
    }

    /// Why this attachment is not what the kernel has, if it is not: the pin is gone, the link
    /// was detached, or it runs another program than `program_id`. A held link's pin is looked
    /// at only when `pins_changed` (the pin directory's watch saw a removal, or has none). Only
    /// a definite answer is a fault: a question that failed (no descriptor left) is `Err`,
    /// asked again at the next check. A cgroup that is gone is no fault: following the tree
    /// forgets it.
    pub(super) fn fault(
        &self,
        program_id: u32,
        pins_changed: bool,
    ) -> Result<Option<&'static str>, Unanswered> {
        match (&self.link, &self.pin) {
            (Some(held), pin) => {
                if pins_changed
                    && let Some(pin) = pin
                    && !pin_exists(pin)?
                {
                    return Ok(self.unless_cgroup_gone("pin removed"));
                }
                self.ask(held.fd.as_fd(), program_id)
            }
            (None, Some(pin)) => match sys::open_pinned(pin) {
                Ok(fd) => self.ask(fd.as_fd(), program_id),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    Ok(self.unless_cgroup_gone("pin removed"))
                }
                // Out of descriptors (EMFILE) or memory: no answer, so no fault.
                Err(_) => Err(Unanswered),
            },
            (None, None) => Ok(Some("no link")),
        }
    }

    fn ask(
        &self,
        link: BorrowedFd<'_>,
        program_id: u32,
    ) -> Result<Option<&'static str>, Unanswered> {
        match sys::cgroup_link_info(link) {
            Err(_) => Err(Unanswered),
            Ok(info) if info.cgroup_id != self.cgroup.id => {
                Ok(self.unless_cgroup_gone("link detached"))
            }
            Ok(info) if info.program_id != program_id => Ok(Some("program replaced")),
            Ok(_) => Ok(None),
        }
    }

    /// A removed cgroup takes its link with it: no fault, following the tree forgets it. Asked
    /// only of a link that looks wrong (a path lookup per attachment is most of a check's cost).
    fn unless_cgroup_gone(&self, what: &'static str) -> Option<&'static str> {
        self.cgroup.path.exists().then_some(what)
    }

    /// Detaches (the pin goes, then the descriptor closes).
    pub(super) fn detach(self, hook: Hook) -> Result<Cgroup, EnforcerError> {
        if let Some(pin) = &self.pin {
            match fs::remove_file(pin) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(EnforcerError::Detach {
                        program: hook.program,
                        cgroup: self.cgroup.to_string(),
                        source,
                    });
                }
            }
        }
        Ok(self.cgroup)
    }
}

fn pin_exists(pin: &Path) -> Result<bool, Unanswered> {
    match fs::symlink_metadata(pin) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(_) => Err(Unanswered),
    }
}
