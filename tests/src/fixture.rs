//! The program loaded and enforcing a policy on a fresh cgroup, in a fresh network namespace:
//! what most enforcement tests start from.

use keepalive_agent::{Enforcer, Policy, Values};
use keepalive_common::Stage;

use crate::{Netns, Placement, TestCgroup, enforce, load_enforcer};

/// A test cgroup with a policy applied to it and a network namespace for its workloads.
/// Fields drop in order: the attachments go before the cgroup.
#[derive(Debug)]
pub struct Fixture {
    pub enforcer: Enforcer,
    pub cgroup: TestCgroup,
    pub netns: Netns,
}

impl Fixture {
    /// `values` enforced on every connection of the cgroup, no rules.
    pub fn enforcing(values: &Values) -> Self {
        Self::with_policy(|cgroup| enforce(*values, &[cgroup]))
    }

    /// The policy `make` builds for the fresh cgroup.
    pub fn with_policy(make: impl FnOnce(&TestCgroup) -> Policy) -> Self {
        let cgroup = TestCgroup::new();
        let netns = Netns::new();
        let mut enforcer = load_enforcer(Stage::Full);
        enforcer
            .apply(&make(&cgroup))
            .unwrap_or_else(|e| panic!("apply the policy to the test cgroup: {e}"));
        Self {
            enforcer,
            cgroup,
            netns,
        }
    }

    /// In the cgroup and the namespace.
    pub fn inside(&self) -> Placement<'_> {
        Placement::new(&self.cgroup, &self.netns)
    }

    /// In the namespace, outside the cgroup.
    pub fn outside(&self) -> Placement<'_> {
        Placement::netns_only(&self.netns)
    }
}
