//! What the kernel says is attached to a cgroup, read with `bpftool -j link show` (bpf_link
//! attachments, which is how the agent attaches). `bpftool cgroup show` is not used: the
//! bpftool of Debian 12 fails it on 5.10 kernels.

use std::process::Command;

use keepalive_agent::enforcer::features;

use crate::TestCgroup;

/// The bpf_links attached to `cgroup`: (link id, attach type).
pub fn kernel_links(cgroup: &TestCgroup) -> Vec<(u64, String)> {
    // bpftool lists the link ids, then opens each: a link detached in between (another test's
    // agent exiting) fails the whole command. That race is short; a few tries get past it.
    let show = || {
        Command::new("bpftool")
            .args(["-j", "link", "show"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run bpftool (Debian package bpftool): {e}"))
    };
    let out = (1..5)
        .map(|_| show())
        .find(|out| out.status.success())
        .unwrap_or_else(show);
    assert!(
        out.status.success(),
        "bpftool -j link show: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("bpftool -j link show prints JSON");
    links
        .as_array()
        .expect("bpftool -j link show prints a list")
        .iter()
        .filter(|link| link["cgroup_id"].as_u64() == Some(cgroup.cgroup().id))
        .map(|link| {
            (
                link["id"].as_u64().unwrap_or_default(),
                link["attach_type"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The links the agent makes per enforced cgroup on this kernel: sock_ops, and the lock
/// (cgroup/setsockopt) from Linux 6.1, where the kernel lets it load.
pub fn links_per_cgroup() -> usize {
    let host = crate::require_host();
    let missing = features::by_release(&host.kernel_release);
    let lock = !features::lacks(&missing, features::LOCK);
    1 + usize::from(lock)
}
