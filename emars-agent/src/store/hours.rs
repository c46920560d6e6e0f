//! Hour buckets: merging a delta into the open bucket (`hours_open`), sealing the hours
//! before the one before the newest into one block per hour (`hour_blocks`), and rewriting a
//! sealed hour's block for a late report.

use std::collections::BTreeSet;

use sled::Transactional;

use crate::model::{HourBucket, HourDelta, HOUR_MS};

use super::codec::{
    encode_hour, encode_hour_block, hour_block_key, hour_log_key, stored_hour, tx_error,
};
use super::functions::validate_name;
use super::index::State;
use super::{Store, StoreError, TREE_HOUR_BLOCKS};

impl Store {
    /// Merges `delta` into the bucket of the hour containing `at_ms`: counters add,
    /// `peak_bytes` takes the max. The bucket comes from the model, so the write reads
    /// nothing, except for an hour already sealed into its block (a late report).
    pub fn add_hour(&self, function: &str, at_ms: u64, delta: HourDelta) -> Result<(), StoreError> {
        let _changed = self.changing();
        validate_name(function)?;
        let mut st = self.state();
        self.admit_locked(&st.model, function)?;
        if st.model.seen(function, at_ms, at_ms) {
            self.write_function(&st.model, function)?;
        }
        let hour_start_ms = at_ms - at_ms % HOUR_MS;
        let b = st.model.add_hour(function, hour_start_ms, &delta);
        let id = self.intern(function)?;
        if st.index.sealed_hours.contains(&hour_start_ms) {
            self.write_hour_block(&st, hour_start_ms)?;
        } else {
            self.hours_open
                .insert(hour_log_key(hour_start_ms, id), encode_hour(&b))?;
            st.index.open_hours.insert((hour_start_ms, id));
        }
        if hour_start_ms > st.index.newest_hour {
            st.index.newest_hour = hour_start_ms;
            // The hour before stays open for late events; older ones are sealed.
            self.seal_hours(&mut st, hour_start_ms.saturating_sub(HOUR_MS))?;
        }
        Ok(())
    }

    /// Seals every open hour that starts before `before_ms` into its block, atomically.
    pub(super) fn seal_hours(&self, st: &mut State, before_ms: u64) -> Result<(), StoreError> {
        let hours: BTreeSet<u64> = st
            .index
            .open_hours
            .range(..(before_ms, 0))
            .map(|(h, _)| *h)
            .collect();
        for hour in hours {
            let ids: Vec<u32> = st
                .index
                .open_hours
                .range((hour, 0)..=(hour, u32::MAX))
                .map(|(_, id)| *id)
                .collect();
            let value = self.hour_block_value(st, hour)?;
            (&self.hour_blocks, &self.hours_open)
                .transaction(|(blocks, open)| {
                    blocks.insert(&hour_block_key(hour), value.as_slice())?;
                    for id in &ids {
                        open.remove(&hour_log_key(hour, *id))?;
                    }
                    Ok(())
                })
                .map_err(tx_error)?;
            for id in ids {
                st.index.open_hours.remove(&(hour, id));
            }
            st.index.sealed_hours.insert(hour);
        }
        Ok(())
    }

    /// The block of `hour`: every function's bucket of that hour, from the model.
    pub(super) fn hour_block_value(&self, st: &State, hour: u64) -> Result<Vec<u8>, StoreError> {
        let mut entries = Vec::new();
        for (name, b) in st.model.buckets_of_hour(hour) {
            entries.push((self.intern(&name)?, stored_hour(&b)));
        }
        encode_hour_block(&entries).map_err(|reason| StoreError::Encode {
            tree: TREE_HOUR_BLOCKS,
            key: hour.to_string(),
            reason,
        })
    }

    pub(super) fn write_hour_block(&self, st: &State, hour: u64) -> Result<(), StoreError> {
        let value = self.hour_block_value(st, hour)?;
        self.hour_blocks.insert(hour_block_key(hour), value)?;
        Ok(())
    }

    /// Hour buckets of `function`, oldest first (from memory).
    pub fn hours(&self, function: &str) -> Result<Vec<HourBucket>, StoreError> {
        validate_name(function)?;
        Ok(self.state().model.hours(function))
    }

    /// Records `count` invocations reported by the platform at `at_ms`. The function becomes
    /// known even if no instance of it was seen yet (also when `count` is 0).
    pub fn add_invocations(
        &self,
        function: &str,
        count: u64,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let _changed = self.changing();
        self.add_hour(
            function,
            at_ms,
            HourDelta {
                invocations: count,
                ..HourDelta::default()
            },
        )
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
    fn add_hour_merges_sum_and_max() {
        let (_d, s) = open_tmp();
        let h = 5 * HOUR_MS;
        let d = |execs, peak| HourDelta {
            instances_started: 1,
            execs,
            invocations: 2,
            oom_kills: 1,
            peak_bytes: peak,
            connections: 7,
            requests: execs * 10,
        };
        s.add_hour("f", h + 1, d(3, 10)).unwrap();
        s.add_hour("f", h + HOUR_MS - 1, d(4, 30)).unwrap();
        s.add_hour("f", h + 2, d(5, 20)).unwrap();
        s.add_hour("f", h + HOUR_MS, d(1, 1)).unwrap(); // next hour
        s.add_hour("f", h - 1, d(1, 1)).unwrap(); // previous hour
        let hours = s.hours("f").unwrap();
        assert_eq!(hours.len(), 3);
        assert_eq!(
            hours[1],
            HourBucket {
                hour_start_ms: h,
                instances_started: 3,
                execs: 12,
                invocations: 6,
                oom_kills: 3,
                peak_bytes: 30,
                connections: 21,
                requests: 120,
            }
        );
        assert_eq!(hours[0].hour_start_ms, h - HOUR_MS);
        assert_eq!(hours[2].hour_start_ms, h + HOUR_MS);
    }

    #[test]
    fn add_hour_concurrent_is_exact() {
        let (_d, s) = open_tmp();
        let threads = 8u64;
        let per = 200u64;
        std::thread::scope(|scope| {
            for t in 0..threads {
                let s = s.clone();
                scope.spawn(move || {
                    for i in 0..per {
                        let delta = HourDelta {
                            execs: 1,
                            invocations: 2,
                            peak_bytes: t * 1000 + i,
                            ..HourDelta::default()
                        };
                        s.add_hour("f", HOUR_MS + i, delta).unwrap();
                    }
                });
            }
        });
        let hours = s.hours("f").unwrap();
        assert_eq!(hours.len(), 1);
        assert_eq!(hours[0].execs, threads * per);
        assert_eq!(hours[0].invocations, 2 * threads * per);
        assert_eq!(hours[0].peak_bytes, (threads - 1) * 1000 + per - 1);
        let f = s.function("f").unwrap().unwrap();
        assert_eq!(
            (f.first_seen_ms, f.last_seen_ms),
            (HOUR_MS, HOUR_MS + per - 1)
        );
    }

    #[test]
    fn add_invocations_makes_function_known() {
        let (_d, s) = open_tmp();
        assert_eq!(s.function("api").unwrap(), None);
        assert!(s.function_names().unwrap().is_empty());
        s.add_invocations("api", 42, 7 * HOUR_MS + 5).unwrap();
        s.add_invocations("zero", 0, 9).unwrap();
        assert_eq!(s.function_names().unwrap(), vec!["api", "zero"]);
        let f = s.function("api").unwrap().unwrap();
        assert_eq!(f.instances, 0);
        assert_eq!(f.live_instances, 0);
        assert_eq!(f.invocations, 42);
        assert_eq!(f.peak_bytes, 0);
        assert_eq!(f.peak_percentiles, PeakPercentiles::default());
        assert_eq!(
            (f.first_seen_ms, f.last_seen_ms),
            (7 * HOUR_MS + 5, 7 * HOUR_MS + 5)
        );
        assert_eq!(s.functions().unwrap().len(), 2);
    }

    /// Hour buckets move from `hours_open` into one block per hour once two newer hours have
    /// begun; a late report into a sealed hour rewrites its block; reopen and pruning agree.
    #[test]
    fn hours_are_sealed_per_hour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let s = Store::open(&path).unwrap();
        let one = |execs| HourDelta {
            execs,
            ..HourDelta::default()
        };
        for h in 0..6u64 {
            for f in ["a", "b"] {
                s.add_hour(f, h * HOUR_MS + 10, one(h + 1)).unwrap();
            }
        }
        {
            let st = s.state();
            assert_eq!(st.index.sealed_hours.len(), 4, "{:?}", st.index);
            assert_eq!(st.index.open_hours.len(), 4);
        }
        s.add_invocations("a", 9, HOUR_MS + 5).unwrap(); // hour 1 is sealed
        let hours_a = s.hours("a").unwrap();
        assert_eq!(hours_a[1].invocations, 9);
        assert_eq!(hours_a[1].execs, 2);
        let hours_b = s.hours("b").unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.hours("a").unwrap(), hours_a);
        assert_eq!(s.hours("b").unwrap(), hours_b);
        let report = s
            .prune(5 * HOUR_MS, Duration::from_millis(2 * HOUR_MS))
            .unwrap();
        assert_eq!(report.hours_removed, 6); // hours 0, 1, 2 of both
        drop(s);
        let s = Store::open(&path).unwrap();
        let left: Vec<u64> = s
            .hours("a")
            .unwrap()
            .iter()
            .map(|b| b.hour_start_ms)
            .collect();
        assert_eq!(left, vec![3 * HOUR_MS, 4 * HOUR_MS, 5 * HOUR_MS]);
    }
}
