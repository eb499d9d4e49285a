//! Running commands.

use std::process::{Command, ExitStatus};

use anyhow::{Context as _, bail};

/// Runs `command`, echoing it, and fails unless it exits 0.
pub(crate) fn run_status(command: &mut Command) -> anyhow::Result<()> {
    let status = status(command)?;
    if !status.success() {
        bail!("{} failed: {status}", describe(command));
    }
    Ok(())
}

/// Runs `command`, echoing it, and returns how it ended.
pub(crate) fn status(command: &mut Command) -> anyhow::Result<ExitStatus> {
    eprintln!("xtask: $ {}", describe(command));
    command
        .status()
        .with_context(|| format!("cannot run {}", describe(command)))
}

fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned()),
    );
    words.join(" ")
}
