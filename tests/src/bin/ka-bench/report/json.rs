//! The figures and every sample, as JSON.

use std::time::Duration;

use serde_json::{Value, json};

use super::targets::targets;
use crate::{
    results::Results,
    samples::{Row, Samples, paired_ratio},
};

fn rate_rows(rows: &[Row]) -> Value {
    rows.iter()
        .map(|row| {
            let ratios = paired_ratio(rows, row.name, "none");
            json!({
                "variant": row.name,
                "what": row.what,
                "median": row.samples.median(),
                "ratio_to_none": ratios.median(),
                "ratio_samples": ratios.0,
                "samples": row.samples.0,
            })
        })
        .collect()
}

fn samples(s: &Samples) -> Value {
    json!({ "median": s.median(), "samples": s.0 })
}

pub(super) fn json(results: &Results, took: Duration) -> Value {
    json!({
        "kernel": results.kernel,
        "wall_time_s": took.as_secs_f64(),
        "cpus": results.cpus,
        "quick": results.settings.quick,
        "rounds": results.settings.rounds,
        "connections_per_round": results.settings.conns,
        "loopback_conn_per_s": rate_rows(&results.loopback),
        "veth_conn_per_s": rate_rows(&results.veth),
        "program_ns_per_conn": results.program_ns.iter().map(|row| json!({
            "variant": row.name,
            "median": row.samples.median(),
            "samples": row.samples.0,
        })).collect::<Value>(),
        "program_runs_per_conn": results.runs_per_conn,
        "program_ns_per_exchange": results.exchange_ns.iter().map(|row| json!({
            "variant": row.name,
            "median": row.samples.median(),
            "samples": row.samples.0,
        })).collect::<Value>(),
        "targets": targets(results).iter().map(|target| json!({
            "what": target.what,
            "target": target.bound,
            "median": target.ratio.median(),
            "samples": target.ratio.0,
            "pass": target.pass,
        })).collect::<Value>(),
        "policy_update_latency_us": samples(&results.update_latency_us),
        "agent_startup_ms": samples(&results.startup_ms),
        "agent_rss_kib": samples(&results.rss_kib),
        "agent_startup_10k_rules_ms": samples(&results.startup_10k_ms),
        "agent_rss_10k_rules_kib": samples(&results.rss_10k_kib),
        "cgroup_scale": results.scale.iter().map(|row| json!({
            "cgroups": row.cgroups,
            "program_ns_per_conn": samples(&row.program_ns),
            "new_cgroup_covered_ms": samples(&row.coverage_ms),
            "agent_rss_kib": row.rss_kib,
        })).collect::<Value>(),
        "existing_connections": results.existing.iter().map(|row| json!({
            "connections": row.connections,
            "processes": row.processes,
            "startup_sweeps": row.sweeps.iter().map(|sweep| json!({
                "via": sweep.via,
                "swept_sockets": sweep.swept_sockets,
                "seconds": sweep.sweep_s,
                "conn_per_s": row.sweep_rate(sweep.via),
            })).collect::<Value>(),
            "new_cgroup_covered_ms": samples(&row.coverage_ms),
        })).collect::<Value>(),
        "steady_state": results.steady.iter().map(|row| json!({
            "cgroups": row.cgroups,
            "connections": row.connections,
            "startup_ms": row.startup_ms,
            "idle_cpu_percent_of_a_core": row.cpu_percent,
            "agent_rss_kib": row.rss_kib,
            "new_cgroup_covered_ms": row.coverage_ms,
            "link_watch": row.link_watch,
        })).collect::<Value>(),
    })
}
