//! Empty library target: it lets `keepalive-agent` declare this crate as a build dependency,
//! so cargo rebuilds the agent (which embeds the program) when the program changes.
#![no_std]
