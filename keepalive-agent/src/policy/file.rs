//! Policy files (TOML): parsing and checking, with errors that name the file, the line, the
//! field and what is allowed. The schema is documented in docs/policy.md.

//!
//! Modules: [`raw`] is the file's shape (serde) and its conversion into a [`Policy`];
//! [`fields`] checks one value each (modes, durations, seconds, CIDRs, port ranges).

mod annotations;
mod fields;
mod raw;
mod trust;

use std::{
    fs, io,
    ops::Range,
    path::{Path, PathBuf},
};

pub use self::fields::parse_duration;
use self::raw::RawFile;
use super::Policy;

/// A policy file that cannot be used. The running policy is never touched by one.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read policy file {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("{} is a directory, not a policy file", path.display())]
    Directory { path: PathBuf },
    #[error("refusing policy file {}: {reason}", path.display())]
    Untrusted { path: PathBuf, reason: String },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Reads and checks a policy file.
pub fn load(path: &Path) -> Result<Policy, FileError> {
    if path.is_dir() {
        return Err(FileError::Directory {
            path: path.to_path_buf(),
        });
    }
    if let Some(reason) = trust::distrust(path) {
        return Err(FileError::Untrusted {
            path: path.to_path_buf(),
            reason,
        });
    }
    let text = fs::read_to_string(path).map_err(|error| FileError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    parse(path, &text)
}

/// Checks policy `text`; `path` names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<Policy, FileError> {
    // Empty would mean "the built-in default on the whole host"; far more often it is a file
    // truncated by a writer that has not written yet, or a failed generation step.
    if text.trim().is_empty() {
        return Err(invalid(
            path,
            text,
            &(0..0),
            "the file is empty; for the built-in default everywhere, write an empty [default] \
             table"
                .to_string(),
        ));
    }
    let raw: RawFile = toml::from_str(text).map_err(|error| {
        let at = error.span().unwrap_or(0..0);
        invalid(path, text, &at, toml_message(text, &at, error.message()))
    })?;
    raw.into_policy(text)
        .map_err(|(at, message)| invalid(path, text, &at, message))
}

/// The TOML parser's message, naming the key of the line it points at (serde's type errors
/// name the expected type, not the field) and without the names of our internal types.
fn toml_message(text: &str, at: &Range<usize>, message: &str) -> String {
    let message = message.trim_end();
    let message = if message.contains(" as i128") {
        "the number is too large".to_string()
    } else {
        ["RawFile", "RawAgent", "RawValues", "RawRule"]
            .iter()
            .fold(message.to_string(), |message, raw| {
                message.replace(&format!("struct {raw}"), "a table")
            })
    };
    match key_at(text, at.start) {
        Some(key) if !message.contains("field `") => format!("field `{key}`: {message}"),
        _ => message,
    }
}

/// The bare key of the `key = value` line holding byte `offset`, if it is one.
fn key_at(text: &str, offset: usize) -> Option<&str> {
    let start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = text.get(start..)?.lines().next()?.split_once('=')?;
    let key = key.trim();
    let bare = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    (!key.is_empty() && key.chars().all(bare)).then_some(key)
}

/// 1-based line and column of byte `offset`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

fn invalid(path: &Path, text: &str, at: &Range<usize>, message: String) -> FileError {
    let (line, column) = position(text, at.start);
    FileError::Invalid {
        path: path.to_path_buf(),
        line,
        column,
        message,
    }
}

/// A problem at a place in the file.
pub(super) type Located = (Range<usize>, String);

#[cfg(test)]
mod tests;
