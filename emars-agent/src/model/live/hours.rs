//! A function's hour buckets, compact and ordered by hour.

use serde::{Deserialize, Serialize};

use crate::model::{HourBucket, HOUR_MS};

/// A function's hour buckets in 40 bytes each (a `BTreeMap<u64, HourBucket>` takes more than
/// twice that), ordered by hour: with many functions and a month of history they are most of
/// the model. Counters saturate at 4 billion per hour.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct HourSeries(pub(super) Vec<CompactHour>);

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct CompactHour {
    /// Hours since the epoch.
    hour: u32,
    instances_started: u32,
    execs: u32,
    invocations: u32,
    oom_kills: u32,
    connections: u32,
    requests: u32,
    peak_bytes: u64,
}

impl CompactHour {
    pub(super) fn of(b: &HourBucket) -> Self {
        let c = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        CompactHour {
            hour: c(b.hour_start_ms / HOUR_MS),
            instances_started: c(b.instances_started),
            execs: c(b.execs),
            invocations: c(b.invocations),
            oom_kills: c(b.oom_kills),
            connections: c(b.connections),
            requests: c(b.requests),
            peak_bytes: b.peak_bytes,
        }
    }

    pub(super) fn bucket(&self) -> HourBucket {
        HourBucket {
            hour_start_ms: u64::from(self.hour) * HOUR_MS,
            instances_started: u64::from(self.instances_started),
            execs: u64::from(self.execs),
            invocations: u64::from(self.invocations),
            oom_kills: u64::from(self.oom_kills),
            peak_bytes: self.peak_bytes,
            connections: u64::from(self.connections),
            requests: u64::from(self.requests),
        }
    }
}

impl HourSeries {
    pub(super) fn find(&self, hour_start_ms: u64) -> Result<usize, usize> {
        let hour = u32::try_from(hour_start_ms / HOUR_MS).unwrap_or(u32::MAX);
        // Mostly the newest hour: look there first.
        match self.0.last() {
            Some(last) if last.hour == hour => Ok(self.0.len() - 1),
            Some(last) if last.hour < hour => Err(self.0.len()),
            _ => self.0.binary_search_by_key(&hour, |h| h.hour),
        }
    }

    pub(super) fn get(&self, hour_start_ms: u64) -> Option<HourBucket> {
        self.find(hour_start_ms).ok().map(|i| self.0[i].bucket())
    }

    /// Inserts or replaces the bucket of its hour; returns the one replaced.
    pub(super) fn insert(&mut self, b: HourBucket) -> Option<HourBucket> {
        let c = CompactHour::of(&b);
        match self.find(b.hour_start_ms) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i], c).bucket()),
            Err(i) => {
                self.0.insert(i, c);
                None
            }
        }
    }

    pub(super) fn remove(&mut self, hour_start_ms: u64) -> Option<HourBucket> {
        let i = self.find(hour_start_ms).ok()?;
        Some(self.0.remove(i).bucket())
    }

    pub(super) fn values(&self) -> impl Iterator<Item = HourBucket> + '_ {
        self.0.iter().map(CompactHour::bucket)
    }

    pub(super) fn starts_before(&self, cutoff_ms: u64) -> impl Iterator<Item = u64> + '_ {
        self.0
            .iter()
            .map(|h| u64::from(h.hour) * HOUR_MS)
            .take_while(move |h| *h < cutoff_ms)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn shrink(&mut self) {
        self.0.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_hour_keeps_every_counter_and_saturates() {
        let b = HourBucket {
            hour_start_ms: 7 * HOUR_MS,
            instances_started: 1,
            execs: 2,
            invocations: 3,
            oom_kills: 4,
            peak_bytes: 5 << 40,
            connections: 6,
            requests: 7,
        };
        assert_eq!(CompactHour::of(&b).bucket(), b);
        let big = HourBucket {
            requests: u64::MAX,
            connections: u64::from(u32::MAX) + 1,
            ..b
        };
        let back = CompactHour::of(&big).bucket();
        assert_eq!(
            (back.requests, back.connections),
            (u64::from(u32::MAX), u64::from(u32::MAX))
        );
        assert_eq!(std::mem::size_of::<CompactHour>(), 40);
    }
}
