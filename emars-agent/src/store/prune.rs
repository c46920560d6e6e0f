//! Retention: ended instances, hour buckets, logs, forgotten functions and the strings
//! nothing retained names any more.
//!
//! Strings go with retention: [`Store::prune`] removes a string once no known function has
//! that name, no live record names it, and every ended record naming it ended before the
//! cutoff (the index keeps each string's latest such end), so the records that used it are
//! gone. It takes the string out of the in-memory map first (a new record naming that text
//! gets a new id), flushes sled, so that the records' removal is durable, and only then
//! removes it from `strings`: a crash at any point leaves no record naming a missing id (at
//! worst a string with no record, removed by the next prune).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use crate::model::live::InstanceKey;
use crate::model::{InstanceRecord, HOUR_MS};

use super::codec::{decode_instance_value, hour_block_key, hour_log_key, log_key, BlockEntry};
use super::index::{BlockInfo, State};
use super::{Store, StoreError, TREE_BLOCKS};

/// What [`Store::prune`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PruneReport {
    pub instances_removed: u64,
    pub hours_removed: u64,
    /// Audit records older than the retention.
    pub audit_removed: u64,
    /// Generations older than the retention (the newest one is always kept: it carries the
    /// period across restarts).
    pub generations_removed: u64,
    /// Functions with nothing retained and not seen within the retention.
    pub functions_removed: u64,
    /// Interned names and parent paths no retained record, live instance or function uses.
    pub strings_removed: u64,
}

impl Store {
    /// Deletes ended instances with `ended_at_ms < now_ms - retention` and hour buckets whose
    /// whole hour lies before that cutoff, then functions with nothing retained that were last
    /// seen before it. Live instances are never deleted. Whole blocks go without being read
    /// (except to take their records out of the model); only a block that straddles the
    /// cutoff is rewritten. Then the strings nothing retained names any more go (see the
    /// module's doc for the order that keeps a crash harmless).
    pub fn prune(&self, now_ms: u64, retention: Duration) -> Result<PruneReport, StoreError> {
        let _changed = self.changing();
        let (mut report, retired) = self.prune_retained(now_ms, retention)?;
        report.strings_removed = self.remove_strings(&retired)?;
        Ok(report)
    }

    /// Everything [`Store::prune`] does before the strings leave the disk; returns the ids of
    /// those taken out of memory.
    pub(super) fn prune_retained(
        &self,
        now_ms: u64,
        retention: Duration,
    ) -> Result<(PruneReport, Vec<u32>), StoreError> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(retention_ms);
        let mut report = PruneReport::default();

        // Held throughout: a concurrent put_instance waits, and its write then stands.
        let mut st = self.state();
        let mut gone: HashMap<String, Vec<InstanceRecord>> = HashMap::new();
        let old_blocks: Vec<(u64, BlockInfo)> = st
            .index
            .blocks
            .iter()
            .filter(|(_, b)| b.min_ended < cutoff)
            .map(|(s, b)| (*s, *b))
            .collect();
        for (seq, _) in old_blocks {
            let entries = self.read_block_entries(seq)?;
            let (old, kept): (Vec<BlockEntry>, Vec<BlockEntry>) =
                entries.into_iter().partition(|e| {
                    e.started_at_ms.saturating_add(e.record.ran_ms.unwrap_or(0)) < cutoff
                });
            for e in old {
                let rec = self.record_of(e.started_at_ms, e.cgroup_id, e.record, TREE_BLOCKS)?;
                gone.entry(rec.function.clone()).or_default().push(rec);
            }
            self.write_block(&mut st, seq, &kept)?;
        }
        let tail_keys: Vec<InstanceKey> = st.index.tail.keys().copied().collect();
        for ikey in tail_keys {
            let key = log_key(ikey.0, ikey.1);
            let Some(raw) = self.tail.get(key)? else {
                continue;
            };
            let Ok(rec) = self.decode_instance(&key, &raw) else {
                continue;
            };
            if matches!(rec.ended_at_ms, Some(end) if end < cutoff) {
                self.tail.remove(key)?;
                st.index.tail.remove(&ikey);
                gone.entry(rec.function.clone()).or_default().push(rec);
            }
        }
        for (function, recs) in &gone {
            report.instances_removed += recs.len() as u64;
            st.model.remove_instances(function, recs);
        }

        // Hours entirely before the cutoff: the open ones by key, the sealed ones by block.
        let last_old_hour = cutoff.checked_sub(HOUR_MS).map(|c| c - c % HOUR_MS);
        if let Some(last_old) = last_old_hour {
            let open: Vec<(u64, u32)> = st
                .index
                .open_hours
                .range(..=(last_old, u32::MAX))
                .copied()
                .collect();
            for (hour, id) in open {
                self.hours_open.remove(hour_log_key(hour, id))?;
                st.index.open_hours.remove(&(hour, id));
            }
            let sealed: Vec<u64> = st.index.sealed_hours.range(..=last_old).copied().collect();
            for hour in sealed {
                self.hour_blocks.remove(hour_block_key(hour))?;
                st.index.sealed_hours.remove(&hour);
            }
            for (function, hour) in st.model.hours_before(last_old + 1) {
                st.model.remove_hour(&function, hour);
                report.hours_removed += 1;
            }
        }

        self.prune_logs(cutoff, &mut report)?;

        for name in st.model.forgotten(cutoff) {
            self.functions.remove(name.as_bytes())?;
            st.model.remove_function(&name);
            self.cap().admitted.remove(&name);
            report.functions_removed += 1;
        }
        // Last-seen times and sizes move with every event and are written here and at
        // checkpoints only; an open after a crash takes the later of these and the records'.
        for name in st.model.names() {
            self.write_function(&st.model, &name)?;
        }
        let retired = self.retire_strings(&mut st, cutoff)?;
        Ok((report, retired))
    }

    /// Takes the strings nothing retained uses out of the in-memory map (with the state held,
    /// so no write in between can name them): known functions' names, strings of live records,
    /// and strings of ended records that ended at or after `cutoff` stay. A record written
    /// from now on with one of these texts gets a new id. Returns the ids to remove.
    pub(super) fn retire_strings(
        &self,
        st: &mut State,
        cutoff: u64,
    ) -> Result<Vec<u32>, StoreError> {
        let mut live: HashSet<u32> = HashSet::new();
        for item in self.live_tree.iter() {
            let (_, raw) = item?;
            // One that does not decode names nothing this store can read.
            if let Ok(r) = decode_instance_value(&raw) {
                live.extend([r.function, r.parent]);
            }
        }
        live.extend(st.index.open_hours.iter().map(|(_, id)| *id));
        let mut strings = self.strings();
        let unused: Vec<u32> = strings
            .by_id
            .iter()
            .filter(|(id, text)| {
                !live.contains(id)
                    && !st.model.contains(text)
                    && st.index.string_ends.get(id).is_none_or(|end| *end < cutoff)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &unused {
            st.index.string_ends.remove(id);
            let Some(text) = strings.by_id.get(id).cloned() else {
                continue;
            };
            // Two ids may carry one text (one retired before a crash): keep the other's entry.
            if strings.ids.get(&text) == Some(id) {
                strings.ids.remove(&text);
            }
        }
        Ok(unused)
    }

    /// Removes retired strings from `strings`, after a flush: the removal of every record that
    /// named them is durable first, so a crash never leaves a record naming a missing id.
    pub(super) fn remove_strings(&self, ids: &[u32]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.db.flush()?;
        for id in ids {
            self.strings_tree.remove(id.to_be_bytes())?;
        }
        let mut strings = self.strings();
        for id in ids {
            strings.by_id.remove(id);
        }
        Ok(ids.len() as u64)
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
    fn prune_keeps_live_and_recent() {
        let (_d, s) = open_tmp();
        let day = 24 * HOUR_MS;
        // Half past the hour, so the cutoff falls inside an hour bucket.
        let now = 10 * day + HOUR_MS / 2;
        let retention = Duration::from_millis(2 * day);
        let cutoff = now - 2 * day;
        let cutoff_hour = cutoff - cutoff % HOUR_MS;

        let mut old = rec("f", 0, 1);
        old.ended_at_ms = Some(cutoff - 1);
        let mut at_cutoff = rec("f", 1, 2);
        at_cutoff.ended_at_ms = Some(cutoff);
        let old_live = rec("f", 2, 3); // started long ago, still running
        let mut recent = rec("f", cutoff + 5, 4);
        recent.ended_at_ms = Some(now - 1);
        for r in [&old, &at_cutoff, &old_live, &recent] {
            s.put_instance(r).unwrap();
        }
        let one = HourDelta {
            execs: 1,
            ..HourDelta::default()
        };
        s.add_hour("f", 0, one).unwrap(); // old
        s.add_hour("f", cutoff_hour - 1, one).unwrap(); // the hour before the cutoff: old
        s.add_hour("f", cutoff_hour, one).unwrap(); // contains the cutoff: partly recent, kept
        s.add_hour("f", now, one).unwrap();

        let report = s.prune(now, retention).unwrap();
        assert_eq!(report.instances_removed, 1);
        assert_eq!(report.hours_removed, 2);
        let left: Vec<u64> = s
            .instances("f")
            .unwrap()
            .iter()
            .map(|r| r.cgroup_id)
            .collect();
        assert_eq!(left, vec![2, 3, 4]);
        let hours: Vec<u64> = s
            .hours("f")
            .unwrap()
            .iter()
            .map(|h| h.hour_start_ms)
            .collect();
        assert_eq!(hours, vec![cutoff_hour, now - HOUR_MS / 2]);
        // The function itself stays known (it has retained data); a second prune finds
        // nothing.
        assert_eq!(s.function_names().unwrap(), vec!["f"]);
        assert_eq!(s.prune(now, retention).unwrap(), PruneReport::default());
        // A retention longer than all time removes nothing.
        assert_eq!(
            s.prune(now, Duration::from_secs(u64::MAX)).unwrap(),
            PruneReport::default()
        );
    }

    #[test]
    fn prune_forgets_functions_and_generations_past_retention() {
        let (_d, s) = open_tmp();
        let day = 24 * HOUR_MS;
        let now = 30 * day;
        let retention = Duration::from_millis(7 * day);
        let mut gone = rec("gone", day, 1);
        gone.ended_at_ms = Some(day + 10);
        s.put_instance(&gone).unwrap();
        s.add_invocations("gone", 3, day).unwrap();
        let mut kept = rec("kept", now - day, 2);
        kept.ended_at_ms = Some(now - day + 10);
        s.put_instance(&kept).unwrap();
        for at in [day, 2 * day, now - day] {
            s.append_generation(at, &at).unwrap();
        }
        let r = s.prune(now, retention).unwrap();
        assert_eq!((r.functions_removed, r.generations_removed), (1, 2));
        assert_eq!(s.function_names().unwrap(), vec!["kept"]);
        assert_eq!(s.function("gone").unwrap(), None);
        assert_eq!(s.generations::<u64>(10).unwrap(), vec![now - day]);
        // The newest generation stays even when it is old: it carries the period.
        let r = s.prune(now + 30 * day, retention).unwrap();
        assert_eq!(r.generations_removed, 0);
        assert_eq!(s.generations::<u64>(10).unwrap(), vec![now - day]);
    }

    /// Strings go with the records that named them: a pruned function's name and every
    /// per-pod parent path of its instances leave `strings`, on disk and in memory, while those
    /// of retained records, live instances and known functions stay; the store reopens (after
    /// a crash and from its checkpoint) with every retained record readable, and a name seen
    /// again gets a string of its own.
    #[test]
    fn strings_go_with_retention() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let s = Store::open(&path).unwrap();
        let day = 24 * HOUR_MS;
        // "old": 300 instances (blocks and tail), each in a pod of its own, ended on day 1.
        for i in 0..300 {
            s.put_instance(&pod_rec("old", i, day + i, None)).unwrap();
            s.put_instance(&pod_rec("old", i, day + i, Some(day + i + 10)))
                .unwrap();
        }
        // "kept" ended on day 9; "running" started on day 1 and runs; "reported": invocations.
        for i in 300..310 {
            let start = 9 * day + i;
            s.put_instance(&pod_rec("kept", i, start, Some(start + 10)))
                .unwrap();
        }
        s.put_instance(&pod_rec("running", 400, day, None)).unwrap();
        s.add_invocations("reported", 3, 9 * day).unwrap();
        assert_eq!(stored_strings(&s).len(), 4 + 311);
        assert_eq!(s.footprint().strings, 315);

        let r = s.prune(10 * day, Duration::from_millis(5 * day)).unwrap();
        assert_eq!((r.instances_removed, r.functions_removed), (300, 1));
        assert_eq!(r.strings_removed, 301);
        let mut expected: BTreeSet<String> =
            ["kept", "running", "reported"].map(String::from).into();
        expected.extend(
            (300..310)
                .chain([400])
                .map(|i| format!("/sys/fs/cgroup/kubepods/pod-{i}")),
        );
        assert_eq!(stored_strings(&s), expected);
        assert_eq!(s.footprint().strings, expected.len() as u64);
        // The name again, in a pod path seen before: new strings, read back as written.
        let again = pod_rec("old", 7, 10 * day, None);
        s.put_instance(&again).unwrap();
        assert_eq!(s.instances("old").unwrap(), vec![again.clone()]);
        expected.extend(["old".to_string(), "/sys/fs/cgroup/kubepods/pod-7".into()]);
        assert_eq!(stored_strings(&s), expected);
        let kept = s.instances("kept").unwrap();
        assert_eq!(kept.len(), 10);
        drop(s);

        // After a crash: rebuilt from the records, none of which names a missing string.
        let s = Store::open(&path).unwrap();
        assert!(!s.opened_from_checkpoint());
        assert_eq!(s.corrupt_at_open(), 0);
        assert_eq!(s.instances("kept").unwrap(), kept);
        assert_eq!(s.instances("old").unwrap(), vec![again.clone()]);
        assert_eq!(s.instances("running").unwrap().len(), 1);
        let r = s.prune(10 * day, Duration::from_millis(5 * day)).unwrap();
        assert_eq!(r.strings_removed, 0);
        s.checkpoint().unwrap();
        drop(s);
        // From the checkpoint: the same; a later prune takes "kept" and its pods, and
        // "reported", once they are before the cutoff, and keeps the live ones'.
        let s = Store::open(&path).unwrap();
        assert!(s.opened_from_checkpoint());
        assert_eq!(s.instances("kept").unwrap(), kept);
        let r = s.prune(20 * day, Duration::from_millis(5 * day)).unwrap();
        assert_eq!(r.strings_removed, 12, "{:?}", stored_strings(&s));
        let left: BTreeSet<String> = [
            "running",
            "old",
            "/sys/fs/cgroup/kubepods/pod-400",
            "/sys/fs/cgroup/kubepods/pod-7",
        ]
        .map(String::from)
        .into();
        assert_eq!(stored_strings(&s), left);
    }

    /// A prune cut short after the strings left memory but before they left the disk (a crash
    /// then) leaves strings no record names, never a record naming a missing string: the store
    /// reopens whole, and the next prune removes them.
    #[test]
    fn strings_retired_before_a_crash_go_at_the_next_prune() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let day = 24 * HOUR_MS;
        let kept = pod_rec("kept", 2, 9 * day, Some(9 * day + 5));
        {
            let s = Store::open(&path).unwrap();
            s.put_instance(&pod_rec("old", 1, day, Some(day + 5)))
                .unwrap();
            s.put_instance(&kept).unwrap();
            let (_, retired) = s
                .prune_retained(10 * day, Duration::from_millis(5 * day))
                .unwrap();
            assert_eq!(retired.len(), 2);
            // Written meanwhile under the retired text: a new id, not the retired one.
            s.put_instance(&pod_rec("old", 3, 10 * day, None)).unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.corrupt_at_open(), 0);
        assert_eq!(s.instances("kept").unwrap(), vec![kept]);
        assert_eq!(s.instances("old").unwrap().len(), 1);
        let olds = s
            .raw_tree(TREE_STRINGS)
            .iter()
            .values()
            .filter(|v| v.as_ref().unwrap().as_ref() == b"old")
            .count();
        assert_eq!(olds, 2, "the retired string and the new one");
        let r = s.prune(10 * day, Duration::from_millis(5 * day)).unwrap();
        // The retired pod path goes; "old" is a known function's name again, so both of its
        // strings stay until it is pruned.
        assert_eq!(r.strings_removed, 1);
        assert!(!stored_strings(&s).contains("/sys/fs/cgroup/kubepods/pod-1"));
        assert_eq!(s.instances("old").unwrap().len(), 1);
    }
}
