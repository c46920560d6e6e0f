//! Time as the agent reads it: wall-clock milliseconds for records, the monotonic clock the
//! kernel stamps events with, and the conversion between the two. Every stage uses these, so
//! they live below all of them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time, unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall-clock ms of a kernel timestamp (bpf_ktime_get_ns is CLOCK_MONOTONIC).
pub fn wall_ms_of(ts_ns: u64) -> u64 {
    let age_ms = monotonic_ns().saturating_sub(ts_ns) / 1_000_000;
    now_ms().saturating_sub(age_ms)
}
