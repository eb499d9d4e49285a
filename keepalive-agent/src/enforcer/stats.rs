//! What the kernel counts: the programs' counters summed over CPUs, and its accounting of the
//! programs themselves.

use std::time::Duration;

use keepalive_common::{AttachRecord, Outcome, Stat, ends::End};

use super::{EnforcerError, PinnedMaps, maps};

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

/// How one rule slot's connections ended, summed over CPUs, in [`End`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ends(pub [u64; End::COUNT as usize]);

impl Ends {
    pub fn get(&self, end: End) -> u64 {
        self.0[end as usize]
    }
}

/// The kernel's own accounting of the sock_ops program (with BPF run-time stats on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    pub id: u32,
    pub run_count: u64,
    pub run_time: Duration,
}

impl PinnedMaps {
    /// The global counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, EnforcerError> {
        maps::counters(self)
    }

    /// The outcomes of a rule slot, summed over CPUs.
    pub fn outcomes(&self, slot: u32) -> Result<Outcomes, EnforcerError> {
        maps::outcomes(self, slot)
    }

    /// How a rule slot's connections ended, summed over CPUs.
    pub fn ends(&self, slot: u32) -> Result<Ends, EnforcerError> {
        maps::ends(self, slot)
    }

    /// The records by cgroup id.
    pub fn records(&self) -> Result<Vec<(u64, AttachRecord)>, EnforcerError> {
        maps::cgroup_records(self)
    }
}

/// Turns on the kernel's run-time accounting of BPF programs (`run_time_ns`, `run_cnt`) for as
/// long as the returned descriptor is open (BPF_ENABLE_STATS): nothing global to restore.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, aya::sys::SyscallError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
}
