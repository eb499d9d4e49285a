//! Which container a cgroup belongs to, where a container engine knows: the one seam between
//! `scan` and the engines. Without an engine every answer is `None`, and `scan` shows the
//! cgroup alone.

use std::collections::BTreeMap;

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

/// No engine: no container is known.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEngines;

impl Containers for NoEngines {
    fn container_of(&self, _cgroup: &CgroupPath) -> Option<ContainerInfo> {
        None
    }
}

/// The engines `scan` asks.
pub fn engines() -> impl Containers {
    NoEngines
}
