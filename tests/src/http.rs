//! The agent's metrics endpoint, from the outside.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use crate::Workload;

/// The endpoint the agent logged, e.g. `127.0.0.1:40123`.
pub fn metrics_addr(agent: &Workload, timeout: Duration) -> String {
    let line = agent.expect_log("metrics endpoint", timeout);
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .map(|addr| addr.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no addr in {line}"))
}

/// `GET path`: (status code, body), waiting at most `timeout` for the answer.
pub fn get_within(addr: &str, path: &str, timeout: Duration) -> (u16, String) {
    let mut stream =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(timeout))
        .unwrap_or_else(|e| panic!("{e}"));
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
        .unwrap_or_else(|e| panic!("cannot send to {addr}: {e}"));
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("no answer to GET {path} from {addr} within {timeout:?}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// The value of the sample whose line starts with `prefix`.
pub fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{metrics}"))
}
