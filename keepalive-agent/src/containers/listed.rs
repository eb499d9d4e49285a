//! The containers the engines list when asked once (`scan`, `explain`), and which container a
//! cgroup belongs to. Without an engine every answer is `None`, and `scan` shows the cgroup
//! alone.

use std::collections::BTreeMap;

use super::{Container, Sockets};
use crate::policy::CgroupPath;

/// A container as `scan` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Something that knows containers by cgroup.
pub trait Containers {
    /// The container whose cgroup is `cgroup` (or an ancestor of it), if known.
    fn container_of(&self, cgroup: &CgroupPath) -> Option<ContainerInfo>;
}

/// The containers the engines listed: a cgroup belongs to the container whose cgroup is it or
/// its nearest ancestor.
#[derive(Debug, Clone, Default)]
pub struct Listed(pub Vec<Container>);

impl Containers for Listed {
    fn container_of(&self, cgroup: &CgroupPath) -> Option<ContainerInfo> {
        self.0
            .iter()
            .filter(|container| container.cgroup.contains(cgroup))
            .max_by_key(|container| container.cgroup.depth())
            .map(|container| ContainerInfo {
                name: container.name.clone(),
                labels: container.labels.clone(),
            })
    }
}

/// Asks the engines once for their running containers (see [`super::list_once`]), with notes
/// for those that failed.
pub fn ask_once(sockets: &Sockets) -> anyhow::Result<(Listed, Vec<String>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (containers, notes) = runtime.block_on(super::list_once(sockets));
    Ok((Listed(containers), notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, cgroup: &str) -> Container {
        Container::new(
            "docker",
            name.into(),
            name.into(),
            BTreeMap::from([("app".into(), name.into())]),
            CgroupPath::parse(cgroup).unwrap_or_else(|e| panic!("{e}")),
        )
    }

    #[test]
    fn a_cgroup_belongs_to_its_nearest_container() {
        let listed = Listed(vec![
            container("outer", "/docker/a"),
            container("inner", "/docker/a/b"),
        ]);
        let of = |path: &str| {
            listed
                .container_of(&CgroupPath::parse(path).unwrap_or_else(|e| panic!("{e}")))
                .map(|info| info.name)
        };
        assert_eq!(of("/docker/a/b/c").as_deref(), Some("inner"));
        assert_eq!(of("/docker/a").as_deref(), Some("outer"));
        assert_eq!(of("/docker/z"), None);
    }
}
