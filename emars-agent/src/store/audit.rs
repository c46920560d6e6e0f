//! The audit and generation logs (`audit`, `audit_pending`, `generations`) and the audit's
//! write-ahead [`journal`](super::journal): durable intents, outcomes, interrupted writes
//! closed at start-up, and their retention. The records themselves are opaque here (any
//! `Serialize` type, stored as JSON).

use std::sync::MutexGuard;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::codec::{decode_json, encode_json, u64_of};
use super::prune::PruneReport;
use super::{journal, Store, StoreError, TREE_AUDIT, TREE_GENERATIONS};

/// The audit journal is emptied (after a flush of sled) once it holds this much.
pub(super) const JOURNAL_SETTLE_BYTES: u64 = journal::CAPACITY / 2;

/// Key of a log record (audit, generations): `at_ms` (u64 BE) · sequence (u64 BE).
pub type AuditKey = [u8; 16];

pub(super) fn journal_error(journal: &journal::Journal, source: std::io::Error) -> StoreError {
    StoreError::Journal {
        path: journal.path().to_path_buf(),
        source,
    }
}

pub(super) fn read_log<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    limit: usize,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for item in tree.iter().rev().take(limit) {
        let (k, v) = item?;
        let at = k.get(..8).map(u64_of);
        out.push(decode_json(name, &format!("{}", at.unwrap_or(0)), &v)?);
    }
    Ok(out)
}

impl Store {
    /// Appends an audit record that needs no durability of its own (a refusal: nothing was
    /// written); it reaches the disk with the next flush (the agent flushes once a second).
    pub fn append_audit<T: Serialize>(&self, at_ms: u64, rec: &T) -> Result<AuditKey, StoreError> {
        self.append_log(&self.audit, TREE_AUDIT, at_ms, rec)
    }

    /// Records the intent of a limit write and returns only once it is on disk, so that no
    /// write can happen that the audit does not show, even after `kill -9`: the record goes to
    /// sled and, durably, to the audit journal (one `O_DSYNC` write, not a flush of sled).
    /// Until [`Store::complete_audit`] replaces it, the record is also listed as pending, and a
    /// restarted agent marks it as interrupted ([`Store::close_interrupted_audit`]).
    pub fn append_audit_durable<T: Serialize>(
        &self,
        at_ms: u64,
        rec: &T,
    ) -> Result<AuditKey, StoreError> {
        let mut journal = self.journal();
        let key = self.append_audit(at_ms, rec)?;
        self.audit_pending.insert(key, &[])?;
        let value = encode_json(TREE_AUDIT, &key, rec)?;
        if let Err(e) = journal.append(&journal::Entry::new(&key, true, &value)) {
            // Not durable, so the write will not happen: the record must not claim it might
            // have (best effort; the disk is failing).
            let _ = self.audit.remove(key);
            let _ = self.audit_pending.remove(key);
            return Err(journal_error(&journal, e));
        }
        self.settle_if_large(&mut journal)?;
        Ok(key)
    }

    /// Replaces an audit record appended with [`Store::append_audit`] by its outcome (made
    /// durable with the store's next flush, like the record it replaces).
    pub fn update_audit<T: Serialize>(&self, key: &AuditKey, rec: &T) -> Result<(), StoreError> {
        let value = encode_json(TREE_AUDIT, key, rec)?;
        self.audit.insert(key, value.as_slice())?;
        Ok(())
    }

    /// Replaces a pending audit record by its outcome, durably (journal).
    pub fn complete_audit<T: Serialize>(&self, key: &AuditKey, rec: &T) -> Result<(), StoreError> {
        let mut journal = self.journal();
        let value = encode_json(TREE_AUDIT, key, rec)?;
        self.audit.insert(key, value.as_slice())?;
        self.audit_pending.remove(key)?;
        journal
            .append(&journal::Entry::new(key, false, &value))
            .map_err(|source| journal_error(&journal, source))?;
        Ok(())
    }

    pub(super) fn settle_if_large(&self, journal: &mut journal::Journal) -> Result<(), StoreError> {
        if journal.bytes < JOURNAL_SETTLE_BYTES {
            return Ok(());
        }
        self.db.flush()?;
        journal
            .reset()
            .map_err(|source| journal_error(journal, source))
    }

    /// At open: the journal's records into the `audit` tree (what sled lost in a crash comes
    /// back, pending or complete as the journal last said), then flushed and the journal
    /// emptied.
    pub(super) fn replay_journal(&self, entries: Vec<journal::Entry>) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in &entries {
            let Some(key) = e.key_bytes() else {
                continue;
            };
            self.audit.insert(key, e.value.as_bytes())?;
            if e.pending {
                self.audit_pending.insert(key, &[])?;
            } else {
                self.audit_pending.remove(key)?;
            }
        }
        self.db.flush()?;
        let mut journal = self.journal();
        journal
            .reset()
            .map_err(|source| journal_error(&journal, source))?;
        tracing::info!("{} audit journal entries replayed", entries.len());
        Ok(())
    }

    pub(super) fn journal(&self) -> MutexGuard<'_, journal::Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// At start-up: every audit record still pending (the agent stopped between intent and
    /// outcome) is passed to `close`, which says what is known now, and is no longer pending.
    /// Returns how many there were.
    pub fn close_interrupted_audit<T, F>(&self, mut close: F) -> Result<u64, StoreError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(T) -> T,
    {
        let mut n = 0;
        for item in self.audit_pending.iter() {
            let (key, _) = item?;
            if let Some(raw) = self.audit.get(&key)? {
                let rec: T = decode_json(TREE_AUDIT, &format!("{key:?}"), &raw)?;
                self.audit
                    .insert(&key, encode_json(TREE_AUDIT, &key, &close(rec))?)?;
                n += 1;
            }
            self.audit_pending.remove(&key)?;
        }
        if n > 0 {
            self.db.flush()?;
        }
        Ok(n)
    }

    /// The newest `limit` audit records, newest first.
    pub fn audit<T: DeserializeOwned>(&self, limit: usize) -> Result<Vec<T>, StoreError> {
        read_log(&self.audit, TREE_AUDIT, limit)
    }

    /// Appends a generated per-function config; every generation is kept.
    pub fn append_generation<T: Serialize>(&self, at_ms: u64, gen: &T) -> Result<(), StoreError> {
        self.append_log(&self.generations, TREE_GENERATIONS, at_ms, gen)
            .map(drop)
    }

    /// The newest `limit` generations, newest first.
    pub fn generations<T: DeserializeOwned>(&self, limit: usize) -> Result<Vec<T>, StoreError> {
        read_log(&self.generations, TREE_GENERATIONS, limit)
    }

    pub(super) fn append_log<T: Serialize>(
        &self,
        tree: &sled::Tree,
        name: &'static str,
        at_ms: u64,
        rec: &T,
    ) -> Result<AuditKey, StoreError> {
        // The sequence number keeps two records of the same millisecond apart.
        let seq = self.db.generate_id()?;
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&at_ms.to_be_bytes());
        key[8..].copy_from_slice(&seq.to_be_bytes());
        let value = encode_json(name, &key, rec)?;
        tree.insert(key, value)?;
        Ok(key)
    }

    /// Audit records and generations before `cutoff` (the newest generation is kept: it
    /// carries the period across restarts).
    pub(super) fn prune_logs(
        &self,
        cutoff: u64,
        report: &mut PruneReport,
    ) -> Result<(), StoreError> {
        // Audit keys start with at_ms (BE): everything before the cutoff is one range.
        let old: Vec<_> = self
            .audit
            .range(..cutoff.to_be_bytes().to_vec())
            .keys()
            .collect::<Result<_, _>>()?;
        for key in old {
            self.audit.remove(key)?;
            report.audit_removed += 1;
        }
        let newest = self.generations.last()?.map(|(k, _)| k);
        let old: Vec<_> = self
            .generations
            .range(..cutoff.to_be_bytes().to_vec())
            .keys()
            .collect::<Result<_, _>>()?;
        for key in old.into_iter().filter(|k| Some(k) != newest.as_ref()) {
            self.generations.remove(key)?;
            report.generations_removed += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::store::*;
    use std::time::Duration;

    /// An intent made durable by the journal alone (sled lost it in a crash) is back after
    /// the next open, still pending, so that the restart closes it as interrupted; one whose
    /// outcome was journaled comes back complete.
    #[test]
    fn journal_brings_back_what_sled_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (k1, k2) = {
            let store = Store::open(&path).unwrap();
            let k1 = store.append_audit_durable(1_000, &"intent-1").unwrap();
            let k2 = store.append_audit_durable(2_000, &"intent-2").unwrap();
            store.complete_audit(&k2, &"done-2").unwrap();
            // What a crash before sled's flush would leave: none of it in sled.
            store.audit.remove(k1).unwrap();
            store.audit.remove(k2).unwrap();
            store.audit_pending.remove(k1).unwrap();
            store.db.flush().unwrap();
            assert!(store.journal().bytes > 0);
            (k1, k2)
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(store.journal().bytes, 0, "the journal was not emptied");
        assert_eq!(
            store.audit::<String>(10).unwrap(),
            vec!["done-2", "intent-1"]
        );
        assert!(store.audit_pending.contains_key(k1).unwrap());
        assert!(!store.audit_pending.contains_key(k2).unwrap());
        let closed = store
            .close_interrupted_audit(|r: String| format!("{r}: interrupted"))
            .unwrap();
        assert_eq!(closed, 1);
        assert_eq!(
            store.audit::<String>(10).unwrap(),
            vec!["done-2", "intent-1: interrupted"]
        );
        // Settled: sled has it all, the journal is empty.
        store.append_audit_durable(3_000, &"intent-3").unwrap();
        store.flush().unwrap();
        assert_eq!(store.journal().bytes, 0);
    }

    #[test]
    fn audit_is_newest_first_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        for (at, n) in [(1_000u64, 1u64), (2_000, 2), (2_000, 3), (9_000_000, 4)] {
            store.append_audit(at, &n).unwrap();
        }
        let all: Vec<u64> = store.audit(10).unwrap();
        assert_eq!(all, vec![4, 3, 2, 1]);
        assert_eq!(store.audit::<u64>(2).unwrap(), vec![4, 3]);
        let r = store
            .prune(9_000_000, Duration::from_millis(8_000_000))
            .unwrap();
        assert_eq!(r.audit_removed, 3);
        assert_eq!(store.audit::<u64>(10).unwrap(), vec![4]);
        store.append_generation(5, &"g").unwrap();
        assert_eq!(
            store.generations::<String>(5).unwrap(),
            vec!["g".to_string()]
        );
    }
}
