//! The privileged integration suite inside a guest: which test binaries run there, which do
//! not and why, the script that runs them, and what their output says.

use std::{fmt::Write as _, fs, path::Path};

use super::guest::shell_quote;

/// Test binaries (tests/tests/<name>.rs) that do not run in the guests, with the reason. Every
/// other one runs, whole.
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
        "bench_smoke",
        "runs the benchmark end to end; its figures under emulation mean nothing, and the host \
         run proves the steps",
    ),
];

/// The reason `test` does not run in the guests, if it does not.
pub(crate) fn host_only(test: &str) -> Option<&'static str> {
    HOST_ONLY
        .iter()
        .find(|(name, _)| *name == test)
        .map(|(_, reason)| *reason)
}

/// A bash script that exports `env`, then runs each test binary one test at a time (the guest
/// has 2 emulated CPUs), teeing its output to /ka-vm/<name>.log and its exit status to
/// /ka-vm/results.
pub(crate) fn script(
    binaries: &[(String, std::path::PathBuf)],
    env: &[(&str, &Path)],
    args: &[String],
) -> String {
    let mut script = String::from("set -u\nstatus=0\n");
    for (name, value) in env {
        let _ = writeln!(script, "export {name}={}", shell_quote(value));
    }
    let extra: Vec<String> = args.iter().map(|arg| shell_quote(Path::new(arg))).collect();
    for (name, binary) in binaries {
        let _ = writeln!(
            script,
            "echo 'ka-vm: == {name}'\nstart=$(date +%s)\n\
             {} --test-threads=1 {} 2>&1 | tee /ka-vm/{name}.log\n\
             rc=${{PIPESTATUS[0]}}\n\
             echo \"{name} $rc $(( $(date +%s) - start ))\" >>/ka-vm/results\n\
             [ \"$rc\" = 0 ] || status=1",
            shell_quote(binary),
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

/// Per binary: (name, exit status, seconds), and the totals of its log.
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
