//! What the agent is told to do, as `commands::run` parsed it from the command line: no clap
//! types below this point, and the cgroups the user named already read
//! ([`crate::cgroup::named`]).

use std::path::PathBuf;

use crate::policy::{CgroupPath, Policy, Values, file};

/// The agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The policy file, read again on every reload; without one, `values` enforced on
    /// `scopes` (the root by default).
    pub file: Option<PathBuf>,
    pub values: Values,
    /// Where to enforce, overriding the file's `[agent] cgroups`; empty: the file's.
    pub scopes: Vec<CgroupPath>,
    /// Leave connections that exist when a policy takes effect as they are.
    pub no_existing: bool,
    /// Leave enforcement pinned when stopping.
    pub persist: bool,
    /// The bpffs mount the pins live under.
    pub bpffs: PathBuf,
    /// Where state.json goes, for `status`.
    pub state_dir: PathBuf,
}

impl Config {
    /// The policy this configuration describes. The file is read again each time, so this is
    /// also the reload.
    pub fn policy(&self) -> anyhow::Result<Policy> {
        let mut policy = match &self.file {
            Some(path) => file::load(path)?,
            None => Policy::enforce(self.values, vec![CgroupPath::root()]),
        };
        if !self.scopes.is_empty() {
            policy.scopes.clone_from(&self.scopes);
        }
        if self.no_existing {
            policy.existing = false;
        }
        Ok(policy)
    }

    /// What the policy comes from, for the state file and the logs: the file, or
    /// `command line`.
    pub fn source(&self) -> String {
        self.file.as_ref().map_or_else(
            || crate::status::state::COMMAND_LINE.to_string(),
            |path| path.display().to_string(),
        )
    }
}
