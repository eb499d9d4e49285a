//! The keepalive agent: loads the eBPF programs, attaches them to cgroups, compiles the policy
//! into their maps, and keeps it current.

pub mod agent;
pub mod bpffs;
pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod compile;
pub mod containers;
pub mod ends;
pub mod enforcer;
pub mod existing;
pub mod instance;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod plan;
pub mod policy;
pub mod sockopt;
pub mod status;
pub mod sys;
pub mod watch;
pub mod without_keepalive;

pub use cgroup::Cgroup;
pub use enforcer::{Counters, Enforcer, Outcomes, ProgramStats};
pub use policy::{Action, CgroupPath, Mode, Policy, Rule, Values};
