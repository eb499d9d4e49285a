//! The shape of a policy file (serde, unknown keys refused) and its conversion into a
//! [`Policy`], each problem located in the file.

use std::collections::HashMap;

use serde::Deserialize;
use toml::{Spanned, Value};

use super::{
    Located,
    annotations::RawAnnotations,
    fields::{cidrs, integer, milliseconds, parse_mode, port_ranges, seconds},
};
use crate::policy::{Action, CgroupPath, Direction, Field, Policy, Rule, Values};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    agent: Option<RawAgent>,
    default: Option<RawValues>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    annotations: Option<Spanned<RawAnnotations>>,
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
    ends: Option<bool>,
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
    pod_labels: Option<Spanned<Value>>,
    mode: Option<Spanned<String>>,
    idle: Option<Spanned<Value>>,
    interval: Option<Spanned<Value>>,
    count: Option<Spanned<Value>>,
    user_timeout: Option<Spanned<Value>>,
    lock: Option<bool>,
    ends: Option<bool>,
}

impl RawFile {
    pub(super) fn into_policy(self, text: &str) -> Result<Policy, Located> {
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
        let annotations = self
            .annotations
            .map(|raw| {
                let at = raw.span();
                raw.into_inner().into_annotations(at)
            })
            .transpose()?;
        Ok(Policy {
            scopes,
            default,
            rules,
            existing,
            annotations,
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
            ends: self.ends.unwrap_or(inherited.ends),
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
        let keys = crate::policy::containers::SelectorKeys {
            labels: self.labels.as_ref(),
            container: self.container.as_ref(),
            pod_labels: self.pod_labels.as_ref(),
        };
        let containers = crate::policy::containers::selector(&keys, &owner)?.map(|selector| {
            crate::policy::Selection {
                selector,
                cgroups: Vec::new(),
            }
        });
        let values = RawValues {
            mode: self.mode,
            idle: self.idle,
            interval: self.interval,
            count: self.count,
            user_timeout: self.user_timeout,
            lock: self.lock,
            ends: self.ends,
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
            annotated: false,
        })
    }
}
