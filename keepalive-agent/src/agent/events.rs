//! What the loop tells the agent: typed events, and the signals among them.

use crate::watch::Change;

/// What the loop tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Something changed in the policy file's directory.
    PolicyFileChanged,
    /// Cgroups appeared or vanished below a watched root (or events were lost).
    CgroupsChanged(Change),
    Signal(Signal),
    /// No event for the health interval (`Enforcer::health_interval`): time to check that
    /// enforcement is where it should be.
    Tick,
    /// A container engine reported containers that started, stopped or changed.
    ContainersChanged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: stop.
    Interrupt,
    /// SIGTERM: stop.
    Terminate,
    /// SIGHUP: read the policy again.
    Hangup,
    /// SIGUSR2 from `run --take-over`: exit, leaving enforcement pinned for the successor.
    HandOver,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
            Self::Hangup => "SIGHUP",
            Self::HandOver => "SIGUSR2",
        }
    }

    /// Whether the agent stops on it.
    pub fn stops(self) -> bool {
        self != Self::Hangup
    }
}
