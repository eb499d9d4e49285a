//! Progress lines on stderr while the benchmark runs: which step, which round, time so far.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Progress {
    started: Instant,
}

impl Progress {
    pub(crate) fn start() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// `ka-bench [  12 s] what`.
    pub(crate) fn step(&self, what: &str) {
        #[expect(
            clippy::print_stderr,
            reason = "progress goes to stderr, the table to stdout"
        )]
        {
            eprintln!(
                "ka-bench [{:>5.0} s] {what}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// `ka-bench [  12 s] what: round i/n` (`round` counts from 0).
    pub(crate) fn round(&self, what: &str, round: usize, rounds: usize) {
        self.step(&format!("{what}: round {}/{rounds}", round + 1));
    }
}
