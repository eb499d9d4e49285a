//! The ring buffer of ends (failures, and closes after a survived silence), read as it fills (its descriptor polls readable when the
//! kernel submits), into the shared telemetry.

use std::{
    io,
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use keepalive_common::ends::{End, EndEvent};
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use super::Ended;
use crate::status::Shared;

/// Reads ends until the task is dropped.
pub async fn follow(ring: RingBuf<MapData>, shared: Shared) {
    let hz = tokio::task::spawn_blocking(kernel_hz).await.unwrap_or(None);
    let Some(hz) = hz else {
        warn!(
            "cannot tell the kernel's tick rate (CONFIG_HZ); connection failures are counted, their idle times are not"
        );
        return;
    };
    debug!(hz, "following connection failures");
    // SAFETY: the ring buffer owns its map's descriptor, which stays open and the same for as
    // long as the AsyncFd owns the ring buffer.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(error) => {
            let error = io::Error::from(error);
            warn!(%error, "cannot poll the ring buffer of connection failures");
            return;
        }
    };
    loop {
        let Ok(mut ready) = ring.readable_mut().await else {
            return;
        };
        let mut ends = Vec::new();
        while let Some(item) = ready.get_inner_mut().next() {
            if let Some(ended) = parse(&item, hz) {
                ends.push(ended);
            }
        }
        ready.clear_ready();
        if let Ok(mut telemetry) = shared.lock() {
            for ended in &ends {
                telemetry.agent.failures.record(ended);
            }
        }
    }
}

/// One event, its silences in time (jiffies at `hz`; the failure's less the time spent
/// retransmitting).
fn parse(bytes: &[u8], hz: u64) -> Option<Ended> {
    if bytes.len() < size_of::<EndEvent>() {
        return None;
    }
    // SAFETY: at least size_of::<EndEvent>() bytes; EndEvent is plain data, read unaligned.
    let event: EndEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let end = *End::ALL.get(usize::try_from(event.end).ok()?)?;
    let silent_ms = u64::from(event.silent_jiffies) * 1000 / hz;
    let idle_ms = silent_ms.saturating_sub(u64::from(event.unanswered_ms));
    Some(Ended {
        slot: event.slot,
        end,
        remote: IpAddr::V6(Ipv6Addr::from(event.remote)),
        remote_port: event.remote_port,
        local_port: event.local_port,
        inbound: event.direction == keepalive_common::INBOUND,
        idle: Duration::from_millis(idle_ms),
        survived: Duration::from_millis(u64::from(event.survived_jiffies) * 1000 / hz),
    })
}

/// The kernel's tick rate: CONFIG_HZ from its configuration in /boot where it is there, else
/// from the jiffies count since boot (/proc/timer_list, read once), else measured (jiffies
/// over 200 ms), rounded to the rates Linux offers. Found once: the loader needs it at
/// start-up (for the silence the program tracks), where a 200 ms wait would add to every start
/// on hosts without /boot (containers).
pub fn kernel_hz() -> Option<u64> {
    static HZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        configured_hz()
            .or_else(|| {
                let text = std::fs::read_to_string("/proc/timer_list").ok()?;
                hz_since_boot(&text)
            })
            .or_else(|| measured_hz().ok().flatten())
    })
}

const RATES: [u64; 4] = [100, 250, 300, 1000];

fn configured_hz() -> Option<u64> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let text = std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("CONFIG_HZ="))
        .and_then(|hz| hz.trim().parse().ok())
        .filter(|hz| RATES.contains(hz))
}

/// CONFIG_HZ from one reading of /proc/timer_list (`now at N nsecs`, `jiffies: J`): a 64-bit
/// kernel starts jiffies at INITIAL_JIFFIES, 2^32 - 300 HZ (so that the 32-bit count wraps five
/// minutes after boot), then counts HZ per second of the monotonic clock `now` reads. So
/// J - 2^32 = HZ (now - 300 s). Within a minute of that five-minute mark the rates are too
/// close to tell apart (None).
fn hz_since_boot(timer_list: &str) -> Option<u64> {
    let field = |prefix: &str| {
        timer_list.lines().find_map(|line| {
            let value = line.trim().strip_prefix(prefix)?;
            value.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let (now_ns, jiffies) = (field("now at ")?, field("jiffies:")?);
    let seconds = now_ns as f64 / 1e9 - 300.0;
    if seconds.abs() < 60.0 {
        return None;
    }
    let rate = (jiffies as f64 - 4_294_967_296.0) / seconds;
    RATES
        .into_iter()
        .find(|hz| (rate - *hz as f64).abs() < *hz as f64 * 0.05)
}

fn measured_hz() -> io::Result<Option<u64>> {
    Ok(measured_rate()?.map(nearest_rate))
}

fn nearest_rate(per_second: f64) -> u64 {
    RATES
        .into_iter()
        .min_by(|a, b| {
            (*a as f64 - per_second)
                .abs()
                .total_cmp(&(*b as f64 - per_second).abs())
        })
        .unwrap_or(RATES[0])
}

/// Jiffies per second over 200 ms. Each reading of /proc/timer_list is stamped with the middle
/// of the read: generating the file takes milliseconds, more on a loaded machine, which would
/// otherwise move the measurement by as much as the rates 250 and 300 differ.
fn measured_rate() -> io::Result<Option<f64>> {
    let jiffies = || -> io::Result<Option<(u64, Instant)>> {
        let before = Instant::now();
        let text = std::fs::read_to_string("/proc/timer_list")?;
        let after = Instant::now();
        let stamp = before + (after - before) / 2;
        Ok(text
            .lines()
            .find_map(|line| line.trim().strip_prefix("jiffies:"))
            .and_then(|value| value.trim().parse().ok())
            .map(|jiffies| (jiffies, stamp)))
    };
    let Some((before, start)) = jiffies()? else {
        return Ok(None);
    };
    std::thread::sleep(Duration::from_millis(200));
    let Some((after, end)) = jiffies()? else {
        return Ok(None);
    };
    let seconds = (end - start).as_secs_f64();
    Ok((seconds > 0.0).then(|| after.saturating_sub(before) as f64 / seconds))
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests panic with the reason")]

    use super::*;

    #[test]
    fn an_event_gives_the_silence_before_the_first_unanswered_segment() {
        let event = EndEvent {
            slot: 3,
            end: End::Timeout as u32,
            remote: Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0xc612, 0x0207]).octets(),
            remote_port: 6379,
            local_port: 41_000,
            silent_jiffies: 2_250,
            unanswered_ms: 3_000,
            direction: keepalive_common::OUTBOUND,
            survived_jiffies: 500,
            _pad: 0,
        };
        // SAFETY: plain data viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<EndEvent>())
        };
        let failure = parse(bytes, 250).unwrap();
        assert_eq!(failure.idle, Duration::from_secs(6));
        assert_eq!(failure.survived, Duration::from_secs(2));
        assert_eq!(failure.end, End::Timeout);
        assert_eq!(
            failure.remote,
            "::ffff:198.18.2.7".parse::<IpAddr>().unwrap()
        );
        assert!(parse(&bytes[..10], 250).is_none());
    }

    #[test]
    fn the_running_kernels_tick_rate_is_one_linux_offers() {
        assert!(RATES.contains(&kernel_hz().unwrap()));
    }

    #[test]
    fn the_tick_rate_follows_from_the_jiffies_since_boot_and_agrees_with_a_measurement() {
        let text = |now_s: u64, hz: u64| {
            let jiffies = (1u64 << 32) - 300 * hz + now_s * hz + 40;
            format!(
                "now at {} nsecs\n\ncpu: 0\n  jiffies: {jiffies}\n",
                now_s * 1_000_000_000
            )
        };
        for hz in RATES {
            assert_eq!(hz_since_boot(&text(25_000, hz)), Some(hz), "{hz} Hz");
            assert_eq!(hz_since_boot(&text(100, hz)), Some(hz), "{hz} Hz, early");
        }
        // Near the wrap of the 32-bit count every rate reads alike.
        assert_eq!(hz_since_boot(&text(330, 250)), None);
        assert_eq!(hz_since_boot("now at 1 nsecs\n"), None);
        // On the running kernel, against a measurement; the test threads run beside it, so a
        // measurement may be stretched: one of three within 10% (250 and 300 Hz differ by 20%).
        let running = std::fs::read_to_string("/proc/timer_list").unwrap();
        if let Some(hz) = hz_since_boot(&running) {
            let rates: Vec<f64> = (0..3).map(|_| measured_rate().unwrap().unwrap()).collect();
            assert!(
                rates
                    .iter()
                    .any(|rate| (rate - hz as f64).abs() < hz as f64 * 0.1),
                "{hz} Hz from the jiffies since boot, measured {rates:?} per second"
            );
        }
    }
}
