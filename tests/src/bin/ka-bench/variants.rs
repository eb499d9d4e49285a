//! What is compared: no program, the agent with a given policy, libkeepalive (LD_PRELOAD).

use keepalive_agent::{CgroupPath, Enforcer, Policy, Values};
use keepalive_common::Stage;
use keepalive_tests::{Netns, Placement, TestCgroup, load_enforcer};

/// Where Debian's libkeepalive0 puts the library.
const LIBKEEPALIVE: &str = "/usr/lib/libkeepalive.so";

/// libkeepalive's environment for the same values as the default policy.
const LIBKEEPALIVE_ENV: &[(&str, &str)] = &[
    ("LD_PRELOAD", LIBKEEPALIVE),
    ("KEEPIDLE", "60"),
    ("KEEPINTVL", "5"),
    ("KEEPCNT", "3"),
];

/// One way of running the workload, with its own cgroup.
#[derive(Debug)]
pub(crate) struct Variant {
    pub(crate) name: &'static str,
    pub(crate) what: &'static str,
    pub(crate) enforcer: Option<Enforcer>,
    env: &'static [(&'static str, &'static str)],
    pub(crate) cgroup: TestCgroup,
}

impl Variant {
    pub(crate) fn none() -> Self {
        Self {
            name: "none",
            what: "no program attached",
            enforcer: None,
            env: &[],
            cgroup: TestCgroup::new(),
        }
    }

    /// The agent with `values` everywhere, no rules.
    pub(crate) fn agent(name: &'static str, what: &'static str, values: &Values) -> Self {
        Self::stage(name, what, values, Stage::Full)
    }

    /// The program stopping after `stage`: what the steps up to there cost.
    pub(crate) fn stage(
        name: &'static str,
        what: &'static str,
        values: &Values,
        stage: Stage,
    ) -> Self {
        Self::policy(name, what, stage, |scope| {
            Policy::enforce(*values, vec![scope])
        })
    }

    /// The agent with the policy `make` builds for the variant's cgroup.
    pub(crate) fn policy(
        name: &'static str,
        what: &'static str,
        stage: Stage,
        make: impl FnOnce(CgroupPath) -> Policy,
    ) -> Self {
        let cgroup = TestCgroup::new();
        let mut enforcer = load_enforcer(stage);
        enforcer
            .apply(&make(cgroup.scope()))
            .expect("apply the policy");
        Self {
            name,
            what,
            enforcer: Some(enforcer),
            env: &[],
            cgroup,
        }
    }

    pub(crate) fn libkeepalive() -> Self {
        assert!(
            std::path::Path::new(LIBKEEPALIVE).exists(),
            "{LIBKEEPALIVE} is missing: install Debian's libkeepalive0 (cargo xtask bench does)"
        );
        Self {
            name: "libkeepalive",
            what: "LD_PRELOAD libkeepalive (setsockopt after every socket())",
            enforcer: None,
            env: LIBKEEPALIVE_ENV,
            cgroup: TestCgroup::new(),
        }
    }

    /// The workload placement of this variant, pinned to `cpu`.
    pub(crate) fn place<'a>(&'a self, netns: &'a Netns, cpu: usize) -> Placement<'a> {
        Placement {
            cgroup: Some(&self.cgroup),
            netns: Some(netns),
            cpu: Some(cpu),
            env: self.env,
        }
    }
}
