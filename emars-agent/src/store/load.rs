//! The rebuild of the live model and the index from the records, at an open without a valid
//! checkpoint, as one step per tree; values that do not decode are moved to `quarantine`.

use std::collections::HashMap;

use crate::model::live::EndedRecord;
use crate::model::HOUR_MS;

use super::checkpoint::{release_free_heap, CHECKPOINT_FILE};
use super::codec::{
    decode_block, decode_instance_value, decode_json, display_text, quarantine_key, u32_of, u64_of,
};
use super::functions::FunctionRecord;
use super::index::State;
use super::index::{BlockId, BlockInfo};
use super::{
    Load, Store, StoreError, TREE_BLOCKS, TREE_FUNCTIONS, TREE_HOURS_OPEN, TREE_HOUR_BLOCKS,
    TREE_INSTANCE_STATE, TREE_LIVE, TREE_META, TREE_QUARANTINE, TREE_STRINGS, TREE_TAIL,
};

/// A value that did not decode: its tree, key, value and why.
type Corrupt = (&'static str, sled::IVec, sled::IVec, StoreError);

impl Store {
    /// Values that did not decode at open (left out of the model, kept in `quarantine`).
    pub fn corrupt_at_open(&self) -> u64 {
        self.corrupt_at_open
    }

    /// Builds the live model and the index from the records (once, at open), one tree at a
    /// time. A value that does not decode is left out, copied to `quarantine` and said, not
    /// fatal.
    pub(super) fn load_live(&mut self) -> Result<(), StoreError> {
        let mut corrupt = Vec::new();
        {
            let mut st = self.state();
            let st = &mut *st;
            self.load_functions(st, &mut corrupt)?;
            self.load_blocks(st, &mut corrupt)?;
            self.load_unsealed(st, &mut corrupt)?;
            self.load_hour_blocks(st, &mut corrupt)?;
            self.load_open_hours(st, &mut corrupt)?;
            st.model.shrink();
        }
        self.quarantine_corrupt(&corrupt)
    }

    /// `functions`: first/last-seen times, and room for each function's history.
    fn load_functions(&self, st: &mut State, corrupt: &mut Vec<Corrupt>) -> Result<(), StoreError> {
        for item in self.functions.iter() {
            let (key, raw) = item?;
            match decode_json::<FunctionRecord>(TREE_FUNCTIONS, &display_text(&key), &raw) {
                Ok(r) => {
                    let name = String::from_utf8_lossy(&key);
                    st.model.seen(&name, r.first_seen_ms, r.last_seen_ms);
                    st.model.reserve(&name, r.ended, r.hours);
                }
                Err(e) => corrupt.push((TREE_FUNCTIONS, key, raw, e)),
            }
        }
        Ok(())
    }

    /// `instance_blocks`: the sealed ended records, each block's end-time range, and the
    /// strings they name.
    fn load_blocks(&self, st: &mut State, corrupt: &mut Vec<Corrupt>) -> Result<(), StoreError> {
        for item in self.blocks.iter() {
            let (key, raw) = item?;
            let seq = u64_of(&key);
            let entries = match decode_block(&raw) {
                Ok(e) => e,
                Err(reason) => {
                    let e = StoreError::Corrupt {
                        tree: TREE_BLOCKS,
                        key: seq.to_string(),
                        reason,
                    };
                    corrupt.push((TREE_BLOCKS, key, raw, e));
                    continue;
                }
            };
            let mut by_fn: HashMap<u32, Vec<EndedRecord>> = HashMap::new();
            let mut info = BlockInfo {
                min_ended: u64::MAX,
                max_ended: 0,
            };
            for e in &entries {
                let end = e.started_at_ms.saturating_add(e.record.ran_ms.unwrap_or(0));
                info.min_ended = info.min_ended.min(end);
                info.max_ended = info.max_ended.max(end);
                st.index.note_end([e.record.function, e.record.parent], end);
                by_fn
                    .entry(e.record.function)
                    .or_default()
                    .push(EndedRecord {
                        key: (e.started_at_ms, e.cgroup_id),
                        ended_at_ms: end,
                        peak_bytes: e.record.peak_bytes,
                        execs: e.record.execs,
                        oom_kills: e.record.oom_kills,
                        connections: e.record.connections,
                        requests: e.record.requests,
                        limit_bytes: e.record.max_bytes,
                        // A lifetime watermark (v2 before 6.12) is no peak of this use: no
                        // point of the input fit.
                        input_bytes: e.record.input_bytes.filter(|_| e.record.peak_source != 4),
                    });
            }
            for (fid, recs) in by_fn {
                let Some(function) = self.string(fid) else {
                    // A record naming a string that is not there: said, block kept.
                    tracing::error!(
                        "block {seq}: {} records name function id {fid}, which is not in \
                         `{TREE_STRINGS}`; left out of the model",
                        recs.len()
                    );
                    continue;
                };
                st.model.load_ended(&function, BlockId::of_seq(seq), &recs);
            }
            st.index.blocks.insert(seq, info);
            st.index.next_block = st.index.next_block.max(seq + 1);
        }
        Ok(())
    }

    /// `instances_tail` and `instances_live`: the records not sealed into a block.
    fn load_unsealed(&self, st: &mut State, corrupt: &mut Vec<Corrupt>) -> Result<(), StoreError> {
        for (tree, name) in [(&self.tail, TREE_TAIL), (&self.live_tree, TREE_LIVE)] {
            for item in tree.iter() {
                let (key, raw) = item?;
                let rec = match self.decode_instance(&key, &raw) {
                    Ok(rec) => rec,
                    Err(e) => {
                        corrupt.push((name, key, raw, e));
                        continue;
                    }
                };
                let last = rec.ended_at_ms.unwrap_or(0).max(rec.started_at_ms);
                st.model.seen(&rec.function, rec.started_at_ms, last);
                st.model.put_instance(None, &rec);
                if name == TREE_TAIL {
                    if let Ok(s) = decode_instance_value(&raw) {
                        let end = rec.started_at_ms.saturating_add(s.ran_ms.unwrap_or(0));
                        st.index.note_end([s.function, s.parent], end);
                    }
                    st.index
                        .tail
                        .insert((rec.started_at_ms, rec.cgroup_id), rec.function);
                }
            }
        }
        Ok(())
    }

    /// `hour_blocks`: the sealed hours.
    fn load_hour_blocks(
        &self,
        st: &mut State,
        corrupt: &mut Vec<Corrupt>,
    ) -> Result<(), StoreError> {
        for item in self.hour_blocks.iter() {
            let (key, raw) = item?;
            let hour = u64::from(u32_of(&key)) * HOUR_MS;
            match self.decode_hour_block(hour, &raw) {
                Ok(buckets) => {
                    for (name, b) in buckets {
                        st.model.load_hour(&name, b);
                    }
                    st.index.sealed_hours.insert(hour);
                    st.index.newest_hour = st.index.newest_hour.max(hour);
                }
                Err(e) => corrupt.push((TREE_HOUR_BLOCKS, key, raw, e)),
            }
        }
        Ok(())
    }

    /// `hours_open`: the buckets of the hours not sealed yet.
    fn load_open_hours(
        &self,
        st: &mut State,
        corrupt: &mut Vec<Corrupt>,
    ) -> Result<(), StoreError> {
        for item in self.hours_open.iter() {
            let (key, raw) = item?;
            match self.decode_hour(&key, &raw) {
                Ok((name, id, b)) => {
                    st.model.seen(&name, b.hour_start_ms, b.hour_start_ms);
                    st.model.put_hour(&name, b);
                    st.index.open_hours.insert((b.hour_start_ms, id));
                    st.index.newest_hour = st.index.newest_hour.max(b.hour_start_ms);
                }
                Err(e) => corrupt.push((TREE_HOURS_OPEN, key, raw, e)),
            }
        }
        Ok(())
    }

    /// Moves the values that did not decode to `quarantine` and counts them.
    fn quarantine_corrupt(&mut self, corrupt: &[Corrupt]) -> Result<(), StoreError> {
        for (tree, key, raw, e) in corrupt {
            tracing::error!("{e}; left out of the model and moved to `{TREE_QUARANTINE}`");
            self.quarantine.insert(quarantine_key(tree, key), raw)?;
            if let Some(t) = self.tree_named(tree) {
                t.remove(key)?;
            }
        }
        self.corrupt_at_open = corrupt.len() as u64;
        if !corrupt.is_empty() {
            tracing::warn!(
                "{} corrupt records in the store at {}",
                corrupt.len(),
                self.path.display()
            );
        }
        Ok(())
    }

    /// After a rebuild: sled opened afresh, cold as after a clean close, and the model moved
    /// over encoded. Reading every block left sled's cache holding several times its capacity,
    /// and the model's buffers interleaved with it; decoded again once sled's memory is freed,
    /// the model lies in memory of its own (the figures are in docs/design.md).
    pub(super) fn reopen_cold(self) -> Result<Store, StoreError> {
        let encoded = postcard::to_allocvec(&*self.state()).map_err(|e| StoreError::Encode {
            tree: TREE_META,
            key: CHECKPOINT_FILE.to_owned(),
            reason: e.to_string(),
        })?;
        let corrupt = self.corrupt_at_open;
        let path = self.path.clone();
        self.db.flush()?;
        drop(self);
        let reopened = Self::open_with(&path, Load::Nothing)?;
        *reopened.state() = postcard::from_bytes(&encoded).map_err(|e| StoreError::Corrupt {
            tree: TREE_META,
            key: CHECKPOINT_FILE.to_owned(),
            reason: e.to_string(),
        })?;
        drop(encoded);
        reopened.load_containers()?;
        release_free_heap();
        Ok(Store {
            corrupt_at_open: corrupt + reopened.corrupt_at_open,
            ..reopened
        })
    }

    /// The tree of a record kind by its name (for moving a corrupt value aside).
    pub(super) fn tree_named(&self, name: &str) -> Option<&sled::Tree> {
        match name {
            TREE_FUNCTIONS => Some(&self.functions),
            TREE_BLOCKS => Some(&self.blocks),
            TREE_TAIL => Some(&self.tail),
            TREE_LIVE => Some(&self.live_tree),
            TREE_HOUR_BLOCKS => Some(&self.hour_blocks),
            TREE_HOURS_OPEN => Some(&self.hours_open),
            TREE_INSTANCE_STATE => Some(&self.instance_state),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::store::codec::{hour_log_key, log_key};
    use crate::store::test_util::*;
    use crate::store::*;
    use std::time::Duration;

    /// The live model's answers equal a fresh summary of the trees: after live updates,
    /// repeated writes of the same record, ends, invocations and pruning, and after a reopen
    /// (which builds the model from the trees alone).
    #[test]
    fn live_model_matches_the_trees() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let s = Store::open(&path).unwrap();
        for i in 0..30u64 {
            let f = if i % 3 == 0 { "a" } else { "b" };
            let mut r = rec(f, 1000 + i * HOUR_MS / 4, i);
            r.execs = 1;
            s.put_instance(&r).unwrap();
            r.peak_bytes = (i + 1) * MIB;
            r.execs = 2;
            s.put_instance(&r).unwrap();
            if i % 5 != 0 {
                r.ended_at_ms = Some(r.started_at_ms + 10);
                r.oom_kills = i % 2;
                s.put_instance(&r).unwrap();
                // The same ended record again: counted once.
                s.put_instance(&r).unwrap();
            }
            s.add_invocations(f, i, r.started_at_ms).unwrap();
        }
        s.prune(1000 + 4 * HOUR_MS, Duration::from_millis(2 * HOUR_MS))
            .unwrap();
        let live = s.functions().unwrap();
        let export = s.export().unwrap();
        let hours = s.hours("b").unwrap();
        assert_eq!(live.len(), 2);
        let b = &live[1];
        assert_eq!(b.live_instances, 4, "{b:?}");
        assert!(b.instances > b.live_instances && b.execs == 2 * b.instances);
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.functions().unwrap(), live);
        assert_eq!(s.export().unwrap(), export);
        assert_eq!(s.hours("b").unwrap(), hours);
        // And both agree with the records themselves.
        let recs = s.instances("b").unwrap();
        assert_eq!(b.instances, recs.len() as u64);
        assert_eq!(b.oom_kills, recs.iter().map(|r| r.oom_kills).sum::<u64>());
        assert_eq!(
            b.peak_bytes,
            recs.iter().map(|r| r.peak_bytes).max().unwrap()
        );
    }

    #[test]
    fn corrupt_value_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let s = Store::open(&path).unwrap();
        s.put_instance(&rec("f", 1, 1)).unwrap();
        s.add_hour("f", HOUR_MS, HourDelta::default()).unwrap();
        let bad_key = log_key(2, 9);
        s.raw_tree(TREE_LIVE)
            .insert(
                bad_key,
                &b"\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..],
            )
            .unwrap();
        s.raw_tree(TREE_HOURS_OPEN)
            .insert(hour_log_key(2 * HOUR_MS, 0), &b"{"[..])
            .unwrap();
        match s.instance("f", 2, 9) {
            Err(StoreError::Corrupt { tree, key, .. }) => {
                assert_eq!((tree, key.as_str()), (TREE_LIVE, "2/9"))
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        drop(s);
        // At open: left out of the model, kept aside, counted; the good records stay.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.corrupt_at_open(), 2);
        assert_eq!(s.function("f").unwrap().map(|f| f.instances), Some(1));
        assert_eq!(s.hours("f").unwrap().len(), 1);
        assert!(s.instance("f", 1, 1).unwrap().is_some());
        let kept: Vec<_> = s.raw_tree(TREE_QUARANTINE).iter().keys().collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        // A write over the corrupt key works, and the raw value is still in quarantine.
        s.put_instance(&rec("f", 2, 9)).unwrap();
        assert!(s.instance("f", 2, 9).unwrap().is_some());
        assert!(s
            .raw_tree(TREE_QUARANTINE)
            .get(quarantine_key(TREE_LIVE, &bad_key))
            .unwrap()
            .is_some());
    }
}
