//! The Prometheus endpoint (`/metrics`), and liveness and readiness (`/healthz`, `/readyz`) for
//! probes. A minimal HTTP/1.1 server: one GET per connection, read-only, bounded in size and
//! time.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use keepalive_common::{Outcome, Stat};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::{enforcer::PinnedMaps, state::State};

/// What the main loop shares with the endpoint.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// The state of the policy in force (None until the first apply: not ready).
    pub state: Option<State>,
    /// Cgroups the sock_ops program is attached to.
    pub attached: usize,
    /// Ids of the agent's programs, for their kernel accounting.
    pub programs: Vec<u32>,
}

pub type Shared = Arc<Mutex<Telemetry>>;

/// Binds the endpoint (errors here are the agent's: a busy port is reported at start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Shared, maps_dir: PathBuf) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let (shared, maps_dir) = (shared.clone(), maps_dir.clone());
        tokio::spawn(async move {
            if let Err(error) =
                tokio::time::timeout(Duration::from_secs(5), answer(stream, &shared, &maps_dir))
                    .await
            {
                debug!(%peer, %error, "metrics request timed out");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    shared: &Shared,
    maps_dir: &std::path::Path,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 || request.len() > 16 * 1024 {
            return Ok(());
        }
        request.extend_from_slice(&buffer[..read]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => match render(shared, maps_dir) {
            Ok(body) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
            Err(error) => (
                "500 Internal Server Error",
                "text/plain",
                format!("{error:#}\n"),
            ),
        },
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".into()),
        ("GET", "/readyz") => {
            let ready = shared
                .lock()
                .is_ok_and(|telemetry| telemetry.state.is_some());
            if ready {
                ("200 OK", "text/plain", "ready\n".into())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "no policy applied yet\n".into(),
                )
            }
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Prometheus label values escape `\`, `"` and newlines.
fn label(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// The exposition text, read fresh from the pinned maps.
pub fn render(shared: &Shared, maps_dir: &std::path::Path) -> anyhow::Result<String> {
    let (state, attached, programs) = {
        let telemetry = shared
            .lock()
            .map_err(|_| anyhow::anyhow!("telemetry lock poisoned"))?;
        (
            telemetry.state.clone(),
            telemetry.attached,
            telemetry.programs.clone(),
        )
    };
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# HELP keepalive_up Whether the agent has a policy in force."
    );
    let _ = writeln!(w, "# TYPE keepalive_up gauge");
    let _ = writeln!(w, "keepalive_up {}", u8::from(state.is_some()));
    let Some(state) = state else {
        return Ok(out);
    };
    let _ = writeln!(
        w,
        "# HELP keepalive_kernel_feature Whether an optional part of the agent loaded on this \
         kernel (0: this kernel lacks it; `keepalive-agent status` says what follows)."
    );
    let _ = writeln!(w, "# TYPE keepalive_kernel_feature gauge");
    for feature in crate::enforcer::features::OPTIONAL {
        let missing = state
            .missing_features
            .iter()
            .any(|missing| missing.feature == *feature);
        let _ = writeln!(
            w,
            "keepalive_kernel_feature{{feature=\"{feature}\"}} {}",
            u8::from(!missing)
        );
    }
    let maps = PinnedMaps::open(maps_dir)?;
    let _ = writeln!(
        w,
        "# HELP keepalive_connections_total Connections decided, by rule and outcome."
    );
    let _ = writeln!(w, "# TYPE keepalive_connections_total counter");
    for rule in &state.rules {
        let outcomes = maps.outcomes(rule.slot)?;
        for outcome in Outcome::ALL
            .into_iter()
            .filter(|outcome| *outcome != Outcome::Overridden)
        {
            let _ = writeln!(
                w,
                "keepalive_connections_total{{rule=\"{}\",slot=\"{}\",outcome=\"{}\"}} {}",
                label(&rule.name),
                rule.slot,
                outcome.name(),
                outcomes.get(outcome)
            );
        }
    }
    let _ = writeln!(
        w,
        "# HELP keepalive_app_setsockopt_overridden_total Application setsockopt calls the lock overrode (audit: would have), by rule."
    );
    let _ = writeln!(
        w,
        "# TYPE keepalive_app_setsockopt_overridden_total counter"
    );
    for rule in &state.rules {
        let overridden = maps.outcomes(rule.slot)?.get(Outcome::Overridden);
        let _ = writeln!(
            w,
            "keepalive_app_setsockopt_overridden_total{{rule=\"{}\",slot=\"{}\"}} {overridden}",
            label(&rule.name),
            rule.slot
        );
    }
    let counters = maps.counters()?;
    let _ = writeln!(
        w,
        "# HELP keepalive_setsockopt_errors_total Failed bpf_setsockopt or bpf_getsockopt calls, by option."
    );
    let _ = writeln!(w, "# TYPE keepalive_setsockopt_errors_total counter");
    for stat in Stat::ALL
        .into_iter()
        .filter(|stat| stat.name().starts_with("err_"))
    {
        let option = stat.name().trim_start_matches("err_");
        let _ = writeln!(
            w,
            "keepalive_setsockopt_errors_total{{option=\"{option}\"}} {}",
            counters.get(stat)
        );
    }
    let _ = writeln!(
        w,
        "# HELP keepalive_program_events_total Program events: callbacks left to a more specific cgroup, sockets of unconfigured attachments, application setsockopt calls seen."
    );
    let _ = writeln!(w, "# TYPE keepalive_program_events_total counter");
    for stat in [Stat::Deferred, Stat::Unconfigured, Stat::AppSetsockopt] {
        let _ = writeln!(
            w,
            "keepalive_program_events_total{{event=\"{}\"}} {}",
            stat.name(),
            counters.get(stat)
        );
    }
    let _ = writeln!(
        w,
        "# HELP keepalive_reloads_total Policy reloads, by result."
    );
    let _ = writeln!(w, "# TYPE keepalive_reloads_total counter");
    let _ = writeln!(
        w,
        "keepalive_reloads_total{{result=\"success\"}} {}",
        state.reloads_succeeded
    );
    let _ = writeln!(
        w,
        "keepalive_reloads_total{{result=\"failure\"}} {}",
        state.reloads_failed
    );
    let _ = writeln!(
        w,
        "# HELP keepalive_policy_generation Generation of the policy in force."
    );
    let _ = writeln!(w, "# TYPE keepalive_policy_generation gauge");
    let _ = writeln!(w, "keepalive_policy_generation {}", state.generation);
    let _ = writeln!(
        w,
        "# HELP keepalive_policy_rules Rules of the policy in force."
    );
    let _ = writeln!(w, "# TYPE keepalive_policy_rules gauge");
    let _ = writeln!(
        w,
        "keepalive_policy_rules {}",
        state.rules.len().saturating_sub(1)
    );
    let _ = writeln!(
        w,
        "# HELP keepalive_attached_cgroups Cgroups the sock_ops program is attached to."
    );
    let _ = writeln!(w, "# TYPE keepalive_attached_cgroups gauge");
    let _ = writeln!(w, "keepalive_attached_cgroups {attached}");
    let _ = writeln!(
        w,
        "# HELP keepalive_program_runs_total Runs of the agent's programs (kernel accounting; needs --program-stats)."
    );
    let _ = writeln!(w, "# TYPE keepalive_program_runs_total counter");
    let _ = writeln!(
        w,
        "# HELP keepalive_program_run_seconds_total Time in the agent's programs (kernel accounting; needs --program-stats)."
    );
    let _ = writeln!(w, "# TYPE keepalive_program_run_seconds_total counter");
    let mut runs = String::new();
    let mut seconds = String::new();
    for program in aya::programs::loaded_programs().flatten() {
        let Some(name) = program.name_as_str() else {
            continue;
        };
        if !programs.contains(&program.id()) {
            continue;
        }
        let labels = format!("program=\"{name}\",id=\"{}\"", program.id());
        let _ = writeln!(
            runs,
            "keepalive_program_runs_total{{{labels}}} {}",
            program.run_count()
        );
        let _ = writeln!(
            seconds,
            "keepalive_program_run_seconds_total{{{labels}}} {}",
            program.run_time().as_secs_f64()
        );
    }
    // The two families' samples, each after its own HELP/TYPE (the text format wants a family's
    // lines together).
    let position = out
        .find("# HELP keepalive_program_run_seconds_total")
        .unwrap_or(out.len());
    out.insert_str(position, &runs);
    out.push_str(&seconds);
    Ok(out)
}
