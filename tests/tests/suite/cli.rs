//! The command line as an operator meets it: the man pages and shell completions generated
//! from it (rendered by `man`, driven through bash's completion machinery), `--version`, the
//! `KEEPALIVE_AGENT_*` environment fallbacks and the typed options. Needs no root.

use std::{
    fs,
    path::Path,
    process::{Command, Output},
};

use keepalive_tests::{TempDir, agent_bin, succeeds};

/// `keepalive-agent generate --out-dir <temporary>`.
fn generated() -> TempDir {
    let dir = TempDir::new();
    succeeds(
        Command::new(agent_bin())
            .args(["generate", "--out-dir"])
            .arg(dir.path()),
    );
    dir
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `man -l PAGE` rendered as plain ASCII text.
fn render(page: &Path) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run man (Debian package man-db): {e}"));
    assert!(
        out.status.success(),
        "man -l {}: {}",
        page.display(),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn man_pages_render_for_the_agent_and_each_subcommand() {
    let dir = generated();
    let man = dir.join("man");
    let mut pages: Vec<String> = fs::read_dir(&man)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "keepalive-agent-check.1",
            "keepalive-agent-detach.1",
            "keepalive-agent-explain.1",
            "keepalive-agent-report.1",
            "keepalive-agent-run.1",
            "keepalive-agent-scan.1",
            "keepalive-agent-status.1",
            "keepalive-agent.1",
        ],
        "one page per visible subcommand; the hidden `generate` has none"
    );
    let main = render(&man.join("keepalive-agent.1"));
    for expected in [
        "NAME",
        "keepalive-agent",
        "SUBCOMMANDS",
        "--log-level",
        "VERSION",
    ] {
        assert!(main.contains(expected), "{expected} missing from:\n{main}");
    }
    let run = render(&man.join("keepalive-agent-run.1"));
    for expected in [
        "--metrics-addr",
        "--no-metrics",
        "KEEPALIVE_AGENT_CONFIG",
        "TCP_KEEPIDLE",
    ] {
        assert!(run.contains(expected), "{expected} missing from:\n{run}");
    }
    let scan = render(&man.join("keepalive-agent-scan.1"));
    for expected in ["--json", "--cgroup", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN"] {
        assert!(scan.contains(expected), "{expected} missing from:\n{scan}");
    }
    let explain = render(&man.join("keepalive-agent-explain.1"));
    for expected in ["--remote", "--local-port", "--direction", "inbound"] {
        assert!(
            explain.contains(expected),
            "{expected} missing from:\n{explain}"
        );
    }
}

/// What bash's completion function for the agent offers for `COMMAND_LINE` (the word being
/// completed is the last one; a trailing space starts a new, empty word).
fn bash_complete(script: &Path, command_line: &str) -> Vec<String> {
    let driver = r#"
        source "$1" || exit 3
        read -r -a COMP_WORDS <<< "$2"
        [[ "$2" == *" " ]] && COMP_WORDS+=("")
        COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
        COMP_LINE="$2"
        COMP_POINT=${#COMP_LINE}
        function=$(complete -p keepalive-agent | sed -E 's/.* -F ([^ ]+) .*/\1/') || exit 4
        [[ -n "$function" ]] || exit 4
        previous=""
        (( COMP_CWORD > 0 )) && previous="${COMP_WORDS[COMP_CWORD-1]}"
        "$function" keepalive-agent "${COMP_WORDS[COMP_CWORD]}" "$previous"
        printf '%s\n' "${COMPREPLY[@]}"
    "#;
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", driver, "complete"])
        .arg(script)
        .arg(command_line)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash: {e}"));
    assert!(out.status.success(), "{command_line:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| line.trim().to_string())
        .filter(|line| !line.is_empty())
        .collect()
}

#[test]
fn bash_completion_offers_the_subcommands_options_and_values() {
    let dir = generated();
    let script = dir.join("completions/keepalive-agent.bash");

    let subcommands = bash_complete(&script, "keepalive-agent ");
    for expected in [
        "run", "check", "status", "detach", "scan", "explain", "report",
    ] {
        assert!(
            subcommands.iter().any(|word| word == expected),
            "{expected} not offered: {subcommands:?}"
        );
    }
    assert!(
        !subcommands.iter().any(|word| word == "generate"),
        "the hidden subcommand is offered: {subcommands:?}"
    );
    assert_eq!(bash_complete(&script, "keepalive-agent sta"), ["status"]);

    let options = bash_complete(&script, "keepalive-agent run --no-");
    for expected in ["--no-existing", "--no-metrics"] {
        assert!(
            options.iter().any(|word| word == expected),
            "{expected} not offered: {options:?}"
        );
    }
    let mut formats = bash_complete(&script, "keepalive-agent run --log-format ");
    formats.sort();
    assert_eq!(formats, ["auto", "journald", "json", "text"]);
}

#[test]
fn zsh_and_fish_completions_know_the_subcommands() {
    let dir = generated();
    for file in ["_keepalive-agent", "keepalive-agent.fish"] {
        let script = fs::read_to_string(dir.join("completions").join(file)).unwrap();
        for expected in [
            "run",
            "check",
            "status",
            "detach",
            "scan",
            "explain",
            "metrics-addr",
        ] {
            assert!(script.contains(expected), "{file}: no {expected}");
        }
        assert!(
            !script.contains("generate"),
            "{file} offers the hidden subcommand"
        );
    }
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let out = Command::new(agent_bin()).arg("--version").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let commit = version
        .strip_prefix(&format!(
            "keepalive-agent {} (commit ",
            env!("CARGO_PKG_VERSION")
        ))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{version}"));
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
    };
    if !git(&["rev-parse", "HEAD"]).is_some_and(|out| out.status.success()) {
        // Not a git checkout (a tarball): nothing to name.
        assert_eq!(commit, "unknown");
        return;
    }
    // Built from this checkout by `cargo xtask test` just now: the commit is HEAD, or an
    // ancestor of it should a commit have landed since.
    assert!(
        commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "{version}"
    );
    let ancestor = git(&["merge-base", "--is-ancestor", commit, "HEAD"]);
    assert!(
        ancestor.is_some_and(|out| out.status.success()),
        "{commit} is not a commit of this checkout's HEAD"
    );
}

/// `keepalive-agent ARGS` with `ENV` set: clap settles the command line before anything is
/// loaded, so `--help` at the end shows whether it parsed without needing root.
fn parse(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(agent_bin());
    command.args(args).arg("--help");
    for (key, _) in std::env::vars() {
        if key.starts_with("KEEPALIVE_AGENT_") && key != "KEEPALIVE_AGENT_BIN" {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied()).output().unwrap()
}

#[test]
fn environment_fallbacks_are_documented_and_checked_like_flags() {
    let help = text(&parse(&["run"], &[]));
    for variable in [
        "KEEPALIVE_AGENT_CONFIG",
        "KEEPALIVE_AGENT_METRICS_ADDR",
        "KEEPALIVE_AGENT_NO_METRICS",
        "KEEPALIVE_AGENT_PERSIST",
        "KEEPALIVE_AGENT_BPFFS",
        "KEEPALIVE_AGENT_LOG_FORMAT",
        "KEEPALIVE_AGENT_LOG_LEVEL",
        "KEEPALIVE_AGENT_MISSING_INTERVAL",
    ] {
        assert!(help.contains(variable), "--help does not name {variable}");
    }
    // The help shows the value in force, so a variable is seen to be read.
    let shown = text(&parse(
        &["run"],
        &[("KEEPALIVE_AGENT_METRICS_ADDR", "127.0.0.1:9999")],
    ));
    assert!(
        shown.contains("KEEPALIVE_AGENT_METRICS_ADDR=127.0.0.1:9999"),
        "{shown}"
    );

    // A bad value in the environment is refused with the option's name, like on the command
    // line, and never panics.
    for (variable, value, option) in [
        ("KEEPALIVE_AGENT_METRICS_ADDR", "none", "--metrics-addr"),
        ("KEEPALIVE_AGENT_PERSIST", "maybe", "--persist"),
        ("KEEPALIVE_AGENT_LOG_FORMAT", "xml", "--log-format"),
        ("KEEPALIVE_AGENT_LOG_LEVEL", "loud", "--log-level"),
        (
            "KEEPALIVE_AGENT_MISSING_INTERVAL",
            "soon",
            "--missing-interval",
        ),
    ] {
        let out = Command::new(agent_bin())
            .args(["run", "--cgroup", "/nonexistent"])
            .env(variable, value)
            .output()
            .unwrap();
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{variable}={value}: {said}");
        assert!(
            said.contains(option) && said.contains(value) && !said.contains("panicked"),
            "{variable}={value}: {said}"
        );
    }
}

#[test]
fn metrics_are_an_address_or_explicitly_off() {
    // The magic word of old is now an error that says what is expected.
    let old = text(&parse(&["run", "--metrics-addr", "none"], &[]));
    assert!(
        old.contains("invalid value 'none' for '--metrics-addr <ADDR>'"),
        "{old}"
    );
    assert!(parse(&["run", "--no-metrics"], &[]).status.success());
    assert!(
        parse(&["run", "--metrics-addr", "[::1]:9477"], &[])
            .status
            .success()
    );
    let both = Command::new(agent_bin())
        .args(["run", "--metrics-addr", "127.0.0.1:1", "--no-metrics"])
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2), "{}", text(&both));
    assert!(
        text(&both).contains("cannot be used with"),
        "{}",
        text(&both)
    );
}
