//! The keepalive agent: loads the sock_ops program, attaches it to cgroups, pushes the policy.

pub mod cgroup;
pub mod cli;
pub mod enforcer;
pub mod policy;
pub mod run;

pub use cgroup::Cgroup;
pub use enforcer::{Counters, Enforcer, ProgramStats};
pub use policy::Policy;
