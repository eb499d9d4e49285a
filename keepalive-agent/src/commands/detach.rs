//! `keepalive-agent detach`: removes everything an agent pinned; its links detach.
//!
//! A running agent would put back what is removed under it, so it is stopped first (SIGTERM:
//! it detaches everything as it stops); what it leaves (it ran with --persist) is removed
//! after.

use std::fmt::Write as _;

use crate::{
    bpffs::PinDir,
    cli::DetachArgs,
    instance::{HAND_OVER_TIMEOUT, InstanceLock, holder},
    status::State,
};

pub fn detach(args: &DetachArgs) -> anyhow::Result<String> {
    let pins = PinDir::at(&args.places.bpffs);
    let mut out = String::new();
    if !pins.root.exists() {
        State::remove(&args.places.state_dir);
        return Ok(format!(
            "nothing to detach: no pins under {}\n",
            pins.root.display()
        ));
    }
    let _lock = match holder(&pins.root) {
        Some(pid) => {
            let _ = writeln!(
                out,
                "agent pid {pid} is running with these pins: stopping it (SIGTERM; it detaches \
                 as it stops), then removing what is left"
            );
            let (lock, _) = InstanceLock::replace(&pins.root, libc::SIGTERM, HAND_OVER_TIMEOUT)?;
            lock
        }
        None => None,
    };
    let links = pins.pinned_links().len();
    let removed = pins.remove()?;
    State::remove(&args.places.state_dir);
    let _ = writeln!(
        out,
        "detached {links} link(s); removed {} pin(s) under {}",
        removed.len(),
        pins.root.display()
    );
    Ok(out)
}
