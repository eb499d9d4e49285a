//! `cargo xtask`: the project's commands, toolchain bootstrap included.
#![expect(
    clippy::print_stderr,
    reason = "xtask reports to the developer on stderr"
)]

mod arch;
mod cmd;
mod dist;
mod fuzz;
mod image;
mod packages;
mod suite;
mod toolchain;
mod vm;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{
    arch::Arch,
    cmd::{as_on_a_fresh_machine, run_status},
    toolchain::Toolchain,
};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run and test the keepalive agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the release agent at target/release/keepalive-agent (eBPF program embedded).
    Build,
    /// Build the static agent and lay out in target/dist/<arch> what a host install needs: the
    /// binary, man pages (man/), shell completions for bash, zsh and fish (completions/),
    /// all generated from the agent's command line, the systemd unit; and the packages made
    /// of them, keepalive-agent_<version>-1_<arch>.deb and keepalive-agent-<version>-1.<arch>.rpm
    /// (reproducible: dated by SOURCE_DATE_EPOCH, else the last commit).
    Dist {
        /// amd64 (x86_64) or arm64 (aarch64), or both; default: this host's. Another
        /// architecture's agent is cross-built (static musl, linked by rust-lld).
        #[arg(long, value_delimiter = ',', value_name = "ARCH")]
        arch: Vec<String>,
    },
    /// Build the agent's container image (deploy/Dockerfile, FROM scratch: the static agent
    /// and the default policy) with buildah for amd64 and arm64: this host's architecture into
    /// target/image/keepalive-agent.tar (docker-archive, tagged
    /// localhost/keepalive-agent:<version>), both as an OCI index into
    /// target/image/keepalive-agent.oci.tar. Pulls nothing.
    Image {
        /// The repository URL for the org.opencontainers.image.source label (default: the
        /// git remote `origin`, if any, without credentials).
        #[arg(long, value_name = "URL")]
        source: Option<String>,
    },
    /// Build, then run the agent in the foreground as root: the default policy (idle 60 s,
    /// interval 5 s, 3 probes) at the root of the cgroup v2 hierarchy. Arguments after `--`
    /// go to `keepalive-agent run`. Ctrl-C or SIGTERM detaches cleanly.
    Run {
        #[arg(last = true, value_name = "AGENT ARGS")]
        agent_args: Vec<String>,
    },
    /// Install what the tests need, then run every test: unit and privileged (as root). On
    /// the host it also builds the image (as `image` does) for the tests that check it. The
    /// privileged suite (tests/tests/suite) is one binary run module by module, each in a
    /// process of its own. Arguments after `--` go to libtest, for the unit tests and each
    /// module's run (e.g. a test name filter, `--nocapture`).
    Test {
        /// Where the tests run: `host` (this kernel: unit and privileged tests), a kernel of
        /// the matrix booted under qemu (`5.10`, `6.1`, `6.12`, and arm64's `arm64-5.10`,
        /// `arm64-6.1`, `arm64-6.12` with the suite cross-built) with the privileged
        /// integration suite inside, or `systemd` (Debian 12's kernel and systemd as PID 1,
        /// where the .deb is installed and its unit driven); `amd64` and `arm64` are an
        /// architecture's three kernels, `all` is the eight guests. Repeatable or
        /// comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "host")]
        kernel: Vec<String>,
        /// Run only these modules of the suite (tests/tests/suite/NAME.rs), and no unit tests.
        #[arg(long, value_name = "NAME", value_delimiter = ',')]
        only: Vec<String>,
        #[arg(last = true, value_name = "TEST ARGS")]
        test_args: Vec<String>,
    },
    /// Boot a kernel of the matrix under qemu (the host's root read-only, pure cgroup v2; an
    /// arm64 kernel gets Debian 12's arm64 userland over it) and run a bash command in this
    /// workspace inside it, as root; `systemd` boots with systemd as PID 1 and runs the command
    /// as a service.
    Vm {
        /// 5.10, 6.1, 6.12, arm64-5.10, arm64-6.1, arm64-6.12 or systemd.
        #[arg(long)]
        kernel: String,
        /// The command, run by bash.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// rustfmt and clippy (host crates and the eBPF crate), warnings as errors.
    Lint,
    /// Measure what enforcement costs (as root): connection rate against no program, a
    /// policy-free floor program, libkeepalive and the application setting the options itself;
    /// program ns per connection; update latency, agent start-up and memory; scale. Progress on
    /// stderr; prints a table (targets marked pass/fail) and writes
    /// bench/results/bench.{md,json,svg}.
    Bench {
        /// Exercise every step in seconds; the figures mean nothing.
        #[arg(long)]
        quick: bool,
        /// Only the steady-state rows: an idle agent's CPU and memory at 10 to 10,000 cgroups.
        #[arg(long)]
        steady: bool,
        /// Only the program time per connection, of every variant, with its targets.
        #[arg(long, conflicts_with = "steady")]
        program: bool,
    },
    /// Fuzz the policy file parser and the policy compiler (cargo fuzz, pinned nightly) for a
    /// bounded time per target; not part of `test`. Failing inputs land in fuzz/artifacts/.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Only this target (policy_file or policy_rules).
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    let workspace = workspace_root();
    match task {
        Task::Build => build(&workspace, &Toolchain::ensure()?, Profile::Release).map(drop),
        Task::Dist { arch } => {
            let toolchain = Toolchain::ensure()?;
            for arch in arches(&arch)? {
                dist::dist(&workspace, &toolchain, arch)?;
            }
            Ok(())
        }
        Task::Image { source } => {
            image::build(&workspace, &Toolchain::ensure()?, source.as_deref()).map(drop)
        }
        Task::Run { agent_args } => {
            host_check("cargo xtask run")?;
            let agent = build(&workspace, &Toolchain::ensure()?, Profile::Release)?;
            // exec: the agent gets Ctrl-C and SIGTERM itself and detaches before exiting.
            let error = Command::new(&agent).arg("run").args(agent_args).exec();
            Err(error).with_context(|| format!("cannot run {}", agent.display()))
        }
        Task::Test {
            kernel,
            only,
            test_args,
        } => test(&workspace, &kernel, &only, &test_args),
        Task::Vm { kernel, command } => {
            let targets = vm::targets(std::slice::from_ref(&kernel))?;
            packages::ensure(packages::TEST)?;
            vm::run_command(&workspace, &targets, &command.join(" "))
        }
        Task::Lint => lint(&workspace, &Toolchain::ensure()?),
        Task::Fuzz { seconds, target } => fuzz::run(
            &workspace,
            &Toolchain::ensure()?,
            seconds,
            target.as_deref(),
        ),
        Task::Bench {
            quick,
            steady,
            program,
        } => bench(&workspace, quick, steady, program),
    }
}

/// `cargo xtask test`: the unit and privileged tests on this kernel, then in the guests of the
/// kernel matrix.
fn test(
    workspace: &Path,
    kernel: &[String],
    only: &[String],
    test_args: &[String],
) -> anyhow::Result<()> {
    let targets = vm::targets(kernel)?;
    if targets.host {
        host_check("cargo xtask test")?;
    }
    packages::ensure(packages::TEST)?;
    let toolchain = Toolchain::ensure()?;
    // The host's tests lint, list and install the packages; the guests run their agent.
    let packages = dist::dist(workspace, &toolchain, Arch::host()?)?;
    if targets.host {
        let agent = build(workspace, &toolchain, Profile::Debug)?;
        let python = packages::ensure_python_tools(&toolchain::cache_dir()?)?;
        // The tests check the image and run the agent as a container from it.
        let image = image::build(workspace, &toolchain, None)?;
        // Unit tests: every crate's library and binaries (the suite alone needs root).
        if only.is_empty() {
            let mut units = cargo(workspace, &toolchain)?;
            units
                .args([
                    "test",
                    "--locked",
                    "--no-fail-fast",
                    "--lib",
                    "--bins",
                    "--",
                ])
                .args(test_args);
            run_status(&mut units)?;
        }
        let mut build_suite = cargo(workspace, &toolchain)?;
        build_suite.arg("test");
        let suite_binary = suite::build(build_suite)?;
        let modules = suite::modules(workspace)?;
        let mut failed = Vec::new();
        for module in suite::select(only, &modules)? {
            eprintln!("xtask: suite: {module}");
            let mut tests = Command::new(&suite_binary);
            tests
                .args(suite::only(&module, &modules))
                .args(test_args)
                .current_dir(workspace.join("tests"))
                .env("KEEPALIVE_AGENT_BIN", &agent)
                .env("KUBERNETES_VALIDATE", &python.kubernetes_validate)
                .env("KUBECTL", &python.kubectl)
                .env("KA_AGENT_IMAGE", &image.host)
                .env("KA_AGENT_IMAGE_INDEX", &image.index)
                .env("KA_AGENT_DEB", &packages.deb)
                .env("KA_AGENT_RPM", &packages.rpm);
            if run_status(&mut as_on_a_fresh_machine(&tests)).is_err() {
                failed.push(module);
            }
        }
        if !failed.is_empty() {
            anyhow::bail!("the suite failed on the host: {}", failed.join(", "));
        }
    }
    if targets.kernels.is_empty() && !targets.systemd {
        return Ok(());
    }
    let host = Arch::host()?;
    let matrix = vm::Matrix {
        workspace,
        only,
        libtest_args: test_args,
        dist: &|arch| {
            if arch == host {
                Ok(packages.clone())
            } else {
                dist::dist(workspace, &toolchain, arch)
            }
        },
    };
    vm::test_matrix(
        &matrix,
        || cargo(workspace, &toolchain),
        &targets.kernels,
        targets.systemd,
    )
}

/// `cargo xtask bench`: the release agent and the benchmark, results under bench/results.
fn bench(workspace: &Path, quick: bool, steady: bool, program: bool) -> anyhow::Result<()> {
    host_check("cargo xtask bench")?;
    packages::ensure(packages::TEST)?;
    let toolchain = Toolchain::ensure()?;
    let agent = build(workspace, &toolchain, Profile::Release)?;
    run_status(cargo(workspace, &toolchain)?.args([
        "build",
        "--locked",
        "--release",
        "--package",
        "keepalive-tests",
        "--bins",
    ]))?;
    let bins = target_dir(workspace).join("release");
    let mut bench = Command::new(bins.join("ka-bench"));
    bench
        .arg("--agent")
        .arg(agent)
        .arg("--out")
        .arg(workspace.join("bench").join("results"));
    if quick {
        bench.arg("--quick");
    }
    if steady {
        bench.arg("--steady");
    }
    if program {
        bench.arg("--program");
    }
    run_status(&mut bench)
}

/// The architectures named (`amd64`, `arm64`, their `uname -m` names), or the host's.
fn arches(names: &[String]) -> anyhow::Result<Vec<Arch>> {
    if names.is_empty() {
        return Ok(vec![Arch::host()?]);
    }
    let mut arches = Vec::new();
    for name in names {
        let arch = Arch::parse(name)?;
        if !arches.contains(&arch) {
            arches.push(arch);
        }
    }
    Ok(arches)
}

/// The host requirements (root, kernel, BTF, cgroup v2), as one sentence on failure.
fn host_check(task: &str) -> anyhow::Result<()> {
    keepalive_common::host::check()
        .map(drop)
        .with_context(|| format!("{task} loads eBPF programs into this kernel"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

/// Builds the agent and returns the binary's path.
fn build(workspace: &Path, toolchain: &Toolchain, profile: Profile) -> anyhow::Result<PathBuf> {
    let mut command = cargo(workspace, toolchain)?;
    command.args(["build", "--locked", "--package", "keepalive-agent"]);
    if profile == Profile::Release {
        command.arg("--release");
    }
    run_status(&mut command)?;
    let dir = if profile == Profile::Release {
        "release"
    } else {
        "debug"
    };
    Ok(target_dir(workspace).join(dir).join("keepalive-agent"))
}

fn lint(workspace: &Path, toolchain: &Toolchain) -> anyhow::Result<()> {
    run_status(cargo(workspace, toolchain)?.args(["fmt", "--all", "--check"]))?;
    // fuzz/ is a workspace of its own; `cargo xtask fuzz` builds it.
    run_status(cargo(workspace, toolchain)?.args([
        "fmt",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--check",
    ]))?;
    run_status(cargo(workspace, toolchain)?.args([
        "clippy",
        "--locked",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate only builds for the BPF target, with the pinned nightly.
    run_status(
        toolchain::rustup_run(toolchain::NIGHTLY, "cargo")
            .args(["clippy", "--locked", "--release"])
            .args([
                "--package",
                "keepalive-ebpf",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core", "--target-dir"])
            .arg(target_dir(workspace).join("ebpf-lint"))
            .args(["--", "-D", "warnings"])
            .current_dir(workspace)
            .env("PATH", toolchain.path()?),
    )
}

/// `cargo` of the pinned host toolchain (not the stable that runs xtask) in the workspace,
/// with bpf-linker on PATH.
fn cargo(workspace: &Path, toolchain: &Toolchain) -> anyhow::Result<Command> {
    let mut command = toolchain::rustup_run(toolchain::HOST, "cargo");
    command
        .current_dir(workspace)
        .env("PATH", toolchain.path()?);
    Ok(command)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from)
}
