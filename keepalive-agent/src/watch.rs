//! Watching the policy file for changes (inotify on its directory).
//!
//! The directory, not the file: editors replace files by renaming a new one over them, and a
//! Kubernetes ConfigMap volume swaps a `..data` symlink. Any event in the directory only wakes
//! the agent, which then compares the file's content with what it last applied.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use tokio::io::{Interest, unix::AsyncFd};

/// Wakes on changes in the directory of a file.
#[derive(Debug)]
pub struct Watch {
    inotify: AsyncFd<OwnedFd>,
}

impl Watch {
    pub fn new(file: &Path) -> io::Result<Self> {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_ATTRIB;
        // SAFETY: a NUL-terminated path and our inotify descriptor.
        if unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd stays open and the same for the AsyncFd's whole life.
        let inotify = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { inotify })
    }

    /// Returns after at least one change in the directory, having drained the events.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.inotify.readable_mut().await?;
            let mut buffer = [0u8; 4096];
            let fd = guard.get_inner().as_raw_fd();
            // SAFETY: reading into a buffer of the given size from our descriptor.
            let read = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
            if read > 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(error);
        }
    }
}
