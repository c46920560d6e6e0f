//! The on-disk store: a [sled] database holding instance records, hourly buckets, the set of
//! known functions, the audit and the generated configs, so that EMARS keeps its history
//! across restarts.
//!
//! The store persists; it is not queried on the hot path. Every read the API and the policy
//! make (summaries, hours, recommendation samples, which instances a function has) is
//! answered by the live model ([`crate::model::live`]) that the store keeps in step with every write
//! and builds once at open. sled is read at open, for instance records by key (a function's
//! instance list, the live instances at start-up) and for the audit and generation logs.
//!
//! # Layout (schema 2)
//!
//! Numbers inside keys are big-endian, so a key-ordered scan is a time-ordered scan: new
//! records land at the right edge of their tree (cheap for sled). `·` is concatenation.
//!
//! | tree              | key                                              | value                                          |
//! |-------------------|--------------------------------------------------|------------------------------------------------|
//! | `instances_live`  | `started_at_ms` (u64) · `cgroup_id` (u64)        | `0x02` · postcard [`StoredInstance`]; with a bind's size hint `0x03` · the same · postcard u64 (the hint); with kernel-counted connections or requests `0x04` · the same · postcard (hint `Option<u64>`, connections u64, requests u64) |
//! | `instances_tail`  | `started_at_ms` (u64) · `cgroup_id` (u64)        | the same, for an ended record not sealed yet   |
//! | `instance_blocks` | sequence (u64)                                   | `0x02` · postcard list of (start, cgroup id, [`StoredInstance`]); when a record has a hint `0x03` · the same · postcard list of `Option<u64>` (each record's hint); when a record has kernel counts `0x04` · the same · postcard list of (hint, connections, requests), one per record |
//! | `hours_open`      | hours since the epoch (u32) · function id (u32)  | `0x02` · postcard `StoredHour`; with kernel-counted connections or requests `0x04` · the same · postcard (connections u64, requests u64) |
//! | `hour_blocks`     | hours since the epoch (u32)                      | `0x02` · postcard list of (function id, `StoredHour`); when an entry has kernel counts `0x04` · the same · postcard list of (connections, requests), one per entry |
//! | `strings`         | id (u32)                                         | a function name or a cgroup parent path        |
//! | `functions`       | name                                             | `{"first_seen_ms":…,"last_seen_ms":…}`         |
//! | `meta`            | `schema_version`                                 | `2`                                            |
//! | `meta`            | `checkpoint_id`, `clean`                         | id of the checkpoint file the last clean close wrote; `1` while nothing was written since |
//! | `meta`            | `agent_id`                                       | 32 lowercase hex digits, drawn at the first open ([`identity`]) |
//! | `audit`           | `at_ms` (u64) · sequence (u64)                   | `AuditRecord` JSON (every limit write)         |
//! | `audit_pending`   | the `audit` key of a write whose outcome is not recorded yet | empty                              |
//! | `generations`     | `generated_at_ms` (u64) · sequence (u64)         | `Generation` JSON (each generated config)      |
//! | `instance_state`  | `started_at_ms` (u64) · `cgroup_id` (u64) · kind (u8) | `0x02` · postcard of the kind: 1 [`RuntimeLimit`], 2 [`BurstWatch`], 3 [`SqueezeHold`], 4 [`KubernetesNames`] |
//! | `quarantine`      | tree name · `0x00` · key                         | a value that did not decode, moved aside       |
//!
//! An instance's record lives in `instances_live` while it runs (rewritten as its peak grows),
//! then in `instances_tail` once it ends; every [`BLOCK_RECORDS`] ended records are moved into
//! one block in a single sled transaction (a crash leaves them in one place or the other).
//! One sled value per 128 records instead of one each is what makes a record small on disk
//! (docs/design.md). Hour buckets work the same way: `hours_open` while their hour (or the
//! one after it) is current, then one block per hour; a late report into a sealed hour
//! rewrites its block. Retention drops whole blocks and rewrites the one that straddles the
//! cutoff. The model knows which block holds each ended record, so reading one is one get.
//!
//! `instance_state` holds what the agent keeps of a live instance besides its record
//! ([`crate::model::kept`]): the limit its container's runtime gave it, the burst guard's watch
//! and a squeeze's hold, so that a restarted agent releases the holds and guards the instances
//! of the last run. Its entries go when the instance's record is written as ended, and an open
//! drops those of instances that are not live (a write that raced the end) or do not decode
//! (moved to `quarantine`). Retention and checkpoints do not concern it: it holds live
//! instances only, and is read from sled, not from the model.
//!
//! A record names its function and its cgroup's parent directory by id (`strings`): both
//! repeat across thousands of records. Strings go with retention ([`prune`]). At most
//! [`Store::set_function_cap`] functions are known ([`functions`]). Schema 1 stores are
//! migrated at open ([`migrate`]).
//!
//! `hour_start_ms` is the event time rounded down to a multiple of [`HOUR_MS`] (UTC hours).
//! Function names are UTF-8, non-empty and never contain `0x00`. An instance is identified by
//! `(function, started_at_ms, cgroup_id)`: cgroup ids (inode numbers) can be reused after a
//! cgroup is removed, the start time tells the two apart.
//!
//! `functions` lists every function the store has heard of with its first-seen time, which
//! survives pruning; its last-seen time is written at checkpoints and pruning, and at open
//! the later of it and the retained records' times counts. [`Store::prune`] removes an entry
//! only once nothing of the function is retained and it was last seen before the retention.
//!
//! # Errors
//!
//! A value that does not decode is reported as [`StoreError::Corrupt`] with the tree and a
//! readable rendering of the key (`started_at_ms/cgroup_id` for instances); the store never
//! panics on bad data. At open, such a value is left out of the live model and moved to
//! `quarantine` (nothing is lost when a later write reuses its key).
//!
//! # Modules
//!
//! This file holds the handle, its open (as named steps) and the error type; each concern
//! has a module: [`instances`] (records and blocks), [`hours`], [`strings`], [`functions`]
//! (the cap, and the model's answers), [`kept`] (`instance_state`), [`audit`] (with the
//! [`journal`]), [`checkpoint`], [`load`] (the model rebuilt from the records), [`migrate`]
//! (schema), [`prune`] (retention), [`codec`] (values and keys), [`index`] (where records
//! are), [`identity`] (the agent's id), [`containers`] (Kubernetes containers' series) and
//! [`recover`] (a store sled cannot open).

mod audit;
mod checkpoint;
mod codec;
mod containers;
mod functions;
mod hours;
mod identity;
mod index;
mod instances;
pub mod journal;
mod kept;
mod load;
mod migrate;
mod prune;
mod recover;
mod strings;
#[cfg(test)]
mod test_util;

pub use audit::AuditKey;
pub use checkpoint::CHECKPOINT_FILE;
pub use codec::StoredInstance;
pub use functions::DEFAULT_MAX_FUNCTIONS;
pub use instances::{InstancesPage, PageQuery, BLOCK_RECORDS};
pub use prune::PruneReport;
pub use recover::KEEP_MOVED_ASIDE;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use crate::model::live::Order;
use crate::model::tracker::FunctionsFull;
pub use crate::model::HOUR_MS;

use audit::journal_error;
use checkpoint::{release_free_heap, KEY_CLEAN, KEY_LIVE_CHECKPOINT};
use functions::FunctionCap;
use index::State;
use strings::Strings;

/// Schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 2;

/// sled's page cache: reads are answered from the live model, so it serves writes and point
/// reads only (sled's default is 1 GiB).
const STORE_CACHE_BYTES: u64 = 32 << 20;

pub(super) const TREE_LIVE: &str = "instances_live";

pub(super) const TREE_TAIL: &str = "instances_tail";

pub(super) const TREE_BLOCKS: &str = "instance_blocks";

pub(super) const TREE_HOURS_OPEN: &str = "hours_open";

pub(super) const TREE_HOUR_BLOCKS: &str = "hour_blocks";

pub(super) const TREE_STRINGS: &str = "strings";

pub(super) const TREE_FUNCTIONS: &str = "functions";

pub(super) const TREE_META: &str = "meta";

pub(super) const TREE_AUDIT: &str = "audit";

pub(super) const TREE_GENERATIONS: &str = "generations";

pub(super) const TREE_AUDIT_PENDING: &str = "audit_pending";

pub(super) const TREE_QUARANTINE: &str = "quarantine";

pub(super) const TREE_INSTANCE_STATE: &str = "instance_state";

/// Format byte in front of every schema 2 record value.
pub(super) const FORMAT_V2: u8 = 2;

pub(super) const KEY_SCHEMA_VERSION: &str = "schema_version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store at {path} is corrupt ({reason}) and could not be moved aside: {source}")]
    MoveAside {
        path: PathBuf,
        reason: String,
        source: std::io::Error,
    },
    #[error("cannot open store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "another agent holds the store at {path}{}: one store serves one agent (stop it, or \
         give this one its own store.path)",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Busy { path: PathBuf, holder: Option<u32> },
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
    #[error("corrupt value in tree `{tree}` at key {key}: {reason}")]
    Corrupt {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("cannot encode value for tree `{tree}` at key {key}: {reason}")]
    Encode {
        tree: &'static str,
        key: String,
        reason: String,
    },
    #[error("invalid function name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot write the audit journal {path}: {source}")]
    Journal {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "sled's log {path} ({bytes} bytes) holds none of the store's records: sled, which cuts \
         a damaged log at its last whole record as it opens it, kept nothing of it"
    )]
    LogLost { path: PathBuf, bytes: u64 },
    #[error("cannot draw the agent's id from the kernel's random source: {source}")]
    AgentId { source: std::io::Error },
    #[error("cannot write the checkpoint {path}: {source}")]
    Checkpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A new function, and the cap on functions is reached.
    #[error(transparent)]
    FunctionsFull(#[from] FunctionsFull),
}

/// Handle to the store. Cloning is cheap (sled handles are reference-counted) and all clones
/// see the same data; it is `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    path: Arc<Path>,
    db: sled::Db,
    live_tree: sled::Tree,
    tail: sled::Tree,
    blocks: sled::Tree,
    hours_open: sled::Tree,
    hour_blocks: sled::Tree,
    strings_tree: sled::Tree,
    functions: sled::Tree,
    audit: sled::Tree,
    audit_pending: sled::Tree,
    generations: sled::Tree,
    quarantine: sled::Tree,
    /// What the agent keeps of live instances besides their records ([`crate::model::kept`]).
    instance_state: sled::Tree,
    /// The one source of reads, kept in step with every write. Lock order: `state`, then
    /// `strings`.
    state: Arc<Mutex<State>>,
    strings: Arc<Mutex<Strings>>,
    /// The cap on functions. Lock order: `state`, then `cap`.
    cap: Arc<Mutex<FunctionCap>>,
    /// Makes audit records durable without flushing sled (see [`journal`]).
    journal: Arc<Mutex<journal::Journal>>,
    meta: sled::Tree,
    /// True when the model came from the checkpoint rather than a scan of the records.
    from_checkpoint: bool,
    /// Values left out at open because they did not decode (copied to `quarantine`).
    corrupt_at_open: u64,
    /// Bumped by every write to the model: answers built from the whole model are rebuilt
    /// only when it moved ([`Store::changes`]).
    changes: Arc<std::sync::atomic::AtomicU64>,
    /// This agent's id ([`identity`]).
    agent_id: Arc<str>,
    /// Kubernetes containers' series ([`containers`]). Lock order: `state`, then this.
    containers: Arc<Mutex<crate::model::containers::Containers>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in directory `path`, migrating an older schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, Load::Checkpoint)
    }

    /// Opens the store and builds the model from the records even when a checkpoint is valid
    /// (what an open after a crash does): for benchmarks and consistency checks.
    pub fn open_rebuilding(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, Load::Records)
    }

    fn open_with(path: &Path, load: Load) -> Result<Store, StoreError> {
        create_private_dir(path)?;
        // What sled's log held before sled opens it (see `schema_found`).
        let log_bytes = std::fs::metadata(path.join("db")).map_or(0, |m| m.len());
        let db = open_db(path)?;
        let meta = db.open_tree(TREE_META).map_err(|e| open_error(path, e))?;
        let found = migrate::schema_found(path, &meta, log_bytes)?;
        let (journal, journaled) =
            journal::Journal::open(path).map_err(|source| StoreError::CreateDir {
                path: path.join(journal::JOURNAL_FILE),
                source,
            })?;
        let mut store = Self::with_trees(path, db, meta, journal)?;
        store.replay_journal(journaled)?;
        store.load_strings()?;
        store.bring_schema_up(found)?;
        store.load_agent_id()?;
        let current = found == Some(SCHEMA_VERSION);
        match load {
            Load::Checkpoint if current && store.load_checkpoint() => store.from_checkpoint = true,
            Load::Checkpoint => {
                store.load_live()?;
                return store.reopen_cold();
            }
            Load::Records => store.load_live()?,
            Load::Nothing => {}
        }
        store.begin_writes()?;
        // Read from the live model: the caller of an open without one loads them once it has
        // installed it.
        if load != Load::Nothing {
            store.load_containers()?;
        }
        // The load freed many buffers (records read, a checkpoint decoded, a first sled
        // handle): give them back rather than keep them as RSS.
        release_free_heap();
        Ok(store)
    }

    /// The handle on `db`'s trees, with an empty model.
    fn with_trees(
        path: &Path,
        db: sled::Db,
        meta: sled::Tree,
        journal: journal::Journal,
    ) -> Result<Store, StoreError> {
        let tree = |name: &str| db.open_tree(name).map_err(|e| open_error(path, e));
        Ok(Store {
            journal: Arc::new(Mutex::new(journal)),
            path: Arc::from(path),
            live_tree: tree(TREE_LIVE)?,
            tail: tree(TREE_TAIL)?,
            blocks: tree(TREE_BLOCKS)?,
            hours_open: tree(TREE_HOURS_OPEN)?,
            hour_blocks: tree(TREE_HOUR_BLOCKS)?,
            strings_tree: tree(TREE_STRINGS)?,
            functions: tree(TREE_FUNCTIONS)?,
            audit: tree(TREE_AUDIT)?,
            audit_pending: tree(TREE_AUDIT_PENDING)?,
            generations: tree(TREE_GENERATIONS)?,
            quarantine: tree(TREE_QUARANTINE)?,
            instance_state: tree(TREE_INSTANCE_STATE)?,
            db,
            state: Arc::default(),
            strings: Arc::default(),
            cap: Arc::default(),
            meta,
            from_checkpoint: false,
            corrupt_at_open: 0,
            changes: Arc::default(),
            agent_id: Arc::from(""),
            containers: Arc::default(),
        })
    }

    /// The last step of an open, before any write: from here on the checkpoint is stale until
    /// the next clean close, durably so, or a crash could leave a checkpoint that misses later
    /// writes. Then what is kept of instances that are not live goes.
    fn begin_writes(&mut self) -> Result<(), StoreError> {
        self.meta.insert(KEY_CLEAN, &b"0"[..])?;
        self.drop_orphan_states()?;
        if self.meta.remove(KEY_LIVE_CHECKPOINT)?.is_some() {
            tracing::info!(
                "store at {}: checkpoint moved to a file of its own",
                self.path.display()
            );
        }
        self.db.flush()?;
        Ok(())
    }

    /// Directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes all buffered changes to disk (one flush of sled), then empties the audit
    /// journal, whose records sled now holds durably. The agent calls this once a second and
    /// at a clean stop; sled has no flusher of its own here, and flushes at drop.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mark = self.journal().bytes;
        // The flush runs without the journal's lock, so limit writes meanwhile do not wait
        // for it; the journal is emptied only if none came in (else at the next flush, or
        // when it reaches JOURNAL_SETTLE_BYTES).
        self.db.flush()?;
        if mark == 0 {
            return Ok(());
        }
        let mut journal = self.journal();
        if journal.bytes != mark {
            return Ok(());
        }
        journal
            .reset()
            .map_err(|source| journal_error(&journal, source))
    }

    /// How many writes the model has taken since the store opened: equal counts, equal answers.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Counts a change of the model when dropped, at the end of the write that makes it: an
    /// answer built on the count read before then is rebuilt at the next request.
    fn changing(&self) -> Changing<'_> {
        Changing(&self.changes)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The model holds plain aggregates: one left by a panicked writer is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    fn raw_tree(&self, name: &str) -> sled::Tree {
        self.db.open_tree(name).expect("open tree")
    }
}

/// Creates the store's directory, root's eyes only: it holds every function's history and
/// the audit.
fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    let create_err = |source| StoreError::CreateDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(create_err)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(create_err)
}

/// Opens sled in `path`, waiting a moment for a lock just released; [`StoreError::Busy`],
/// naming the holder, when another agent keeps it.
fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    // No flusher thread of sled's own (it flushed every 500 ms): the agent flushes once a
    // second itself, when it also gives read events back to the kernel, and each flush is a
    // device cache flush that an audit record's O_DSYNC write meeting it waits for (the
    // figures are in docs/design.md). sled flushes at drop.
    let config = sled::Config::new()
        .path(path)
        .cache_capacity(STORE_CACHE_BYTES)
        .flush_every_ms(None);
    // The file lock of a handle just dropped (this process's, or an agent still exiting
    // while its successor starts) is released by sled's flusher thread a moment later.
    let mut tries = 0;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && tries < 40 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(StoreError::Busy {
                    path: path.to_path_buf(),
                    holder: crate::files::lock_holder(&path.join("db")),
                })
            }
            other => return other.map_err(|e| open_error(path, e)),
        }
    }
}

fn open_error(path: &Path, source: sled::Error) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// What an open builds the live model from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Load {
    /// The checkpoint of the last clean close, or the records when there is none.
    Checkpoint,
    /// The records, even when a checkpoint is valid.
    Records,
    /// Nothing (the caller installs a model it built).
    Nothing,
}

/// See [`Store::changing`].
struct Changing<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn a_second_open_names_the_agent_holding_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let _held = Store::open(&path).expect("first open");
        match Store::open(&path) {
            Err(e @ StoreError::Busy { .. }) => {
                let StoreError::Busy { holder, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(*holder, Some(std::process::id()), "{e}");
                let text = e.to_string();
                assert!(text.contains("another agent holds the store"), "{text}");
                assert!(!text.contains("WouldBlock"), "{text}");
            }
            Err(e) => panic!("not Busy: {e}"),
            Ok(_) => panic!("opened twice"),
        }
    }

    #[test]
    fn store_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Store>();
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
    fn open_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = Store::open(&file.join("db")).unwrap_err();
        assert!(matches!(err, StoreError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains("plain-file"), "{err}");
    }
}
