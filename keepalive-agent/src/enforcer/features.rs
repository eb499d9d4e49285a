//! Parts of the agent that the running kernel may not offer, found by loading them (the
//! verifier's answer, not the version string), and the RLIMIT_MEMLOCK that kernels before 5.11
//! charge BPF maps to.

use std::fmt;

use aya::programs::ProgramError;
use keepalive_common::Mode;
use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// The optional parts, by the name `status` and the metrics use.
pub const LOCK: &str = "lock";
/// Reading a socket's keepalive options in the kernel (`bpf_getsockopt`), which the modes
/// fill, cap and audit need.
pub const READS: &str = "reads";
/// Updating existing connections in the kernel (a TCP iterator program).
pub const ITERATOR: &str = "iterator";
/// Learning of links detached or given another program from the kernel (fentry programs or a
/// kprobe), not by asking each.
pub const LINK_WATCH: &str = "link-watch";
/// Following how connections end (`ends = true` in the policy): the sock_ops program reads
/// the socket's error and timestamps.
pub const ENDS: &str = "ends";
/// Every optional part.
pub const OPTIONAL: &[&str] = &[LOCK, READS, ITERATOR, LINK_WATCH, ENDS];

/// A part that did not load on this kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingFeature {
    /// [`LOCK`].
    pub feature: String,
    /// The first kernel that offers it.
    pub since: String,
    /// What the verifier (or the load) said.
    pub reason: String,
    /// What works without it, and what does not.
    pub effect: String,
}

impl MissingFeature {
    /// The cgroup/setsockopt hook that holds applications to locked rules. It asks which
    /// process calls (to let the agent's own calls through) and which cgroups the caller is
    /// in; cgroup/setsockopt programs may call those helpers from Linux 6.1 (commit
    /// bed89185af0d, "bpf: Use cgroup_{common,current}_func_proto in more hooks").
    pub(crate) fn lock(error: &ProgramError) -> Self {
        Self::lock_because(verifier_reason(error))
    }

    fn lock_because(reason: String) -> Self {
        Self {
            feature: LOCK.to_owned(),
            since: "6.1".to_owned(),
            reason,
            effect: "new connections get the policy, but applications can change or turn off \
                     their keepalive afterwards (locked rules are not held)"
                .to_owned(),
        }
    }

    /// `bpf_getsockopt` of SO_KEEPALIVE and the TCP keepalive options, from Linux 6.1 (commits
    /// 65ddc82d3b96 and 273b7f0fb448; before them the call fails with EINVAL at run time). The
    /// verifier accepts the call on every kernel, so no load can tell: the release decides,
    /// and the `failed` outcome counts what a misjudged kernel refuses.
    pub(crate) fn reads(release: &str) -> Option<Self> {
        let version = keepalive_common::host::parse_kernel_version(release)?;
        (version < (6, 1)).then(|| Self {
            feature: READS.to_owned(),
            since: "6.1".to_owned(),
            reason: format!("bpf_getsockopt cannot read SO_KEEPALIVE or TCP_KEEPIDLE on {release}"),
            effect: "the modes fill, cap and audit cannot see what an application set, so \
                     their connections are left alone and counted failed; enforce and exempt \
                     work"
                .to_owned(),
        })
    }
}

impl MissingFeature {
    /// The sweep program, a TCP iterator that applies the policy to existing connections in the
    /// kernel: iterator programs may call `bpf_setsockopt` from Linux 5.14 (commit
    /// 3cee6fb8e69e, "bpf: tcp: Support bpf_(get|set)sockopt in bpf tcp iter"), and the
    /// socket's cgroup pointer is where the program reads it from 5.15 (8520e224f547).
    pub(crate) fn iterator(error: &ProgramError) -> Self {
        Self::iterator_because(verifier_reason(error))
    }

    pub(crate) fn iterator_because(reason: String) -> Self {
        Self {
            feature: ITERATOR.to_owned(),
            since: "5.15".to_owned(),
            reason,
            effect: "connections that existed before the policy are updated through duplicates \
                     of their owners' descriptors (pidfd_getfd), which needs CAP_SYS_PTRACE for \
                     processes of other users; new connections are not affected"
                .to_owned(),
        }
    }
}

impl MissingFeature {
    /// The programs that count cgroup links detached or given another program
    /// ([`keepalive_common::LINK_WATCH_FENTRIES`], both functions since Linux 5.9): fentry
    /// needs BPF trampolines (x86-64 5.5, arm64 6.0) and the kernel's BTF, the kprobe fallback
    /// CONFIG_KPROBES and perf_event_open, the link iterator (where both are refused) Linux
    /// 5.19 and the kernel's BTF; a kernel or sandbox without any of them refuses it.
    pub(crate) fn link_watch(reason: String) -> Self {
        Self {
            feature: LINK_WATCH.to_owned(),
            since: "5.9".to_owned(),
            reason,
            effect: "to find what someone else removed, each attachment is asked every 500 ms, \
                     which costs CPU in proportion to the cgroups followed"
                .to_owned(),
        }
    }
}

impl MissingFeature {
    /// Following connection ends: sock_ops programs reach their socket as a `tcp_sock`
    /// (`bpf_sock_ops.sk` and `bpf_skc_to_tcp_sock` there, Linux 5.10) and read its fields at
    /// offsets from the kernel's BTF.
    pub(crate) fn ends(reason: String) -> Self {
        Self {
            feature: ENDS.to_owned(),
            since: "5.10".to_owned(),
            reason,
            effect: "keepalive is enforced as before, but how connections end is not counted \
                     (`ends = true` has no effect)"
                .to_owned(),
        }
    }
}

/// What a kernel of `release` is known to lack, without loading anything (for `check`).
pub fn by_release(release: &str) -> Vec<MissingFeature> {
    let mut missing: Vec<MissingFeature> = MissingFeature::reads(release).into_iter().collect();
    let version = keepalive_common::host::parse_kernel_version(release);
    if version.is_some_and(|version| version < (6, 1)) {
        missing.push(MissingFeature::lock_because(format!(
            "cgroup/setsockopt programs cannot ask for the caller on {release}"
        )));
    }
    if version.is_some_and(|version| version < (5, 15)) {
        missing.push(MissingFeature::iterator_because(format!(
            "TCP iterator programs cannot set socket options on {release}"
        )));
    }
    missing
}

/// Whether `missing` names `feature` ([`LOCK`], [`READS`]).
pub fn lacks(missing: &[MissingFeature], feature: &str) -> bool {
    missing.iter().any(|missing| missing.feature == feature)
}

/// One sentence per rule of `policy` (the default first) that a kernel lacking `missing`
/// cannot carry out: fill, cap and audit without keepalive reads. (A missing lock is one
/// sentence for the whole agent, said when it loads.)
pub fn unsupported(policy: &Policy, missing: &[MissingFeature]) -> Vec<String> {
    let no_reads = lacks(missing, READS);
    let default = std::iter::once(("default".to_owned(), &policy.default));
    let rules = policy.rules.iter().map(|rule| {
        let name = if rule.line > 0 {
            format!("rule {:?} (line {})", rule.name, rule.line)
        } else {
            format!("rule {:?}", rule.name)
        };
        (name, &rule.action)
    });
    let mut sentences = Vec::new();
    for (name, action) in default.chain(rules) {
        if no_reads && matches!(action.mode, Mode::Fill | Mode::Cap | Mode::Audit) {
            sentences.push(format!(
                "{name} uses mode {}, which needs Linux 6.1 (keepalive reads of bpf_getsockopt): \
                 its connections are left alone and counted failed",
                action.mode.name()
            ));
        }
    }
    sentences
}

impl fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.feature.as_str() {
            LOCK => "the lock (the cgroup/setsockopt hook)",
            READS => "keepalive reads (bpf_getsockopt of the keepalive options)",
            ITERATOR => {
                "the in-kernel sweep (a TCP iterator program setting the options of \
                         connections opened before the policy)"
            }
            other => other,
        };
        write!(
            f,
            "this kernel lacks {what}, which needs Linux {} or newer ({}): {}",
            self.since, self.reason, self.effect
        )
    }
}

/// The verifier's own sentence for a refused program (e.g. `unknown func
/// bpf_get_current_pid_tgid#14`), else the error.
pub(super) fn verifier_reason(error: &ProgramError) -> String {
    if let ProgramError::LoadError { verifier_log, .. } = error {
        let log = verifier_log.to_string();
        let line = log.lines().map(str::trim).find(|line| {
            line.starts_with("unknown func")
                || line.contains("cannot use helper")
                || line.contains("helper call is not allowed")
        });
        if let Some(line) = line {
            return line.to_owned();
        }
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Raises RLIMIT_MEMLOCK to unlimited, as aya's own loaders do: kernels before 5.11 charge
/// BPF maps to it, and its default (64 KiB there) is too small for the agent's maps. Returns
/// why it could not, if it could not (no CAP_SYS_RESOURCE); newer kernels do not need it.
pub fn raise_memlock_limit() -> Result<(), std::io::Error> {
    // None: unlimited (RLIM_INFINITY).
    let unlimited = rustix::process::Rlimit {
        current: None,
        maximum: None,
    };
    Ok(rustix::process::setrlimit(
        rustix::process::Resource::Memlock,
        unlimited,
    )?)
}

/// Raises the soft RLIMIT_NOFILE to the hard one (as Go's runtime does for every program):
/// the agent keeps a descriptor per attachment it can, and the soft limit's usual 1,024 is
/// far below a host's cgroups. Returns the soft limit in force.
pub fn raise_descriptor_limit() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        ..limit
    };
    let current = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(_) => limit.current,
    };
    // None: unlimited, which Linux does not allow for descriptors; counted as nr_open's default.
    current.map_or(1 << 20, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

    use std::path::Path;

    use super::{ITERATOR, LOCK, READS, by_release, unsupported};
    use crate::policy::file;

    const POLICY: &str = "[default]\nmode = \"enforce\"\n\
        [[rule]]\nname = \"pool\"\nremote_port = 5432\nmode = \"cap\"\n\
        [[rule]]\nname = \"ssh\"\nlocal_port = 22\nmode = \"exempt\"\n\
        [[rule]]\nname = \"loose\"\nremote_port = 80\nlock = false\n";

    #[test]
    fn a_5_10_kernel_lacks_reads_the_lock_and_the_iterator_and_6_1_lacks_nothing() {
        let names = |release: &str| -> Vec<String> {
            by_release(release)
                .into_iter()
                .map(|missing| missing.feature)
                .collect()
        };
        assert_eq!(names("5.10.0-32-amd64"), [READS, LOCK, ITERATOR]);
        assert!(names("6.1.0-50-amd64").is_empty());
        assert!(names("6.18.2").is_empty());
    }

    #[test]
    fn each_rule_a_kernel_cannot_carry_out_is_named() {
        let policy = file::parse(Path::new("p.toml"), POLICY).unwrap();
        let sentences = unsupported(&policy, &by_release("5.10.0"));
        assert_eq!(sentences.len(), 1, "cap only, not the lock: {sentences:#?}");
        assert!(
            sentences[0].starts_with("rule \"pool\" (line 3) uses mode cap"),
            "{sentences:#?}"
        );
        assert!(unsupported(&policy, &by_release("6.1.0")).is_empty());
    }
}
