//! What the running agent enforces, for `status`: the policy's source, generation and rule
//! names by counter slot. Written (atomically, by rename) after every apply; the maps and links
//! themselves are in bpffs.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    enforcer::MissingFeature,
    policy::{CgroupPath, Policy},
};

const FILE: &str = "state.json";

/// A rule as `status` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleState {
    /// Counter slot (0: the default).
    pub slot: u32,
    pub name: String,
    /// Line in the policy file (0: not from a file).
    pub line: usize,
    /// What it does, e.g. `enforce idle 60 s, interval 5 s, count 3, ...`.
    pub action: String,
    /// The keepalive idle it gives (None: it leaves keepalive alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_secs: Option<u32>,
    /// For a rule with `labels` or `container`: what it selects and the cgroups of the
    /// containers it applies to now, or that it applies to nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub pid: u32,
    /// The policy file, or `command line`.
    pub source: String,
    pub generation: u32,
    /// Seconds since the epoch of the last apply.
    pub applied_at: u64,
    pub scopes: Vec<String>,
    pub rules: Vec<RuleState>,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    /// Attachments the agent found missing (removed by someone else) and could not put back
    /// yet: where enforcement is missing.
    #[serde(default)]
    pub faults: Vec<String>,
    /// Optional parts this kernel refused (e.g. the lock on 5.10).
    #[serde(default)]
    pub missing_features: Vec<MissingFeature>,
    /// The values of a policy given on the command line (there is no file to read it back
    /// from), for `scan` and `explain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_line: Option<CommandLine>,
}

/// `run --idle --interval --count --user-timeout`, enforced on every connection of the scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLine {
    pub idle_secs: u32,
    pub interval_secs: u32,
    pub count: u32,
    pub user_timeout_ms: Option<u32>,
}

/// [`State::source`] of a policy given on the command line.
pub const COMMAND_LINE: &str = "command line";

impl State {
    pub fn new(policy: &Policy, source: &str, generation: u32) -> Self {
        let mut rules = vec![RuleState {
            slot: 0,
            name: "default".into(),
            line: 0,
            action: policy.default.to_string(),
            idle_secs: policy.default.idle_secs(),
            containers: None,
        }];
        rules.extend(policy.rules.iter().enumerate().map(|(i, rule)| RuleState {
            slot: Policy::slot(crate::policy::Decision::Rule(i)),
            name: rule.name.clone(),
            line: rule.line,
            action: rule.action.to_string(),
            idle_secs: rule.action.idle_secs(),
            containers: rule.containers.as_ref().map(|selection| {
                if selection.cgroups.is_empty() {
                    let what = if selection.selector.pod_labels.is_empty() {
                        "container"
                    } else {
                        "pod"
                    };
                    format!(
                        "{}: no running {what} matches; the rule applies to nothing",
                        selection.selector
                    )
                } else {
                    let cgroups: Vec<&str> =
                        selection.cgroups.iter().map(CgroupPath::as_str).collect();
                    format!("{}: {}", selection.selector, cgroups.join(" "))
                }
            }),
        }));
        Self {
            pid: std::process::id(),
            source: source.to_string(),
            generation,
            applied_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
            scopes: policy.scopes.iter().map(CgroupPath::to_string).collect(),
            rules,
            reloads_succeeded: 0,
            reloads_failed: 0,
            faults: Vec::new(),
            missing_features: Vec::new(),
            command_line: (source == COMMAND_LINE).then_some(CommandLine {
                idle_secs: policy.default.values.idle_secs,
                interval_secs: policy.default.values.interval_secs,
                count: policy.default.values.count,
                user_timeout_ms: policy.default.values.user_timeout_ms,
            }),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// Writes the file (a new file renamed over the old: readers never see half of it).
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let staging = dir.join(format!(".{FILE}.{}", std::process::id()));
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        fs::write(&staging, text)?;
        fs::rename(&staging, Self::path(dir))
    }

    /// The state, if an agent wrote one.
    pub fn read(dir: &Path) -> Option<Self> {
        let text = fs::read_to_string(Self::path(dir)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn remove(dir: &Path) {
        let _ignored = fs::remove_file(Self::path(dir));
    }
}

/// Whether `pid` is a live (not zombie) keepalive-agent process.
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // pid (comm) state ...: the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    stat.contains("(keepalive-agent)") && !matches!(state, Some("Z" | "X"))
}
