//! `cargo xtask bench --quick` end to end: every measurement step runs and the three reports
//! are written. The figures of a quick run mean nothing and are not asserted.

use std::fs;

use keepalive_tests::{TempDir, agent_bin, kernel_offers_iterator, require_host};

#[test]
fn quick_benchmark_writes_table_json_and_plot() {
    require_host();
    let out = TempDir::new();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_ka-bench"))
        .arg("--agent")
        .arg(agent_bin())
        .arg("--out")
        .arg(out.path())
        .arg("--quick")
        .status()
        .unwrap();
    assert!(status.success(), "ka-bench --quick: {status}");

    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    for key in [
        "loopback_conn_per_s",
        "veth_conn_per_s",
        "program_ns_per_conn",
        "policy_update_latency_us",
        "agent_startup_ms",
        "agent_rss_kib",
    ] {
        assert!(json.get(key).is_some(), "bench.json has no {key}: {json}");
    }
    let variants: Vec<&str> = json["loopback_conn_per_s"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|row| row["variant"].as_str())
        .collect();
    assert!(
        variants.contains(&"none")
            && variants.contains(&"agent")
            && variants.contains(&"libkeepalive"),
        "{variants:?}"
    );
    assert!(
        variants.contains(&"floor") && variants.contains(&"app-sets"),
        "the floor program and the application setting the options: {variants:?}"
    );
    // The in-kernel sweep's target needs the iterator program (Linux 5.15+).
    let in_kernel = kernel_offers_iterator();
    assert_eq!(
        json["targets"].as_array().map(Vec::len),
        Some(if in_kernel { 6 } else { 5 }),
        "program time, four connection rates, the new cgroup (and the in-kernel sweep): {}",
        json["targets"]
    );
    let paths: Vec<&str> = json["existing_connections"][0]["startup_sweeps"]
        .as_array()
        .unwrap_or_else(|| panic!("no start-up sweeps: {json}"))
        .iter()
        .filter_map(|sweep| sweep["via"].as_str())
        .collect();
    let expected: &[&str] = if in_kernel {
        &["iterator", "descriptors"]
    } else {
        &["descriptors"]
    };
    assert_eq!(paths, expected, "a start-up sweep by each path");
    assert!(
        json["program_runs_per_conn"].as_f64().unwrap() >= 2.0,
        "both established callbacks ran"
    );
    let md = fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(md.contains("| agent |"), "{md}");
    assert!(
        md.contains("## Targets") && md.contains("Wall time"),
        "{md}"
    );
    assert!(
        fs::read_to_string(out.join("bench.svg"))
            .unwrap()
            .starts_with("<svg")
    );
}
