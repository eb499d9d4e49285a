//! Policy files (TOML): parsing and checking, with errors that name the file, the line, the
//! field and what is allowed. The schema is documented in docs/policy.md.

use std::{
    collections::HashMap,
    fs, io,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::{Spanned, Value};

use super::{Action, CgroupPath, Cidr, Direction, Field, Mode, Policy, PortRange, Rule, Values};

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
type Located = (Range<usize>, String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    agent: Option<RawAgent>,
    default: Option<RawValues>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    cgroups: Option<Spanned<Vec<Spanned<String>>>>,
    existing: Option<bool>,
}

/// The value keys, shared by `[default]` and `[[rule]]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawValues {
    mode: Option<Spanned<String>>,
    idle: Option<Spanned<Value>>,
    interval: Option<Spanned<Value>>,
    count: Option<Spanned<Value>>,
    user_timeout: Option<Spanned<Value>>,
    lock: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    remote: Option<Spanned<Value>>,
    remote_port: Option<Spanned<Value>>,
    local_port: Option<Spanned<Value>>,
    direction: Option<Spanned<String>>,
    labels: Option<Spanned<Value>>,
    container: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    idle: Option<Spanned<Value>>,
    interval: Option<Spanned<Value>>,
    count: Option<Spanned<Value>>,
    user_timeout: Option<Spanned<Value>>,
    lock: Option<bool>,
}

impl RawFile {
    fn into_policy(self, text: &str) -> Result<Policy, Located> {
        let default_action = Action::enforce(Values::default());
        let default = match self.default {
            Some(raw) => raw.into_action("default", &default_action)?,
            None => default_action,
        };
        let (scopes, existing) = match self.agent {
            Some(agent) => (agent.scopes()?, agent.existing.unwrap_or(true)),
            None => (vec![CgroupPath::root()], true),
        };
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut rules = Vec::with_capacity(self.rule.len());
        // Rules come in file order: count lines incrementally, not from the start each time.
        let (mut line, mut counted) = (1, 0);
        for (i, raw) in self.rule.into_iter().enumerate() {
            let at = raw.span();
            let upto = at.start.min(text.len()).max(counted);
            line += text[counted..upto].matches('\n').count();
            counted = upto;
            let rule = raw.into_inner().into_rule(i, line, &default)?;
            if let Some(first) = names.insert(rule.name.clone(), line) {
                return Err((
                    at,
                    format!(
                        "rule name {:?} is already used by the rule at line {first}; names must be \
                         unique",
                        rule.name
                    ),
                ));
            }
            rules.push(rule);
        }
        if rules.len() > keepalive_common::limits::RULES as usize {
            return Err((
                0..0,
                format!(
                    "{} rules; the limit is {} (keepalive_common::limits::RULES)",
                    rules.len(),
                    keepalive_common::limits::RULES
                ),
            ));
        }
        Ok(Policy {
            scopes,
            default,
            rules,
            existing,
        })
    }
}

impl RawAgent {
    fn scopes(&self) -> Result<Vec<CgroupPath>, Located> {
        let Some(list) = &self.cgroups else {
            return Ok(vec![CgroupPath::root()]);
        };
        if list.get_ref().is_empty() {
            return Err((
                list.span(),
                "field `cgroups`: the list is empty; name at least one cgroup (\"/\" is all)"
                    .into(),
            ));
        }
        list.get_ref()
            .iter()
            .map(|entry| {
                CgroupPath::parse(entry.get_ref())
                    .map_err(|e| (entry.span(), format!("field `cgroups`: {e}")))
            })
            .collect()
    }
}

impl RawValues {
    /// The action these keys describe, each absent key taken from `inherited`.
    fn into_action(self, owner: &str, inherited: &Action) -> Result<Action, Located> {
        let mode = match &self.mode {
            Some(mode) => parse_mode(mode, owner)?,
            None => inherited.mode,
        };
        let mut values = inherited.values;
        if let Some(idle) = &self.idle {
            values.idle_secs = seconds(idle, owner, &Field::IDLE)?;
        }
        if let Some(interval) = &self.interval {
            values.interval_secs = seconds(interval, owner, &Field::INTERVAL)?;
        }
        if let Some(count) = &self.count {
            values.count = integer(count, owner, &Field::COUNT)?;
        }
        if let Some(timeout) = &self.user_timeout {
            values.user_timeout_ms = Some(milliseconds(timeout, owner)?);
        }
        Ok(Action {
            mode,
            values,
            lock: self.lock.unwrap_or(inherited.lock),
        })
    }
}

impl RawRule {
    fn into_rule(self, index: usize, line: usize, default: &Action) -> Result<Rule, Located> {
        let name = match &self.name {
            Some(name) if name.get_ref().trim().is_empty() => {
                return Err((name.span(), "field `name`: must not be empty".into()));
            }
            Some(name) => name.get_ref().clone(),
            None => format!("rule {}", index + 1),
        };
        let owner = format!("rule {:?}", name);
        let cgroup = self
            .cgroup
            .as_ref()
            .map(|cgroup| {
                CgroupPath::parse(cgroup.get_ref())
                    .map_err(|e| (cgroup.span(), format!("{owner}: field `cgroup`: {e}")))
            })
            .transpose()?;
        let remote = match &self.remote {
            Some(remote) => cidrs(remote, &owner)?,
            None => Vec::new(),
        };
        let remote_ports = match &self.remote_port {
            Some(ports) => port_ranges(ports, &owner, "remote_port")?,
            None => Vec::new(),
        };
        let local_ports = match &self.local_port {
            Some(ports) => port_ranges(ports, &owner, "local_port")?,
            None => Vec::new(),
        };
        let direction = self
            .direction
            .as_ref()
            .map(|direction| match direction.get_ref().as_str() {
                "outbound" => Ok(Direction::Outbound),
                "inbound" => Ok(Direction::Inbound),
                other => Err((
                    direction.span(),
                    format!(
                        "{owner}: field `direction`: {other:?} is not a direction: use \
                         \"outbound\" (connections the cgroup opens) or \"inbound\" (connections \
                         it accepts)"
                    ),
                )),
            })
            .transpose()?;
        let containers =
            super::containers::selector(self.labels.as_ref(), self.container.as_ref(), &owner)?
                .map(|selector| super::Selection {
                    selector,
                    cgroups: Vec::new(),
                });
        let values = RawValues {
            mode: self.mode,
            idle: self.idle,
            interval: self.interval,
            count: self.count,
            user_timeout: self.user_timeout,
            lock: self.lock,
        };
        Ok(Rule {
            line,
            action: values.into_action(&owner, default)?,
            name,
            cgroup,
            remote,
            remote_ports,
            local_ports,
            direction,
            containers,
        })
    }
}

fn parse_mode(mode: &Spanned<String>, owner: &str) -> Result<Mode, Located> {
    Mode::ALL
        .into_iter()
        .find(|candidate| candidate.name() == mode.get_ref())
        .ok_or_else(|| {
            (
                mode.span(),
                format!(
                    "{owner}: field `mode`: {:?} is not a mode: use enforce, fill, cap, exempt or \
                     audit",
                    mode.get_ref()
                ),
            )
        })
}

/// `"45s"`, `"5m"`, `"1h30m"`, `"1500ms"` as milliseconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration: write a number and a unit, like \"45s\", \"5m\", \"1h30m\" or \"1500ms\""
        )
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        total = number
            .checked_mul(scale)
            .and_then(|ms| total.checked_add(ms))
            .ok_or_else(bad)?;
        rest = &rest[unit..];
    }
    Ok(total)
}

fn duration_ms(value: &Spanned<Value>, owner: &str, field: &str) -> Result<u64, Located> {
    match value.get_ref() {
        Value::String(text) => parse_duration(text)
            .map_err(|e| (value.span(), format!("{owner}: field `{field}`: {e}"))),
        other => Err((
            value.span(),
            format!(
                "{owner}: field `{field}`: {other} has no unit: write a duration as a string, like \
                 \"45s\", \"5m\" or \"1500ms\""
            ),
        )),
    }
}

/// A duration in whole seconds within the field's bounds (idle, interval).
fn seconds(value: &Spanned<Value>, owner: &str, field: &Field) -> Result<u32, Located> {
    let ms = duration_ms(value, owner, field.name)?;
    if ms % 1000 != 0 {
        return Err((
            value.span(),
            format!(
                "{owner}: field `{}`: {ms} ms is not a whole number of seconds ({} counts in \
                 seconds)",
                field.name, field.option
            ),
        ));
    }
    field
        .check(ms / 1000)
        .map_err(|e| (value.span(), format!("{owner}: {e}")))
}

fn milliseconds(value: &Spanned<Value>, owner: &str) -> Result<u32, Located> {
    let field = Field::USER_TIMEOUT;
    let ms = duration_ms(value, owner, field.name)?;
    field
        .check(ms)
        .map_err(|e| (value.span(), format!("{owner}: {e}")))
}

fn integer(value: &Spanned<Value>, owner: &str, field: &Field) -> Result<u32, Located> {
    let number = match value.get_ref() {
        Value::Integer(number) => *number,
        other => {
            return Err((
                value.span(),
                format!(
                    "{owner}: field `{}`: {other} is not a whole number",
                    field.name
                ),
            ));
        }
    };
    let in_range = u64::try_from(number).map_err(|_| {
        (
            value.span(),
            format!(
                "{owner}: field `{}`: {number} is out of range: allowed {}..={} ({})",
                field.name,
                field.range.start(),
                field.range.end(),
                field.option
            ),
        )
    })?;
    field
        .check(in_range)
        .map_err(|e| (value.span(), format!("{owner}: {e}")))
}

/// One item or an array of them.
fn items(value: &Spanned<Value>) -> Vec<&Value> {
    match value.get_ref() {
        Value::Array(items) => items.iter().collect(),
        single => vec![single],
    }
}

fn cidrs(value: &Spanned<Value>, owner: &str) -> Result<Vec<Cidr>, Located> {
    let error = |message: String| (value.span(), format!("{owner}: field `remote`: {message}"));
    let list = items(value);
    if list.is_empty() {
        return Err(error(
            "an empty list matches nothing; remove the key to match any address".into(),
        ));
    }
    list.into_iter()
        .map(|item| match item {
            Value::String(text) => Cidr::parse(text).map_err(error),
            other => Err(error(format!(
                "{other} is not a CIDR string like \"10.0.0.0/8\" or \"fd00::/8\""
            ))),
        })
        .collect()
}

fn port_ranges(
    value: &Spanned<Value>,
    owner: &str,
    field: &str,
) -> Result<Vec<PortRange>, Located> {
    let error = |message: String| (value.span(), format!("{owner}: field `{field}`: {message}"));
    let list = items(value);
    if list.is_empty() {
        return Err(error(
            "an empty list matches nothing; remove the key to match any port".into(),
        ));
    }
    let port = |text: &str| -> Result<u16, Located> {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| error(format!("{text:?} is not a port: allowed 1..=65535")))
    };
    list.into_iter()
        .map(|item| {
            let (first, last) = match item {
                Value::Integer(number) => {
                    let single = port(&number.to_string())?;
                    (single, single)
                }
                Value::String(text) => match text.split_once('-') {
                    Some((first, last)) => (port(first)?, port(last)?),
                    None => {
                        let single = port(text)?;
                        (single, single)
                    }
                },
                other => {
                    return Err(error(format!(
                        "{other} is not a port or range: write 5432, \"5432\" or \"8000-8999\""
                    )));
                }
            };
            if first > last {
                return Err(error(format!(
                    "{first}-{last} is an empty range; write it low-high"
                )));
            }
            Ok(PortRange { first, last })
        })
        .collect()
}

mod trust;

#[cfg(test)]
mod tests;
