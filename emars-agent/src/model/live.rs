//! The live per-function model: what the store holds, aggregated in memory, so that function
//! summaries, hour buckets, recommendations' samples and the exported config are answered
//! without reading the history.
//!
//! The store keeps it in step with every write (instance records, hour buckets, pruning) and
//! builds it once when it opens. An instance record counts by its latest version: the store
//! hands over the version it replaced, whose contribution is taken back first, so writing the
//! same record twice never counts it twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::ModelFootprint as Footprint;
use crate::model::Sample;
use crate::model::HOUR_MS;
use crate::model::{
    FunctionConfig, FunctionSummary, HourBucket, HourDelta, InstanceRecord, PeakPercentiles,
};

/// A function's instance peaks in buckets ([`LiveModel::peak_histograms`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeakHistogram {
    /// Peaks above the bound before (0 for the first) and at or below each bound; those above
    /// the last bound are in `count` only.
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: u64,
}

/// Identity of an instance record in the store: (started_at_ms, cgroup_id). Listings are in
/// this order.
pub type InstanceKey = (u64, u64);

/// Which end of a listing comes first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    /// Oldest first (ascending keys).
    #[default]
    Oldest,
    /// Newest first (descending keys).
    Newest,
}

/// Up to `limit` items of two sequences, each sorted by `first`, merged into `out`.
fn merge_sorted<T: Copy>(
    a: impl Iterator<Item = T>,
    b: impl Iterator<Item = T>,
    first: impl Fn(&T, &T) -> bool,
    limit: usize,
    out: &mut Vec<T>,
) {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    while out.len() < limit {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if first(y, x) => b.next(),
            (Some(_), _) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(k) => out.push(k),
            None => break,
        }
    }
}

/// What the model keeps of a live instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Live {
    execs: u64,
    oom_kills: u64,
    peak_bytes: u64,
    limit_bytes: Option<u64>,
}

/// What the model takes of an ended record read at open.
#[derive(Debug, Clone, Copy)]
pub struct EndedRecord {
    pub key: InstanceKey,
    pub ended_at_ms: u64,
    pub peak_bytes: u64,
    pub execs: u64,
    pub oom_kills: u64,
    /// memory.max in force (the recommender's bump of an OOM-killed instance needs it).
    pub limit_bytes: Option<u64>,
}

/// Where the store keeps an ended record: in the tail (not sealed into a block yet).
pub const IN_TAIL: u32 = u32::MAX;

/// What the model keeps of an ended, retained instance: 32 bytes, so that a history of
/// millions of instances fits in a few tens of MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Ended {
    started_at_ms: u64,
    cgroup_id: u64,
    peak_bytes: u64,
    /// Run time; `u32::MAX` (49.7 days or more): the end is in `long_runs`.
    ran_ms: u32,
    /// The store's block holding the record, or [`IN_TAIL`].
    block: u32,
}

/// One function's aggregates (serialised into the store's checkpoint, caches left out).
#[derive(Debug, Default, Serialize, Deserialize)]
struct FunctionState {
    first_seen_ms: u64,
    last_seen_ms: u64,
    live: HashMap<InstanceKey, Live>,
    /// Ended, retained instances, ordered by (started_at_ms, cgroup_id).
    ended: Vec<Ended>,
    /// End times of the ended instances that ran for 49.7 days or more.
    long_runs: HashMap<InstanceKey, u64>,
    /// Their execs and OOM kills summed.
    ended_execs: u64,
    ended_oom_kills: u64,
    /// Ended instances with OOM kills: the memory.max they had (the recommender bumps it).
    ended_oom: BTreeMap<InstanceKey, Option<u64>>,
    hours: HourSeries,
    invocations: u64,
    /// The summary as last computed, and its JSON; None after any change.
    #[serde(skip)]
    summary: Option<FunctionSummary>,
    #[serde(skip)]
    summary_json: Option<String>,
    /// Its peaks counted into the metrics' buckets, as last counted (see
    /// [`LiveModel::peak_histograms`]); None after any change.
    #[serde(skip)]
    histogram: Option<Arc<PeakHistogram>>,
}

impl FunctionState {
    fn changed(&mut self) {
        self.summary = None;
        self.summary_json = None;
        self.histogram = None;
    }

    /// Its instance peaks (live and ended, above 0) counted into `bounds`, counted again only
    /// after a change.
    fn histogram(&mut self, bounds: &[u64]) -> Arc<PeakHistogram> {
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

    /// The summary as JSON, kept until the next change: the list of every function is then a
    /// concatenation, not a serialisation of thousands of summaries.
    fn summary_json(&mut self, name: &str) -> &str {
        if self.summary_json.is_none() {
            let s = self.summary(name);
            // A summary of plain numbers and a string always serialises.
            self.summary_json = Some(serde_json::to_string(&s).unwrap_or_default());
        }
        self.summary_json.as_deref().unwrap_or("{}")
    }

    fn add(&mut self, rec: &InstanceRecord, sign: i8) {
        self.changed();
        let key = (rec.started_at_ms, rec.cgroup_id);
        let Some(ended_at_ms) = rec.ended_at_ms else {
            if sign > 0 {
                let live = Live {
                    execs: rec.execs,
                    oom_kills: rec.oom_kills,
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
                    limit_bytes: rec.limits.max_bytes,
                },
                IN_TAIL,
            );
        } else {
            if let Some(i) = self.find(key) {
                self.ended.remove(i);
            }
            self.sub_counts(rec);
        }
    }

    /// Adds an ended record (or replaces the entry of the same key) and its counts.
    fn insert_ended(&mut self, r: &EndedRecord, block: u32) {
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
            block,
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
        if r.oom_kills > 0 {
            self.ended_oom.insert(r.key, r.limit_bytes);
        }
    }

    /// Widens the first/last-seen range; true when the function is new or its first-seen
    /// time moved.
    fn widen_seen(&mut self, first_ms: u64, last_ms: u64) -> bool {
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
    fn put_hour(&mut self, bucket: HourBucket) {
        self.changed();
        let old = self.hours.insert(bucket);
        self.invocations = self
            .invocations
            .saturating_sub(old.map_or(0, |b| b.invocations))
            .saturating_add(bucket.invocations);
    }

    fn sub_counts(&mut self, rec: &InstanceRecord) {
        self.ended_execs = self.ended_execs.saturating_sub(rec.execs);
        self.ended_oom_kills = self.ended_oom_kills.saturating_sub(rec.oom_kills);
        let key = (rec.started_at_ms, rec.cgroup_id);
        self.ended_oom.remove(&key);
        self.long_runs.remove(&key);
    }

    /// Idle times between uses: the gaps in which none of the function's retained instances
    /// ran, oldest first (concurrent uses leave no gap; a live one has no end yet).
    fn idle_times(&self) -> Vec<u64> {
        let mut uses: Vec<(u64, u64)> = self
            .ended
            .iter()
            .map(|e| (e.started_at_ms, self.ended_at(e)))
            .chain(self.live.keys().map(|k| (k.0, u64::MAX)))
            .collect();
        uses.sort_unstable();
        idle_gaps(uses)
    }

    fn ended_at(&self, e: &Ended) -> u64 {
        if e.ran_ms == u32::MAX {
            if let Some(end) = self.long_runs.get(&(e.started_at_ms, e.cgroup_id)) {
                return *end;
            }
        }
        e.started_at_ms.saturating_add(u64::from(e.ran_ms))
    }

    fn find(&self, key: InstanceKey) -> Option<usize> {
        self.ended
            .binary_search_by_key(&key, |e| (e.started_at_ms, e.cgroup_id))
            .ok()
    }

    fn summary(&mut self, name: &str) -> FunctionSummary {
        if let Some(s) = &self.summary {
            return s.clone();
        }
        let live_peaks = self.live.values().map(|v| v.peak_bytes);
        let ended_peaks = self.ended.iter().map(|e| e.peak_bytes);
        let mut peaks: Vec<u64> = live_peaks.chain(ended_peaks).filter(|p| *p > 0).collect();
        peaks.sort_unstable();
        let live_sum = |f: fn(&Live) -> u64| self.live.values().map(f).fold(0, u64::saturating_add);
        let s = FunctionSummary {
            name: name.to_owned(),
            instances: self.ended.len() as u64 + self.live.len() as u64,
            live_instances: self.live.len() as u64,
            execs: self.ended_execs.saturating_add(live_sum(|v| v.execs)),
            invocations: self.invocations,
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
    fn samples(&self, now_ms: u64) -> Vec<Sample> {
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

    fn export(&self, name: &str) -> FunctionConfig {
        let max = |f: fn(&HourBucket) -> u64| self.hours.values().map(|b| f(&b)).max().unwrap_or(0);
        let invocations = max(|h| h.invocations);
        let live_peak = self.live.values().map(|v| v.peak_bytes).max();
        let ended_peak = self.ended.iter().map(|e| e.peak_bytes).max();
        FunctionConfig {
            function: name.to_owned(),
            requests_per_hour: if invocations > 0 {
                invocations
            } else {
                max(|h| h.execs)
            },
            max_memory_bytes: live_peak.max(ended_peak).unwrap_or(0),
        }
    }
}

/// Every known function's aggregates, by name. A hash map for the lookup on every write (a
/// B-tree of 10k names cost a dozen string compares each, a third of a start-up's time), and the
/// names in order beside it for the lists.
#[derive(Debug, Default)]
pub struct LiveModel {
    functions: HashMap<String, FunctionState>,
    order: BTreeSet<String>,
}

impl Serialize for LiveModel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.functions.serialize(s)
    }
}

impl<'de> Deserialize<'de> for LiveModel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let functions = HashMap::<String, FunctionState>::deserialize(d)?;
        let order = functions.keys().cloned().collect();
        Ok(LiveModel { functions, order })
    }
}

impl LiveModel {
    fn function(&mut self, name: &str) -> &mut FunctionState {
        if !self.functions.contains_key(name) {
            self.functions
                .insert(name.to_owned(), FunctionState::default());
            self.order.insert(name.to_owned());
        }
        self.functions.get_mut(name).expect("inserted above")
    }

    /// The functions in name order.
    fn sorted(&self) -> impl Iterator<Item = (&String, &FunctionState)> {
        self.order
            .iter()
            .filter_map(|n| self.functions.get(n).map(|f| (n, f)))
    }

    /// Widens the function's first/last-seen range; true when the function is new or its
    /// first-seen time moved (the store persists those two, the rest is derived at open).
    pub fn seen(&mut self, name: &str, first_ms: u64, last_ms: u64) -> bool {
        self.function(name).widen_seen(first_ms, last_ms)
    }

    /// How many ended instances and hour buckets the function retains.
    pub fn sizes(&self, name: &str) -> (u64, u64) {
        self.functions
            .get(name)
            .map_or((0, 0), |f| (f.ended.len() as u64, f.hours.0.len() as u64))
    }

    /// Makes room for `ended` ended instances and `hours` hour buckets (a hint: at open, from
    /// the sizes last written; capped so a corrupt hint cannot exhaust memory).
    pub fn reserve(&mut self, name: &str, ended: u64, hours: u64) {
        const CAP: u64 = 1 << 24;
        let f = self.function(name);
        f.ended
            .reserve(usize::try_from(ended.min(CAP)).unwrap_or(0));
        f.hours
            .0
            .reserve(usize::try_from(hours.min(CAP)).unwrap_or(0));
    }

    /// The function's (first_seen_ms, last_seen_ms).
    pub fn seen_range(&self, name: &str) -> Option<(u64, u64)> {
        self.functions
            .get(name)
            .map(|f| (f.first_seen_ms, f.last_seen_ms))
    }

    /// An instance record written: `old` is the version it replaced, if any.
    /// A live version needs no `old`: the model holds it (see [`LiveModel::is_live`]).
    pub fn put_instance(&mut self, old: Option<&InstanceRecord>, new: &InstanceRecord) {
        let f = self.function(&new.function);
        if let Some(old) = old {
            f.add(old, -1);
        } else if f.live.remove(&(new.started_at_ms, new.cgroup_id)).is_some() {
            f.changed();
        }
        f.add(new, 1);
    }

    /// Ended records read from one store block at open, all of one function: one lookup of
    /// the function for all, and no strings built.
    pub fn load_block(&mut self, name: &str, block: u32, recs: &[EndedRecord]) {
        let f = self.function(name);
        for r in recs {
            f.widen_seen(r.key.0, r.ended_at_ms.max(r.key.0));
            f.live.remove(&r.key);
            f.insert_ended(r, block);
        }
    }

    /// Whether the model holds `rec`'s instance as live: rewriting it then needs no decoding
    /// of the version it replaces (the common case: a live instance's peak grew).
    pub fn is_live(&self, rec: &InstanceRecord) -> bool {
        self.functions
            .get(&rec.function)
            .is_some_and(|f| f.live.contains_key(&(rec.started_at_ms, rec.cgroup_id)))
    }

    /// Instance records removed (retention), all of one function: one pass over its history,
    /// however many there are.
    pub fn remove_instances(&mut self, function: &str, recs: &[InstanceRecord]) {
        let Some(f) = self.functions.get_mut(function) else {
            return;
        };
        f.changed();
        let mut gone = std::collections::HashSet::with_capacity(recs.len());
        for rec in recs {
            let key = (rec.started_at_ms, rec.cgroup_id);
            if rec.is_live() {
                f.live.remove(&key);
            } else {
                f.sub_counts(rec);
                gone.insert(key);
            }
        }
        f.ended
            .retain(|e| !gone.contains(&(e.started_at_ms, e.cgroup_id)));
    }

    /// An hour bucket read at open: one lookup of the function for the bucket and its
    /// first/last-seen range.
    pub fn load_hour(&mut self, function: &str, bucket: HourBucket) {
        let f = self.function(function);
        f.widen_seen(bucket.hour_start_ms, bucket.hour_start_ms);
        f.put_hour(bucket);
    }

    /// An hour bucket as written.
    pub fn put_hour(&mut self, function: &str, bucket: HourBucket) {
        self.function(function).put_hour(bucket);
    }

    /// Merges `delta` into the function's bucket of the hour starting at `hour_start_ms` and
    /// returns the bucket as it is now (for the store to write: no read of the old one).
    pub fn add_hour(
        &mut self,
        function: &str,
        hour_start_ms: u64,
        delta: &HourDelta,
    ) -> HourBucket {
        let f = self.function(function);
        let mut b = f.hours.get(hour_start_ms).unwrap_or(HourBucket {
            hour_start_ms,
            ..HourBucket::default()
        });
        apply_delta(&mut b, delta);
        f.put_hour(b);
        b
    }

    /// An hour bucket removed (retention).
    pub fn remove_hour(&mut self, function: &str, hour_start_ms: u64) {
        if let Some(f) = self.functions.get_mut(function) {
            if let Some(b) = f.hours.remove(hour_start_ms) {
                f.changed();
                f.invocations = f.invocations.saturating_sub(b.invocations);
            }
        }
    }

    /// Every function's bucket of the hour starting at `hour_start_ms`.
    pub fn buckets_of_hour(&self, hour_start_ms: u64) -> Vec<(String, HourBucket)> {
        self.functions
            .iter()
            .filter_map(|(name, f)| f.hours.get(hour_start_ms).map(|b| (name.clone(), b)))
            .collect()
    }

    /// Hour buckets of every function that start before `cutoff_ms`: (function, hour start).
    pub fn hours_before(&self, cutoff_ms: u64) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (name, f) in &self.functions {
            out.extend(f.hours.starts_before(cutoff_ms).map(|h| (name.clone(), h)));
        }
        out
    }

    pub fn summary(&mut self, name: &str) -> Option<FunctionSummary> {
        let f = self.functions.get_mut(name)?;
        Some(f.summary(name))
    }

    /// Every function's summary, sorted by name.
    pub fn summaries(&mut self) -> Vec<FunctionSummary> {
        let functions = &mut self.functions;
        self.order
            .iter()
            .filter_map(|name| functions.get_mut(name).map(|f| f.summary(name)))
            .collect()
    }

    /// `{"functions": [summary, …]}` (GET /v1/functions), sorted by name.
    pub fn summaries_json(&mut self) -> String {
        let mut out = String::with_capacity(64 + self.functions.len() * 320);
        out.push_str("{\"functions\":[");
        let mut first = true;
        for name in &self.order {
            let Some(f) = self.functions.get_mut(name) else {
                continue;
            };
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(f.summary_json(name));
        }
        out.push_str("]}");
        out
    }

    /// Each function's instance peaks (retained, live and ended, peaks above 0: the
    /// population of its summary's percentiles) counted into the buckets `bounds` (ascending)
    /// make, with their count and sum. Only functions that changed since the last call are
    /// counted again: the caller holds the store's lock, which the event loop's writes wait
    /// for, so this must not walk every record.
    pub fn peak_histograms(&mut self, bounds: &[u64]) -> Vec<(String, Arc<PeakHistogram>)> {
        let functions = &mut self.functions;
        self.order
            .iter()
            .filter_map(|name| {
                let h = functions.get_mut(name)?.histogram(bounds);
                Some((name.clone(), h))
            })
            .collect()
    }

    /// A function's idle times between uses (None when it is unknown).
    pub fn idle_times(&self, name: &str) -> Option<Vec<u64>> {
        self.functions.get(name).map(|f| f.idle_times())
    }

    /// The recommender's samples of a function (empty when it is unknown).
    pub fn samples(&self, name: &str, now_ms: u64) -> Vec<Sample> {
        self.functions
            .get(name)
            .map(|f| f.samples(now_ms))
            .unwrap_or_default()
    }

    /// Up to `limit` keys of a function's retained instances (only live or only ended ones
    /// when `live` says so) that come strictly after `after` in `order`, in that order. The
    /// ended ones are found by binary search in their ordered list, so a page costs its own
    /// length (plus the function's live instances), however long the history.
    pub fn instance_keys_page(
        &self,
        name: &str,
        live: Option<bool>,
        order: Order,
        after: Option<InstanceKey>,
        limit: usize,
    ) -> Vec<InstanceKey> {
        let Some(f) = self.functions.get(name) else {
            return Vec::new();
        };
        let beyond = |k: &InstanceKey| match (order, after) {
            (_, None) => true,
            (Order::Oldest, Some(a)) => *k > a,
            (Order::Newest, Some(a)) => *k < a,
        };
        let mut live_keys: Vec<InstanceKey> = if live == Some(false) {
            Vec::new()
        } else {
            f.live.keys().copied().filter(|k| beyond(k)).collect()
        };
        live_keys.sort_unstable();
        let ended: &[Ended] = if live == Some(true) { &[] } else { &f.ended };
        let key = |e: &Ended| (e.started_at_ms, e.cgroup_id);
        let mut out = Vec::with_capacity(limit.min(ended.len() + live_keys.len()));
        match order {
            Order::Oldest => {
                let from = after.map_or(0, |a| ended.partition_point(|e| key(e) <= a));
                merge_sorted(
                    ended[from..].iter().map(key),
                    live_keys.into_iter(),
                    |a, b| a < b,
                    limit,
                    &mut out,
                );
            }
            Order::Newest => {
                let to = after.map_or(ended.len(), |a| ended.partition_point(|e| key(e) < a));
                merge_sorted(
                    ended[..to].iter().rev().map(key),
                    live_keys.into_iter().rev(),
                    |a, b| a > b,
                    limit,
                    &mut out,
                );
            }
        }
        out
    }

    /// Keys of a function's live instances, oldest first (no history read).
    pub fn live_keys_of(&self, name: &str) -> Vec<InstanceKey> {
        let mut keys: Vec<InstanceKey> = self
            .functions
            .get(name)
            .map(|f| f.live.keys().copied().collect())
            .unwrap_or_default();
        keys.sort_unstable();
        keys
    }

    /// Where the store keeps the ended record `key` of `function` (a block, or [`IN_TAIL`]);
    /// None when the model has no such ended record.
    pub fn ended_block(&self, name: &str, key: InstanceKey) -> Option<u32> {
        let f = self.functions.get(name)?;
        f.find(key).map(|i| f.ended[i].block)
    }

    /// Records that ended records moved into `block`.
    pub fn set_block(&mut self, name: &str, keys: &[InstanceKey], block: u32) {
        if let Some(f) = self.functions.get_mut(name) {
            for k in keys {
                if let Some(i) = f.find(*k) {
                    f.ended[i].block = block;
                }
            }
        }
    }

    /// Keys of every live instance: (function, key).
    pub fn live_keys(&self) -> Vec<(String, InstanceKey)> {
        let mut out = Vec::new();
        for (name, f) in &self.functions {
            out.extend(f.live.keys().map(|k| (name.clone(), *k)));
        }
        out.sort_unstable();
        out
    }

    pub fn hours(&self, name: &str) -> Vec<HourBucket> {
        self.functions
            .get(name)
            .map(|f| f.hours.values().collect())
            .unwrap_or_default()
    }

    pub fn export(&self) -> Vec<FunctionConfig> {
        self.sorted().map(|(name, f)| f.export(name)).collect()
    }

    /// Functions with nothing retained (no instance, no hour bucket) last seen before
    /// `cutoff_ms`.
    pub fn forgotten(&self, cutoff_ms: u64) -> Vec<String> {
        self.sorted()
            .filter(|(_, f)| {
                f.live.is_empty()
                    && f.ended.is_empty()
                    && f.hours.is_empty()
                    && f.last_seen_ms < cutoff_ms
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn remove_function(&mut self, name: &str) {
        self.functions.remove(name);
        self.order.remove(name);
    }

    pub fn names(&self) -> Vec<String> {
        self.order.iter().cloned().collect()
    }

    /// Whether `name` is a known function.
    pub fn contains(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }

    /// How many functions are known.
    pub fn len(&self) -> usize {
        self.functions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }

    /// What the model holds and about how many bytes of heap that takes (the names, the
    /// per-instance and per-hour entries, the cached summaries; allocator overhead left out).
    pub fn footprint(&self) -> Footprint {
        let mut fp = Footprint {
            functions: self.functions.len() as u64,
            ..Footprint::default()
        };
        let mut bytes = 0usize;
        for (name, f) in &self.functions {
            fp.live += f.live.len() as u64;
            fp.ended += f.ended.len() as u64;
            fp.hours += f.hours.0.len() as u64;
            bytes += 2 * name.capacity()
                + std::mem::size_of::<FunctionState>()
                + f.live.capacity() * (std::mem::size_of::<(InstanceKey, Live)>() + 1)
                + f.ended.capacity() * std::mem::size_of::<Ended>()
                + f.hours.0.capacity() * std::mem::size_of::<CompactHour>()
                + f.ended_oom.len() * std::mem::size_of::<(InstanceKey, Option<u64>)>()
                + f.summary_json.as_ref().map_or(0, String::capacity);
        }
        fp.bytes = bytes as u64;
        fp
    }

    /// Gives back the spare capacity left by building the model (after a load).
    pub fn shrink(&mut self) {
        for f in self.functions.values_mut() {
            f.ended.shrink_to_fit();
            f.hours.shrink();
        }
    }
}

/// A function's hour buckets in 32 bytes each (a `BTreeMap<u64, HourBucket>` took ~70): at 10k
/// functions x 30 days they are most of the model. Counters saturate at 4 billion per hour.
#[derive(Debug, Default, Serialize, Deserialize)]
struct HourSeries(Vec<CompactHour>);

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct CompactHour {
    /// Hours since the epoch.
    hour: u32,
    instances_started: u32,
    execs: u32,
    invocations: u32,
    oom_kills: u32,
    peak_bytes: u64,
}

impl CompactHour {
    fn of(b: &HourBucket) -> Self {
        let c = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        CompactHour {
            hour: c(b.hour_start_ms / HOUR_MS),
            instances_started: c(b.instances_started),
            execs: c(b.execs),
            invocations: c(b.invocations),
            oom_kills: c(b.oom_kills),
            peak_bytes: b.peak_bytes,
        }
    }

    fn bucket(&self) -> HourBucket {
        HourBucket {
            hour_start_ms: u64::from(self.hour) * HOUR_MS,
            instances_started: u64::from(self.instances_started),
            execs: u64::from(self.execs),
            invocations: u64::from(self.invocations),
            oom_kills: u64::from(self.oom_kills),
            peak_bytes: self.peak_bytes,
        }
    }
}

impl HourSeries {
    fn find(&self, hour_start_ms: u64) -> Result<usize, usize> {
        let hour = u32::try_from(hour_start_ms / HOUR_MS).unwrap_or(u32::MAX);
        // Mostly the newest hour: look there first.
        match self.0.last() {
            Some(last) if last.hour == hour => Ok(self.0.len() - 1),
            Some(last) if last.hour < hour => Err(self.0.len()),
            _ => self.0.binary_search_by_key(&hour, |h| h.hour),
        }
    }

    fn get(&self, hour_start_ms: u64) -> Option<HourBucket> {
        self.find(hour_start_ms).ok().map(|i| self.0[i].bucket())
    }

    /// Inserts or replaces the bucket of its hour; returns the one replaced.
    fn insert(&mut self, b: HourBucket) -> Option<HourBucket> {
        let c = CompactHour::of(&b);
        match self.find(b.hour_start_ms) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i], c).bucket()),
            Err(i) => {
                self.0.insert(i, c);
                None
            }
        }
    }

    fn remove(&mut self, hour_start_ms: u64) -> Option<HourBucket> {
        let i = self.find(hour_start_ms).ok()?;
        Some(self.0.remove(i).bucket())
    }

    fn values(&self) -> impl Iterator<Item = HourBucket> + '_ {
        self.0.iter().map(CompactHour::bucket)
    }

    fn starts_before(&self, cutoff_ms: u64) -> impl Iterator<Item = u64> + '_ {
        self.0
            .iter()
            .map(|h| u64::from(h.hour) * HOUR_MS)
            .take_while(move |h| *h < cutoff_ms)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn shrink(&mut self) {
        self.0.shrink_to_fit();
    }
}

/// `b` after `d`: counters add, `peak_bytes` takes the max.
/// The gaps in which none of a function's uses ran, from their (start, end) ordered by start:
/// the idle times of the keep-alive policy. Concurrent uses leave no gap; a use still running
/// ends at `u64::MAX`.
pub fn idle_gaps(uses: impl IntoIterator<Item = (u64, u64)>) -> Vec<u64> {
    let mut out = Vec::new();
    let mut busy_until: Option<u64> = None;
    for (start, end) in uses {
        if let Some(b) = busy_until.filter(|b| start > *b) {
            out.push(start - b);
        }
        busy_until = Some(busy_until.map_or(end, |b| b.max(end)));
    }
    out
}

pub fn apply_delta(b: &mut HourBucket, d: &HourDelta) {
    b.instances_started = b.instances_started.saturating_add(d.instances_started);
    b.execs = b.execs.saturating_add(d.execs);
    b.invocations = b.invocations.saturating_add(d.invocations);
    b.oom_kills = b.oom_kills.saturating_add(d.oom_kills);
    b.peak_bytes = b.peak_bytes.max(d.peak_bytes);
}

#[cfg(test)]
mod tests {
    #[test]
    fn idle_gaps_are_where_no_use_ran() {
        // 0-10 and 5-20 overlap; 30-40 comes after a 10 ms gap, 100-110 after 60.
        let uses = [(0, 10), (5, 20), (30, 40), (100, 110)];
        assert_eq!(super::idle_gaps(uses), vec![10, 60]);
        assert!(super::idle_gaps([(0, u64::MAX), (5, 6)]).is_empty());
        assert!(super::idle_gaps([]).is_empty());
    }
}
