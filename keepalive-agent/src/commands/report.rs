//! `keepalive-agent report`: the running agent's report of connection failures (`/ends` on its
//! metrics endpoint), in plain words or as JSON.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{cli::DEFAULT_METRICS_ADDR, ends::report::Report};

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The running agent's metrics endpoint (its --metrics-addr) [default: 127.0.0.1:9477].
    #[arg(long, value_name = "ADDR", env = "KEEPALIVE_AGENT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What to print.
pub fn report(args: &ReportArgs) -> anyhow::Result<String> {
    let addr = args.metrics_addr.unwrap_or(DEFAULT_METRICS_ADDR);
    let body = get(addr, "/ends").with_context(|| {
        format!("cannot ask the running agent at {addr} (is it running, with its metrics endpoint there?)")
    })?;
    let report: Report = serde_json::from_str(&body)
        .with_context(|| format!("the agent at {addr} sent no report: {body}"))?;
    if args.json {
        Ok(serde_json::to_string_pretty(&report)? + "\n")
    } else {
        Ok(report.text())
    }
}

/// One GET over HTTP/1.1 (the endpoint answers one request per connection, then closes).
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the answer is not HTTP")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{status}: {}", body.trim());
    }
    Ok(body.to_owned())
}
