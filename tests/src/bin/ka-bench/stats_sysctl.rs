//! `kernel.bpf_stats_enabled`: left on, every program run of every variant pays for two clock
//! reads, which skews the connection rates. Off for the run (the ns figures use
//! BPF_ENABLE_STATS, scoped to their measurement), then restored.

#[derive(Debug)]
pub(crate) struct StatsSysctl {
    was_on: bool,
}

impl StatsSysctl {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    pub(crate) fn off() -> Self {
        let was_on = std::fs::read_to_string(Self::PATH).is_ok_and(|value| value.trim() == "1");
        if was_on {
            std::fs::write(Self::PATH, "0").expect("turn kernel.bpf_stats_enabled off");
        }
        Self { was_on }
    }

    pub(crate) fn note(&self) -> Option<&'static str> {
        self.was_on.then_some(
            "kernel.bpf_stats_enabled was 1: set to 0 for the run and restored afterwards.",
        )
    }
}

impl Drop for StatsSysctl {
    fn drop(&mut self) {
        if self.was_on {
            let _ignored = std::fs::write(Self::PATH, "1");
        }
    }
}
