//! The Prometheus endpoint (`/metrics`), liveness and readiness (`/healthz`, `/readyz`) for
//! probes, and the report of connection failures (`/ends`). A minimal HTTP/1.1 server: one GET
//! per connection, read-only, bounded in size, in time and in connections, so that nobody who
//! can reach it can starve it.
//!
//! - At most [`MAX_CONNECTIONS`] at once. Past that, and whenever `accept` finds no
//!   descriptor left (EMFILE, ENFILE), the connection that has waited longest for its request
//!   is closed: idle clients cannot keep a probe out.
//! - A client has [`REQUEST_TIMEOUT`] to send its request and [`EXCHANGE_TIMEOUT`] in all.
//! - An `accept` error with nothing to close backs off (10 ms, doubling, at most 1 s) instead
//!   of retrying at once.

mod render;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};
use tracing::{debug, warn};

pub use self::render::render;
use crate::status::Shared;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request (a probe or a scraper sends it at once).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for the whole exchange.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Binds the endpoint (errors here are the agent's: a busy port is reported at start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Connections still waiting for their request, oldest first, each with the sender that
/// closes it.
type Waiting = Arc<Mutex<VecDeque<(u64, oneshot::Sender<()>)>>>;

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Shared, maps_dir: PathBuf) {
    let waiting: Waiting = Arc::default();
    let active = Arc::new(()); // one clone per connection: strong_count - 1 are open
    let mut backoff = MIN_BACKOFF;
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                if close_oldest(&waiting) {
                    debug!(%error, "metrics endpoint: accept failed; closed the oldest idle client");
                    tokio::task::yield_now().await;
                } else {
                    warn!(%error, backoff_ms = backoff.as_millis(), "metrics endpoint: accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        if Arc::strong_count(&active) > MAX_CONNECTIONS {
            close_oldest(&waiting);
        }
        next_id += 1;
        let (close, closed) = oneshot::channel();
        if let Ok(mut queue) = waiting.lock() {
            queue.push_back((next_id, close));
        }
        let connection = ScrapeSlot {
            id: next_id,
            waiting: waiting.clone(),
            _active: active.clone(),
        };
        let (shared, maps_dir) = (shared.clone(), maps_dir.clone());
        tokio::spawn(async move {
            let exchange = answer(stream, &connection, &shared, &maps_dir);
            tokio::select! {
                result = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange) => {
                    if let Err(error) = result {
                        debug!(%peer, %error, "metrics request timed out");
                    }
                }
                // An Err only means the request is in (the sender was dropped): keep serving.
                Ok(()) = closed => debug!(%peer, "metrics client closed to make room"),
            }
        });
    }
}

/// Closes the connection that has waited longest for its request; false if none waits.
fn close_oldest(waiting: &Waiting) -> bool {
    let oldest = waiting.lock().ok().and_then(|mut queue| queue.pop_front());
    oldest.is_some_and(|(_, close)| close.send(()).is_ok())
}

/// One scraper's connection: its place among the open and the waiting ones.
struct ScrapeSlot {
    id: u64,
    waiting: Waiting,
    _active: Arc<()>,
}

impl ScrapeSlot {
    /// The request is in: this connection is no longer one to close for room.
    fn received(&self) {
        if let Ok(mut queue) = self.waiting.lock() {
            queue.retain(|(id, _)| *id != self.id);
        }
    }
}

impl Drop for ScrapeSlot {
    fn drop(&mut self) {
        self.received();
    }
}

async fn answer(
    mut stream: TcpStream,
    connection: &ScrapeSlot,
    shared: &Shared,
    maps_dir: &std::path::Path,
) -> std::io::Result<()> {
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(request) => request?,
        Err(_) => return Ok(()),
    };
    connection.received();
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = if (method, path) == ("GET", "/metrics") {
        // Reading the maps (a thousand counter slots, per CPU) is blocking work: off the loop.
        let (shared, maps_dir) = (shared.clone(), maps_dir.to_path_buf());
        tokio::task::spawn_blocking(move || scrape(&shared, &maps_dir))
            .await
            .unwrap_or_else(|error| {
                (
                    "500 Internal Server Error",
                    "text/plain",
                    format!("{error}\n"),
                )
            })
    } else {
        respond(method, path, shared)
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The request head (up to 16 KiB); empty if the client closed first.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut request = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 || request.len() > 16 * 1024 {
            return Ok(Vec::new());
        }
        request.extend_from_slice(&buffer[..read]);
    }
    Ok(request)
}

fn scrape(shared: &Shared, maps_dir: &std::path::Path) -> (&'static str, &'static str, String) {
    match render(shared, maps_dir) {
        Ok(body) => ("200 OK", render::CONTENT_TYPE, body),
        Err(error) => (
            "500 Internal Server Error",
            "text/plain",
            format!("{error:#}\n"),
        ),
    }
}

/// Everything but `/metrics`: answered from memory.
fn respond(method: &str, path: &str, shared: &Shared) -> (&'static str, &'static str, String) {
    match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".into()),
        ("GET", "/readyz") => readiness(shared),
        ("GET", "/ends") => ends(shared),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz, /readyz or /ends\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    }
}

/// `/ends`: the failures' [`crate::ends::report::Report`], as JSON (`keepalive-agent report`).
fn ends(shared: &Shared) -> (&'static str, &'static str, String) {
    let report = shared.lock().map(|telemetry| {
        let rules = telemetry
            .state
            .as_ref()
            .map_or(&[][..], |state| &state.rules[..]);
        crate::ends::report::Report::new(&telemetry.agent.failures, rules)
    });
    match report
        .map_err(|_| "telemetry lock poisoned".to_owned())
        .and_then(|report| serde_json::to_string(&report).map_err(|error| error.to_string()))
    {
        Ok(json) => ("200 OK", "application/json", json + "\n"),
        Err(error) => ("500 Internal Server Error", "text/plain", error + "\n"),
    }
}

/// `/readyz`: [`Telemetry::readiness`].
fn readiness(shared: &Shared) -> (&'static str, &'static str, String) {
    let ready = shared.lock().map_or_else(
        |_| Err("telemetry unavailable".to_owned()),
        |telemetry| telemetry.readiness(),
    );
    match ready {
        Ok(()) => ("200 OK", "text/plain", "ready\n".into()),
        Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
    }
}
