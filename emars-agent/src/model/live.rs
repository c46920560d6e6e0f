//! The live per-function model: what the store holds, aggregated in memory, so that function
//! summaries, hour buckets, recommendations' samples and the exported config are answered
//! without reading the history.
//!
//! The store keeps it in step with every write (instance records, hour buckets, pruning) and
//! builds it once when it opens. An instance record counts by its latest version: the store
//! hands over the version it replaced, whose contribution is taken back first, so writing the
//! same record twice never counts it twice.
//!
//! Beside each ended record the model keeps where the store keeps it (`P`, the store's type:
//! which block, or none yet) and hands it back on request, without reading it: the store's
//! layout stays the store's.

mod function;
mod hours;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::model::ModelFootprint as Footprint;
use crate::model::{FunctionConfig, FunctionSummary, HourBucket, HourDelta, InstanceRecord};
use crate::model::{Sample, SizedSample};

use function::{Ended, FunctionState, Live};
use hours::CompactHour;

// Every known function's summary, sorted by name. The server writes it from the JSON the
// model keeps per function (`LiveModel::summaries_json`, `S` a raw JSON value); clients read
// it typed (`S` = `FunctionSummary`, the default). The doc line below is the API document's.
/// GET /v1/functions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionsResponse<S = FunctionSummary> {
    pub functions: Vec<S>,
}

/// A function's instance peaks in buckets ([`LiveModel::peak_histograms`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeakHistogram {
    /// Peaks above the bound before (0 for the first) and at or below each bound; those above
    /// the last bound are in `count` only.
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: u64,
}

/// A function's instance peaks in the buckets of a Prometheus native histogram at
/// [`crate::model::native::SCHEMA`] ([`LiveModel::native_peaks`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NativePeaks {
    /// (bucket index, peaks in it), ascending by index, counts above 0.
    pub buckets: Vec<(i32, u64)>,
    pub count: u64,
    pub sum: u64,
}

impl NativePeaks {
    /// The peaks (> 0; zeros are left out, as everywhere peaks are counted) in their buckets.
    pub fn of(peaks: impl Iterator<Item = u64>) -> NativePeaks {
        let mut indices = Vec::new();
        let mut sum = 0u64;
        for p in peaks.filter(|p| *p > 0) {
            indices.push(crate::model::native::bucket_index(p));
            sum = sum.saturating_add(p);
        }
        indices.sort_unstable();
        let count = indices.len() as u64;
        let mut buckets: Vec<(i32, u64)> = Vec::new();
        for i in indices {
            match buckets.last_mut() {
                Some((last, n)) if *last == i => *n += 1,
                _ => buckets.push((i, 1)),
            }
        }
        NativePeaks {
            buckets,
            count,
            sum,
        }
    }
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

/// What the model takes of an ended record read at open.
#[derive(Debug, Clone, Copy)]
pub struct EndedRecord {
    pub key: InstanceKey,
    pub ended_at_ms: u64,
    pub peak_bytes: u64,
    pub execs: u64,
    pub oom_kills: u64,
    /// Kernel-counted inbound connections and HTTP requests.
    pub connections: u64,
    pub requests: u64,
    /// memory.max in force (the recommender's bump of an OOM-killed instance needs it).
    pub limit_bytes: Option<u64>,
    /// The bind's size hint, if one was given.
    pub input_bytes: Option<u64>,
}

/// Every known function's aggregates, by name, each ended record with where the store keeps
/// it (`P`). A hash map for the lookup on every write (a B-tree of many names costs a dozen
/// string compares per lookup), and the names in order beside it for the lists.
#[derive(Debug)]
pub struct LiveModel<P> {
    functions: HashMap<String, FunctionState<P>>,
    order: BTreeSet<String>,
}

impl<P> Default for LiveModel<P> {
    fn default() -> Self {
        LiveModel {
            functions: HashMap::new(),
            order: BTreeSet::new(),
        }
    }
}

impl<P: Serialize> Serialize for LiveModel<P> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.functions.serialize(s)
    }
}

impl<'de, P: DeserializeOwned> Deserialize<'de> for LiveModel<P> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let functions = HashMap::<String, FunctionState<P>>::deserialize(d)?;
        let order = functions.keys().cloned().collect();
        Ok(LiveModel { functions, order })
    }
}

impl<P: Copy + Default> LiveModel<P> {
    fn function(&mut self, name: &str) -> &mut FunctionState<P> {
        if !self.functions.contains_key(name) {
            self.functions
                .insert(name.to_owned(), FunctionState::default());
            self.order.insert(name.to_owned());
        }
        self.functions.get_mut(name).expect("inserted above")
    }

    /// The functions in name order.
    fn sorted(&self) -> impl Iterator<Item = (&String, &FunctionState<P>)> {
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

    /// Ended records read at open, all of one function and kept by the store at `place`:
    /// one lookup of the function for all, and no strings built.
    pub fn load_ended(&mut self, name: &str, place: P, recs: &[EndedRecord]) {
        let f = self.function(name);
        for r in recs {
            f.widen_seen(r.key.0, r.ended_at_ms.max(r.key.0));
            f.live.remove(&r.key);
            f.insert_ended(r, place);
        }
    }

    /// Whether the model holds `rec`'s instance as live: rewriting it then needs no decoding
    /// of the version it replaces (the common case: a live instance's peak grew).
    pub fn is_live(&self, rec: &InstanceRecord) -> bool {
        self.functions
            .get(&rec.function)
            .is_some_and(|f| f.live.contains_key(&(rec.started_at_ms, rec.cgroup_id)))
    }

    /// The peak so far of the live instance `key` of `function` (None: not live here).
    pub fn live_peak(&self, function: &str, key: InstanceKey) -> Option<u64> {
        Some(self.functions.get(function)?.live.get(&key)?.peak_bytes)
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
                f.inputs.remove(&key);
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

    /// The body of GET /v1/functions ([`FunctionsResponse`]), from each function's summary
    /// JSON, kept until the function changes.
    pub fn summaries_json(&mut self) -> String {
        for (name, f) in &mut self.functions {
            f.cache_summary_json(name);
        }
        let body = FunctionsResponse {
            functions: self
                .sorted()
                .filter_map(|(_, f)| f.summary_json.as_deref())
                .collect::<Vec<&RawValue>>(),
        };
        // Raw values that are JSON already, under one field name: serialises.
        serde_json::to_string(&body).unwrap_or_default()
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

    /// Each function's instance peaks (the same population as [`LiveModel::peak_histograms`])
    /// in native-histogram buckets, counted again only for functions that changed.
    pub fn native_peaks(&mut self, value: fn(&Sample) -> u64) -> Vec<(String, Arc<NativePeaks>)> {
        let functions = &mut self.functions;
        self.order
            .iter()
            .filter_map(|name| Some((name.clone(), functions.get_mut(name)?.native_peaks(value))))
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

    /// The input-aware fit's samples of a function, the `limit` most recent (empty when it is
    /// unknown).
    pub fn sized_samples(&self, name: &str, limit: usize) -> Vec<SizedSample> {
        self.functions
            .get(name)
            .map(|f| f.sized_samples(limit))
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
        let ended: &[Ended<P>] = if live == Some(true) { &[] } else { &f.ended };
        let key = |e: &Ended<P>| (e.started_at_ms, e.cgroup_id);
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

    /// Where the store keeps the ended record `key` of `function` (`P::default()` until the
    /// store says otherwise); None when the model has no such ended record.
    pub fn stored_at(&self, name: &str, key: InstanceKey) -> Option<P> {
        let f = self.functions.get(name)?;
        f.find(key).map(|i| f.ended[i].place)
    }

    /// Records that the store moved the ended records `keys` to `place`.
    pub fn set_stored_at(&mut self, name: &str, keys: &[InstanceKey], place: P) {
        if let Some(f) = self.functions.get_mut(name) {
            for k in keys {
                if let Some(i) = f.find(*k) {
                    f.ended[i].place = place;
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
                + std::mem::size_of::<FunctionState<P>>()
                + f.live.capacity() * (std::mem::size_of::<(InstanceKey, Live)>() + 1)
                + f.ended.capacity() * std::mem::size_of::<Ended<P>>()
                + f.hours.0.capacity() * std::mem::size_of::<CompactHour>()
                + f.ended_oom.len() * std::mem::size_of::<(InstanceKey, Option<u64>)>()
                + f.inputs.len() * std::mem::size_of::<(InstanceKey, u64)>()
                + f.summary_json.as_ref().map_or(0, |j| j.get().len());
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

/// `b` after `d`: counters add, `peak_bytes` takes the max.
pub fn apply_delta(b: &mut HourBucket, d: &HourDelta) {
    b.instances_started = b.instances_started.saturating_add(d.instances_started);
    b.execs = b.execs.saturating_add(d.execs);
    b.invocations = b.invocations.saturating_add(d.invocations);
    b.oom_kills = b.oom_kills.saturating_add(d.oom_kills);
    b.peak_bytes = b.peak_bytes.max(d.peak_bytes);
    b.connections = b.connections.saturating_add(d.connections);
    b.requests = b.requests.saturating_add(d.requests);
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
