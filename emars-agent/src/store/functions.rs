//! Functions: the `functions` tree (first/last seen), the cap on how many are known, and the
//! answers the live model gives about them (summaries, hours, samples, idle times, export).
//!
//! # Bounds on what tenants name
//!
//! Function names come from cgroup paths, container labels and API calls, all of which a
//! tenant may choose. At most [`Store::set_function_cap`] functions are known (the config's
//! `store.max_functions`, [`DEFAULT_MAX_FUNCTIONS`]): a write that would add one more is
//! refused ([`StoreError::FunctionsFull`]) and counted, and the tracker asks
//! ([`FunctionAdmission`]) before it opens a new instance, so a refused function's instances
//! are not tracked at all. Functions named in the config are admitted past the cap. A function
//! pruned by retention frees its place. What is already in the store when it opens is kept,
//! whatever the cap.

use std::collections::HashSet;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::live::LiveModel;
use crate::model::tracker::{FunctionAdmission, FunctionsFull};
use crate::model::{FunctionConfig, FunctionSummary, Sample, SizedSample};

use super::codec::encode_json;
use super::index::BlockId;
use super::{Store, StoreError, TREE_FUNCTIONS};

/// Default of `store.max_functions`: functions the store knows at most ([`Store::set_function_cap`]).
pub const DEFAULT_MAX_FUNCTIONS: usize = 10_000;

/// A refused function name is logged at most this often (the first at once).
pub(super) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Value of the `functions` tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct FunctionRecord {
    pub(super) first_seen_ms: u64,
    #[serde(default)]
    pub(super) last_seen_ms: u64,
    /// Retained ended instances and hour buckets when last written (checkpoints, pruning):
    /// an open reserves that much, instead of growing each list by doubling (which left the
    /// rebuild of a 3M-record store at twice the model's size).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) ended: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) hours: u64,
}

pub(super) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The cap on functions ([`Store::set_function_cap`]) and the names it refused.
#[derive(Debug)]
pub(super) struct FunctionCap {
    pub(super) max: usize,
    /// Functions named in the config: admitted past the cap (the operator chose them).
    pub(super) always: HashSet<String>,
    /// Functions admitted through [`Store::admit_function`] and known since: a new instance of
    /// one is admitted without the model's lock (the mkdir-to-limits path must not wait behind
    /// a prune). Pruning takes out the functions it forgets.
    pub(super) admitted: HashSet<String>,
    /// Refusals since the store opened, and since the last log line.
    pub(super) refused: u64,
    pub(super) unlogged: u64,
    pub(super) logged_at: Option<std::time::Instant>,
}

impl Default for FunctionCap {
    fn default() -> Self {
        FunctionCap {
            max: DEFAULT_MAX_FUNCTIONS,
            always: HashSet::new(),
            admitted: HashSet::new(),
            refused: 0,
            unlogged: 0,
            logged_at: None,
        }
    }
}

impl FunctionCap {
    /// Counts a refusal of `function` and logs it: the first at once, then at most once per
    /// [`REFUSAL_LOG_INTERVAL`] with how many came since.
    fn refuse(&mut self, function: &str) -> FunctionsFull {
        self.refused += 1;
        self.unlogged += 1;
        let e = FunctionsFull {
            function: function.to_owned(),
            max: self.max,
        };
        let due = self
            .logged_at
            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL);
        if due {
            if self.logged_at.is_none() {
                tracing::warn!("{e}");
            } else {
                tracing::warn!(
                    "{} new function names refused since the last report ({} in all; \
                     store.max_functions = {}); the latest: {function:?}",
                    self.unlogged,
                    self.refused,
                    self.max
                );
            }
            self.logged_at = Some(std::time::Instant::now());
            self.unlogged = 0;
        }
        e
    }
}

impl FunctionAdmission for Store {
    fn admit(&self, function: &str, at_ms: u64) -> Result<(), FunctionsFull> {
        match self.admit_function(function, at_ms) {
            Err(StoreError::FunctionsFull(e)) => Err(e),
            // Not the cap: the instance is tracked, and its writes say what fails.
            Err(e) => {
                tracing::error!("store: admitting function {function:?}: {e}");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }
}

pub(super) fn validate_name(name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidName {
        name: name.to_string(),
        reason,
    })
}

impl Store {
    pub(super) fn cap(&self) -> MutexGuard<'_, FunctionCap> {
        self.cap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// At most `max` functions are known from now on (`store.max_functions`); a write or an
    /// instance that would add one more is refused and counted. Functions named in `always`
    /// are admitted past it. Functions already known stay, also beyond `max`.
    pub fn set_function_cap(&self, max: usize, always: impl IntoIterator<Item = String>) {
        let mut cap = self.cap();
        cap.max = max;
        cap.always = always.into_iter().collect();
    }

    /// The cap on functions and how many new names it refused since the store opened.
    pub fn function_cap(&self) -> crate::model::FunctionCapInfo {
        let cap = self.cap();
        crate::model::FunctionCapInfo {
            max_functions: cap.max as u64,
            refused: cap.refused,
        }
    }

    /// Ok when `function` is known or may be added now; else the refusal, counted.
    pub(super) fn admit_locked(
        &self,
        model: &LiveModel<BlockId>,
        function: &str,
    ) -> Result<(), StoreError> {
        if model.contains(function) {
            return Ok(());
        }
        let mut cap = self.cap();
        if model.len() < cap.max || cap.always.contains(function) {
            return Ok(());
        }
        Err(cap.refuse(function).into())
    }

    /// Makes `function` known (first seen at `at_ms`) unless the cap refuses it: the tracker
    /// asks before it opens a new instance, so that the instance's writes find its place taken.
    pub fn admit_function(&self, function: &str, at_ms: u64) -> Result<(), StoreError> {
        validate_name(function)?;
        {
            // Known, or always admitted (its writes add it): no wait for the model's lock.
            let cap = self.cap();
            if cap.admitted.contains(function) || cap.always.contains(function) {
                return Ok(());
            }
        }
        let mut st = self.state();
        self.admit_locked(&st.model, function)?;
        if st.model.seen(function, at_ms, at_ms) {
            self.write_function(&st.model, function)?;
        }
        self.cap().admitted.insert(function.to_owned());
        Ok(())
    }

    /// What the live model holds.
    pub fn footprint(&self) -> crate::model::ModelFootprint {
        let mut fp = self.state().model.footprint();
        fp.strings = self.strings().by_id.len() as u64;
        fp
    }

    /// Names of all known functions, sorted (byte order).
    pub fn function_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.state().model.names())
    }

    /// Aggregate of one function over its retained data; None if the function is unknown.
    /// Answered from memory, in time that does not grow with the function's history.
    ///
    /// `first_seen_ms` is the earliest time ever recorded for the function (it survives
    /// pruning); `last_seen_ms` is the latest of the recorded activity times, instance
    /// start/end times and the start of any hour bucket.
    pub fn function(&self, name: &str) -> Result<Option<FunctionSummary>, StoreError> {
        validate_name(name)?;
        Ok(self.state().model.summary(name))
    }

    /// Summaries of all known functions, sorted by name (from memory).
    pub fn functions(&self) -> Result<Vec<FunctionSummary>, StoreError> {
        Ok(self.state().model.summaries())
    }

    /// Every function's instance peaks in buckets (from memory; see
    /// [`crate::model::live::LiveModel::peak_histograms`]).
    pub fn peak_histograms(
        &self,
        bounds: &[u64],
    ) -> Vec<(String, Arc<crate::model::live::PeakHistogram>)> {
        self.state().model.peak_histograms(bounds)
    }

    /// Every function's instance peaks in native-histogram buckets (from memory; see
    /// [`crate::model::live::LiveModel::native_peaks`]).
    pub fn native_peaks(
        &self,
        value: fn(&crate::model::Sample) -> u64,
    ) -> Vec<(String, Arc<crate::model::live::NativePeaks>)> {
        self.state().model.native_peaks(value)
    }

    /// The same as the JSON body of GET /v1/functions, from per-function JSON kept in memory.
    pub fn functions_json(&self) -> String {
        self.state().model.summaries_json()
    }

    /// The recommender's samples of `function` (from memory): every retained instance with a
    /// peak or an OOM kill, ended ones at their end, live ones at `now_ms`.
    pub fn samples(&self, function: &str, now_ms: u64) -> Result<Vec<Sample>, StoreError> {
        validate_name(function)?;
        Ok(self.state().model.samples(function, now_ms))
    }

    /// The input-aware fit's samples of `function` (from memory): its `limit` most recently
    /// started ended instances bound with a size hint.
    pub fn sized_samples(
        &self,
        function: &str,
        limit: usize,
    ) -> Result<Vec<SizedSample>, StoreError> {
        validate_name(function)?;
        Ok(self.state().model.sized_samples(function, limit))
    }

    /// A function's idle times between uses, from memory (None when it is unknown).
    pub fn idle_times(&self, function: &str) -> Result<Option<Vec<u64>>, StoreError> {
        validate_name(function)?;
        Ok(self.state().model.idle_times(function))
    }

    /// The paper's per-function config, one entry per known function, sorted by name.
    ///
    /// `requests_per_hour` is the busiest retained hour's requests as `requests_source`
    /// counts them: platform-reported invocations when any retained hour has some, else
    /// HTTP requests counted in the kernel, else TCP connections counted in the kernel, else
    /// execs; `max_memory_bytes` is the peak of the retained instance peaks.
    pub fn export(&self) -> Result<Vec<FunctionConfig>, StoreError> {
        Ok(self.state().model.export())
    }

    /// Persists the function's first/last-seen range as the model has it.
    pub(super) fn write_function(
        &self,
        model: &LiveModel<BlockId>,
        name: &str,
    ) -> Result<(), StoreError> {
        let Some((first_seen_ms, last_seen_ms)) = model.seen_range(name) else {
            return Ok(());
        };
        let (ended, hours) = model.sizes(name);
        let r = FunctionRecord {
            first_seen_ms,
            last_seen_ms,
            ended,
            hours,
        };
        let raw = encode_json(TREE_FUNCTIONS, name.as_bytes(), &r)?;
        self.functions.insert(name.as_bytes(), raw)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::store::test_util::*;
    use crate::store::*;
    use std::time::Duration;

    #[test]
    fn functions_json_is_the_list_serialised() {
        let (_d, s) = open_tmp();
        assert_eq!(s.functions_json(), r#"{"functions":[]}"#);
        for (f, i) in [("b", 1), ("a", 2), ("b", 3)] {
            let mut r = rec(f, i, i);
            r.peak_bytes = i * MIB;
            s.put_instance(&r).unwrap();
        }
        let typed = serde_json::json!({ "functions": s.functions().unwrap() });
        let cached: serde_json::Value = serde_json::from_str(&s.functions_json()).unwrap();
        assert_eq!(cached, typed);
        // A change shows in the next answer.
        s.add_invocations("a", 5, 10).unwrap();
        let cached: serde_json::Value = serde_json::from_str(&s.functions_json()).unwrap();
        assert_eq!(cached["functions"][0]["invocations"], 5);
    }

    #[test]
    fn invalid_names_are_rejected() {
        let (_d, s) = open_tmp();
        for bad in ["", "a\0b"] {
            assert!(matches!(
                s.add_invocations(bad, 1, 0),
                Err(StoreError::InvalidName { .. })
            ));
            assert!(matches!(
                s.put_instance(&rec(bad, 1, 1)),
                Err(StoreError::InvalidName { .. })
            ));
            assert!(matches!(
                s.instances(bad),
                Err(StoreError::InvalidName { .. })
            ));
        }
        assert!(s.function_names().unwrap().is_empty());
    }

    #[test]
    fn summary_numbers_and_percentiles() {
        let (_d, s) = open_tmp();
        fill_known_set(&s);
        s.add_hour(
            "f",
            0,
            HourDelta {
                execs: 200,
                ..HourDelta::default()
            },
        )
        .unwrap();
        s.add_invocations("f", 7, HOUR_MS).unwrap();
        let f = s.function("f").unwrap().unwrap();
        assert_eq!(f.name, "f");
        assert_eq!(f.instances, 101);
        assert_eq!(f.live_instances, 4);
        assert_eq!(f.execs, 201);
        assert_eq!(f.oom_kills, 10);
        assert_eq!(f.invocations, 7);
        assert_eq!(f.peak_bytes, 100 * MIB);
        assert_eq!(
            f.peak_percentiles,
            PeakPercentiles {
                p50: 50 * MIB,
                p90: 90 * MIB,
                p95: 95 * MIB,
                p99: 99 * MIB,
            }
        );
        assert_eq!(f.first_seen_ms, 0); // the add_hour at t=0
        assert_eq!(f.last_seen_ms, HOUR_MS); // the invocations, later than any instance end
    }

    #[test]
    fn export_prefers_invocations_then_kernel_requests_then_connections_then_execs() {
        let (_d, s) = open_tmp();
        fill_known_set(&s);
        let execs = |n| HourDelta {
            execs: n,
            ..HourDelta::default()
        };
        // "f": execs only → busiest hour's execs.
        s.add_hour("f", 0, execs(10)).unwrap();
        s.add_hour("f", HOUR_MS, execs(30)).unwrap();
        s.add_hour("f", 2 * HOUR_MS, execs(20)).unwrap();
        // "g": invocations reported → busiest hour's invocations even though execs are higher.
        s.add_hour("g", 0, execs(1000)).unwrap();
        s.add_invocations("g", 5, 10).unwrap();
        s.add_invocations("g", 9, HOUR_MS).unwrap();
        let mut r = rec("g", 1, 1);
        r.peak_bytes = 3 * MIB;
        s.put_instance(&r).unwrap();
        // "h": known, nothing measured.
        s.add_invocations("h", 0, 0).unwrap();
        let kernel = |execs, connections, requests| HourDelta {
            execs,
            connections,
            requests,
            ..HourDelta::default()
        };
        // "k": an HTTP server, one exec and many requests over fewer connections.
        s.add_hour("k", 0, kernel(1, 40, 70)).unwrap();
        s.add_hour("k", HOUR_MS, kernel(0, 50, 60)).unwrap();
        // "m": a server that does not speak HTTP/1: connections only.
        s.add_hour("m", 0, kernel(1, 0, 0)).unwrap();
        s.add_hour("m", HOUR_MS, kernel(0, 12, 0)).unwrap();
        let config =
            |name: &str, requests_per_hour, requests_source, max_memory_bytes| FunctionConfig {
                function: name.into(),
                requests_per_hour,
                requests_source,
                max_memory_bytes,
            };
        use RequestSource::*;
        assert_eq!(
            s.export().unwrap(),
            vec![
                config("f", 30, Execs, 100 * MIB),
                config("g", 9, Platform, 3 * MIB),
                config("h", 0, Execs, 0),
                config("k", 70, KernelRequests, 0),
                config("m", 12, KernelConnections, 0),
            ]
        );
        // The platform's report wins over the kernel's count.
        s.add_invocations("k", 3, HOUR_MS).unwrap();
        let k = s.export().unwrap().remove(3);
        assert_eq!((k.requests_per_hour, k.requests_source), (3, Platform));
        assert_eq!(s.function("k").unwrap().unwrap().requests_source, Platform);
        assert_eq!(
            s.function("m").unwrap().unwrap().requests_source,
            KernelConnections
        );
    }

    /// The model's samples are what the records say (the recommender reads no records).
    #[test]
    fn samples_match_the_records() {
        let (_d, s) = open_tmp();
        fill_known_set(&s);
        let mut oom = rec("f", 9_000, 500);
        oom.oom_kills = 1;
        oom.limits.max_bytes = Some(40 * MIB);
        oom.ended_at_ms = Some(9_500);
        s.put_instance(&oom).unwrap();
        let now = 20_000;
        let from_records = |recs: &[InstanceRecord]| -> Vec<(u64, u64, bool, Option<u64>)> {
            let mut v: Vec<_> = recs
                .iter()
                .filter(|r| r.peak_bytes > 0 || r.oom_kills > 0)
                .map(|r| {
                    let at = r.ended_at_ms.unwrap_or(now.max(r.started_at_ms));
                    (at, r.peak_bytes, r.oom_kills > 0, r.limits.max_bytes)
                })
                .collect();
            v.sort_unstable();
            v
        };
        let mut model: Vec<_> = s
            .samples("f", now)
            .unwrap()
            .iter()
            .map(|x| (x.at_ms, x.peak_bytes, x.oom_killed, x.limit_bytes))
            .collect();
        model.sort_unstable();
        let expected = from_records(&s.instances("f").unwrap());
        assert_eq!(expected.len(), 101);
        assert_eq!(model, expected);
    }

    /// The native peaks take each sample at the value given (the policy's: an OOM kill at its
    /// bump), and are counted again after a change.
    #[test]
    fn native_peaks_take_the_values_given() {
        use crate::model::native;
        let (_d, s) = open_tmp();
        let mut r = rec("f", 1_000, 1);
        r.peak_bytes = 10 * MIB;
        r.ended_at_ms = Some(2_000);
        s.put_instance(&r).unwrap();
        let bumped = |x: &crate::model::Sample| {
            if x.oom_killed {
                999 * MIB
            } else {
                x.peak_bytes
            }
        };
        let peaks = |s: &Store| s.native_peaks(bumped)[0].1.buckets.clone();
        assert_eq!(peaks(&s), vec![(native::bucket_index(10 * MIB), 1)]);
        let mut oom = rec("f", 3_000, 2);
        oom.peak_bytes = 40 * MIB;
        oom.oom_kills = 1;
        oom.limits.max_bytes = Some(40 * MIB);
        oom.ended_at_ms = Some(3_500);
        s.put_instance(&oom).unwrap();
        assert_eq!(
            peaks(&s),
            vec![
                (native::bucket_index(10 * MIB), 1),
                (native::bucket_index(999 * MIB), 1)
            ]
        );
    }

    /// The cap on functions: a new name past it is refused (invocations, an instance, an hour,
    /// an admission), counted and not kept at all (no function, no string); known functions
    /// take writes as before; a function the config names is admitted past it; a function
    /// pruned by retention frees its place.
    #[test]
    fn function_cap_refuses_new_names() {
        let (_d, s) = open_tmp();
        s.set_function_cap(3, ["pinned".to_string()]);
        s.add_invocations("a", 1, 10).unwrap();
        s.add_invocations("b", 1, 10).unwrap();
        s.admit_function("c", 20).unwrap(); // takes the third place before any record
        let full = |r: Result<(), StoreError>, name: &str| match r {
            Err(StoreError::FunctionsFull(e)) => {
                assert_eq!((e.function.as_str(), e.max), (name, 3));
                assert!(e.to_string().contains("store.max_functions = 3"), "{e}");
            }
            other => panic!("expected FunctionsFull for {name}, got {other:?}"),
        };
        full(s.add_invocations("d", 1, 30), "d");
        full(s.put_instance(&rec("e", 40, 1)), "e");
        full(s.add_hour("f", 50, HourDelta::default()), "f");
        full(s.admit_function("g", 60), "g");
        full(s.add_invocations("d", 1, 70), "d"); // the same name again counts again
        assert_eq!(s.function_names().unwrap(), ["a", "b", "c"]);
        assert_eq!(
            s.function_cap(),
            crate::model::FunctionCapInfo {
                max_functions: 3,
                refused: 5
            }
        );
        let texts: Vec<String> = s
            .raw_tree(TREE_STRINGS)
            .iter()
            .values()
            .map(|v| String::from_utf8(v.unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(texts, ["a", "b"], "refused names were interned");
        assert_eq!(s.raw_tree(TREE_FUNCTIONS).len(), 3);
        // Known functions go on; the operator's function comes in past the cap.
        s.put_instance(&rec("c", 80, 2)).unwrap();
        s.add_invocations("a", 5, 90).unwrap();
        s.add_invocations("pinned", 1, 100).unwrap();
        assert_eq!(s.function_names().unwrap(), ["a", "b", "c", "pinned"]);
        // Retention: a, b and pinned (hours only, long past) go; c runs on. Room again.
        let r = s
            .prune(10 * HOUR_MS, Duration::from_millis(HOUR_MS))
            .unwrap();
        assert_eq!(r.functions_removed, 3);
        s.add_invocations("d", 1, 10 * HOUR_MS).unwrap();
        s.add_invocations("e", 1, 10 * HOUR_MS).unwrap();
        full(s.add_invocations("h", 1, 10 * HOUR_MS), "h");
        assert_eq!(s.function_names().unwrap(), ["c", "d", "e"]);
        assert_eq!(s.function_cap().refused, 6);

        // A function admitted (its instance opened without the model's lock next time), then
        // pruned: its place is gone with it, and it is asked about again.
        let (_d, s) = open_tmp();
        s.set_function_cap(1, []);
        s.admit_function("z", 10).unwrap();
        s.admit_function("z", 20).unwrap();
        s.prune(10 * HOUR_MS, Duration::from_millis(HOUR_MS))
            .unwrap();
        s.add_invocations("y", 1, 10 * HOUR_MS).unwrap();
        assert!(
            matches!(
                s.admit_function("z", 10 * HOUR_MS),
                Err(StoreError::FunctionsFull(FunctionsFull { max: 1, .. }))
            ),
            "a pruned function was admitted past the cap"
        );
        assert_eq!(s.function_names().unwrap(), ["y"]);
    }
}
