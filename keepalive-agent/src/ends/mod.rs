//! How connections end: the kernel counts each connection's end per rule (`KA_ENDS`, read with
//! the other counters) and reports each failure, and each normal close after a silence the
//! connection survived, on a ring buffer (`KA_END_EVENTS`); the agent keeps a summary of those
//! ([`Failures`]) for `/metrics`, `/ends` and `keepalive-agent report`.

mod reader;
pub mod report;
pub mod summary;

pub use self::{
    reader::{follow, kernel_hz},
    summary::{Destination, DestinationFailures, Ended, Failures, Histogram},
};
