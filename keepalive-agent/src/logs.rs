//! Where the logs go and how verbose they are: text, JSON or native journal entries on stderr;
//! `--log-level`, else RUST_LOG, else `info`.

use std::{io::IsTerminal as _, os::fd::AsFd as _};

use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The journal when stderr is connected to it, else text.
    Auto,
    Text,
    Json,
    Journald,
}

/// Installs the global subscriber (and forwards `log` records, aya-log's among them). `level`:
/// a tracing filter directive (`debug`), else RUST_LOG, else `info`.
pub fn init(format: Format, level: Option<&str>) {
    let filter = match level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let format = effective(format, stderr_is_journal());
    let (journald, journal_error) = match format {
        Format::Journald => match tracing_journald::layer() {
            Ok(layer) => (
                Some(
                    layer
                        .with_syslog_identifier("keepalive-agent".to_string())
                        .with_priority_mappings(priorities()),
                ),
                None,
            ),
            Err(error) => (None, Some(error)),
        },
        Format::Auto | Format::Text | Format::Json => (None, None),
    };
    let text = (journald.is_none() && format != Format::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = (format == Format::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(journald)
        .init();
    if let Some(error) = journal_error {
        tracing::warn!(%error, "cannot write to the journal; logging text to stderr");
    }
}

/// Journal priorities: routine `info` lines are informational (6), not notices (5, which
/// journalctl shows in bold), so warnings and errors stand out.
fn priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        info: Priority::Informational,
        debug: Priority::Debug,
        ..tracing_journald::PriorityMappings::new()
    }
}

/// `auto` made concrete: the journal when stderr is connected to it, else text.
fn effective(format: Format, journal: bool) -> Format {
    match format {
        Format::Auto if journal => Format::Journald,
        Format::Auto => Format::Text,
        other => other,
    }
}

/// Whether stderr is the stream systemd connected to the journal: `$JOURNAL_STREAM` is its
/// `device:inode` (a child whose stderr was redirected inherits the variable, not the stream).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(stream) = std::env::var("JOURNAL_STREAM").ok() else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(stderr)
        .metadata()
        .is_ok_and(|meta| dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_the_journal_only_when_stderr_is_connected_to_it() {
        assert_eq!(effective(Format::Auto, true), Format::Journald);
        assert_eq!(effective(Format::Auto, false), Format::Text);
        assert_eq!(effective(Format::Json, true), Format::Json);
        assert_eq!(effective(Format::Text, true), Format::Text);
    }
}
