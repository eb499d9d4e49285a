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

/// What a fresh machine has at /sys/fs/bpf: nothing mounted (no systemd as PID 1 mounts
/// bpffs there). Runs `command` in a private mount namespace with every mount at /sys/fs/bpf
/// taken away, so a test that relies on one an earlier run or the developer left fails here
/// as it would on a fresh machine; and fails if the tests left bpffs mounted there. The
/// host's own mounts are untouched (private propagation).
pub(crate) fn as_on_a_fresh_machine(command: &Command) -> Command {
    const SCRIPT: &str = r#"
while mountpoint -q /sys/fs/bpf; do umount --lazy /sys/fs/bpf || exit 1; done
"$@"
status=$?
if mountpoint -q /sys/fs/bpf; then
    echo "xtask: the tests left a mount at /sys/fs/bpf: a test must mount what it needs in a place of its own and unmount it" >&2
    [ "$status" -ne 0 ] || status=1
fi
exit "$status"
"#;
    let mut wrapped = Command::new("unshare");
    wrapped
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            SCRIPT,
            "sh",
        ])
        .arg(command.get_program())
        .args(command.get_args());
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}
