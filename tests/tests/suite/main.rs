//! The privileged integration suite, one test binary (one link of the agent and its
//! dependencies instead of one per file). Each module is what a binary of its own was, and
//! `cargo xtask test` still runs them one after another, each in a process of its own (the
//! binary with the other modules skipped), as the host and the guests always ran them:
//! `cargo xtask test --only NAME` runs one. The modules share the helpers of
//! `keepalive_tests` (tests/src).
#![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

mod agent_reload;
mod bad_input;
mod bench_smoke;
mod cli;
mod connection_ends;
mod containers;
mod deploy;
mod enforcement;
mod engines;
mod existing;
mod helm;
mod hostile;
mod image;
mod kernel_features;
mod kernel_model;
mod middlebox;
mod monitoring;
mod observability;
mod on_the_wire;
mod operations;
mod pods;
mod policy;
mod policy_changes;
mod scan;
mod single_instance;
mod systemd;
mod under_load;
