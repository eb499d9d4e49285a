//! The .deb and the .rpm `cargo xtask dist` makes (env `KA_AGENT_DEB`, `KA_AGENT_RPM`, set by
//! `cargo xtask test`): where they are and what they must install.

use std::{path::PathBuf, process::Command};

use crate::{TempDir, agent_bin, repo, succeeds};

fn from_env(var: &str, file: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(
        || {
            panic!(
                "{var} is not set: `cargo xtask test` builds the packages and sets it (or run \
                 `cargo xtask dist` and set it to target/dist/{}/{file})",
                debian_arch()
            )
        },
        PathBuf::from,
    )
}

/// This machine's architecture as Debian names it: the packages under test are this machine's
/// (in an arm64 guest, the arm64 ones).
pub fn debian_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no Debian architecture for {other}"),
    }
}

/// `target/dist/<arch>/keepalive-agent_<version>-1_<arch>.deb`.
pub fn deb() -> PathBuf {
    from_env(
        "KA_AGENT_DEB",
        &format!(
            "keepalive-agent_{}-1_{}.deb",
            env!("CARGO_PKG_VERSION"),
            debian_arch()
        ),
    )
}

/// `target/dist/<arch>/keepalive-agent-<version>-1.<uname -m>.rpm`.
pub fn rpm() -> PathBuf {
    from_env(
        "KA_AGENT_RPM",
        &format!(
            "keepalive-agent-{}-1.{}.rpm",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::ARCH
        ),
    )
}

/// The package's version: the workspace's, revision 1.
pub fn version() -> String {
    format!("{}-1", env!("CARGO_PKG_VERSION"))
}

/// Where the package's zsh completion goes: Debian's zsh reads vendor-completions, Fedora's
/// site-functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Deb,
    Rpm,
}

/// Every file the package must install (paths without the leading `/`), sorted: the agent,
/// the unit, the drop-in, the policy, the man pages and completions the agent generates,
/// README.md and docs/*.md; the .deb adds Debian's copyright, changelog and lintian
/// overrides.
pub fn expected_files(format: Format) -> Vec<String> {
    let mut files: Vec<String> = [
        "usr/bin/keepalive-agent",
        "usr/lib/systemd/system/keepalive-agent.service",
        "usr/share/keepalive-agent/before-systemd-253.conf",
        "etc/keepalive-agent/policy.toml",
        "usr/share/bash-completion/completions/keepalive-agent",
        "usr/share/fish/vendor_completions.d/keepalive-agent.fish",
        "usr/share/doc/keepalive-agent/README.md",
    ]
    .map(str::to_string)
    .to_vec();
    files.push(match format {
        Format::Deb => "usr/share/zsh/vendor-completions/_keepalive-agent".to_string(),
        Format::Rpm => "usr/share/zsh/site-functions/_keepalive-agent".to_string(),
    });
    let generated = TempDir::new();
    succeeds(
        Command::new(agent_bin())
            .arg("generate")
            .arg("--out-dir")
            .arg(generated.path()),
    );
    files.extend(names(&generated.join("man")).map(|page| format!("usr/share/man/man1/{page}.gz")));
    files.extend(
        names(&repo::root().join("docs"))
            .filter(|name| name.ends_with(".md"))
            .map(|doc| format!("usr/share/doc/keepalive-agent/docs/{doc}")),
    );
    if format == Format::Deb {
        files.extend(
            [
                "usr/share/doc/keepalive-agent/copyright",
                "usr/share/doc/keepalive-agent/changelog.Debian.gz",
                "usr/share/lintian/overrides/keepalive-agent",
            ]
            .map(str::to_string),
        );
    }
    files.sort();
    files
}

fn names(dir: &std::path::Path) -> impl Iterator<Item = String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap_or_else(|e| panic!("{e}")).file_name())
        .map(|name| name.to_string_lossy().into_owned())
}

/// The unit as the packages install it: the repository's, with the agent in /usr/bin.
pub fn packaged_unit() -> String {
    repo::read("deploy/systemd/keepalive-agent.service")
        .replace("/usr/local/bin/keepalive-agent", "/usr/bin/keepalive-agent")
}
