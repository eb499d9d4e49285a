//! The policy `scan` and `explain` judge by: a file, or the one the running agent enforces
//! (found through its state file: the policy file it reads, with the scopes in force, or the
//! command line's values); with neither, the installed policy, else the built-in default.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::{
    policy::{CgroupPath, Policy, Values, file},
    status::state::{self, State},
};

/// `--state-dir` of `scan` and `explain`.
#[derive(Debug, Clone, clap::Args)]
pub struct StateDir {
    /// Where the running agent writes state.json: without --config, its policy is the one
    /// judged by.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/run/keepalive-agent",
        env = "KEEPALIVE_AGENT_STATE_DIR"
    )]
    pub state_dir: PathBuf,
}

/// A policy and where it came from.
#[derive(Debug)]
pub struct Source {
    pub policy: Policy,
    /// `FILE`, or `the running agent (pid N): FILE`.
    pub description: String,
    /// Anything the reader should know about it (a stale file, a stopped agent).
    pub notes: Vec<String>,
}

/// Where the packages install the policy, and the unit and the image read it.
pub const INSTALLED_POLICY: &str = "/etc/keepalive-agent/policy.toml";

/// `config`, else the running agent's policy, else the installed policy file, else the
/// built-in default (what `run` enforces without --config).
pub fn load(config: Option<&Path>, state_dir: &Path) -> anyhow::Result<Source> {
    load_from(config, state_dir, Path::new(INSTALLED_POLICY))
}

fn load_from(config: Option<&Path>, state_dir: &Path, installed: &Path) -> anyhow::Result<Source> {
    if let Some(path) = config {
        return Ok(Source {
            policy: file::load(path)?,
            description: path.display().to_string(),
            notes: Vec::new(),
        });
    }
    let Some(state) = State::read(state_dir) else {
        let no_agent = format!(
            "no agent's state in {} (none running, or give --state-dir of the agent)",
            State::path(state_dir).display()
        );
        if installed.exists() {
            return Ok(Source {
                policy: file::load(installed)?,
                description: installed.display().to_string(),
                notes: vec![format!(
                    "{no_agent}: judging by the installed policy; --config FILE for another"
                )],
            });
        }
        return Ok(Source {
            policy: Policy::enforce(Values::default(), vec![CgroupPath::root()]),
            description: "the built-in default (what `run` enforces without --config)".into(),
            notes: vec![format!(
                "{no_agent}, and no {}: judging by the built-in default; --config FILE for \
                 another",
                installed.display()
            )],
        });
    };
    let mut notes = Vec::new();
    if !state::alive(state.pid) {
        notes.push(format!(
            "agent pid {} is not running: this is the last policy it applied",
            state.pid
        ));
    }
    let scopes = state
        .scopes
        .iter()
        .map(|scope| CgroupPath::parse(scope).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("the agent's state names a bad scope")?;
    let mut policy = match state.command_line {
        Some(values) => Policy::enforce(
            Values {
                idle_secs: values.idle_secs,
                interval_secs: values.interval_secs,
                count: values.count,
                user_timeout_ms: values.user_timeout_ms,
            },
            scopes.clone(),
        ),
        None => file::load(Path::new(&state.source)).with_context(|| {
            format!(
                "cannot read the running agent's policy file {}",
                state.source
            )
        })?,
    };
    policy.scopes = scopes;
    // The file may have changed since: refused by the agent, or not reloaded yet.
    let now = State::new(&policy, &state.source, state.generation);
    if now.rules != state.rules {
        notes.push(format!(
            "{} differs from the policy the agent applied (generation {}): judging by the \
             file as it is now",
            state.source, state.generation
        ));
    }
    Ok(Source {
        policy,
        description: format!("the running agent's (pid {}): {}", state.pid, state.source),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ka-source-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    #[test]
    fn the_running_agents_policy_is_read_back_from_its_state() {
        let dir = temp_dir();
        let values = Values {
            idle_secs: 30,
            user_timeout_ms: Some(9000),
            ..Values::default()
        };
        let scopes =
            vec![CgroupPath::parse("/kubepods.slice/**").unwrap_or_else(|e| panic!("{e}"))];
        let running = Policy::enforce(values, scopes.clone());
        State::new(&running, state::COMMAND_LINE, 3)
            .write(&dir)
            .unwrap_or_else(|e| panic!("{e}"));
        let source = load(None, &dir).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(source.policy, running);
        assert!(
            source.notes.iter().any(|note| note.contains("not running")),
            "this test is no agent: {:?}",
            source.notes
        );

        let file = dir.join("policy.toml");
        std::fs::write(&file, "[[rule]]\nname = \"a\"\nremote_port = 1\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let applied = file::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let mut state = State::new(&applied, &file.display().to_string(), 4);
        state.scopes = vec!["/a".into()];
        state.write(&dir).unwrap_or_else(|e| panic!("{e}"));
        let source = load(None, &dir).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(source.policy.rules, applied.rules);
        assert_eq!(
            source.policy.scopes,
            [CgroupPath::parse("/a").unwrap_or_else(|e| panic!("{e}"))]
        );
        assert!(!source.notes.iter().any(|note| note.contains("differs")));
        std::fs::write(&file, "[[rule]]\nname = \"b\"\n").unwrap_or_else(|e| panic!("{e}"));
        let source = load(None, &dir).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            source.notes.iter().any(|note| note.contains("differs")),
            "{:?}",
            source.notes
        );
        let _ignored = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_an_agent_the_installed_policy_then_the_default_is_judged_by() {
        let dir = temp_dir();
        let installed = dir.join("installed.toml");
        let state_dir = dir.join("no-agent");
        let source = load_from(None, &state_dir, &installed).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            source.policy,
            Policy::enforce(Values::default(), vec![CgroupPath::root()])
        );
        assert!(source.description.contains("built-in default"));
        assert!(
            source
                .notes
                .iter()
                .any(|note| note.contains("no agent's state")
                    && note.contains(&installed.display().to_string())),
            "{:?}",
            source.notes
        );

        std::fs::write(
            &installed,
            "[[rule]]\nname = \"db\"\nremote_port = 5432\nidle = \"20s\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let source = load_from(None, &state_dir, &installed).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(source.description, installed.display().to_string());
        assert_eq!(source.policy.rules.len(), 1, "{:?}", source.policy);
        assert!(
            source
                .notes
                .iter()
                .any(|note| note.contains("installed policy")),
            "{:?}",
            source.notes
        );
        let _ignored = std::fs::remove_dir_all(&dir);
    }
}
