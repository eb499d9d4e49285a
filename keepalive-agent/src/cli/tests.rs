use std::path::Path;

use clap::CommandFactory as _;

use super::*;
use crate::policy::{CgroupPath, Policy};

fn parse(args: &[&str]) -> Result<RunArgs, String> {
    let mut argv = vec!["keepalive-agent", "run"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Run(run),
            ..
        }) => Ok(run),
        Ok(other) => Err(format!("{other:?}")),
        Err(error) => Err(error.to_string()),
    }
}

fn policy(args: &[&str]) -> Policy {
    parse(args)
        .and_then(|run| {
            crate::commands::run::config(&run, Path::new("/sys/fs/cgroup"))
                .and_then(|config| config.policy())
                .map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn cli_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn metrics_default_to_loopback_and_can_be_moved_or_turned_off() {
    let addr = |args: &[&str]| parse(args).map(|run| run.metrics_addr());
    assert_eq!(addr(&[]), Ok(Some(DEFAULT_METRICS_ADDR)));
    assert_eq!(
        addr(&["--metrics-addr", "[::1]:1234"]),
        Ok(Some("[::1]:1234".parse().unwrap_or(DEFAULT_METRICS_ADDR)))
    );
    assert_ne!(DEFAULT_METRICS_ADDR.port(), 1234);
    assert_eq!(addr(&["--no-metrics"]), Ok(None));
    let none = addr(&["--metrics-addr", "none"]).err().unwrap_or_default();
    assert!(none.contains("--metrics-addr"), "{none}");
}

#[test]
fn generate_is_parsed_beside_the_agent_commands() {
    let generate = Invocation::try_parse_from(["keepalive-agent", "generate", "--out-dir", "d"]);
    assert!(
        matches!(&generate, Ok(Invocation::Generate(args)) if args.out_dir == Path::new("d")),
        "{generate:?}"
    );
    let run = Invocation::try_parse_from(["keepalive-agent", "--log-level", "debug", "run"]);
    assert!(
        matches!(
            &run,
            Ok(Invocation::Agent(Cli {
                log_level: Some(LogLevel::Debug),
                command: Command::Run(_),
                ..
            }))
        ),
        "{run:?}"
    );
}

#[test]
fn defaults_are_the_articles_at_the_root() {
    assert_eq!(
        policy(&[]),
        Policy::enforce(Values::default(), vec![CgroupPath::root()])
    );
}

#[test]
fn out_of_range_values_are_refused_with_the_range() {
    for (args, range) in [
        (["--idle", "0"], "1..=32767"),
        (["--interval", "32768"], "1..=32767"),
        (["--count", "128"], "1..=127"),
        (["--user-timeout", "2147483648"], "0..=2147483647"),
    ] {
        let error = parse(&args).err().unwrap_or_default();
        assert!(
            error.contains(args[0]) && error.contains(range),
            "{args:?}: {error}"
        );
    }
}

#[test]
fn cgroups_are_hierarchy_or_filesystem_paths() {
    let scopes = policy(&[
        "--cgroup",
        "a",
        "--cgroup",
        "/sys/fs/cgroup/b/c",
        "--cgroup",
        "/",
    ])
    .scopes;
    let names: Vec<&str> = scopes.iter().map(CgroupPath::as_str).collect();
    assert_eq!(names, ["/a", "/b/c", "/"]);
}

#[test]
fn a_config_file_excludes_value_flags() {
    let error = parse(&["--config", "p.toml", "--idle", "5"])
        .err()
        .unwrap_or_default();
    assert!(
        error.contains("--idle") && error.contains("--config"),
        "{error}"
    );
}
