//! The repository's own files, as the deployment tests read them, and the one check that a
//! command line they give the agent parses.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::agent_bin;

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("the tests crate has no parent directory"))
        .to_path_buf()
}

/// A file of the repository, as text.
pub fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs the agent with `args` and `--help` appended: clap rejects any unknown or malformed
/// flag before it prints the help. `source` names where the arguments come from.
pub fn assert_agent_accepts(args: &[String], source: &str) {
    let out = Command::new(agent_bin())
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("cannot run the agent: {e}"));
    assert!(
        out.status.success(),
        "{source}: keepalive-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
