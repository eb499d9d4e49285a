//! Pod annotations as self-service: a team annotates its pod (`<prefix>/idle: "30s"`) and the
//! pod's connections get those values, where the policy's `[annotations]` allows it and within
//! its bounds. An annotation that is unknown, malformed, not allowed or out of bounds refuses
//! them all: the pod keeps what the policy gives it.

use std::{collections::BTreeMap, ops::RangeInclusive};

use super::{Action, Mode, file::parse_duration};

/// The annotations' names under the prefix.
const KEYS: [&str; 4] = ["idle", "interval", "count", "mode"];

/// `[annotations]`: what a pod may ask for itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Annotations {
    /// A DNS name the platform owns: the annotations are `<prefix>/idle`, `/interval`,
    /// `/count` and `/mode`.
    pub prefix: String,
    /// Bounds in seconds; None: not annotatable.
    pub idle: Option<RangeInclusive<u32>>,
    pub interval: Option<RangeInclusive<u32>>,
    /// Bounds of the probe count; None: not annotatable.
    pub count: Option<RangeInclusive<u32>>,
    /// The modes an annotation may choose; empty: the mode is not annotatable.
    pub modes: Vec<Mode>,
}

impl Annotations {
    /// What a pod's `annotations` make of `base` (what the policy gives the pod): None when they
    /// name nothing under the prefix; Err with the reason when one of them is refused.
    pub fn apply(
        &self,
        annotations: &BTreeMap<String, String>,
        base: &Action,
    ) -> Result<Option<Action>, String> {
        let mut action = *base;
        let mut any = false;
        for (name, value) in annotations {
            let Some(key) = name
                .strip_prefix(self.prefix.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
            else {
                continue;
            };
            any = true;
            let refused = |why: String| format!("annotation {name}: {value:?}: {why}");
            match key {
                "idle" => {
                    action.values.idle_secs =
                        seconds(value, self.idle.as_ref()).map_err(refused)?;
                }
                "interval" => {
                    action.values.interval_secs =
                        seconds(value, self.interval.as_ref()).map_err(refused)?;
                }
                "count" => {
                    action.values.count = count(value, self.count.as_ref()).map_err(refused)?
                }
                "mode" => action.mode = self.mode(value).map_err(refused)?,
                other => {
                    return Err(format!(
                        "annotation {name}: {other:?} is not a keepalive setting: use {}",
                        KEYS.map(|key| format!("{}/{key}", self.prefix)).join(", ")
                    ));
                }
            }
        }
        Ok(any.then_some(action))
    }

    fn mode(&self, value: &str) -> Result<Mode, String> {
        if self.modes.is_empty() {
            return Err("the policy does not let pods choose their mode".into());
        }
        self.modes
            .iter()
            .copied()
            .find(|mode| mode.name() == value.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = self.modes.iter().map(|mode| mode.name()).collect();
                format!("not a mode the policy allows: {}", names.join(", "))
            })
    }
}

/// Whole seconds within `bounds`.
fn seconds(value: &str, bounds: Option<&RangeInclusive<u32>>) -> Result<u32, String> {
    let bounds = bounds.ok_or("the policy does not let pods set it")?;
    let ms = parse_duration(value)?;
    if ms % 1000 != 0 {
        return Err("not a whole number of seconds".into());
    }
    u32::try_from(ms / 1000)
        .ok()
        .filter(|secs| bounds.contains(secs))
        .ok_or_else(|| {
            format!(
                "outside the policy's bounds {}s..={}s",
                bounds.start(),
                bounds.end()
            )
        })
}

fn count(value: &str, bounds: Option<&RangeInclusive<u32>>) -> Result<u32, String> {
    let bounds = bounds.ok_or("the policy does not let pods set it")?;
    let number: u32 = value
        .trim()
        .parse()
        .map_err(|_| "not a whole number".to_string())?;
    if bounds.contains(&number) {
        Ok(number)
    } else {
        Err(format!(
            "outside the policy's bounds {}..={}",
            bounds.start(),
            bounds.end()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Values;

    fn allowed() -> Annotations {
        Annotations {
            prefix: "keepalive.example.com".into(),
            idle: Some(10..=300),
            interval: None,
            count: Some(1..=10),
            modes: vec![Mode::Enforce, Mode::Fill],
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_string(), (*value).to_string()))
            .collect()
    }

    #[test]
    fn annotations_inside_the_bounds_change_only_what_they_name() {
        let base = Action::enforce(Values::default());
        let Ok(Some(action)) = allowed().apply(
            &annotations(&[
                ("keepalive.example.com/idle", "20s"),
                ("keepalive.example.com/mode", "fill"),
                ("other.example.com/idle", "1s"),
            ]),
            &base,
        ) else {
            panic!("refused")
        };
        assert_eq!(action.values.idle_secs, 20);
        assert_eq!(action.mode, Mode::Fill);
        assert_eq!(action.values.count, base.values.count);
        assert_eq!(action.values.interval_secs, base.values.interval_secs);
    }

    #[test]
    fn no_annotation_under_the_prefix_is_no_answer() {
        let base = Action::enforce(Values::default());
        assert_eq!(
            allowed().apply(
                &annotations(&[("app", "x"), ("keepalive.example.com.evil/idle", "20s")]),
                &base
            ),
            Ok(None)
        );
    }

    #[test]
    fn each_kind_of_bad_annotation_is_refused_with_its_reason() {
        let base = Action::enforce(Values::default());
        for (key, value, reason) in [
            ("idle", "2s", "outside the policy's bounds 10s..=300s"),
            ("idle", "20", "is not a duration"),
            ("idle", "1500ms", "whole number of seconds"),
            ("interval", "5s", "does not let pods set it"),
            ("count", "x", "not a whole number"),
            ("count", "11", "bounds 1..=10"),
            ("mode", "exempt", "allows: enforce, fill"),
            ("probes", "3", "not a keepalive setting"),
        ] {
            let name = format!("keepalive.example.com/{key}");
            let refused = allowed().apply(&annotations(&[(&name, value)]), &base);
            let Err(why) = refused else {
                panic!("{key}={value} accepted: {refused:?}")
            };
            assert!(why.contains(reason), "{key}={value}: {why}");
            assert!(
                why.contains(&name),
                "{key}={value}: names the annotation: {why}"
            );
        }
    }
}
