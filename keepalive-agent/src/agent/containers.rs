//! Rules that select containers: resolved against what the engines report, again whenever
//! that changes.

use tracing::{error, info};

use super::{Agent, reload::report};
use crate::{
    policy::{CgroupPath, Policy},
    state::State,
};

impl Agent {
    /// Remembers `policy` as read and returns it resolved against the containers known now.
    pub(super) fn resolve(&mut self, policy: &Policy) -> Policy {
        self.unresolved = Some(policy.clone());
        if !policy.selects_containers() {
            return policy.clone();
        }
        policy.resolve(&self.containers.snapshot())
    }

    /// Containers started, stopped or changed: applies the policy again if a rule now
    /// resolves to other cgroups.
    pub(super) fn follow_containers(&mut self) {
        let Some(unresolved) = &self.unresolved else {
            return;
        };
        if !unresolved.selects_containers() {
            return;
        }
        let resolved = unresolved.resolve(&self.containers.snapshot());
        let Some(current) = self.enforcer.policy() else {
            return;
        };
        if current == &resolved {
            return;
        }
        for (old, new) in current.rules.iter().zip(&resolved.rules) {
            let (Some(before), Some(now)) = (&old.containers, &new.containers) else {
                continue;
            };
            if before.cgroups != now.cgroups {
                let cgroups: Vec<&str> = now.cgroups.iter().map(CgroupPath::as_str).collect();
                info!(
                    rule = new.name,
                    selects = %now.selector,
                    cgroups = cgroups.join(" "),
                    "the rule's containers changed{}",
                    if cgroups.is_empty() {
                        "; it applies to nothing now"
                    } else {
                        ""
                    }
                );
            }
        }
        match self.enforcer.apply_later(&resolved) {
            Ok((applied, sweep)) => {
                report(&applied, &resolved);
                if let Some(state) = &mut self.state {
                    let fresh = State::new(&resolved, &self.config.source(), applied.generation);
                    state.generation = fresh.generation;
                    state.applied_at = fresh.applied_at;
                    state.rules = fresh.rules;
                }
                self.queue(sweep);
            }
            Err(failed) => error!(
                error = format!("{failed:#}"),
                "cannot apply the policy to the containers' cgroups"
            ),
        }
    }
}
