//! `[annotations]`: the prefix of the pods' annotations and the bounds within which they may
//! set their values.

use std::ops::RangeInclusive;

use serde::Deserialize;
use toml::{Spanned, Value};

use super::{
    Located,
    fields::{integer, parse_mode, seconds},
};
use crate::policy::{Annotations, Field};

const OWNER: &str = "[annotations]";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnotations {
    prefix: Spanned<String>,
    idle: Option<Spanned<Vec<Spanned<Value>>>>,
    interval: Option<Spanned<Vec<Spanned<Value>>>>,
    count: Option<Spanned<Vec<Spanned<Value>>>>,
    modes: Option<Spanned<Vec<Spanned<String>>>>,
}

impl RawAnnotations {
    pub(super) fn into_annotations(
        self,
        at: std::ops::Range<usize>,
    ) -> Result<Annotations, Located> {
        let prefix = prefix(&self.prefix)?;
        let idle = self
            .idle
            .map(|pair| {
                bounds(&pair, &Field::IDLE, |value| {
                    seconds(value, OWNER, &Field::IDLE)
                })
            })
            .transpose()?;
        let interval = self
            .interval
            .map(|pair| {
                bounds(&pair, &Field::INTERVAL, |value| {
                    seconds(value, OWNER, &Field::INTERVAL)
                })
            })
            .transpose()?;
        let count = self
            .count
            .map(|pair| {
                bounds(&pair, &Field::COUNT, |value| {
                    integer(value, OWNER, &Field::COUNT)
                })
            })
            .transpose()?;
        let modes = match &self.modes {
            Some(list) => list
                .get_ref()
                .iter()
                .map(|mode| parse_mode(mode, OWNER))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        if idle.is_none() && interval.is_none() && count.is_none() && modes.is_empty() {
            return Err((
                at,
                format!(
                    "{OWNER} allows pods nothing: give bounds for what they may set, like \
                     idle = [\"10s\", \"5m\"], count = [1, 10] or modes = [\"enforce\", \"fill\"]"
                ),
            ));
        }
        Ok(Annotations {
            prefix,
            idle,
            interval,
            count,
            modes,
        })
    }
}

/// A DNS subdomain (lower-case letters, digits, `-` and `.`, at most 253 characters), as
/// Kubernetes wants an annotation's prefix.
fn prefix(prefix: &Spanned<String>) -> Result<String, Located> {
    let text = prefix.get_ref();
    let labels_ok = text.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    if text.len() > 253 || !labels_ok {
        return Err((
            prefix.span(),
            format!(
                "{OWNER}: field `prefix`: {text:?} is not a DNS name: write one your platform \
                 owns, lower case, like \"keepalive.example.com\" (pods then annotate \
                 keepalive.example.com/idle)"
            ),
        ));
    }
    Ok(text.clone())
}

/// `[low, high]`, each checked by `value`, low <= high.
fn bounds(
    pair: &Spanned<Vec<Spanned<Value>>>,
    field: &Field,
    value: impl Fn(&Spanned<Value>) -> Result<u32, Located>,
) -> Result<RangeInclusive<u32>, Located> {
    let error = |message: String| {
        (
            pair.span(),
            format!("{OWNER}: field `{}`: {message}", field.name),
        )
    };
    let [low, high] = pair.get_ref().as_slice() else {
        return Err(error(format!(
            "write the lowest and the highest value a pod may set, like {} = {}",
            field.name,
            if field.unit.is_empty() {
                "[1, 10]"
            } else {
                "[\"10s\", \"5m\"]"
            }
        )));
    };
    let (low, high) = (value(low)?, value(high)?);
    if low > high {
        return Err(error(format!(
            "the lowest ({low}{}) is above the highest ({high}{})",
            field.unit, field.unit
        )));
    }
    Ok(low..=high)
}
