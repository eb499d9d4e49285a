//! Rules that select containers by what their engine knows of them: `labels` (all must match)
//! and `container` (a glob on the container's name), or Kubernetes pods by their labels
//! (`pod_labels`), as the policy file writes them. They are resolved to the cgroups of the
//! matching containers or pods in [`crate::containers`]; from then on such a rule is a rule of
//! those cgroups, as specific as each of them ([`Policy::candidates`]). Matching nothing, it
//! applies to nothing.

use std::{collections::BTreeMap, fmt, ops::Range};

use globset::{Glob, GlobBuilder};
use toml::{Spanned, Value};

use super::{CgroupPath, Policy, Rule};

/// What a rule's `labels` and `container` keys ask for, or its `pod_labels`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Selector {
    /// Every one must be present with this value.
    pub labels: BTreeMap<String, String>,
    /// A glob on the container name (`*`, `?`, `[...]`).
    pub name: Option<Glob>,
    /// Not empty: the rule selects pods with every one of these labels, not containers (the
    /// two others are then empty).
    pub pod_labels: BTreeMap<String, String>,
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        if let Some(name) = &self.name {
            parts.push(format!("container {}", name.glob()));
        }
        parts.extend(
            self.pod_labels
                .iter()
                .map(|(key, value)| format!("pod {key}={value}")),
        );
        f.write_str(&parts.join(", "))
    }
}

/// A rule's selector and the cgroups it resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Selection {
    pub selector: Selector,
    /// The cgroups of the matching containers (sorted, no duplicates); empty until resolved,
    /// and when no container matches: the rule applies to nothing.
    pub cgroups: Vec<CgroupPath>,
}

impl Rule {
    /// The cgroups this rule is a rule of: its `cgroup`, or those its containers resolved to.
    pub fn rule_cgroups(&self) -> Vec<&CgroupPath> {
        match &self.containers {
            Some(selection) => selection.cgroups.iter().collect(),
            None => self.cgroup.iter().collect(),
        }
    }

    /// How deep the cgroup is through which this rule applies to connections of `cgroup`
    /// (None: it does not). Rules without a cgroup or containers are handled apart.
    pub(super) fn depth_for(&self, cgroup: &CgroupPath) -> Option<usize> {
        self.rule_cgroups()
            .into_iter()
            .filter(|scope| scope.contains(cgroup))
            .map(CgroupPath::depth)
            .max()
    }

    /// Whether it applies everywhere its scope reaches (no cgroup, no containers).
    pub fn unscoped(&self) -> bool {
        self.cgroup.is_none() && self.containers.is_none()
    }
}

impl Policy {
    /// Whether any rule selects containers or pods, or pods may annotate (the agent then
    /// follows the engines).
    pub fn selects_containers(&self) -> bool {
        self.annotations.is_some() || self.rules.iter().any(|rule| rule.containers.is_some())
    }
}

/// A problem at a place in the file.
type Located = (Range<usize>, String);

const LABELS_FORM: &str = "write a table of label = value strings, like { \"io.kubernetes.pod.namespace\" = \"payments\" }";

/// A rule's selector keys, as the file has them.
pub(super) struct SelectorKeys<'a> {
    pub labels: Option<&'a Spanned<Value>>,
    pub container: Option<&'a Spanned<String>>,
    pub pod_labels: Option<&'a Spanned<Value>>,
}

/// The selector of a rule's `labels` and `container` keys, or of its `pod_labels`; None
/// without any.
pub(super) fn selector(keys: &SelectorKeys<'_>, owner: &str) -> Result<Option<Selector>, Located> {
    if let Some(pod_labels) = keys.pod_labels {
        if keys.labels.is_some() || keys.container.is_some() {
            return Err((
                pod_labels.span(),
                format!(
                    "{owner}: field `pod_labels`: a rule selects pods (`pod_labels`) or \
                     containers (`labels`, `container`), not both: the pod's labels are on the \
                     pod, not on its containers; write two rules"
                ),
            ));
        }
        return Ok(Some(Selector {
            labels: BTreeMap::new(),
            name: None,
            pod_labels: label_table(pod_labels, "pod_labels", owner)?,
        }));
    }
    if keys.labels.is_none() && keys.container.is_none() {
        return Ok(None);
    }
    let labels = match keys.labels {
        Some(labels) => label_table(labels, "labels", owner)?,
        None => BTreeMap::new(),
    };
    let name = keys
        .container
        .map(|glob| name_glob(glob, owner))
        .transpose()?;
    Ok(Some(Selector {
        labels,
        name,
        pod_labels: BTreeMap::new(),
    }))
}

fn label_table(
    value: &Spanned<Value>,
    field: &str,
    owner: &str,
) -> Result<BTreeMap<String, String>, Located> {
    let error = |message: String| (value.span(), format!("{owner}: field `{field}`: {message}"));
    let Value::Table(table) = value.get_ref() else {
        return Err(error(format!(
            "{} is not a table: {LABELS_FORM}",
            value.get_ref()
        )));
    };
    if table.is_empty() {
        return Err(error(format!(
            "the table is empty; remove the key to match any container, or {LABELS_FORM}"
        )));
    }
    table
        .iter()
        .map(|(key, entry)| match entry {
            _ if key.trim().is_empty() => Err(error("a label name must not be empty".into())),
            Value::String(text) => Ok((key.clone(), text.clone())),
            other => Err(error(format!(
                "label {key:?}: {other} is not a string; label values are strings: write \
                 {key:?} = \"{other}\""
            ))),
        })
        .collect()
}

fn name_glob(glob: &Spanned<String>, owner: &str) -> Result<Glob, Located> {
    let error = |message: String| {
        (
            glob.span(),
            format!("{owner}: field `container`: {message}"),
        )
    };
    let text = glob.get_ref();
    if text.trim().is_empty() {
        return Err(error(
            "must not be empty: write a container name or a glob, like \"pgbouncer\" or \"web-*\""
                .into(),
        ));
    }
    GlobBuilder::new(text)
        .literal_separator(true)
        .build()
        .map_err(|e| {
            error(format!(
                "{text:?} is not a glob ({}): write a container name or a glob with *, ? or \
                 [abc], like \"web-*\"",
                e.kind()
            ))
        })
}

#[cfg(test)]
mod tests;
