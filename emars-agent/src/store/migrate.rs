//! Schema versions and migration.
//!
//! `meta/schema_version` says which layout the trees follow. Schema 1 (JSON values in
//! `instances` and `hours`, keyed by function name first) is migrated at open: every record
//! is rewritten into the schema 2 trees, then the old trees are dropped and the version set,
//! in that order, so an interrupted migration simply runs again. A version newer than
//! [`SCHEMA_VERSION`] is refused ([`StoreError::SchemaTooNew`]) rather than misread. Values
//! carry their own format byte (`0x02`), so a later format can be read beside this one.

use std::path::Path;

use crate::model::{HourBucket, HourDelta, InstanceRecord};

use super::checkpoint::KEY_LIVE_CHECKPOINT;
use super::codec::{decode_json, display_numbers, display_text, quarantine_key};
use super::functions::{validate_name, FunctionRecord, DEFAULT_MAX_FUNCTIONS};
use super::index::State;
use super::{Store, StoreError, KEY_SCHEMA_VERSION, SCHEMA_VERSION, TREE_META, TREE_QUARANTINE};

/// Schema 1's trees, migrated and dropped at open.
pub(super) const TREE_V1_INSTANCES: &str = "instances";

pub(super) const TREE_V1_HOURS: &str = "hours";

/// Schema 1: the function name of an `instances` or `hours` key (`name · 0x00 · …`).
pub(super) fn v1_function_of_key(key: &[u8]) -> String {
    let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
    String::from_utf8_lossy(&key[..end]).into_owned()
}

/// Schema 1: `function/n1/n2…`.
pub(super) fn v1_display_key(key: &[u8]) -> String {
    let Some(nul) = key.iter().position(|&b| b == 0) else {
        return display_text(key);
    };
    format!(
        "{}/{}",
        String::from_utf8_lossy(&key[..nul]),
        display_numbers(&key[nul + 1..])
    )
}

/// The schema version the store at `path` follows (None: a new store), refused when newer
/// than this build's. sled cuts a damaged log at its last whole record while it opens, and
/// says nothing: a log that had `log_bytes` before the open and kept not even the schema
/// version (written at the first open) lost everything, which is corruption, not a new store.
pub(super) fn schema_found(
    path: &Path,
    meta: &sled::Tree,
    log_bytes: u64,
) -> Result<Option<u32>, StoreError> {
    let Some(raw) = meta.get(KEY_SCHEMA_VERSION)? else {
        if log_bytes > 0 {
            return Err(StoreError::LogLost {
                path: path.join("db"),
                bytes: log_bytes,
            });
        }
        return Ok(None);
    };
    let found: u32 = decode_json(TREE_META, KEY_SCHEMA_VERSION, &raw)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(Some(found))
}

impl Store {
    /// Brings a store of schema `found` (None: new) to [`SCHEMA_VERSION`]: migrated from 1,
    /// then the version written.
    pub(super) fn bring_schema_up(&mut self, found: Option<u32>) -> Result<(), StoreError> {
        if found == Some(1) {
            self.migrate_v1()?;
        }
        if found != Some(SCHEMA_VERSION) {
            self.meta
                .insert(KEY_SCHEMA_VERSION, SCHEMA_VERSION.to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Schema 1 → 2: every record written again through the schema 2 write path, then the old
    /// trees dropped. Values that do not decode are kept in `quarantine`. The model built on
    /// the way is thrown away: the open builds it from the new trees as always.
    pub(super) fn migrate_v1(&mut self) -> Result<(), StoreError> {
        // History, not new names: every function of the old store is kept.
        self.cap().max = usize::MAX;
        let old_instances = self.db.open_tree(TREE_V1_INSTANCES)?;
        let old_hours = self.db.open_tree(TREE_V1_HOURS)?;
        let (mut moved, mut kept_aside) = (0u64, 0u64);
        // First-seen times survive pruning: start from them, so the writes below keep them.
        for item in self.functions.iter() {
            let (key, raw) = item?;
            if let Ok(r) = serde_json::from_slice::<FunctionRecord>(&raw) {
                let name = String::from_utf8_lossy(&key);
                self.state()
                    .model
                    .seen(&name, r.first_seen_ms, r.last_seen_ms);
            }
        }
        for item in old_instances.iter() {
            let (key, raw) = item?;
            match decode_json::<InstanceRecord>(TREE_V1_INSTANCES, &v1_display_key(&key), &raw) {
                Ok(rec) if validate_name(&rec.function).is_ok() => {
                    self.put_instance(&rec)?;
                    moved += 1;
                }
                _ => {
                    self.quarantine
                        .insert(quarantine_key(TREE_V1_INSTANCES, &key), raw)?;
                    kept_aside += 1;
                }
            }
        }
        for item in old_hours.iter() {
            let (key, raw) = item?;
            let name = v1_function_of_key(&key);
            match decode_json::<HourBucket>(TREE_V1_HOURS, &v1_display_key(&key), &raw) {
                Ok(b) if validate_name(&name).is_ok() => {
                    let delta = HourDelta {
                        instances_started: b.instances_started,
                        execs: b.execs,
                        invocations: b.invocations,
                        oom_kills: b.oom_kills,
                        peak_bytes: b.peak_bytes,
                        connections: b.connections,
                        requests: b.requests,
                    };
                    self.add_hour(&name, b.hour_start_ms, delta)?;
                    moved += 1;
                }
                _ => {
                    self.quarantine
                        .insert(quarantine_key(TREE_V1_HOURS, &key), raw)?;
                    kept_aside += 1;
                }
            }
        }
        // The checkpoint of schema 1 describes the old trees' model.
        self.meta.remove(KEY_LIVE_CHECKPOINT)?;
        self.db.flush()?;
        self.db.drop_tree(TREE_V1_INSTANCES)?;
        self.db.drop_tree(TREE_V1_HOURS)?;
        *self.state() = State::default();
        self.cap().max = DEFAULT_MAX_FUNCTIONS;
        tracing::info!(
            "store at {}: schema 1 migrated to {SCHEMA_VERSION} ({moved} records, {kept_aside} \
             unreadable ones kept in `{TREE_QUARANTINE}`)",
            self.path.display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::store::test_util::*;
    use crate::store::*;

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            s.raw_tree(TREE_META)
                .insert(KEY_SCHEMA_VERSION, &b"3"[..])
                .unwrap();
            s.flush().unwrap();
        }
        match Store::open(&path) {
            Err(StoreError::SchemaTooNew {
                found: 3,
                supported: 2,
                path: p,
            }) => {
                assert_eq!(p, path)
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    /// A store as schema 1 wrote it (JSON values keyed by function name first), written with
    /// sled directly, opens as schema 2 with every record and bucket, and the unreadable one
    /// kept aside.
    #[test]
    fn schema_1_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut recs = Vec::new();
        {
            let db = sled::open(&path).unwrap();
            let meta = db.open_tree(TREE_META).unwrap();
            meta.insert(KEY_SCHEMA_VERSION, &b"1"[..]).unwrap();
            meta.insert(KEY_CLEAN, &b"1"[..]).unwrap();
            meta.insert(KEY_LIVE_CHECKPOINT, &br#"{"version":1,"model":{}}"#[..])
                .unwrap();
            let inst = db.open_tree(TREE_V1_INSTANCES).unwrap();
            let hours = db.open_tree(TREE_V1_HOURS).unwrap();
            let funcs = db.open_tree(TREE_FUNCTIONS).unwrap();
            for (i, f) in ["a", "b", "a", "c"].iter().enumerate() {
                let i = i as u64;
                let mut r = rec(f, 1000 + i, 10 + i);
                r.peak_bytes = (i + 1) * MIB;
                r.execs = i;
                r.instance = format!("custom-{i}"); // not the path's last component
                r.limits.max_bytes = Some(64 * MIB);
                if i != 3 {
                    r.ended_at_ms = Some(2000 + i);
                    r.oom_kills = i % 2;
                    r.peak_source = PeakSource::ChargeEvents;
                }
                let mut key = f.as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(&r.started_at_ms.to_be_bytes());
                key.extend_from_slice(&r.cgroup_id.to_be_bytes());
                inst.insert(key, serde_json::to_vec(&r).unwrap()).unwrap();
                let b = HourBucket {
                    hour_start_ms: 5 * HOUR_MS,
                    instances_started: 1,
                    execs: i,
                    invocations: 0,
                    oom_kills: 0,
                    peak_bytes: r.peak_bytes,
                    ..HourBucket::default()
                };
                let mut key = f.as_bytes().to_vec();
                key.push(0);
                key.extend_from_slice(&b.hour_start_ms.to_be_bytes());
                hours.insert(key, serde_json::to_vec(&b).unwrap()).unwrap();
                let fr = FunctionRecord {
                    first_seen_ms: 1000,
                    last_seen_ms: 2000,
                    ended: 0,
                    hours: 0,
                };
                funcs
                    .insert(f.as_bytes(), serde_json::to_vec(&fr).unwrap())
                    .unwrap();
                recs.push(r);
            }
            inst.insert(&b"z\0garbage"[..], &b"not json"[..]).unwrap();
            db.flush().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(
            !s.opened_from_checkpoint(),
            "a schema 1 checkpoint was used"
        );
        for r in &recs {
            assert_eq!(
                s.instance(&r.function, r.started_at_ms, r.cgroup_id)
                    .unwrap()
                    .as_ref(),
                Some(r)
            );
        }
        assert_eq!(
            s.instances("a").unwrap(),
            vec![recs[0].clone(), recs[2].clone()]
        );
        assert_eq!(s.function_names().unwrap(), vec!["a", "b", "c"]);
        let a = s.function("a").unwrap().unwrap();
        assert_eq!((a.instances, a.oom_kills, a.peak_bytes), (2, 0, 3 * MIB));
        assert_eq!(s.function("b").unwrap().unwrap().oom_kills, 1);
        assert_eq!(s.hours("c").unwrap()[0].peak_bytes, 4 * MIB);
        assert_eq!(s.live_instances().unwrap(), vec![recs[3].clone()]);
        let kept: Vec<_> = s.raw_tree(TREE_QUARANTINE).iter().keys().collect();
        assert_eq!(kept.len(), 1);
        let names = s.db.tree_names();
        assert!(!names
            .iter()
            .any(|n| n.as_ref() == TREE_V1_INSTANCES.as_bytes()));
        drop(s);
        // Opened again: schema 2 as it is, nothing migrated twice.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.instances("a").unwrap().len(), 2);
        assert_eq!(s.function("a").unwrap().unwrap().instances, 2);
    }
}
