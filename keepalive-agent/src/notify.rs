//! The service manager's notification protocol (sd_notify): readiness, reloads
//! (`Type=notify-reload`), the watchdog and stopping. Every call is a no-op outside systemd
//! (no `$NOTIFY_SOCKET`), and a failure to notify is logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;

/// `READY=1` with a status line: start-up, or a reload, is complete.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC`: a reload has begun; [`ready`] ends it, whatever its
/// outcome.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(error) => tracing::warn!(%error, "cannot read CLOCK_MONOTONIC for the reload message"),
    }
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

/// The watchdog (`WatchdogSec=`): pinged at half its period from the agent's main loop, so a
/// loop that stops turning gets the service restarted.
#[derive(Debug)]
pub struct Watchdog {
    interval: Option<tokio::time::Interval>,
}

impl Watchdog {
    /// The watchdog systemd asked this process for, if any (`$WATCHDOG_USEC`, `$WATCHDOG_PID`).
    pub fn from_env() -> Self {
        let interval = sd_notify::watchdog_enabled()
            .filter(|period| !period.is_zero())
            .map(|period| {
                let mut interval =
                    tokio::time::interval((period / 2).max(Duration::from_millis(1)));
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                interval
            });
        Self { interval }
    }

    /// Waits for the next ping and sends it (`WATCHDOG=1`); never completes without a
    /// watchdog.
    pub async fn ping(&mut self) {
        match &mut self.interval {
            Some(interval) => {
                interval.tick().await;
                send(&[NotifyState::Watchdog]);
            }
            None => std::future::pending().await,
        }
    }
}
