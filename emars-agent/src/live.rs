//! The live per-function model: what the store holds, aggregated in memory, so that function
//! summaries, hour buckets and the exported config are answered without reading the history.
//!
//! The store keeps it in step with every write (instance records, hour buckets, pruning) and
//! builds it once when it opens. An instance record counts by its latest version: the store
//! hands over the version it replaced, whose contribution is taken back first, so writing the
//! same record twice never counts it twice.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::model::{
    FunctionConfig, FunctionSummary, HourBucket, HourDelta, InstanceRecord, PeakPercentiles,
};

/// One function's aggregates (serialised into the store's checkpoint, caches left out).
#[derive(Debug, Default, Serialize, Deserialize)]
struct FunctionState {
    first_seen_ms: u64,
    last_seen_ms: u64,
    /// Live instances by (started_at_ms, cgroup_id): (execs, oom_kills, peak_bytes).
    #[serde(with = "live_entries")]
    live: HashMap<(u64, u64), (u64, u64, u64)>,
    /// Ended, retained instances: their count, execs and OOM kills summed.
    ended: u64,
    ended_execs: u64,
    ended_oom_kills: u64,
    /// Peaks (> 0) of the ended instances, as a multiset: peak → count.
    ended_peaks: BTreeMap<u64, u64>,
    hours: BTreeMap<u64, HourBucket>,
    invocations: u64,
    /// The summary as last computed, and its JSON; None after any change.
    #[serde(skip)]
    summary: Option<FunctionSummary>,
    #[serde(skip)]
    summary_json: Option<String>,
}

/// JSON maps need string keys: the live instances travel as a list of entries.
mod live_entries {
    use std::collections::HashMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    type Live = HashMap<(u64, u64), (u64, u64, u64)>;

    pub fn serialize<S: Serializer>(m: &Live, s: S) -> Result<S::Ok, S::Error> {
        m.iter().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Live, D::Error> {
        Ok(Vec::<((u64, u64), (u64, u64, u64))>::deserialize(d)?
            .into_iter()
            .collect())
    }
}

impl FunctionState {
    fn changed(&mut self) {
        self.summary = None;
        self.summary_json = None;
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
        if rec.is_live() {
            if sign > 0 {
                self.live
                    .insert(key, (rec.execs, rec.oom_kills, rec.peak_bytes));
            } else {
                self.live.remove(&key);
            }
            return;
        }
        let add = |v: &mut u64, d: u64| {
            *v = if sign > 0 {
                v.saturating_add(d)
            } else {
                v.saturating_sub(d)
            }
        };
        add(&mut self.ended, 1);
        add(&mut self.ended_execs, rec.execs);
        add(&mut self.ended_oom_kills, rec.oom_kills);
        if rec.peak_bytes > 0 {
            let n = self.ended_peaks.entry(rec.peak_bytes).or_insert(0);
            add(n, 1);
            if *n == 0 {
                self.ended_peaks.remove(&rec.peak_bytes);
            }
        }
    }

    fn summary(&mut self, name: &str) -> FunctionSummary {
        if let Some(s) = &self.summary {
            return s.clone();
        }
        let live_peaks = self.live.values().map(|v| v.2).filter(|p| *p > 0);
        let mut peaks: Vec<u64> = live_peaks.collect();
        for (peak, n) in &self.ended_peaks {
            peaks.extend(std::iter::repeat_n(*peak, *n as usize));
        }
        peaks.sort_unstable();
        let sum =
            |f: fn(&(u64, u64, u64)) -> u64| self.live.values().map(f).fold(0, u64::saturating_add);
        let s = FunctionSummary {
            name: name.to_owned(),
            instances: self.ended + self.live.len() as u64,
            live_instances: self.live.len() as u64,
            execs: self.ended_execs.saturating_add(sum(|v| v.0)),
            invocations: self.invocations,
            oom_kills: self.ended_oom_kills.saturating_add(sum(|v| v.1)),
            peak_bytes: peaks.last().copied().unwrap_or(0),
            peak_percentiles: PeakPercentiles::from_sorted(&peaks),
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
        };
        self.summary = Some(s.clone());
        s
    }

    fn export(&self, name: &str) -> FunctionConfig {
        let max = |f: fn(&HourBucket) -> u64| self.hours.values().map(f).max().unwrap_or(0);
        let invocations = max(|h| h.invocations);
        let live_peak = self.live.values().map(|v| v.2).max().unwrap_or(0);
        let ended_peak = self.ended_peaks.keys().next_back().copied().unwrap_or(0);
        FunctionConfig {
            function: name.to_owned(),
            requests_per_hour: if invocations > 0 {
                invocations
            } else {
                max(|h| h.execs)
            },
            max_memory_bytes: live_peak.max(ended_peak),
        }
    }
}

/// Every known function's aggregates, by name.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LiveModel {
    functions: BTreeMap<String, FunctionState>,
}

impl LiveModel {
    fn function(&mut self, name: &str) -> &mut FunctionState {
        self.functions.entry(name.to_owned()).or_default()
    }

    /// The function's first/last-seen range, as the store's `functions` tree has it.
    pub fn seen(&mut self, name: &str, first_ms: u64, last_ms: u64) {
        let f = self.function(name);
        f.changed();
        if f.first_seen_ms == 0 && f.last_seen_ms == 0 {
            f.first_seen_ms = first_ms;
        } else {
            f.first_seen_ms = f.first_seen_ms.min(first_ms);
        }
        f.last_seen_ms = f.last_seen_ms.max(last_ms);
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

    /// Whether the model holds `rec`'s instance as live: rewriting it then needs no decoding
    /// of the version it replaces (the common case: a live instance's peak grew).
    pub fn is_live(&self, rec: &InstanceRecord) -> bool {
        self.functions
            .get(&rec.function)
            .is_some_and(|f| f.live.contains_key(&(rec.started_at_ms, rec.cgroup_id)))
    }

    /// An instance record removed (retention).
    pub fn remove_instance(&mut self, rec: &InstanceRecord) {
        if let Some(f) = self.functions.get_mut(&rec.function) {
            f.add(rec, -1);
        }
    }

    /// An hour bucket as written.
    pub fn put_hour(&mut self, function: &str, bucket: HourBucket) {
        let f = self.function(function);
        f.changed();
        let old = f.hours.insert(bucket.hour_start_ms, bucket);
        f.invocations = f
            .invocations
            .saturating_sub(old.map_or(0, |b| b.invocations))
            .saturating_add(bucket.invocations);
    }

    /// An hour bucket removed (retention).
    pub fn remove_hour(&mut self, function: &str, hour_start_ms: u64) {
        if let Some(f) = self.functions.get_mut(function) {
            if let Some(b) = f.hours.remove(&hour_start_ms) {
                f.changed();
                f.invocations = f.invocations.saturating_sub(b.invocations);
            }
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }

    pub fn summary(&mut self, name: &str) -> Option<FunctionSummary> {
        let f = self.functions.get_mut(name)?;
        Some(f.summary(name))
    }

    /// Every function's summary, sorted by name.
    pub fn summaries(&mut self) -> Vec<FunctionSummary> {
        self.functions
            .iter_mut()
            .map(|(name, f)| f.summary(name))
            .collect()
    }

    /// `{"functions": [summary, …]}` (GET /v1/functions), sorted by name.
    pub fn summaries_json(&mut self) -> String {
        let mut out = String::with_capacity(64 + self.functions.len() * 320);
        out.push_str("{\"functions\":[");
        for (i, (name, f)) in self.functions.iter_mut().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(f.summary_json(name));
        }
        out.push_str("]}");
        out
    }

    pub fn hours(&self, name: &str) -> Vec<HourBucket> {
        self.functions
            .get(name)
            .map(|f| f.hours.values().copied().collect())
            .unwrap_or_default()
    }

    pub fn export(&self) -> Vec<FunctionConfig> {
        self.functions
            .iter()
            .map(|(name, f)| f.export(name))
            .collect()
    }

    /// Functions with nothing retained (no instance, no hour bucket) last seen before
    /// `cutoff_ms`.
    pub fn forgotten(&self, cutoff_ms: u64) -> Vec<String> {
        self.functions
            .iter()
            .filter(|(_, f)| {
                f.live.is_empty()
                    && f.ended == 0
                    && f.hours.is_empty()
                    && f.last_seen_ms < cutoff_ms
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn remove_function(&mut self, name: &str) {
        self.functions.remove(name);
    }

    pub fn names(&self) -> Vec<String> {
        self.functions.keys().cloned().collect()
    }
}

/// `b` after `d`: counters add, `peak_bytes` takes the max.
pub fn apply_delta(b: &mut HourBucket, d: &HourDelta) {
    b.instances_started = b.instances_started.saturating_add(d.instances_started);
    b.execs = b.execs.saturating_add(d.execs);
    b.invocations = b.invocations.saturating_add(d.invocations);
    b.oom_kills = b.oom_kills.saturating_add(d.oom_kills);
    b.peak_bytes = b.peak_bytes.max(d.peak_bytes);
}
