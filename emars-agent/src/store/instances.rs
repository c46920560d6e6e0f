//! Instance records and the blocks they are sealed into: writing a record (live, tail, block),
//! sealing the tail every [`BLOCK_RECORDS`] ended records, and reading records back by key or
//! by page, the model saying which block holds each.

use std::collections::HashMap;

use sled::Transactional;

use crate::model::live::{InstanceKey, Order};
use crate::model::InstanceRecord;

use super::codec::{
    decode_block, decode_instance_value, encode_block, log_key, tx_error, BlockEntry,
};
use super::functions::validate_name;
use super::index::{BlockId, BlockInfo, State};
use super::{Store, StoreError, TREE_BLOCKS};

/// Which page of a function's instances to read ([`Store::instances_page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageQuery {
    /// Only live (true) or only ended (false) instances; all when None.
    pub live: Option<bool>,
    pub order: Order,
    /// The page starts strictly after this key (in `order`): the `next` of the page before.
    pub after: Option<InstanceKey>,
    /// At most this many records.
    pub limit: usize,
}

impl Default for PageQuery {
    fn default() -> Self {
        PageQuery {
            live: None,
            order: Order::Oldest,
            after: None,
            limit: 1000,
        }
    }
}

/// A page of instance records, in the order asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct InstancesPage {
    pub records: Vec<InstanceRecord>,
    /// The key of the page's last record when more follow: where the next page starts.
    pub next: Option<InstanceKey>,
}

/// Ended records per block: the tail is sealed into one sled value when it has this many.
pub const BLOCK_RECORDS: usize = 128;

impl Store {
    /// Inserts or replaces the record identified by `(function, started_at_ms, cgroup_id)`.
    /// A live record goes to `instances_live`; an ended one leaves it for the tail, which is
    /// sealed into a block every [`BLOCK_RECORDS`] records.
    pub fn put_instance(&self, rec: &InstanceRecord) -> Result<(), StoreError> {
        let _changed = self.changing();
        validate_name(&rec.function)?;
        // Held across the write, so the model sees writes in the order the trees do.
        let mut st = self.state();
        self.admit_locked(&st.model, &rec.function)?;
        let last = rec.ended_at_ms.unwrap_or(0).max(rec.started_at_ms);
        if st.model.seen(&rec.function, rec.started_at_ms, last) {
            self.write_function(&st.model, &rec.function)?;
        }
        let key = log_key(rec.started_at_ms, rec.cgroup_id);
        let ikey = (rec.started_at_ms, rec.cgroup_id);
        let (value, ids) = self.encode_instance(rec)?;
        if let Some(end) = rec.ended_at_ms {
            st.index.note_end(ids, end.max(rec.started_at_ms));
        }
        // The version replaced, when the model does not hold it as live: the same record
        // ended before (written again), or the same key under another function.
        let old = if st.model.is_live(rec) {
            None
        } else {
            self.find_ended(&st, &rec.function, ikey)?
        };
        if let Some((old_rec, block)) = &old {
            if let Some(seq) = block.seq() {
                self.remove_from_block(&mut st, seq, &[ikey])?;
            }
            if old_rec.function != rec.function {
                self.tail.remove(key)?;
                st.index.tail.remove(&ikey);
            }
        }
        if rec.is_live() {
            self.live_tree.insert(key, value)?;
            // An ended record written as live again (the agent adopting it back): one copy.
            if st.index.tail.remove(&ikey).is_some() {
                self.tail.remove(key)?;
            }
        } else {
            self.tail.insert(key, value)?;
            self.live_tree.remove(key)?;
            st.index.tail.insert(ikey, rec.function.clone());
            // What was kept of it while it ran (holds, watches) ends with it.
            self.drop_states(&key)?;
        }
        match old {
            Some((old, _)) if old.function != rec.function => {
                st.model
                    .remove_instances(&old.function, std::slice::from_ref(&old));
                st.model.put_instance(None, rec);
            }
            old => st.model.put_instance(old.as_ref().map(|(r, _)| r), rec),
        }
        self.containers().record(rec);
        if st.index.tail.len() >= BLOCK_RECORDS {
            self.seal_tail(&mut st)?;
        }
        Ok(())
    }

    /// The ended record `key` wherever it is kept (tail or block), with its block.
    pub(super) fn find_ended(
        &self,
        st: &State,
        function: &str,
        key: InstanceKey,
    ) -> Result<Option<(InstanceRecord, BlockId)>, StoreError> {
        // The index knows the tail: a new instance (the common write) reads nothing.
        if st.index.tail.contains_key(&key) {
            let raw_key = log_key(key.0, key.1);
            if let Some(raw) = self.tail.get(raw_key)? {
                // One that does not decode was never counted (it is in quarantine).
                return Ok(self
                    .decode_instance(&raw_key, &raw)
                    .ok()
                    .map(|r| (r, BlockId::TAIL)));
            }
        }
        let Some(block) = st.model.stored_at(function, key) else {
            return Ok(None);
        };
        // One the model holds in the tail that the tail has not (in quarantine): no block.
        let Some(seq) = block.seq() else {
            return Ok(None);
        };
        let recs = self.read_block(seq)?;
        Ok(recs
            .into_iter()
            .find(|r| (r.started_at_ms, r.cgroup_id) == key)
            .map(|r| (r, block)))
    }

    /// Moves every tail record into a new block, atomically (a crash leaves them in one place
    /// or the other, never both).
    pub(super) fn seal_tail(&self, st: &mut State) -> Result<(), StoreError> {
        let mut entries = Vec::with_capacity(st.index.tail.len());
        let mut unsealable = Vec::new();
        let mut keys_by_fn: HashMap<String, Vec<InstanceKey>> = HashMap::new();
        let (mut min_end, mut max_end) = (u64::MAX, 0u64);
        for (ikey, function) in &st.index.tail {
            let raw_key = log_key(ikey.0, ikey.1);
            let Some(stored) = self
                .tail
                .get(raw_key)?
                .and_then(|raw| decode_instance_value(&raw).ok())
            else {
                // Gone, or in quarantine since the open: left where it is, not sealed.
                unsealable.push(*ikey);
                continue;
            };
            let end = ikey.0.saturating_add(stored.ran_ms.unwrap_or(0));
            min_end = min_end.min(end);
            max_end = max_end.max(end);
            entries.push(BlockEntry {
                started_at_ms: ikey.0,
                cgroup_id: ikey.1,
                record: stored,
            });
            keys_by_fn.entry(function.clone()).or_default().push(*ikey);
        }
        for k in unsealable {
            st.index.tail.remove(&k);
        }
        if entries.is_empty() {
            return Ok(());
        }
        let seq = st.index.next_block;
        let value = encode_block(&entries)?;
        (&self.blocks, &self.tail)
            .transaction(|(blocks, tail)| {
                blocks.insert(&seq.to_be_bytes(), value.as_slice())?;
                for e in &entries {
                    tail.remove(&log_key(e.started_at_ms, e.cgroup_id))?;
                }
                Ok(())
            })
            .map_err(tx_error)?;
        st.index.next_block = seq + 1;
        st.index.blocks.insert(
            seq,
            BlockInfo {
                min_ended: min_end,
                max_ended: max_end,
            },
        );
        for e in &entries {
            st.index.tail.remove(&(e.started_at_ms, e.cgroup_id));
        }
        let block = BlockId::of_seq(seq);
        for (function, keys) in keys_by_fn {
            st.model.set_stored_at(&function, &keys, block);
        }
        Ok(())
    }

    /// Rewrites block `seq` without the records `keys` (removed when none is left).
    pub(super) fn remove_from_block(
        &self,
        st: &mut State,
        seq: u64,
        keys: &[InstanceKey],
    ) -> Result<(), StoreError> {
        let entries = self.read_block_entries(seq)?;
        let kept: Vec<BlockEntry> = entries
            .into_iter()
            .filter(|e| !keys.contains(&(e.started_at_ms, e.cgroup_id)))
            .collect();
        self.write_block(st, seq, &kept)
    }

    pub(super) fn write_block(
        &self,
        st: &mut State,
        seq: u64,
        kept: &[BlockEntry],
    ) -> Result<(), StoreError> {
        if kept.is_empty() {
            self.blocks.remove(seq.to_be_bytes())?;
            st.index.blocks.remove(&seq);
            return Ok(());
        }
        self.blocks.insert(seq.to_be_bytes(), encode_block(kept)?)?;
        let ends = kept
            .iter()
            .map(|e| e.started_at_ms.saturating_add(e.record.ran_ms.unwrap_or(0)));
        let info = BlockInfo {
            min_ended: ends.clone().min().unwrap_or(0),
            max_ended: ends.max().unwrap_or(0),
        };
        st.index.blocks.insert(seq, info);
        Ok(())
    }

    pub(super) fn read_block_entries(&self, seq: u64) -> Result<Vec<BlockEntry>, StoreError> {
        let key = seq.to_be_bytes();
        match self.blocks.get(key)? {
            None => Ok(Vec::new()),
            Some(raw) => decode_block(&raw).map_err(|reason| StoreError::Corrupt {
                tree: TREE_BLOCKS,
                key: seq.to_string(),
                reason,
            }),
        }
    }

    pub(super) fn read_block(&self, seq: u64) -> Result<Vec<InstanceRecord>, StoreError> {
        self.read_block_entries(seq)?
            .into_iter()
            .map(|e| self.record_of(e.started_at_ms, e.cgroup_id, e.record, TREE_BLOCKS))
            .collect()
    }

    pub fn instance(
        &self,
        function: &str,
        started_at_ms: u64,
        cgroup_id: u64,
    ) -> Result<Option<InstanceRecord>, StoreError> {
        validate_name(function)?;
        let key = log_key(started_at_ms, cgroup_id);
        for tree in [&self.live_tree, &self.tail] {
            if let Some(raw) = tree.get(key)? {
                let rec = self.decode_instance(&key, &raw)?;
                return Ok((rec.function == function).then_some(rec));
            }
        }
        let st = self.state();
        let Some(seq) = st
            .model
            .stored_at(function, (started_at_ms, cgroup_id))
            .and_then(BlockId::seq)
        else {
            return Ok(None);
        };
        drop(st);
        Ok(self
            .read_block(seq)?
            .into_iter()
            .find(|r| r.started_at_ms == started_at_ms && r.cgroup_id == cgroup_id))
    }

    /// All retained instances of `function`, oldest first (by start time, then cgroup id).
    /// Reads the whole history: for tests and tools; the API reads pages.
    pub fn instances(&self, function: &str) -> Result<Vec<InstanceRecord>, StoreError> {
        let q = PageQuery {
            limit: usize::MAX - 1,
            ..PageQuery::default()
        };
        Ok(self.instances_page(function, &q)?.records)
    }

    /// One page of the retained instances of `function` ([`PageQuery`]). The model says which
    /// records they are and where; each block holding some is read once, nothing else is.
    pub fn instances_page(
        &self,
        function: &str,
        q: &PageQuery,
    ) -> Result<InstancesPage, StoreError> {
        validate_name(function)?;
        let limit = q.limit.max(1);
        let st = self.state();
        // One key more than asked for says whether a next page exists.
        let mut keys = st.model.instance_keys_page(
            function,
            q.live,
            q.order,
            q.after,
            limit.saturating_add(1),
        );
        let next = (keys.len() > limit).then(|| keys[limit - 1]);
        keys.truncate(limit);
        // The block of each ended record that is in one (else it is read by key).
        let located: Vec<(InstanceKey, Option<u64>)> = keys
            .iter()
            .map(|k| (*k, st.model.stored_at(function, *k).and_then(BlockId::seq)))
            .collect();
        drop(st);
        let mut blocks: HashMap<u64, HashMap<InstanceKey, InstanceRecord>> = HashMap::new();
        let mut records = Vec::with_capacity(located.len());
        for (key, block) in located {
            match block {
                Some(b) => {
                    if let std::collections::hash_map::Entry::Vacant(slot) = blocks.entry(b) {
                        let recs = self.read_block(b)?;
                        slot.insert(
                            recs.into_iter()
                                .map(|r| ((r.started_at_ms, r.cgroup_id), r))
                                .collect(),
                        );
                    }
                    if let Some(r) = blocks.get_mut(&b).and_then(|m| m.remove(&key)) {
                        records.push(r);
                    }
                }
                None => {
                    if let Some(r) = self.instance(function, key.0, key.1)? {
                        records.push(r);
                    }
                }
            }
        }
        Ok(InstancesPage { records, next })
    }

    /// The newest live instance of `function` named `instance`, from the function's live
    /// records only (the model knows which they are): no history is read.
    pub fn live_instance(
        &self,
        function: &str,
        instance: &str,
    ) -> Result<Option<InstanceRecord>, StoreError> {
        validate_name(function)?;
        let keys = self.state().model.live_keys_of(function);
        for (started, cgroup) in keys.into_iter().rev() {
            if let Some(rec) = self.instance(function, started, cgroup)? {
                if rec.instance == instance && rec.is_live() {
                    return Ok(Some(rec));
                }
            }
        }
        Ok(None)
    }

    /// Instances of every function that have not ended, by function then start. After a
    /// restart the agent checks these against the cgroups that still exist.
    pub fn live_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let keys = self.state().model.live_keys();
        let mut out = Vec::with_capacity(keys.len());
        for (function, (started, cgroup)) in keys {
            if let Some(rec) = self.instance(&function, started, cgroup)? {
                out.push(rec);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::store::test_util::*;
    use crate::store::*;
    use std::collections::*;
    use std::time::Duration;

    #[test]
    fn put_instance_upserts() {
        let (_d, s) = open_tmp();
        let mut r = rec("f", 1000, 7);
        s.put_instance(&r).unwrap();
        assert_eq!(s.instance("f", 1000, 7).unwrap(), Some(r.clone()));
        r.peak_bytes = 5 * MIB;
        r.ended_at_ms = Some(2000);
        r.peak_source = PeakSource::KernelWatermark;
        s.put_instance(&r).unwrap();
        assert_eq!(s.instance("f", 1000, 7).unwrap(), Some(r.clone()));
        assert_eq!(s.instances("f").unwrap(), vec![r]);
        // Same cgroup id, other start time: a different instance (inode reuse).
        assert_eq!(s.instance("f", 1001, 7).unwrap(), None);
        assert_eq!(s.instance("g", 1000, 7).unwrap(), None);
    }

    #[test]
    fn instances_are_oldest_first_and_per_function() {
        let (_d, s) = open_tmp();
        // Inserted out of order; start times straddle a byte boundary to check BE encoding.
        for (t, c) in [(300, 1), (1, 9), (256, 2), (300, 0), (u64::MAX, 3)] {
            s.put_instance(&rec("f", t, c)).unwrap();
        }
        s.put_instance(&rec("fa", 2, 2)).unwrap();
        s.put_instance(&rec("e", 2, 4)).unwrap();
        let got: Vec<(u64, u64)> = s
            .instances("f")
            .unwrap()
            .iter()
            .map(|r| (r.started_at_ms, r.cgroup_id))
            .collect();
        assert_eq!(
            got,
            vec![(1, 9), (256, 2), (300, 0), (300, 1), (u64::MAX, 3)]
        );
        assert_eq!(s.instances("fa").unwrap().len(), 1);
        assert!(s.instances("nope").unwrap().is_empty());
    }

    /// Pages in both orders hold every record once, in key order, while instances end and
    /// start between the pages; sealed blocks, the tail and live records alike.
    #[test]
    fn pages_are_stable_while_instances_start_and_end() {
        let (_d, s) = open_tmp();
        let mut live: Vec<InstanceRecord> = Vec::new();
        // 300 records, every 7th live: more than two blocks are sealed.
        for i in 0..300u64 {
            let mut r = rec("f", 1_000 + i * 10, 1 + i % 5);
            if i % 7 != 0 {
                r.ended_at_ms = Some(r.started_at_ms + 5);
                s.put_instance(&r).unwrap();
            } else {
                s.put_instance(&r).unwrap();
                live.push(r);
            }
            // Another function's records in between change nothing.
            s.put_instance(&rec("g", 1_000 + i * 10, 9)).unwrap();
        }
        let keys = |recs: &[InstanceRecord]| -> Vec<(u64, u64)> {
            recs.iter()
                .map(|r| (r.started_at_ms, r.cgroup_id))
                .collect()
        };
        let mut added: Vec<(u64, u64)> = Vec::new();
        for order in [Order::Oldest, Order::Newest] {
            let before = keys(&s.instances("f").unwrap());
            assert!(before.len() >= 300);
            let mut seen: Vec<(u64, u64)> = Vec::new();
            let mut after = None;
            let first_added = added.len();
            loop {
                let q = PageQuery {
                    live: None,
                    order,
                    after,
                    limit: 7,
                };
                let page = s.instances_page("f", &q).unwrap();
                assert!(page.records.len() <= 7);
                seen.extend(keys(&page.records));
                // Between pages: one live instance ends, a new one starts.
                if let Some(mut r) = live.pop() {
                    r.ended_at_ms = Some(r.started_at_ms + 1);
                    s.put_instance(&r).unwrap();
                }
                let new = rec("f", 100_000 + added.len() as u64, 1);
                added.push((new.started_at_ms, new.cgroup_id));
                s.put_instance(&new).unwrap();
                match page.next {
                    Some(k) => after = Some(k),
                    None => break,
                }
            }
            let mut expected = before.clone();
            match order {
                // Oldest first reaches those that started meanwhile, at the end: all but the
                // one started after the last page.
                Order::Oldest => expected.extend(&added[first_added..added.len() - 1]),
                // Newest first never sees them: they sort before its first page.
                Order::Newest => expected.reverse(),
            }
            assert_eq!(seen, expected, "{order:?}");
        }
        // Only live ones, newest first, in pages of 2.
        let mut live_now = keys(&s.instances("f").unwrap());
        let all = s.instances("f").unwrap();
        live_now.retain(|k| {
            all.iter()
                .any(|r| (r.started_at_ms, r.cgroup_id) == *k && r.is_live())
        });
        live_now.reverse();
        assert!(live_now.len() > 2);
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let q = PageQuery {
                live: Some(true),
                order: Order::Newest,
                after,
                limit: 2,
            };
            let page = s.instances_page("f", &q).unwrap();
            assert!(page.records.iter().all(InstanceRecord::is_live));
            seen.extend(keys(&page.records));
            match page.next {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        assert_eq!(seen, live_now);
    }

    #[test]
    fn a_live_instance_is_found_by_name_without_the_history() {
        let (_d, s) = open_tmp();
        let mut old = rec("f", 10, 1);
        old.instance = "web-1".into();
        old.ended_at_ms = Some(20);
        s.put_instance(&old).unwrap();
        let mut now = rec("f", 30, 2);
        now.instance = "web-1".into();
        s.put_instance(&now).unwrap();
        s.put_instance(&rec("f", 40, 3)).unwrap();
        assert_eq!(s.live_instance("f", "web-1").unwrap(), Some(now.clone()));
        assert_eq!(s.live_instance("f", "web-2").unwrap(), None);
        assert_eq!(s.live_instance("g", "web-1").unwrap(), None);
        now.ended_at_ms = Some(50);
        s.put_instance(&now).unwrap();
        assert_eq!(s.live_instance("f", "web-1").unwrap(), None);
        assert!(matches!(
            s.live_instance("", "x"),
            Err(StoreError::InvalidName { .. })
        ));
    }

    #[test]
    fn live_instances_across_functions() {
        let (_d, s) = open_tmp();
        let mut ended = rec("a", 10, 1);
        ended.ended_at_ms = Some(20);
        s.put_instance(&ended).unwrap();
        s.put_instance(&rec("a", 11, 2)).unwrap();
        s.put_instance(&rec("b", 5, 3)).unwrap();
        let live: Vec<(String, u64)> = s
            .live_instances()
            .unwrap()
            .into_iter()
            .map(|r| (r.function, r.cgroup_id))
            .collect();
        assert_eq!(live, vec![("a".to_string(), 2), ("b".to_string(), 3)]);
    }

    /// Several blocks' worth of instances of three functions, ending out of order: sealed
    /// into blocks as they end; reads, a rewrite of a sealed record, an open after a crash
    /// and one from the checkpoint, and pruning across blocks all agree with what was written.
    #[test]
    fn blocks_hold_ended_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let s = Store::open(&path).unwrap();
        let mut written: BTreeMap<(u64, u64), InstanceRecord> = BTreeMap::new();
        let n = 3 * BLOCK_RECORDS as u64 + 17;
        for i in 0..n {
            let f = ["a", "b", "c"][(i % 3) as usize];
            let mut r = rec(f, 1_000 + i * 10, i);
            r.execs = i % 4;
            // Kernel counts on some (the live version counted less than the final one).
            (r.connections, r.requests) = (i % 5, i % 5 * 3);
            s.put_instance(&r).unwrap();
            r.peak_bytes = (i + 1) * MIB;
            if i % 5 != 0 {
                (r.connections, r.requests) = (i % 5 + 1, i % 5 * 3 + 2);
            }
            if i % 7 != 0 {
                r.ended_at_ms = Some(r.started_at_ms + 5 + (i % 3) * 1_000);
                r.oom_kills = u64::from(i % 11 == 0);
                r.limits.max_bytes = Some(512 * MIB);
            }
            s.put_instance(&r).unwrap();
            written.insert((r.started_at_ms, r.cgroup_id), r);
        }
        assert!(s.state().index.blocks.len() >= 2, "nothing was sealed");
        let check = |s: &Store, written: &BTreeMap<(u64, u64), InstanceRecord>| {
            for f in ["a", "b", "c"] {
                let expected: Vec<InstanceRecord> = written
                    .values()
                    .filter(|r| r.function == f)
                    .cloned()
                    .collect();
                assert_eq!(s.instances(f).unwrap(), expected, "instances of {f}");
                let summary = s.function(f).unwrap().unwrap();
                assert_eq!(summary.instances, expected.len() as u64);
                assert_eq!(
                    summary.oom_kills,
                    expected.iter().map(|r| r.oom_kills).sum::<u64>()
                );
                assert_eq!(summary.execs, expected.iter().map(|r| r.execs).sum::<u64>());
                assert_eq!(
                    (summary.connections, summary.requests),
                    (
                        expected.iter().map(|r| r.connections).sum::<u64>(),
                        expected.iter().map(|r| r.requests).sum::<u64>()
                    ),
                    "kernel counts of {f}"
                );
            }
        };
        check(&s, &written);
        // A sealed record written again (its peak corrected): counted once, read back new.
        let (k, mut first) = written
            .iter()
            .find(|(_, r)| !r.is_live())
            .map(|(k, r)| (*k, r.clone()))
            .unwrap();
        assert_ne!(
            s.state().model.stored_at(&first.function, k),
            Some(BlockId::TAIL)
        );
        first.peak_bytes = 999 * MIB;
        first.execs = 7;
        first.requests += 1_000;
        s.put_instance(&first).unwrap();
        written.insert(k, first.clone());
        check(&s, &written);
        // The newest few ended ones of a function, read without the rest.
        let ended_a: Vec<InstanceRecord> = written
            .values()
            .filter(|r| r.function == "a" && !r.is_live())
            .cloned()
            .collect();
        assert_eq!(
            s.instances_page(
                "a",
                &PageQuery {
                    live: Some(false),
                    order: Order::Newest,
                    after: None,
                    limit: 5
                }
            )
            .unwrap()
            .records,
            ended_a[ended_a.len() - 5..]
                .iter()
                .rev()
                .cloned()
                .collect::<Vec<_>>()
        );
        let summaries = s.functions().unwrap();
        drop(s);
        // After a crash (no checkpoint): rebuilt from blocks, tail and live records.
        let s = Store::open(&path).unwrap();
        assert!(!s.opened_from_checkpoint());
        check(&s, &written);
        assert_eq!(s.functions().unwrap(), summaries);
        s.checkpoint().unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert!(s.opened_from_checkpoint());
        check(&s, &written);
        // Pruning with a cutoff in the middle of the blocks.
        let cutoff = 1_000 + (3 * n / 4) * 10;
        let now = cutoff + 1_000_000;
        let report = s.prune(now, Duration::from_millis(1_000_000)).unwrap();
        let before = written.len();
        written.retain(|_, r| r.ended_at_ms.is_none_or(|e| e >= cutoff));
        assert_eq!(report.instances_removed, (before - written.len()) as u64);
        assert!(report.instances_removed > BLOCK_RECORDS as u64);
        check(&s, &written);
        drop(s);
        let s = Store::open(&path).unwrap();
        check(&s, &written);
    }
}
