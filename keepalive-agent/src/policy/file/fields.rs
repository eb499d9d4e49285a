//! One value of a policy file each: modes, durations, seconds, milliseconds, CIDRs, port
//! ranges, with errors that say what is allowed.

use toml::{Spanned, Value};

use super::Located;
use crate::policy::{Cidr, Field, Mode, PortRange};

pub(super) fn parse_mode(mode: &Spanned<String>, owner: &str) -> Result<Mode, Located> {
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
pub(super) fn seconds(value: &Spanned<Value>, owner: &str, field: &Field) -> Result<u32, Located> {
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

pub(super) fn milliseconds(value: &Spanned<Value>, owner: &str) -> Result<u32, Located> {
    let field = Field::USER_TIMEOUT;
    let ms = duration_ms(value, owner, field.name)?;
    field
        .check(ms)
        .map_err(|e| (value.span(), format!("{owner}: {e}")))
}

pub(super) fn integer(value: &Spanned<Value>, owner: &str, field: &Field) -> Result<u32, Located> {
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

pub(super) fn cidrs(value: &Spanned<Value>, owner: &str) -> Result<Vec<Cidr>, Located> {
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

pub(super) fn port_ranges(
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
