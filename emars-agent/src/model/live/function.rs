//! One function's aggregates: its live instances, its retained ended ones in 32 bytes each
//! (with where the store keeps each, which this module carries without reading), their
//! summed counts, its hours, and the summary, its JSON and its peak histogram, cached until
//! the function changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::model::{
    FunctionConfig, FunctionSummary, HourBucket, InstanceRecord, PeakPercentiles, RequestSource,
    Sample, SizedSample,
};

use super::hours::HourSeries;
use super::{idle_gaps, EndedRecord, InstanceKey, NativePeaks, PeakHistogram};

/// What the model keeps of a live instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Live {
    pub(super) execs: u64,
    pub(super) oom_kills: u64,
    pub(super) connections: u64,
    pub(super) requests: u64,
    pub(super) peak_bytes: u64,
    pub(super) limit_bytes: Option<u64>,
}

/// What the model keeps of an ended, retained instance: 32 bytes, so that a history of
/// millions of instances fits in a few tens of MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Ended<P> {
    pub(super) started_at_ms: u64,
    pub(super) cgroup_id: u64,
    pub(super) peak_bytes: u64,
    /// Run time; `u32::MAX` (49.7 days or more): the end is in `long_runs`.
    pub(super) ran_ms: u32,
    /// Where the store keeps the record: the store's to say, never read here.
    pub(super) place: P,
}

/// One function's aggregates (serialised into the store's checkpoint, caches left out).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct FunctionState<P> {
    pub(super) first_seen_ms: u64,
    pub(super) last_seen_ms: u64,
    pub(super) live: HashMap<InstanceKey, Live>,
    /// Ended, retained instances, ordered by (started_at_ms, cgroup_id).
    pub(super) ended: Vec<Ended<P>>,
    /// End times of the ended instances that ran for 49.7 days or more.
    pub(super) long_runs: HashMap<InstanceKey, u64>,
    /// Their execs, OOM kills, kernel-counted connections and requests summed.
    pub(super) ended_execs: u64,
    pub(super) ended_oom_kills: u64,
    pub(super) ended_connections: u64,
    pub(super) ended_requests: u64,
    /// Ended instances with OOM kills: the memory.max they had (the recommender bumps it).
    pub(super) ended_oom: BTreeMap<InstanceKey, Option<u64>>,
    /// Instances bound with a size hint (`input_bytes`), live and ended: the hint.
    pub(super) inputs: BTreeMap<InstanceKey, u64>,
    pub(super) hours: HourSeries,
    pub(super) invocations: u64,
    /// The summary as last computed, and its JSON; None after any change.
    #[serde(skip)]
    pub(super) summary: Option<FunctionSummary>,
    #[serde(skip)]
    pub(super) summary_json: Option<Box<RawValue>>,
    /// Its peaks counted into the metrics' buckets, as last counted (see
    /// [`LiveModel::peak_histograms`]); None after any change.
    #[serde(skip)]
    pub(super) histogram: Option<Arc<PeakHistogram>>,
    /// Its peaks in native-histogram buckets, as last counted; None after any change.
    #[serde(skip)]
    pub(super) native: Option<Arc<NativePeaks>>,
}

impl<P: Copy + Default> FunctionState<P> {
    pub(super) fn changed(&mut self) {
        self.summary = None;
        self.summary_json = None;
        self.histogram = None;
        self.native = None;
    }

    /// Its recommender samples (live and ended instances with a peak or an OOM kill), each at
    /// `value` (the policy's: an OOM-killed one at its bump), in native-histogram buckets,
    /// counted again only after a change.
    pub(super) fn native_peaks(&mut self, value: fn(&Sample) -> u64) -> Arc<NativePeaks> {
        if let Some(n) = &self.native {
            return n.clone();
        }
        // The values do not depend on the samples' times.
        let n = Arc::new(NativePeaks::of(self.samples(0).iter().map(value)));
        self.native = Some(n.clone());
        n
    }

    /// Its instance peaks (live and ended, above 0) counted into `bounds`, counted again only
    /// after a change.
    pub(super) fn histogram(&mut self, bounds: &[u64]) -> Arc<PeakHistogram> {
        if let Some(h) = &self.histogram {
            if h.buckets.len() == bounds.len() {
                return h.clone();
            }
        }
        let mut h = PeakHistogram {
            buckets: vec![0; bounds.len()],
            count: 0,
            sum: 0,
        };
        let peaks = self.live.values().map(|v| v.peak_bytes);
        for p in peaks.chain(self.ended.iter().map(|e| e.peak_bytes)) {
            if p == 0 {
                continue;
            }
            h.count += 1;
            h.sum = h.sum.saturating_add(p);
            if let Some(c) = h.buckets.get_mut(bounds.partition_point(|b| *b < p)) {
                *c += 1;
            }
        }
        let h = Arc::new(h);
        self.histogram = Some(h.clone());
        h
    }

    /// Makes the summary's JSON ready, kept until the next change: the list of every function
    /// then copies it, instead of serialising thousands of summaries.
    pub(super) fn cache_summary_json(&mut self, name: &str) {
        if self.summary_json.is_none() {
            let s = self.summary(name);
            // A summary of plain numbers and a string always serialises.
            self.summary_json = serde_json::value::to_raw_value(&s).ok();
        }
    }

    pub(super) fn add(&mut self, rec: &InstanceRecord, sign: i8) {
        self.changed();
        let key = (rec.started_at_ms, rec.cgroup_id);
        // The input fit needs this use's own peak: a pooled cgroup's lifetime watermark (v2
        // before 6.12) may be an earlier use's.
        let exact = rec.peak_source != crate::model::PeakSource::LifetimeWatermark;
        match (sign > 0, rec.input_bytes.filter(|_| exact)) {
            (true, Some(input)) => {
                self.inputs.insert(key, input);
            }
            (true, None) => {}
            (false, _) => {
                self.inputs.remove(&key);
            }
        }
        let Some(ended_at_ms) = rec.ended_at_ms else {
            if sign > 0 {
                let live = Live {
                    execs: rec.execs,
                    oom_kills: rec.oom_kills,
                    connections: rec.connections,
                    requests: rec.requests,
                    peak_bytes: rec.peak_bytes,
                    limit_bytes: rec.limits.max_bytes,
                };
                self.live.insert(key, live);
            } else {
                self.live.remove(&key);
            }
            return;
        };
        if sign > 0 {
            self.insert_ended(
                &EndedRecord {
                    key,
                    ended_at_ms,
                    peak_bytes: rec.peak_bytes,
                    execs: rec.execs,
                    oom_kills: rec.oom_kills,
                    connections: rec.connections,
                    requests: rec.requests,
                    limit_bytes: rec.limits.max_bytes,
                    input_bytes: rec.input_bytes.filter(|_| exact),
                },
                P::default(),
            );
        } else {
            if let Some(i) = self.find(key) {
                self.ended.remove(i);
            }
            self.sub_counts(rec);
        }
    }

    /// Adds an ended record (or replaces the entry of the same key) and its counts.
    pub(super) fn insert_ended(&mut self, r: &EndedRecord, place: P) {
        let (started_at_ms, cgroup_id) = r.key;
        let ran_ms = u32::try_from(r.ended_at_ms.saturating_sub(started_at_ms)).unwrap_or(u32::MAX);
        if ran_ms == u32::MAX {
            self.long_runs.insert(r.key, r.ended_at_ms);
        }
        let e = Ended {
            started_at_ms,
            cgroup_id,
            peak_bytes: r.peak_bytes,
            ran_ms,
            place,
        };
        // Mostly at the end: instances end roughly in the order they started.
        let pos = match self.ended.last() {
            Some(l) if (l.started_at_ms, l.cgroup_id) < r.key => Err(self.ended.len()),
            None => Err(0),
            _ => self
                .ended
                .binary_search_by_key(&r.key, |e| (e.started_at_ms, e.cgroup_id)),
        };
        match pos {
            Ok(i) => self.ended[i] = e,
            Err(i) => self.ended.insert(i, e),
        }
        self.ended_execs = self.ended_execs.saturating_add(r.execs);
        self.ended_oom_kills = self.ended_oom_kills.saturating_add(r.oom_kills);
        self.ended_connections = self.ended_connections.saturating_add(r.connections);
        self.ended_requests = self.ended_requests.saturating_add(r.requests);
        if r.oom_kills > 0 {
            self.ended_oom.insert(r.key, r.limit_bytes);
        }
        if let Some(input) = r.input_bytes {
            self.inputs.insert(r.key, input);
        }
    }

    /// Widens the first/last-seen range; true when the function is new or its first-seen
    /// time moved.
    pub(super) fn widen_seen(&mut self, first_ms: u64, last_ms: u64) -> bool {
        self.changed();
        let new = self.first_seen_ms == 0 && self.last_seen_ms == 0;
        let first = if new {
            first_ms
        } else {
            self.first_seen_ms.min(first_ms)
        };
        let moved = new || first != self.first_seen_ms;
        self.first_seen_ms = first;
        self.last_seen_ms = self.last_seen_ms.max(last_ms);
        moved
    }

    /// Inserts or replaces the bucket of its hour, keeping the invocation sum.
    pub(super) fn put_hour(&mut self, bucket: HourBucket) {
        self.changed();
        let old = self.hours.insert(bucket);
        self.invocations = self
            .invocations
            .saturating_sub(old.map_or(0, |b| b.invocations))
            .saturating_add(bucket.invocations);
    }

    pub(super) fn sub_counts(&mut self, rec: &InstanceRecord) {
        self.ended_execs = self.ended_execs.saturating_sub(rec.execs);
        self.ended_oom_kills = self.ended_oom_kills.saturating_sub(rec.oom_kills);
        self.ended_connections = self.ended_connections.saturating_sub(rec.connections);
        self.ended_requests = self.ended_requests.saturating_sub(rec.requests);
        let key = (rec.started_at_ms, rec.cgroup_id);
        self.ended_oom.remove(&key);
        self.inputs.remove(&key);
        self.long_runs.remove(&key);
    }

    /// Idle times between uses: the gaps in which none of the function's retained instances
    /// ran, oldest first (concurrent uses leave no gap; a live one has no end yet).
    pub(super) fn idle_times(&self) -> Vec<u64> {
        let mut uses: Vec<(u64, u64)> = self
            .ended
            .iter()
            .map(|e| (e.started_at_ms, self.ended_at(e)))
            .chain(self.live.keys().map(|k| (k.0, u64::MAX)))
            .collect();
        uses.sort_unstable();
        idle_gaps(uses)
    }

    pub(super) fn ended_at(&self, e: &Ended<P>) -> u64 {
        if e.ran_ms == u32::MAX {
            if let Some(end) = self.long_runs.get(&(e.started_at_ms, e.cgroup_id)) {
                return *end;
            }
        }
        e.started_at_ms.saturating_add(u64::from(e.ran_ms))
    }

    pub(super) fn find(&self, key: InstanceKey) -> Option<usize> {
        self.ended
            .binary_search_by_key(&key, |e| (e.started_at_ms, e.cgroup_id))
            .ok()
    }

    pub(super) fn summary(&mut self, name: &str) -> FunctionSummary {
        if let Some(s) = &self.summary {
            return s.clone();
        }
        let live_peaks = self.live.values().map(|v| v.peak_bytes);
        let ended_peaks = self.ended.iter().map(|e| e.peak_bytes);
        let mut peaks: Vec<u64> = live_peaks.chain(ended_peaks).filter(|p| *p > 0).collect();
        peaks.sort_unstable();
        let live_sum = |f: fn(&Live) -> u64| self.live.values().map(f).fold(0, u64::saturating_add);
        let source = self.requests_source();
        let s = FunctionSummary {
            name: name.to_owned(),
            instances: self.ended.len() as u64 + self.live.len() as u64,
            live_instances: self.live.len() as u64,
            execs: self.ended_execs.saturating_add(live_sum(|v| v.execs)),
            invocations: self.invocations,
            connections: self
                .ended_connections
                .saturating_add(live_sum(|v| v.connections)),
            requests: self.ended_requests.saturating_add(live_sum(|v| v.requests)),
            requests_source: source,
            requests_per_hour: self.busiest_hour(source),
            oom_kills: self
                .ended_oom_kills
                .saturating_add(live_sum(|v| v.oom_kills)),
            peak_bytes: peaks.last().copied().unwrap_or(0),
            peak_percentiles: PeakPercentiles::from_sorted(&peaks),
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
        };
        self.summary = Some(s.clone());
        s
    }

    /// The recommender's samples: every retained instance with a peak or an OOM kill, ended
    /// ones at their end, live ones at `now_ms`.
    pub(super) fn samples(&self, now_ms: u64) -> Vec<Sample> {
        let ended = self.ended.iter().filter_map(|e| {
            let oom = self.ended_oom.get(&(e.started_at_ms, e.cgroup_id));
            (e.peak_bytes > 0 || oom.is_some()).then(|| Sample {
                at_ms: self.ended_at(e),
                peak_bytes: e.peak_bytes,
                oom_killed: oom.is_some(),
                limit_bytes: oom.copied().flatten(),
            })
        });
        let live = self
            .live
            .iter()
            .filter(|(_, l)| l.peak_bytes > 0 || l.oom_kills > 0)
            .map(|(k, l)| Sample {
                at_ms: now_ms.max(k.0),
                peak_bytes: l.peak_bytes,
                oom_killed: l.oom_kills > 0,
                limit_bytes: l.limit_bytes,
            });
        ended.chain(live).collect()
    }

    /// The input-aware fit's samples: the `limit` most recently started ended instances bound
    /// with a size hint that have a peak or an OOM kill, at their end. Live ones are left out:
    /// their peak is not final.
    pub(super) fn sized_samples(&self, limit: usize) -> Vec<SizedSample> {
        self.inputs
            .iter()
            .rev()
            .filter_map(|(key, input)| {
                let e = &self.ended[self.find(*key)?];
                let oom = self.ended_oom.get(key);
                (e.peak_bytes > 0 || oom.is_some()).then(|| SizedSample {
                    at_ms: self.ended_at(e),
                    input_bytes: *input,
                    peak_bytes: e.peak_bytes,
                    oom_killed: oom.is_some(),
                    limit_bytes: oom.copied().flatten(),
                })
            })
            .take(limit)
            .collect()
    }

    /// Where its requests are counted from, over its retained hours.
    pub(super) fn requests_source(&self) -> RequestSource {
        RequestSource::of_hours(self.hours.values())
    }

    /// Its busiest retained hour's requests as `source` counts them.
    fn busiest_hour(&self, source: RequestSource) -> u64 {
        let requests = self.hours.values().map(|b| b.requests_by(source));
        requests.max().unwrap_or(0)
    }

    pub(super) fn export(&self, name: &str) -> FunctionConfig {
        let source = self.requests_source();
        let live_peak = self.live.values().map(|v| v.peak_bytes).max();
        let ended_peak = self.ended.iter().map(|e| e.peak_bytes).max();
        FunctionConfig {
            function: name.to_owned(),
            requests_per_hour: self.busiest_hour(source),
            requests_source: source,
            max_memory_bytes: live_peak.max(ended_peak).unwrap_or(0),
        }
    }
}
