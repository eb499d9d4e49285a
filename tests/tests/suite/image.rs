//! The agent's container image that `cargo xtask image` built (env `KA_AGENT_IMAGE`): the
//! static agent and the DaemonSet's policy, its labels, entrypoint and command, and nothing
//! else; the agent in it runs, and enforces on new and existing connections; the OCI index
//! (env `KA_AGENT_IMAGE_INDEX`) gives amd64 and arm64 each its own. (Running it as a container
//! is the engines' tests' part.)

use std::{fs, process::Command, time::Duration};

use keepalive_tests::{
    AgentPlaces, Netns, Placement, TempDir, TestCgroup, connect, image, kernel_links,
    repo::{assert_agent_accepts, read},
    require_host, succeeds,
};

/// The image's command line parses.
#[test]
fn the_container_image_command_parses() {
    assert_agent_accepts(&dockerfile_cmd(), "Dockerfile CMD");
}

/// The CMD of deploy/Dockerfile, as the exec form's words.
fn dockerfile_cmd() -> Vec<String> {
    let dockerfile = read("deploy/Dockerfile");
    let cmd = dockerfile
        .lines()
        .find(|line| line.starts_with("CMD "))
        .unwrap();
    cmd.trim_start_matches("CMD ")
        .trim_matches(['[', ']'])
        .split(',')
        .map(|arg| arg.trim().trim_matches('"').to_string())
        .collect()
}

/// The build context is the repository root, gigabytes with target/: .dockerignore must let
/// in exactly what the Dockerfile copies. And the Dockerfile has one stage, from scratch.
#[test]
fn the_dockerfile_is_one_stage_from_scratch_and_dockerignore_lets_in_what_it_copies() {
    let dockerfile = read("deploy/Dockerfile");
    let mut copied: Vec<String> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .map(|args| args.split_whitespace().next().unwrap())
        // One path per architecture (the build argument), one pattern for them all.
        .map(|path| path.replace("${TARGETARCH}", "*"))
        .collect();
    copied.sort_unstable();
    let dockerignore = read(".dockerignore");
    let rules: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert_eq!(rules.first(), Some(&"*"), "everything is left out first");
    let mut let_in: Vec<&str> = rules
        .iter()
        .filter_map(|rule| rule.strip_prefix('!'))
        .collect();
    let_in.sort_unstable();
    assert_eq!(let_in, copied);
    assert_eq!(rules.len(), copied.len() + 1, "{rules:?}");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|line| line.starts_with("FROM"))
        .collect();
    assert_eq!(stages, ["FROM scratch"], "one stage, nothing pulled");
}

/// The largest the image archive may be. Measured: the archive of 0.1.0 is 12.4 MiB
/// (12,994,560 bytes), nearly all of it the static agent (12,978,840 bytes, symbols kept for
/// backtraces).
const IMAGE_MAX_BYTES: u64 = 16 * 1024 * 1024;

#[test]
fn the_image_is_the_agent_and_its_policy_with_labels_and_nothing_else() {
    let archive = image::archive();
    let unpacked = image::Unpacked::open(&archive);
    assert_eq!(
        unpacked.manifest["RepoTags"],
        serde_json::json!([image::reference()]),
        "the archive's tag"
    );
    let config = &unpacked.config["config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/keepalive-agent"])
    );
    assert_eq!(config["Cmd"], serde_json::json!(dockerfile_cmd()));
    let labels = &config["Labels"];
    for (label, value) in [
        ("title", "keepalive-agent"),
        ("version", env!("CARGO_PKG_VERSION")),
        ("licenses", "MIT OR Apache-2.0"),
    ] {
        assert_eq!(
            labels[format!("org.opencontainers.image.{label}")].as_str(),
            Some(value),
            "label {label} in {labels}"
        );
    }
    for label in ["description", "revision"] {
        let value = labels[format!("org.opencontainers.image.{label}")]
            .as_str()
            .unwrap_or_default();
        assert!(
            !value.is_empty() && value != "unknown",
            "label {label} in {labels}"
        );
    }
    if let Some(source) = labels["org.opencontainers.image.source"].as_str() {
        assert!(
            source.starts_with("https://")
                && !source.split('/').nth(2).unwrap_or_default().contains('@'),
            "the source label is a URL without credentials: {source}"
        );
    }

    // Exactly these files: no shell, no package manager, no libc.
    let mut files = unpacked.files();
    files.sort();
    files.dedup();
    let expected = [
        "etc/",
        "etc/keepalive-agent/",
        "etc/keepalive-agent/policy.toml",
        "usr/",
        "usr/local/",
        "usr/local/bin/",
        "usr/local/bin/keepalive-agent",
    ];
    assert_eq!(files, expected, "the image's files");
    assert!(!files.iter().any(|file| file.ends_with("bin/sh")));

    let size = fs::metadata(&archive).unwrap().len();
    assert!(
        size <= IMAGE_MAX_BYTES,
        "{} is {size} bytes, over {IMAGE_MAX_BYTES}",
        archive.display()
    );
}

#[test]
fn the_agent_in_the_image_is_static_and_runs_from_its_policy() {
    let unpacked = image::Unpacked::open(&image::archive());
    let agent = unpacked.extract("usr/local/bin/keepalive-agent");
    assert!(
        !image::is_dynamically_linked(&agent),
        "the image has no loader or libc: the agent must be static"
    );
    let version = Command::new(&agent).arg("--version").output().unwrap();
    assert!(version.status.success(), "{version:?}");
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(
        version.starts_with(&format!("keepalive-agent {} ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    // The binary's commit (12 digits) is the revision label's prefix.
    let revision = unpacked.config["config"]["Labels"]["org.opencontainers.image.revision"]
        .as_str()
        .unwrap()
        .to_string();
    let commit = version
        .split_once("(commit ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(commit, _)| commit)
        .unwrap_or_else(|| panic!("no commit in {version}"));
    assert!(
        revision.starts_with(commit),
        "revision label {revision}, binary {commit}"
    );

    let policy = unpacked.extract("etc/keepalive-agent/policy.toml");
    assert_eq!(
        fs::read_to_string(&policy).unwrap(),
        read("deploy/kubernetes/policy.toml"),
        "the image carries the DaemonSet's default policy"
    );
    succeeds(
        Command::new(&agent)
            .args(["check", "--config"])
            .arg(&policy),
    );
}

/// The OCI index holds an amd64 and an arm64 image; podman, asked for each architecture, pulls
/// the half whose agent is that architecture's (ELF machine), with the same policy and command.
#[test]
fn the_index_gives_each_architecture_its_own_agent() {
    let index = image::index_archive();
    let store = TempDir::new();
    let podman = |args: &[&str]| -> String {
        let out = succeeds(
            Command::new("podman")
                .arg("--root")
                .arg(store.join("root"))
                .arg("--runroot")
                .arg(store.join("run"))
                .args(["--storage-driver", "vfs"])
                .args(args),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let source = format!("oci-archive:{}", index.display());
    for (arch, machine) in [("amd64", 62), ("arm64", 183)] {
        let id = podman(&["pull", "--quiet", "--arch", arch, &source]);
        assert_eq!(
            podman(&["image", "inspect", "--format", "{{.Architecture}}", &id]),
            arch,
            "podman pulled the {arch} half"
        );
        assert_eq!(
            podman(&["image", "inspect", "--format", "{{json .Config.Cmd}}", &id]),
            serde_json::to_string(&dockerfile_cmd()).unwrap()
        );
        let archive = store.join(format!("{arch}.tar"));
        podman(&[
            "save",
            "--format",
            "docker-archive",
            "--output",
            &archive.display().to_string(),
            &id,
        ]);
        let unpacked = image::Unpacked::open(&archive);
        let agent = unpacked.extract("usr/local/bin/keepalive-agent");
        assert_eq!(
            image::elf_machine(&agent),
            machine,
            "the {arch} image's agent"
        );
        assert!(
            !image::is_dynamically_linked(&agent),
            "the {arch} agent is static"
        );
        assert_eq!(
            fs::read_to_string(unpacked.extract("etc/keepalive-agent/policy.toml")).unwrap(),
            read("deploy/kubernetes/policy.toml")
        );
    }
}

/// The static (musl) agent loads the program, attaches, updates a connection that existed
/// before it started (pidfd_getfd, setns) and new ones, both ends, and detaches on SIGTERM.
#[test]
fn the_static_agent_from_the_image_enforces_and_detaches() {
    require_host();
    let unpacked = image::Unpacked::open(&image::archive());
    let agent = unpacked.extract("usr/local/bin/keepalive-agent");
    let cgroup = TestCgroup::new();
    let netns = Netns::new();
    let place = Placement::new(&cgroup, &netns);
    let before = connect("127.0.0.1:0", "127.0.0.1", place, place);
    assert!(!before.client().enabled, "no keepalive before the agent");

    let places = AgentPlaces::new();
    let name = cgroup.cgroup().name.clone();
    let mut run = places.spawn(&agent, &["run", "--cgroup", &name, "--idle", "17"]);
    run.expect_log("attached", Duration::from_secs(10));
    run.expect_log("existing connections", Duration::from_secs(10));
    for (which, keepalive) in [("client", before.client()), ("server", before.server())] {
        assert!(keepalive.enabled, "existing {which}: {keepalive:?}");
        assert_eq!(keepalive.idle_secs, 17, "existing {which}");
    }
    let after = connect("127.0.0.1:0", "127.0.0.1", place, place);
    for (which, keepalive) in [("client", after.client()), ("server", after.server())] {
        assert_eq!(
            (
                keepalive.enabled,
                keepalive.idle_secs,
                keepalive.interval_secs,
                keepalive.count
            ),
            (true, 17, 5, 3),
            "new {which}"
        );
    }
    assert_eq!(
        run.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)),
        Some(0)
    );
    assert!(kernel_links(&cgroup).is_empty(), "detached on SIGTERM");
}
