//! Workload processes placed in a cgroup and a network namespace, with a line protocol on
//! stdout and their sockets reachable from the test through pidfd_getfd(2).

use std::{
    ffi::OsStr,
    fs::OpenOptions,
    io::{BufRead as _, BufReader},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::{Netns, TestCgroup};

/// How long a workload may take to print the line a test waits for.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how a workload runs; `None` leaves it as the test runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement<'a> {
    pub cgroup: Option<&'a TestCgroup>,
    pub netns: Option<&'a Netns>,
    /// Pins the workload to this CPU (benchmarks: less noise).
    pub cpu: Option<usize>,
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
}

impl<'a> Placement<'a> {
    pub fn new(cgroup: &'a TestCgroup, netns: &'a Netns) -> Self {
        Self {
            cgroup: Some(cgroup),
            netns: Some(netns),
            ..Self::default()
        }
    }

    pub fn netns_only(netns: &'a Netns) -> Self {
        Self {
            netns: Some(netns),
            ..Self::default()
        }
    }
}

/// A child process; killed and reaped on drop.
#[derive(Debug)]
pub struct Workload {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Workload {
    /// Starts `program ARGS` inside `place`: the child joins the namespace and the cgroup
    /// between fork and exec, so every socket it ever creates belongs to them. Its stdout lines
    /// are what [`Self::expect`] reads.
    pub fn spawn(program: impl AsRef<OsStr>, args: &[&str], place: Placement<'_>) -> Self {
        Self::start(program.as_ref(), args, place, false)
    }

    /// Starts a daemon whose log goes to stderr; its stderr lines are what
    /// [`Self::expect_log`] reads.
    pub fn spawn_daemon(program: impl AsRef<OsStr>, args: &[&str]) -> Self {
        Self::spawn_daemon_with_env(program, args, &[])
    }

    /// [`Self::spawn_daemon`] with extra environment variables.
    pub fn spawn_daemon_with_env(
        program: impl AsRef<OsStr>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let place = Placement {
            env,
            ..Placement::default()
        };
        Self::start(program.as_ref(), args, place, true)
    }

    /// [`Self::spawn_daemon`] inside `place` (a network namespace, a cgroup).
    pub fn spawn_daemon_placed(
        program: impl AsRef<OsStr>,
        args: &[&str],
        place: Placement<'_>,
    ) -> Self {
        Self::start(program.as_ref(), args, place, true)
    }

    fn start(program: &OsStr, args: &[&str], place: Placement<'_>, read_stderr: bool) -> Self {
        let name = format!("{} {}", program.to_string_lossy(), args.join(" "));
        let procs = place.cgroup.map(|cgroup| {
            OpenOptions::new()
                .write(true)
                .open(cgroup.path().join("cgroup.procs"))
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot open cgroup.procs of {}: {e}",
                        cgroup.path().display()
                    )
                })
        });
        let netns = place.netns.map(|ns| {
            ns.as_fd()
                .try_clone_to_owned()
                .unwrap_or_else(|e| panic!("{e}"))
        });
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(place.env.iter().copied())
            .stdin(Stdio::piped());
        if read_stderr {
            command.stdout(Stdio::null()).stderr(Stdio::piped());
        } else {
            command.stdout(Stdio::piped()).stderr(Stdio::inherit());
        }
        enter_on_exec(
            &mut command,
            procs.as_ref().map(AsRawFd::as_raw_fd),
            netns.as_ref().map(AsRawFd::as_raw_fd),
            place.cpu,
        );
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let output: Box<dyn std::io::Read + Send> = if read_stderr {
            Box::new(
                child
                    .stderr
                    .take()
                    .unwrap_or_else(|| panic!("{name}: no stderr")),
            )
        } else {
            Box::new(
                child
                    .stdout
                    .take()
                    .unwrap_or_else(|| panic!("{name}: no stdout")),
            )
        };
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            name,
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next line whose first word is `word` and returns the other words.
    /// Panics on an `error` line, on exit, or after [`LINE_TIMEOUT`].
    pub fn expect(&self, word: &str) -> Vec<String> {
        self.expect_within(word, LINE_TIMEOUT)
    }

    /// [`Self::expect`] with its own deadline.
    pub fn expect_within(&self, word: &str, timeout: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{}: no `{word}` line within {timeout:?}", self.name)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("{}: exited before printing `{word}`", self.name)
                }
            };
            let mut words = line.split_whitespace().map(str::to_string);
            match words.next().as_deref() {
                Some(first) if first == word => return words.collect(),
                Some("error") => panic!("{}: {line}", self.name),
                _ => {}
            }
        }
    }

    /// Writes one command line to the workload's standard input.
    pub fn send(&mut self, line: &str) {
        use std::io::Write as _;
        let name = &self.name;
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("{name}: standard input already closed"));
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{name}: cannot send {line:?}: {e}"));
    }

    /// The next line if one is ready, without waiting.
    pub fn try_line(&self) -> Option<String> {
        self.lines.try_recv().ok()
    }

    /// The next line within `timeout`, or `None` (timeout, or the workload exited).
    pub fn try_line_within(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits for the next line containing `text` (a daemon's log) and returns it.
    /// Panics on exit or after `timeout`.
    pub fn expect_log(&self, text: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        // What it said instead, for the panic message (the last few lines).
        let mut seen: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let why = match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(line) => {
                    if seen.len() == 8 {
                        seen.pop_front();
                    }
                    seen.push_back(line);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    format!("no log line with `{text}` within {timeout:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    format!("exited before logging `{text}`")
                }
            };
            let said: Vec<String> = seen.into_iter().collect();
            panic!("{}: {why}; its last lines:\n{}", self.name, said.join("\n"));
        }
    }

    /// Sends `signal` to the workload.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.pid()).unwrap_or(i32::MAX);
        assert_eq!(
            // SAFETY: a signal to our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// Sends `signal` and waits up to `timeout` for the exit; returns the exit code.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> Option<i32> {
        self.signal(signal);
        let status = crate::wait_for(&format!("{} to exit", self.name), timeout, || {
            self.child.try_wait().ok().flatten()
        });
        status.code()
    }

    /// A duplicate of the workload's file descriptor `fd` (pidfd_getfd(2)): the same socket,
    /// so getsockopt on it reads what the kernel holds for the workload.
    pub fn steal_fd(&self, fd: i32) -> OwnedFd {
        keepalive_agent::existing::steal_fd(self.pid(), fd)
            .unwrap_or_else(|e| panic!("pidfd_getfd({}, {fd}): {e}", self.pid()))
    }

    /// Closes the workload's standard input (probes exit on that) and waits for it to exit.
    pub fn finish(mut self) {
        self.stdin.take();
        let _ignored = self.child.wait();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stdin.take();
        let _ignored = self.child.kill();
        let _ignored = self.child.wait();
    }
}

/// Makes `command`'s child, between fork and exec, enter the network namespace `netns_fd`, run
/// on `cpu` alone and move itself into the cgroup whose `cgroup.procs` is `procs_fd` (each if
/// given). The descriptors must stay open until the child is spawned.
fn enter_on_exec(
    command: &mut Command,
    procs_fd: Option<RawFd>,
    netns_fd: Option<RawFd>,
    cpu: Option<usize>,
) {
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
    // on file descriptors opened before the fork.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = netns_fd {
                rustix::thread::move_into_link_name_space(
                    BorrowedFd::borrow_raw(fd),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
            }
            if let Some(cpu) = cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // "0" moves the writing process itself.
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// User plus system CPU time of `pid` so far, every thread, dead ones too (`/proc/PID/stat`).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .unwrap_or_else(|| panic!("/proc/{pid}/stat has no `)`: {stat}"))
        .1
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    // After the state: ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
    // utime stime (clock ticks).
    // SAFETY: plain system call.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or_else(|e| panic!("CLK_TCK: {e}"));
    Duration::from_millis((fields[10] + fields[11]) * 1000 / ticks)
}
