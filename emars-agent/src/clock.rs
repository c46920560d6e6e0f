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

/// Wall-clock ms of a kernel timestamp (bpf_ktime_get_ns is CLOCK_MONOTONIC). The clocks'
/// offset is taken in nanoseconds and the sum cut to milliseconds once: two agents converting
/// the same event agree (its instance's key, when an agent killed before its flush left it to
/// the next one to apply again), where two separate cuts can differ by 1 ms.
pub fn wall_ms_of(ts_ns: u64) -> u64 {
    let wall_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let offset_ns = wall_ns.saturating_sub(u128::from(monotonic_ns()));
    u64::try_from((offset_ns + u128::from(ts_ns)) / 1_000_000).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same kernel timestamps, converted a few milliseconds apart (as a killed agent and
    /// the next one do), give the same milliseconds: at most a rare one lies within the
    /// clocks' reading jitter of a millisecond's edge.
    #[test]
    fn a_timestamp_converts_the_same_later() {
        let base = monotonic_ns();
        let stamps: Vec<u64> = (0..1000u64).map(|i| base - i * 1_234_567).collect();
        let first: Vec<u64> = stamps.iter().map(|t| wall_ms_of(*t)).collect();
        std::thread::sleep(std::time::Duration::from_millis(7));
        let differ = stamps
            .iter()
            .zip(&first)
            .filter(|(t, w)| wall_ms_of(**t) != **w)
            .count();
        assert!(differ <= 10, "{differ} of 1000 converted otherwise");
        // And the conversion is the wall clock's: now is now.
        let now = wall_ms_of(monotonic_ns());
        assert!(now.abs_diff(now_ms()) <= 1, "{now} vs {}", now_ms());
    }
}
