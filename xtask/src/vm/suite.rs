//! The privileged integration suite inside a guest: which of its modules run there, which do
//! not and why, the script that runs them, and what their output says.

use std::{fmt::Write as _, fs, path::Path};

use super::guest::shell_quote;

/// Modules of the suite (tests/tests/suite/<name>.rs) that do not run in the guests, with the
/// reason. Every other one runs, whole.
pub(crate) const HOST_ONLY: &[(&str, &str)] = &[
    (
        "deploy",
        "checks the manifests and the systemd unit with host tools, not the kernel",
    ),
    (
        "image",
        "checks the container image archive `cargo xtask image` built on the host",
    ),
    (
        "engines",
        "starts dockerd, containerd and podman with their state on disk, and runs the image; the \
         guest's root is a read-only 9p share with a tmpfs overlay",
    ),
    (
        "pods",
        "starts containerd with its CRI plugin and its state on disk, as `engines` does",
    ),
    (
        "helm",
        "renders and lints the Helm chart with Helm's engine on the host, not the kernel",
    ),
    (
        "monitoring",
        "checks the alert rules with promtool and the PrometheusRule with kubectl kustomize, \
         not the kernel",
    ),
    (
        "bench_smoke",
        "runs the benchmark end to end; its figures under emulation mean nothing, and the host \
         run proves the steps",
    ),
];

/// What runs in the guests of another architecture than the host's from a module of
/// [`HOST_ONLY`]: the tests that install that architecture's packages (cross-built by
/// `cargo xtask dist --arch`) into scratch roots with its dpkg and rpm, and run its agent.
pub(crate) const FOREIGN_PACKAGE_TESTS: (&str, &[&str]) = (
    "deploy",
    &[
        "packages::the_deb_installs_into_a_scratch_root",
        "packages::the_rpm_installs_into_a_scratch_root",
    ],
);

/// Modules that the guests of another architecture than the host's do not run, with the
/// reason: what they prove is the agent's own user-space behaviour, the same Rust code on every
/// architecture, run on the host and in every x86-64 guest; emulation time is CI's budget.
pub(crate) const SAME_ON_EVERY_ARCHITECTURE: &[(&str, &str)] = &[
    (
        "cli",
        "the command line, man pages and completions the agent prints",
    ),
    (
        "containers",
        "cgroups followed by pattern as they come and go",
    ),
    (
        "hostile",
        "input chosen to hurt the agent's parsers, endpoint and queues",
    ),
    (
        "observability",
        "the metrics endpoint, probes and log formats",
    ),
    ("operations", "pins, status, detach and one-sentence errors"),
    ("under_load", "the agent under reload and restart churn"),
];

/// The reason `test` does not run in another architecture's guests, if it does not.
pub(crate) fn same_on_every_architecture(test: &str) -> Option<&'static str> {
    reason(SAME_ON_EVERY_ARCHITECTURE, test)
}

/// Random policies the kernel model's property test tries in each guest (tests/tests/suite/
/// kernel_model.rs: 256 on the host).
const GUEST_MODEL_CASES: &str = "64";

/// The reason `test` does not run in the guests, if it does not.
pub(crate) fn host_only(test: &str) -> Option<&'static str> {
    reason(HOST_ONLY, test)
}

/// `test`'s reason in a list of (module, reason).
fn reason(list: &[(&str, &'static str)], test: &str) -> Option<&'static str> {
    list.iter()
        .find(|(name, _)| *name == test)
        .map(|(_, reason)| *reason)
}

/// A module of a guest's suite: its name, the suite's binary, and the arguments that run it
/// (the other modules skipped, and filters where only some of its tests run).
pub(crate) type Run = (String, std::path::PathBuf, Vec<String>);

/// A bash script that exports `env`, then runs each module one test at a time (the guest has 2
/// emulated CPUs), teeing its output to /ka-vm/<name>.log and its exit status to
/// /ka-vm/results.
pub(crate) fn script(runs: &[Run], env: &[(&str, &Path)], args: &[String]) -> String {
    let mut script = format!("set -u\nstatus=0\nexport KA_MODEL_CASES={GUEST_MODEL_CASES}\n");
    for (name, value) in env {
        let _ = writeln!(script, "export {name}={}", shell_quote(value));
    }
    let extra: Vec<String> = args.iter().map(|arg| shell_quote(Path::new(arg))).collect();
    for (name, binary, filters) in runs {
        let filters: Vec<String> = filters
            .iter()
            .map(|filter| shell_quote(Path::new(filter)))
            .collect();
        let _ = writeln!(
            script,
            "echo 'ka-vm: == {name}'\nstart=$(date +%s)\n\
             {} --test-threads=1 {} {} 2>&1 | tee /ka-vm/{name}.log\n\
             rc=${{PIPESTATUS[0]}}\n\
             echo \"{name} $rc $(( $(date +%s) - start ))\" >>/ka-vm/results\n\
             [ \"$rc\" = 0 ] || status=1",
            shell_quote(binary),
            filters.join(" "),
            extra.join(" ")
        );
    }
    script.push_str("exit $status\n");
    script
}

/// Totals of libtest's `test result:` lines.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) passed: u32,
    pub(crate) failed: u32,
    pub(crate) ignored: u32,
}

/// Per module: (name, exit status, seconds), and the totals of its log.
pub(crate) fn results(out: &Path) -> (Vec<(String, i32, u64)>, Counts) {
    let mut runs = Vec::new();
    let mut counts = Counts::default();
    let text = fs::read_to_string(out.join("results")).unwrap_or_default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(rc), Some(secs)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        runs.push((
            name.to_owned(),
            rc.parse().unwrap_or(-1),
            secs.parse().unwrap_or(0),
        ));
        let log = fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default();
        for result in log.lines().filter(|line| line.starts_with("test result:")) {
            counts.passed += count(result, "passed");
            counts.failed += count(result, "failed");
            counts.ignored += count(result, "ignored");
        }
    }
    (runs, counts)
}

/// N in "..., N <word>; ..." of a libtest result line.
fn count(line: &str, word: &str) -> u32 {
    line.split([';', '.'])
        .find_map(|part| {
            let mut words = part.split_whitespace();
            let n = words.next()?.parse().ok()?;
            (words.next()? == word).then_some(n)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_of_a_libtest_result_line() {
        let line = "test result: FAILED. 12 passed; 2 failed; 1 ignored; 0 measured; 0 filtered \
                    out; finished in 3.21s";
        assert_eq!(count(line, "passed"), 12);
        assert_eq!(count(line, "failed"), 2);
        assert_eq!(count(line, "ignored"), 1);
    }
}
