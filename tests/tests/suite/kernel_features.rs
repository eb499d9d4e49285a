//! What the running kernel lets the agent load, against what each kernel of the matrix is
//! known to offer. The agent decides by loading (the verifier's answer); this test holds that
//! answer to the kernel's release, so a program that stops loading on a kernel that should
//! take it fails here instead of quietly running without the lock.

use keepalive_common::{Stage, host::parse_kernel_version};
use keepalive_tests::{load_enforcer, require_host};

/// From this release, cgroup/setsockopt programs may ask for the calling process and its
/// cgroup ancestors (commit bed89185af0d), which the lock needs.
const LOCK_FROM: (u32, u32) = (6, 1);

#[test]
fn the_lock_loads_exactly_where_the_kernel_offers_it() {
    let host = require_host();
    let version = parse_kernel_version(&host.kernel_release).unwrap();
    let enforcer = load_enforcer(Stage::Full);
    let missing = enforcer.missing_features();
    assert_eq!(
        enforcer.has_lock(),
        version >= LOCK_FROM,
        "kernel {}: missing {missing:?}",
        host.kernel_release
    );
    for feature in missing {
        let sentence = feature.to_string();
        assert!(!sentence.contains('\n'), "one sentence: {sentence}");
        assert!(
            sentence.contains(&format!("Linux {}", feature.since)),
            "names the kernel it needs: {sentence}"
        );
    }
    // The kernel matrix (`cargo xtask test --kernel`) shows this in its summary.
    if let Some(dir) = std::env::var_os("KA_VM_OUT") {
        let text = if missing.is_empty() {
            "all".to_owned()
        } else {
            missing
                .iter()
                .map(|missing| format!("no {} (needs {})", missing.feature, missing.since))
                .collect::<Vec<_>>()
                .join(", ")
        };
        std::fs::write(std::path::Path::new(&dir).join("features"), text).unwrap();
    }
}

/// The health check learns of detached and updated links from fentry programs or a kprobe,
/// else from the link iterator (5.19); every kernel of the matrix has kprobes (Debian builds
/// them in), and this project's development VMs (no CONFIG_KPROBES, fentry refused) have the
/// iterator, so it must load on both. Only a kernel without any of them says it lacks it.
#[test]
fn the_link_watch_loads_wherever_the_kernel_has_kprobes_or_the_link_iterator() {
    let host = require_host();
    let version = parse_kernel_version(&host.kernel_release).unwrap();
    let enforcer = load_enforcer(Stage::Full);
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    let lacks = enforcer.lacks(keepalive_agent::enforcer::features::LINK_WATCH);
    assert_eq!(lacks, !enforcer.watches_links());
    if kprobes || version >= (5, 19) {
        assert!(
            enforcer.watches_links(),
            "kernel {} has kprobes or the link iterator: {:?}",
            host.kernel_release,
            enforcer.missing_features()
        );
    }
}

#[test]
fn keepalive_reads_are_expected_exactly_from_6_1() {
    let host = require_host();
    let version = parse_kernel_version(&host.kernel_release).unwrap();
    let enforcer = load_enforcer(Stage::Full);
    let reads_missing = enforcer.lacks(keepalive_agent::enforcer::features::READS);
    assert_eq!(
        reads_missing,
        version < (6, 1),
        "kernel {}",
        host.kernel_release
    );
    let policy = keepalive_agent::policy::file::parse(
        std::path::Path::new("reads.toml"),
        "[default]\nmode = \"fill\"\n[[rule]]\nname = \"a\"\nremote_port = 1\nmode = \"exempt\"\n",
    )
    .unwrap();
    let unsupported = enforcer.unsupported(&policy);
    if reads_missing {
        assert_eq!(
            unsupported.len(),
            1,
            "the default's fill only: {unsupported:?}"
        );
        assert!(
            unsupported[0].contains("default uses mode fill"),
            "{unsupported:?}"
        );
    } else {
        assert!(unsupported.is_empty(), "{unsupported:?}");
    }
}

#[test]
fn the_memlock_limit_does_not_stop_the_load() {
    // Kernels before 5.11 charge maps to RLIMIT_MEMLOCK (the guests start at 64 KiB): loading
    // raises it, which needs CAP_SYS_RESOURCE. Where that is refused (our CI hosts), only a
    // kernel that no longer charges maps may load. The loaded programs prove the maps exist.
    let host = require_host();
    let enforcer = load_enforcer(Stage::Full);
    assert!(!enforcer.program_ids().is_empty());
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit struct to write into.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) };
    assert_eq!(read, 0);
    let version = parse_kernel_version(&host.kernel_release).unwrap();
    assert!(
        limit.rlim_cur == libc::RLIM_INFINITY || version >= (5, 11),
        "kernel {} charges maps to RLIMIT_MEMLOCK, and the load did not raise it ({})",
        host.kernel_release,
        limit.rlim_cur
    );
}
