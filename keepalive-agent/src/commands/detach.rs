//! `keepalive-agent detach`: removes everything an agent pinned; its links detach.

use std::fmt::Write as _;

use crate::{bpffs::PinDir, cli::DetachArgs, state::State};

pub fn detach(args: &DetachArgs) -> anyhow::Result<String> {
    let pins = PinDir::at(&args.places.bpffs);
    let state = State::read(&args.places.state_dir);
    if !pins.root.exists() {
        State::remove(&args.places.state_dir);
        return Ok(format!(
            "nothing to detach: no pins under {}\n",
            pins.root.display()
        ));
    }
    let links = pins.pinned_links().len();
    let removed = pins.remove()?;
    State::remove(&args.places.state_dir);
    let mut out = format!(
        "detached {links} link(s); removed {} pin(s) under {}\n",
        removed.len(),
        pins.root.display()
    );
    if let Some(state) = state.filter(|state| crate::state::alive(state.pid)) {
        let _ = writeln!(
            out,
            "note: agent process {} is still running with its programs loaded but attached nowhere; stop it",
            state.pid
        );
    }
    Ok(out)
}
