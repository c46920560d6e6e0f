//! The on-disk store: a [sled] database holding instance records, hourly buckets and the set of
//! known functions, so that EMARS keeps its history across restarts.
//!
//! # Layout
//!
//! One sled database (a directory) with four trees. Every value is JSON (serde_json). Numbers
//! inside keys are unsigned 64-bit big-endian, so a key-ordered scan is a time-ordered scan.
//! `·` below is concatenation.
//!
//! | tree        | key                                                              | value                                  |
//! |-------------|------------------------------------------------------------------|----------------------------------------|
//! | `instances` | name · `0x00` · `started_at_ms` (u64 BE) · `cgroup_id` (u64 BE)  | [`InstanceRecord`]                     |
//! | `hours`     | name · `0x00` · `hour_start_ms` (u64 BE)                         | [`HourBucket`]                         |
//! | `functions` | name                                                             | `{"first_seen_ms":…,"last_seen_ms":…}` |
//! | `meta`      | `schema_version`                                                 | `1`                                    |
//! | `meta`      | `live_checkpoint`, `clean`                                       | the live model at the last clean close; `1` while nothing was written since |
//! | `audit`     | `at_ms` (u64 BE) · sequence (u64 BE)                             | `AuditRecord` (every limit write)      |
//! | `audit_pending` | the `audit` key of a write whose outcome is not recorded yet     | empty                                  |
//! | `generations` | `generated_at_ms` (u64 BE) · sequence (u64 BE)                 | `Generation` (each generated config)   |
//!
//! `hour_start_ms` is the event time rounded down to a multiple of [`HOUR_MS`] (UTC hours).
//!
//! Function names are UTF-8, non-empty and never contain `0x00`, so the prefix
//! `name · 0x00` selects exactly one function's entries (`"a"` never matches `"ab"`), oldest
//! first. An instance is identified by `(function, started_at_ms, cgroup_id)`: cgroup ids (inode
//! numbers) can be reused after a cgroup is removed, the start time tells the two apart.
//!
//! `functions` lists every function the store has heard of, whether through an instance, an
//! hour bucket or platform-reported invocations; [`Store::prune`] removes an entry only once
//! nothing of the function is retained and it was last seen before the retention.
//!
//! On open, `meta/schema_version` is written if absent; a version newer than
//! [`SCHEMA_VERSION`] is refused ([`StoreError::SchemaTooNew`]) rather than misread.
//!
//! # Errors
//!
//! A value that does not decode is reported as [`StoreError::Corrupt`] with the tree and a
//! readable rendering of the key (`function/started_at_ms/cgroup_id` for instances,
//! `function/hour_start_ms` for hours); the store never panics on bad data.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::live::{apply_delta, LiveModel};
use crate::model::{FunctionConfig, FunctionSummary, HourBucket, HourDelta, InstanceRecord};

/// Schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

/// sled's page cache.
const STORE_CACHE_BYTES: u64 = 64 << 20;

/// Length of an hour bucket in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;

const TREE_INSTANCES: &str = "instances";
const TREE_HOURS: &str = "hours";
const TREE_FUNCTIONS: &str = "functions";
const TREE_META: &str = "meta";
const TREE_AUDIT: &str = "audit";
const TREE_GENERATIONS: &str = "generations";
const TREE_AUDIT_PENDING: &str = "audit_pending";

/// Key of a log record (audit, generations): `at_ms` (u64 BE) · sequence (u64 BE).
pub type AuditKey = [u8; 16];
const KEY_SCHEMA_VERSION: &str = "schema_version";
/// The live model as of the last clean close, and whether nothing was written since.
const KEY_LIVE_CHECKPOINT: &str = "live_checkpoint";
const KEY_CLEAN: &str = "clean";
/// Format of the checkpoint; another one is ignored (the model is rebuilt from the trees).
const CHECKPOINT_VERSION: u32 = 1;

#[derive(Deserialize)]
struct Checkpoint {
    version: u32,
    model: LiveModel,
}

#[derive(Serialize)]
struct CheckpointRef<'a> {
    version: u32,
    model: &'a LiveModel,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "store at {path} has schema version {found}, this build understands up to {supported}"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("store database error: {0}")]
    Db(#[from] sled::Error),
    #[error("corrupt value in tree `{tree}` at key {key}: {source}")]
    Corrupt {
        tree: &'static str,
        key: String,
        source: serde_json::Error,
    },
    #[error("cannot encode value for tree `{tree}` at key {key}: {source}")]
    Encode {
        tree: &'static str,
        key: String,
        source: serde_json::Error,
    },
    #[error("invalid function name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
}

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
}

/// Value of the `functions` tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FunctionRecord {
    first_seen_ms: u64,
    #[serde(default)]
    last_seen_ms: u64,
}

/// Handle to the store. Cloning is cheap (sled handles are reference-counted) and all clones
/// see the same data; it is `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    path: Arc<Path>,
    db: sled::Db,
    instances: sled::Tree,
    hours: sled::Tree,
    functions: sled::Tree,
    audit: sled::Tree,
    audit_pending: sled::Tree,
    generations: sled::Tree,
    /// Summaries, hour buckets and export answered from memory, kept in step with every write.
    live: Arc<Mutex<LiveModel>>,
    meta: sled::Tree,
    /// True when the model came from the checkpoint rather than a scan of the trees.
    from_checkpoint: bool,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in directory `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(path).map_err(|source| StoreError::CreateDir {
            path: path.to_path_buf(),
            source,
        })?;
        // The store holds every function's history and the audit: root's eyes only.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|source| StoreError::CreateDir {
                path: path.to_path_buf(),
                source,
            })?;
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Reads are answered from the live model, so sled's page cache serves writes and the
        // per-function scans only: 64 MiB instead of sled's default 1 GiB keeps the agent small.
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(STORE_CACHE_BYTES)
            .open()
            .map_err(open_err)?;
        let instances = db.open_tree(TREE_INSTANCES).map_err(open_err)?;
        let hours = db.open_tree(TREE_HOURS).map_err(open_err)?;
        let functions = db.open_tree(TREE_FUNCTIONS).map_err(open_err)?;
        let meta = db.open_tree(TREE_META).map_err(open_err)?;
        let audit = db.open_tree(TREE_AUDIT).map_err(open_err)?;
        let audit_pending = db.open_tree(TREE_AUDIT_PENDING).map_err(open_err)?;
        let generations = db.open_tree(TREE_GENERATIONS).map_err(open_err)?;

        match meta.get(KEY_SCHEMA_VERSION)? {
            None => {
                meta.insert(KEY_SCHEMA_VERSION, SCHEMA_VERSION.to_string().as_bytes())?;
            }
            Some(raw) => {
                let found: u32 = decode(TREE_META, KEY_SCHEMA_VERSION, &raw)?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        path: path.to_path_buf(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
        }

        let mut store = Store {
            path: Arc::from(path),
            db,
            instances,
            hours,
            functions,
            audit,
            audit_pending,
            generations,
            live: Arc::default(),
            meta,
            from_checkpoint: false,
        };
        store.from_checkpoint = store.load_checkpoint();
        if !store.from_checkpoint {
            store.load_live()?;
        }
        // From here on the checkpoint is stale until the next clean close; durably so before
        // any write, or a crash could leave a checkpoint that misses later writes.
        store.meta.insert(KEY_CLEAN, &b"0"[..])?;
        store.db.flush()?;
        Ok(store)
    }

    /// The live model from the checkpoint of the last clean close, if there is a valid one.
    fn load_checkpoint(&self) -> bool {
        let clean = matches!(self.meta.get(KEY_CLEAN), Ok(Some(v)) if v.as_ref() == b"1");
        if !clean {
            return false;
        }
        let Ok(Some(raw)) = self.meta.get(KEY_LIVE_CHECKPOINT) else {
            return false;
        };
        match serde_json::from_slice::<Checkpoint>(&raw) {
            Ok(c) if c.version == CHECKPOINT_VERSION => {
                *self.live() = c.model;
                true
            }
            Ok(c) => {
                tracing::info!("checkpoint of version {} ignored: rebuilding", c.version);
                false
            }
            Err(e) => {
                tracing::warn!("unreadable checkpoint ({e}): rebuilding from the records");
                false
            }
        }
    }

    /// Writes the live model as the checkpoint the next open starts from, and marks the store
    /// clean. Called at a clean shutdown; any write after it makes the next open rebuild.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let live = self.live();
        let c = CheckpointRef {
            version: CHECKPOINT_VERSION,
            model: &live,
        };
        let raw = encode(TREE_META, KEY_LIVE_CHECKPOINT.as_bytes(), &c)?;
        self.meta.insert(KEY_LIVE_CHECKPOINT, raw)?;
        self.meta.insert(KEY_CLEAN, &b"1"[..])?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether this open took the live model from a checkpoint (else it scanned the records).
    pub fn opened_from_checkpoint(&self) -> bool {
        self.from_checkpoint
    }

    /// Builds the live model from the trees (once, at open). A value that does not decode is
    /// left out of the aggregates and said, not fatal: reading it directly still reports it
    /// as corrupt.
    fn load_live(&self) -> Result<(), StoreError> {
        let mut live = self.live();
        let mut corrupt = 0u64;
        let mut skip = |e: StoreError| {
            corrupt += 1;
            tracing::error!("{e}; left out of the summaries");
        };
        for item in self.functions.iter() {
            let (key, raw) = item?;
            match decode::<FunctionRecord>(TREE_FUNCTIONS, &display_key(&key), &raw) {
                Ok(r) => live.seen(
                    &String::from_utf8_lossy(&key),
                    r.first_seen_ms,
                    r.last_seen_ms,
                ),
                Err(e) => skip(e),
            }
        }
        for item in self.instances.iter() {
            let (key, raw) = item?;
            match decode::<InstanceRecord>(TREE_INSTANCES, &display_key(&key), &raw) {
                Ok(rec) => live.put_instance(None, &rec),
                Err(e) => skip(e),
            }
        }
        for item in self.hours.iter() {
            let (key, raw) = item?;
            match decode::<HourBucket>(TREE_HOURS, &display_key(&key), &raw) {
                Ok(b) => live.put_hour(&function_of_key(&key), b),
                Err(e) => skip(e),
            }
        }
        if corrupt > 0 {
            tracing::warn!(
                "{corrupt} corrupt records in the store at {}",
                self.path.display()
            );
        }
        Ok(())
    }

    fn live(&self) -> MutexGuard<'_, LiveModel> {
        // The model holds plain aggregates: one left by a panicked writer is still usable.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an audit record that needs no durability of its own (a refusal: nothing was
    /// written); it reaches the disk with sled's next periodic flush.
    pub fn append_audit<T: Serialize>(&self, at_ms: u64, rec: &T) -> Result<AuditKey, StoreError> {
        self.append_log(&self.audit, TREE_AUDIT, at_ms, rec)
    }

    /// Records the intent of a limit write and returns only once it is on disk (fsync), so that
    /// no write can happen that the audit does not show, even after `kill -9`. Until
    /// [`Store::complete_audit`] replaces it, the record is also listed as pending, and a
    /// restarted agent marks it as interrupted ([`Store::close_interrupted_audit`]).
    pub fn append_audit_durable<T: Serialize>(
        &self,
        at_ms: u64,
        rec: &T,
    ) -> Result<AuditKey, StoreError> {
        let key = self.append_audit(at_ms, rec)?;
        self.audit_pending.insert(key, &[])?;
        if let Err(e) = self.db.flush() {
            // Not durable, so the write will not happen: the record must not claim it might
            // have (best effort; the store is failing).
            let _ = self.audit.remove(key);
            let _ = self.audit_pending.remove(key);
            return Err(e.into());
        }
        Ok(key)
    }

    /// Replaces a pending audit record by its outcome, durably.
    pub fn complete_audit<T: Serialize>(&self, key: &AuditKey, rec: &T) -> Result<(), StoreError> {
        let value = encode(TREE_AUDIT, key, rec)?;
        self.audit.insert(key, value)?;
        self.audit_pending.remove(key)?;
        self.db.flush()?;
        Ok(())
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
                let rec: T = decode(TREE_AUDIT, &format!("{key:?}"), &raw)?;
                self.audit
                    .insert(&key, encode(TREE_AUDIT, &key, &close(rec))?)?;
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

    fn append_log<T: Serialize>(
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
        let value = encode(name, &key, rec)?;
        tree.insert(key, value)?;
        Ok(key)
    }

    /// Directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Inserts or replaces the record identified by `(function, started_at_ms, cgroup_id)`.
    pub fn put_instance(&self, rec: &InstanceRecord) -> Result<(), StoreError> {
        validate_name(&rec.function)?;
        // Held across the write, so the model sees writes in the order the trees do.
        let mut live = self.live();
        let last = rec.ended_at_ms.unwrap_or(0).max(rec.started_at_ms);
        self.touch_function(&mut live, &rec.function, rec.started_at_ms, last)?;
        let key = instance_key(&rec.function, rec.started_at_ms, rec.cgroup_id);
        let value = encode(TREE_INSTANCES, &key, rec)?;
        let old = match self.instances.insert(&key, value)? {
            Some(raw) if !live.is_live(rec) => Some(decode::<InstanceRecord>(
                TREE_INSTANCES,
                &display_key(&key),
                &raw,
            )?),
            _ => None,
        };
        live.put_instance(old.as_ref(), rec);
        Ok(())
    }

    pub fn instance(
        &self,
        function: &str,
        started_at_ms: u64,
        cgroup_id: u64,
    ) -> Result<Option<InstanceRecord>, StoreError> {
        validate_name(function)?;
        let key = instance_key(function, started_at_ms, cgroup_id);
        match self.instances.get(&key)? {
            None => Ok(None),
            Some(raw) => Ok(Some(decode(TREE_INSTANCES, &display_key(&key), &raw)?)),
        }
    }

    /// All retained instances of `function`, oldest first (by start time, then cgroup id).
    pub fn instances(&self, function: &str) -> Result<Vec<InstanceRecord>, StoreError> {
        validate_name(function)?;
        scan(&self.instances, TREE_INSTANCES, &prefix(function))
    }

    /// Instances of every function that have not ended, in key order. After a restart the
    /// agent checks these against the cgroups that still exist.
    pub fn live_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        let all: Vec<InstanceRecord> = scan(&self.instances, TREE_INSTANCES, &[])?;
        Ok(all.into_iter().filter(InstanceRecord::is_live).collect())
    }

    /// Merges `delta` into the bucket of the hour containing `at_ms`: counters add,
    /// `peak_bytes` takes the max. Safe against concurrent callers (compare-and-swap loop).
    pub fn add_hour(&self, function: &str, at_ms: u64, delta: HourDelta) -> Result<(), StoreError> {
        validate_name(function)?;
        let mut live = self.live();
        self.touch_function(&mut live, function, at_ms, at_ms)?;
        let hour_start_ms = at_ms - at_ms % HOUR_MS;
        let key = hour_key(function, hour_start_ms);
        let b = update_json(&self.hours, TREE_HOURS, &key, |old: Option<HourBucket>| {
            let mut b = old.unwrap_or(HourBucket {
                hour_start_ms,
                ..HourBucket::default()
            });
            apply_delta(&mut b, &delta);
            b
        })?;
        live.put_hour(function, b);
        Ok(())
    }

    /// Hour buckets of `function`, oldest first (from memory).
    pub fn hours(&self, function: &str) -> Result<Vec<HourBucket>, StoreError> {
        validate_name(function)?;
        Ok(self.live().hours(function))
    }

    /// Records `count` invocations reported by the platform at `at_ms`. The function becomes
    /// known even if no instance of it was seen yet (also when `count` is 0).
    pub fn add_invocations(
        &self,
        function: &str,
        count: u64,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        self.add_hour(
            function,
            at_ms,
            HourDelta {
                invocations: count,
                ..HourDelta::default()
            },
        )
    }

    /// Names of all known functions, sorted (byte order).
    pub fn function_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.live().names())
    }

    /// Aggregate of one function over its retained data; None if the function is unknown.
    /// Answered from memory, in time that does not grow with the function's history.
    ///
    /// `first_seen_ms` is the earliest time ever recorded for the function (it survives
    /// pruning); `last_seen_ms` is the latest of the recorded activity times, instance
    /// start/end times and the start of any hour bucket.
    pub fn function(&self, name: &str) -> Result<Option<FunctionSummary>, StoreError> {
        validate_name(name)?;
        Ok(self.live().summary(name))
    }

    /// Summaries of all known functions, sorted by name (from memory).
    pub fn functions(&self) -> Result<Vec<FunctionSummary>, StoreError> {
        Ok(self.live().summaries())
    }

    /// The same as the JSON body of GET /v1/functions, from per-function JSON kept in memory.
    pub fn functions_json(&self) -> String {
        self.live().summaries_json()
    }

    /// The paper's per-function config, one entry per known function, sorted by name.
    ///
    /// `requests_per_hour` is the busiest retained hour's platform-reported invocations when
    /// any retained hour has some, else the busiest hour's execs; `max_memory_bytes` is the
    /// peak of the retained instance peaks.
    pub fn export(&self) -> Result<Vec<FunctionConfig>, StoreError> {
        Ok(self.live().export())
    }

    /// Deletes ended instances with `ended_at_ms < now_ms - retention` and hour buckets whose
    /// whole hour lies before that cutoff. Live instances are never deleted, nor are the
    /// entries of the `functions` tree.
    pub fn prune(&self, now_ms: u64, retention: Duration) -> Result<PruneReport, StoreError> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(retention_ms);
        let mut report = PruneReport::default();

        for item in self.instances.iter() {
            let (key, raw) = item?;
            let rec: InstanceRecord = decode(TREE_INSTANCES, &display_key(&key), &raw)?;
            if matches!(rec.ended_at_ms, Some(end) if end < cutoff) {
                // Only delete the value we judged: a concurrent put_instance wins.
                let mut live = self.live();
                if self
                    .instances
                    .compare_and_swap(&key, Some(&raw), None::<&[u8]>)?
                    .is_ok()
                {
                    live.remove_instance(&rec);
                    report.instances_removed += 1;
                }
            }
        }

        for item in self.hours.iter() {
            let (key, raw) = item?;
            let bucket: HourBucket = decode(TREE_HOURS, &display_key(&key), &raw)?;
            if bucket.hour_start_ms.saturating_add(HOUR_MS) > cutoff {
                continue;
            }
            let mut live = self.live();
            if self
                .hours
                .compare_and_swap(&key, Some(&raw), None::<&[u8]>)?
                .is_ok()
            {
                live.remove_hour(&function_of_key(&key), bucket.hour_start_ms);
                report.hours_removed += 1;
            }
        }

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

        let mut live = self.live();
        for name in live.forgotten(cutoff) {
            self.functions.remove(name.as_bytes())?;
            live.remove_function(&name);
            report.functions_removed += 1;
        }
        Ok(report)
    }

    /// Writes all buffered changes to disk (sled also flushes on its own every 500 ms).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Widens the function's first/last-seen range, creating the entry if needed.
    fn touch_function(
        &self,
        live: &mut LiveModel,
        name: &str,
        first_ms: u64,
        last_ms: u64,
    ) -> Result<(), StoreError> {
        live.seen(name, first_ms, last_ms);
        update_json(
            &self.functions,
            TREE_FUNCTIONS,
            name.as_bytes(),
            |old: Option<FunctionRecord>| match old {
                None => FunctionRecord {
                    first_seen_ms: first_ms,
                    last_seen_ms: last_ms,
                },
                Some(r) => FunctionRecord {
                    first_seen_ms: r.first_seen_ms.min(first_ms),
                    last_seen_ms: r.last_seen_ms.max(last_ms),
                },
            },
        )
        .map(drop)
    }

    #[cfg(test)]
    fn raw_tree(&self, name: &str) -> sled::Tree {
        self.db.open_tree(name).expect("open tree")
    }
}

/// The function name of an `instances` or `hours` key (`name · 0x00 · …`).
fn function_of_key(key: &[u8]) -> String {
    let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
    String::from_utf8_lossy(&key[..end]).into_owned()
}

fn validate_name(name: &str) -> Result<(), StoreError> {
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

fn prefix(function: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(function.len() + 17);
    k.extend_from_slice(function.as_bytes());
    k.push(0);
    k
}

fn instance_key(function: &str, started_at_ms: u64, cgroup_id: u64) -> Vec<u8> {
    let mut k = prefix(function);
    k.extend_from_slice(&started_at_ms.to_be_bytes());
    k.extend_from_slice(&cgroup_id.to_be_bytes());
    k
}

fn hour_key(function: &str, hour_start_ms: u64) -> Vec<u8> {
    let mut k = prefix(function);
    k.extend_from_slice(&hour_start_ms.to_be_bytes());
    k
}

/// Human-readable key for error messages: `function/n1/n2…`, or escaped bytes when the key does
/// not follow the schema.
fn display_key(key: &[u8]) -> String {
    let Some(nul) = key.iter().position(|&b| b == 0) else {
        return String::from_utf8_lossy(key).into_owned();
    };
    let (name, rest) = (&key[..nul], &key[nul + 1..]);
    match std::str::from_utf8(name) {
        Ok(name) if rest.len() % 8 == 0 => {
            let mut s = name.to_string();
            for chunk in rest.chunks_exact(8) {
                let mut n = [0u8; 8];
                n.copy_from_slice(chunk);
                s.push('/');
                s.push_str(&u64::from_be_bytes(n).to_string());
            }
            s
        }
        _ => key.escape_ascii().to_string(),
    }
}

fn read_log<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    limit: usize,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for item in tree.iter().rev().take(limit) {
        let (k, v) = item?;
        let at = k
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes);
        out.push(decode(name, &format!("{}", at.unwrap_or(0)), &v)?);
    }
    Ok(out)
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|source| StoreError::Corrupt {
        tree,
        key: key.to_string(),
        source,
    })
}

fn encode<T: Serialize>(tree: &'static str, key: &[u8], value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        tree,
        key: display_key(key),
        source,
    })
}

/// Decodes every value under `prefix`, in key order.
fn scan<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    prefix: &[u8],
) -> Result<Vec<T>, StoreError> {
    tree.scan_prefix(prefix)
        .map(|item| {
            let (key, raw) = item?;
            decode(name, &display_key(&key), &raw)
        })
        .collect()
}

/// Read-modify-write of one JSON value, atomic against concurrent writers of the same key.
/// Unlike sled's `update_and_fetch`, a corrupt old value surfaces as an error instead of
/// having to be swallowed inside the closure. Skips the write when nothing changes.
fn update_json<T, F>(
    tree: &sled::Tree,
    name: &'static str,
    key: &[u8],
    mut f: F,
) -> Result<T, StoreError>
where
    T: Serialize + DeserializeOwned + PartialEq,
    F: FnMut(Option<T>) -> T,
{
    loop {
        let old_raw = tree.get(key)?;
        let old: Option<T> = match &old_raw {
            Some(raw) => Some(decode(name, &display_key(key), raw)?),
            None => None,
        };
        let unchanged_probe = old.as_ref().map(|o| serde_json::to_vec(o).ok());
        let new = f(old);
        let new_raw = encode(name, key, &new)?;
        if matches!(&unchanged_probe, Some(Some(o)) if *o == new_raw) {
            return Ok(new);
        }
        if tree.compare_and_swap(key, old_raw, Some(new_raw))?.is_ok() {
            return Ok(new);
        }
        // Another writer got in between: re-read and re-apply.
    }
}

#[cfg(test)]
mod audit_tests {
    use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Limits, PeakPercentiles, PeakSource};

    const MIB: u64 = 1024 * 1024;

    fn rec(function: &str, started: u64, cgroup: u64) -> InstanceRecord {
        InstanceRecord {
            function: function.to_string(),
            instance: format!("{function}-{cgroup}"),
            cgroup_id: cgroup,
            cgroup_path: format!("/sys/fs/cgroup/test/{function}/{cgroup}"),
            started_at_ms: started,
            ended_at_ms: None,
            execs: 0,
            peak_bytes: 0,
            peak_source: PeakSource::None,
            oom_kills: 0,
            limits: Limits::default(),
        }
    }

    fn open_tmp() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        (dir, store)
    }

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

    /// A clean close leaves a checkpoint the next open starts from; a write after it (and no
    /// clean close, as after kill -9) makes the next open rebuild from the records.
    #[test]
    fn checkpoint_after_clean_close_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut r = rec("f", 1, 1);
        {
            let s = Store::open(&path).unwrap();
            assert!(!s.opened_from_checkpoint());
            s.put_instance(&r).unwrap();
            r.ended_at_ms = Some(5);
            r.peak_bytes = 3 * MIB;
            s.put_instance(&r).unwrap();
            s.add_invocations("f", 4, 2).unwrap();
            s.checkpoint().unwrap();
        }
        let before = {
            let s = Store::open(&path).unwrap();
            assert!(s.opened_from_checkpoint());
            let live = (
                s.functions().unwrap(),
                s.export().unwrap(),
                s.hours("f").unwrap(),
            );
            // Written after the checkpoint, then "killed" (no checkpoint).
            s.put_instance(&rec("f", 9, 2)).unwrap();
            live
        };
        let s = Store::open(&path).unwrap();
        assert!(!s.opened_from_checkpoint(), "a stale checkpoint was used");
        let f = &s.functions().unwrap()[0];
        assert_eq!((f.instances, f.live_instances), (2, 1));
        assert_eq!(f.peak_bytes, before.0[0].peak_bytes);
        assert_eq!(f.invocations, 4);
        assert_eq!(s.export().unwrap(), before.1);
        assert_eq!(s.hours("f").unwrap(), before.2);
    }

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
    fn store_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Store>();
    }

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
        s.put_instance(&rec("e", 2, 2)).unwrap();
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

    /// 100 instances with peaks 1..=100 MiB (shuffled), plus zero-peak ones that must not count.
    fn fill_known_set(s: &Store) {
        for i in 0..100u64 {
            let peak = ((i * 37) % 100 + 1) * MIB; // a permutation of 1..=100
            let mut r = rec("f", 1_000 + i, i);
            r.peak_bytes = peak;
            r.execs = 2;
            r.oom_kills = u64::from(i % 10 == 0);
            if i < 97 {
                r.ended_at_ms = Some(5_000 + i);
            }
            s.put_instance(&r).unwrap();
        }
        let mut unmeasured = rec("f", 500, 1000); // live, never measured
        unmeasured.execs = 1;
        s.put_instance(&unmeasured).unwrap();
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
    fn export_prefers_invocations_else_execs() {
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
        assert_eq!(
            s.export().unwrap(),
            vec![
                FunctionConfig {
                    function: "f".into(),
                    requests_per_hour: 30,
                    max_memory_bytes: 100 * MIB,
                },
                FunctionConfig {
                    function: "g".into(),
                    requests_per_hour: 9,
                    max_memory_bytes: 3 * MIB,
                },
                FunctionConfig {
                    function: "h".into(),
                    requests_per_hour: 0,
                    max_memory_bytes: 0,
                },
            ]
        );
    }

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

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/db");
        let (summaries, export, live, hours) = {
            let s = Store::open(&path).unwrap();
            fill_known_set(&s);
            s.add_invocations("f", 3, HOUR_MS).unwrap();
            s.add_invocations("other", 1, 2 * HOUR_MS).unwrap();
            s.flush().unwrap();
            (
                s.functions().unwrap(),
                s.export().unwrap(),
                s.live_instances().unwrap(),
                s.hours("f").unwrap(),
            )
        };
        let s = Store::open(&path).unwrap();
        assert_eq!(s.functions().unwrap(), summaries);
        assert_eq!(s.export().unwrap(), export);
        assert_eq!(s.live_instances().unwrap(), live);
        assert_eq!(s.hours("f").unwrap(), hours);
        assert_eq!(s.instances("f").unwrap().len(), 101);
        assert_eq!(s.function_names().unwrap(), vec!["f", "other"]);
    }

    #[test]
    fn survives_reopen_without_explicit_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            s.put_instance(&rec("f", 1, 1)).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.instances("f").unwrap().len(), 1);
    }

    #[test]
    fn corrupt_value_is_an_error_not_a_panic() {
        let (_d, s) = open_tmp();
        s.put_instance(&rec("f", 1, 1)).unwrap();
        s.add_hour("f", HOUR_MS, HourDelta::default()).unwrap();
        s.raw_tree(TREE_INSTANCES)
            .insert(instance_key("f", 2, 9), &b"\xffnot json"[..])
            .unwrap();
        let is_corrupt_instance = |e: StoreError| match e {
            StoreError::Corrupt { tree, key, .. } => tree == TREE_INSTANCES && key == "f/2/9",
            _ => false,
        };
        assert!(is_corrupt_instance(s.instance("f", 2, 9).unwrap_err()));
        assert!(is_corrupt_instance(s.instances("f").unwrap_err()));
        assert!(is_corrupt_instance(s.live_instances().unwrap_err()));
        assert!(is_corrupt_instance(
            s.prune(u64::MAX, Duration::ZERO).unwrap_err()
        ));
        // Summaries come from memory, where the corrupt value never was.
        assert_eq!(s.function("f").unwrap().map(|f| f.instances), Some(1));
        // The good record is still readable by key.
        assert!(s.instance("f", 1, 1).unwrap().is_some());

        // A corrupt bucket makes add_hour fail instead of overwriting it silently.
        s.raw_tree(TREE_HOURS)
            .insert(hour_key("f", HOUR_MS), &b"{"[..])
            .unwrap();
        let err = s.add_hour("f", HOUR_MS, HourDelta::default()).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { tree: "hours", key, .. } if key == &format!("f/{HOUR_MS}")),
            "{err}"
        );
        assert!(err.to_string().contains("hours"), "{err}");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            s.raw_tree(TREE_META)
                .insert(KEY_SCHEMA_VERSION, &b"2"[..])
                .unwrap();
            s.flush().unwrap();
        }
        match Store::open(&path) {
            Err(StoreError::SchemaTooNew {
                found: 2,
                supported: 1,
                path: p,
            }) => {
                assert_eq!(p, path)
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    #[test]
    fn open_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = Store::open(&file.join("db")).unwrap_err();
        assert!(matches!(err, StoreError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains("plain-file"), "{err}");
    }
}
