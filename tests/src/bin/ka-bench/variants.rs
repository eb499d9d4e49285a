//! What is compared: no program, the agent's program (whole, or stopped after a step) with a
//! given policy, the policy-free floor program, libkeepalive (LD_PRELOAD), and the application
//! setting the options itself.

use std::time::Duration;

use keepalive_agent::{CgroupPath, Enforcer, Policy, Values};
use keepalive_common::Stage;
use keepalive_tests::{Netns, Placement, TestCgroup, load_enforcer};

use crate::floor::FloorProgram;

/// Where Debian's libkeepalive0 puts the library.
const LIBKEEPALIVE: &str = "/usr/lib/libkeepalive.so";

/// libkeepalive's environment for the same values as the default policy.
const LIBKEEPALIVE_ENV: &[(&str, &str)] = &[
    ("LD_PRELOAD", LIBKEEPALIVE),
    ("KEEPIDLE", "60"),
    ("KEEPINTVL", "5"),
    ("KEEPCNT", "3"),
];

/// `ka-probe`'s own setsockopt calls, with the default policy's values (idle, interval, count).
const APP_SETS_ENV: &[(&str, &str)] = &[("KA_PROBE_KEEPALIVE", "60,5,3")];

/// A sock_ops program whose run time the kernel counts.
#[derive(Debug)]
pub(crate) enum Program {
    Agent(Box<Enforcer>),
    Floor(FloorProgram),
}

impl Program {
    /// Run time and run count so far.
    pub(crate) fn stats(&self) -> (Duration, u64) {
        match self {
            Self::Agent(enforcer) => {
                let stats = enforcer.program_stats().expect("the program's statistics");
                (stats.run_time, stats.run_count)
            }
            Self::Floor(floor) => floor.stats(),
        }
    }
}

/// One way of running the workload, with its own cgroup.
#[derive(Debug)]
pub(crate) struct Variant {
    pub(crate) name: &'static str,
    pub(crate) what: &'static str,
    // Declared before the cgroup: the program is detached before the cgroup is removed.
    pub(crate) program: Option<Program>,
    env: &'static [(&'static str, &'static str)],
    pub(crate) cgroup: TestCgroup,
}

impl Variant {
    fn plain(
        name: &'static str,
        what: &'static str,
        env: &'static [(&'static str, &'static str)],
    ) -> Self {
        Self {
            name,
            what,
            program: None,
            env,
            cgroup: TestCgroup::new(),
        }
    }

    pub(crate) fn none() -> Self {
        Self::plain("none", "no program attached", &[])
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
        let mut variant = Self::plain(name, what, &[]);
        let mut enforcer = load_enforcer(stage);
        enforcer
            .apply(&make(variant.cgroup.scope()))
            .expect("apply the policy");
        variant.program = Some(Program::Agent(Box::new(enforcer)));
        variant
    }

    /// The policy-free program that only sets the four options: the floor for this job.
    pub(crate) fn floor() -> Self {
        let mut variant = Self::plain(
            "floor",
            "policy-free program setting the four options (hand-assembled)",
            &[],
        );
        variant.program = Some(Program::Floor(FloorProgram::attach(variant.cgroup.path())));
        variant
    }

    pub(crate) fn libkeepalive() -> Self {
        assert!(
            std::path::Path::new(LIBKEEPALIVE).exists(),
            "{LIBKEEPALIVE} is missing: install Debian's libkeepalive0 (cargo xtask bench does)"
        );
        Self::plain(
            "libkeepalive",
            "LD_PRELOAD libkeepalive (setsockopt after every socket())",
            LIBKEEPALIVE_ENV,
        )
    }

    /// The application changed to set the options itself: four setsockopt calls on each end
    /// once connected or accepted, where the agent's program sets them.
    pub(crate) fn app_sets() -> Self {
        Self::plain(
            "app-sets",
            "the application calls setsockopt 4 times per connection end",
            APP_SETS_ENV,
        )
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

/// Every variant of the connection-rate and program-cost tables.
pub(crate) fn all() -> Vec<Variant> {
    use crate::policies::realistic;
    let default = Values::default();
    vec![
        Variant::none(),
        Variant::stage(
            "attached",
            "program returning at once: the floor of any sock_ops program",
            &default,
            Stage::Attached,
        ),
        Variant::stage(
            "lookup",
            "program finding the policy, setting nothing",
            &default,
            Stage::Lookup,
        ),
        Variant::stage(
            "tcp-values",
            "program setting the TCP values, not SO_KEEPALIVE",
            &default,
            Stage::TcpValues,
        ),
        Variant::floor(),
        Variant::agent("agent", "keepalive-agent, default policy", &default),
        Variant::policy(
            "ends-on",
            "the default policy with ends = true (state, RTO and segment callbacks); `agent` is it without",
            Stage::Full,
            |s| {
                let mut policy = Policy::enforce(default, vec![s]);
                policy.default.ends = true;
                policy
            },
        ),
        Variant::policy(
            "rules-1",
            "1 rule (loopback matches it)",
            Stage::Full,
            |s| realistic(1, s),
        ),
        Variant::policy(
            "rules-4",
            "4 rules: one of each kind of match key, the last matches",
            Stage::Full,
            |s| realistic(4, s),
        ),
        Variant::policy(
            "rules-100",
            "100 realistic rules, the last matches",
            Stage::Full,
            |s| realistic(100, s),
        ),
        Variant::policy(
            "rules-10k",
            "10,000 realistic rules, the last matches",
            Stage::Full,
            |s| realistic(10_000, s),
        ),
        Variant::libkeepalive(),
        Variant::app_sets(),
    ]
}
