//! Attachments: one bpf_link per program and cgroup, held as a descriptor (dropping it
//! detaches) or pinned in bpffs (it outlives the agent).

use std::{
    fs::{self, File},
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
};

use aya_obj::generated::bpf_attach_type::{BPF_CGROUP_SETSOCKOPT, BPF_CGROUP_SOCK_OPS};

use super::EnforcerError;
use crate::{
    bpffs::{self, PinDir},
    cgroup::Cgroup,
};

/// One program's link to one cgroup.
#[derive(Debug)]
pub(super) struct Attachment {
    pub(super) cgroup: Cgroup,
    /// Unpinned: the link lives as long as this descriptor (held, never read).
    _link: Option<OwnedFd>,
    /// Pinned: the link lives as long as this pin.
    pin: Option<PathBuf>,
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
        program: std::os::fd::BorrowedFd<'_>,
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
        let fd =
            bpffs::link_cgroup(program, dir.as_fd(), hook.attach_type).map_err(attach_error)?;
        match pins {
            None => Ok(Self {
                cgroup: cgroup.clone(),
                _link: Some(fd),
                pin: None,
            }),
            Some(pins) => {
                let path = pins.link(hook.pin_name, cgroup.id);
                // A stale pin of a removed cgroup's id would be in the way.
                let _ignored = fs::remove_file(&path);
                bpffs::pin(fd.as_fd(), &path).map_err(attach_error)?;
                Ok(Self {
                    cgroup: cgroup.clone(),
                    _link: None,
                    pin: Some(path),
                })
            }
        }
    }

    /// Takes over a pinned link: its program becomes `program` (an atomic swap).
    pub(super) fn adopt(
        hook: Hook,
        program: std::os::fd::BorrowedFd<'_>,
        cgroup: Cgroup,
        pin: PathBuf,
    ) -> Result<Self, EnforcerError> {
        let attach_error = |source| EnforcerError::Attach {
            program: hook.program,
            cgroup: cgroup.to_string(),
            source,
        };
        let link = bpffs::open_pinned(&pin).map_err(attach_error)?;
        bpffs::update_link(link.as_fd(), program).map_err(attach_error)?;
        Ok(Self {
            cgroup,
            _link: None,
            pin: Some(pin),
        })
    }

    /// Why this attachment is not what the kernel has, if it is not: the pin is gone, the link
    /// was detached, or it runs another program than `program_id`. Only a definite answer is
    /// a fault: a question that failed (no descriptor left) is `Err`, asked again at the next
    /// check. A cgroup that is gone is no fault: following the tree forgets it.
    pub(super) fn fault(&self, program_id: u32) -> Result<Option<&'static str>, Unanswered> {
        let opened;
        let link = match (&self._link, &self.pin) {
            (Some(fd), _) => fd.as_fd(),
            (None, Some(pin)) => match bpffs::open_pinned(pin) {
                Ok(fd) => {
                    opened = fd;
                    opened.as_fd()
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(self.unless_cgroup_gone("pin removed"));
                }
                // Out of descriptors (EMFILE) or memory: no answer, so no fault.
                Err(_) => return Err(Unanswered),
            },
            (None, None) => return Ok(Some("no link")),
        };
        match bpffs::cgroup_link_info(link) {
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

    /// Detaches (the descriptor closes, or the pin goes).
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
