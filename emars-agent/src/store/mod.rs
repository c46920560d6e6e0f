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
//! | `instances_live`  | `started_at_ms` (u64) · `cgroup_id` (u64)        | `0x02` · postcard [`StoredInstance`]           |
//! | `instances_tail`  | `started_at_ms` (u64) · `cgroup_id` (u64)        | the same, for an ended record not sealed yet   |
//! | `instance_blocks` | sequence (u64)                                   | `0x02` · postcard list of (start, cgroup id, [`StoredInstance`]) |
//! | `hours_open`      | hours since the epoch (u32) · function id (u32)  | `0x02` · postcard `StoredHour`                 |
//! | `hour_blocks`     | hours since the epoch (u32)                      | `0x02` · postcard list of (function id, `StoredHour`) |
//! | `strings`         | id (u32)                                         | a function name or a cgroup parent path        |
//! | `functions`       | name                                             | `{"first_seen_ms":…,"last_seen_ms":…}`         |
//! | `meta`            | `schema_version`                                 | `2`                                            |
//! | `meta`            | `checkpoint_id`, `clean`                         | id of the checkpoint file the last clean close wrote; `1` while nothing was written since |
//! | `audit`           | `at_ms` (u64) · sequence (u64)                   | `AuditRecord` JSON (every limit write)         |
//! | `audit_pending`   | the `audit` key of a write whose outcome is not recorded yet | empty                              |
//! | `generations`     | `generated_at_ms` (u64) · sequence (u64)         | `Generation` JSON (each generated config)      |
//! | `instance_state`  | `started_at_ms` (u64) · `cgroup_id` (u64) · kind (u8) | `0x02` · postcard of the kind: 1 [`RuntimeLimit`], 2 [`BurstWatch`], 3 [`SqueezeHold`] |
//! | `quarantine`      | tree name · `0x00` · key                         | a value that did not decode, moved aside       |
//!
//! An instance's record lives in `instances_live` while it runs (rewritten as its peak grows),
//! then in `instances_tail` once it ends; every [`BLOCK_RECORDS`] ended records are moved into
//! one block in a single sled transaction (a crash leaves them in one place or the other).
//! One sled value per 128 records instead of one each is what brings a record down to about
//! 100 bytes on disk. Hour buckets work the same way: `hours_open` while their hour (or the
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
//! repeat across thousands of records. Strings go with retention: [`Store::prune`] removes a
//! string once no known function has that name, no live record names it, and every ended
//! record naming it ended before the cutoff (the index keeps each string's latest such end),
//! so the records that used it are gone. It takes the string out of the in-memory map first
//! (a new record naming that text gets a new id), flushes sled, so that the records' removal
//! is durable, and only then removes it from `strings`: a crash at any point leaves no record
//! naming a missing id (at worst a string with no record, removed by the next prune).
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
//! # Versions and migration
//!
//! `meta/schema_version` says which layout the trees follow. Schema 1 (JSON values in
//! `instances` and `hours`, keyed by function name first) is migrated at open: every record
//! is rewritten into the schema 2 trees, then the old trees are dropped and the version set,
//! in that order, so an interrupted migration simply runs again. A version newer than
//! [`SCHEMA_VERSION`] is refused ([`StoreError::SchemaTooNew`]) rather than misread. Values
//! carry their own format byte (`0x02`), so a later format can be read beside this one.
//!
//! # Errors
//!
//! A value that does not decode is reported as [`StoreError::Corrupt`] with the tree and a
//! readable rendering of the key (`started_at_ms/cgroup_id` for instances); the store never
//! panics on bad data. At open, such a value is left out of the live model and moved to
//! `quarantine` (nothing is lost when a later write reuses its key).

pub mod journal;
mod recover;

pub use recover::KEEP_MOVED_ASIDE;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::kept::{BurstWatch, KeptState, RuntimeLimit, SqueezeHold};
use crate::model::live::{EndedRecord, InstanceKey, LiveModel, IN_TAIL};
use crate::model::tracker::{FunctionAdmission, FunctionsFull};
use crate::model::Sample;
pub use crate::model::HOUR_MS;
use crate::model::{
    FunctionConfig, FunctionSummary, HourBucket, HourDelta, InstanceRecord, Limits, PeakSource,
};
use sled::Transactional;

pub use crate::model::live::Order;

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

/// Schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 2;

/// sled's page cache.
const STORE_CACHE_BYTES: u64 = 32 << 20;

const TREE_LIVE: &str = "instances_live";
const TREE_TAIL: &str = "instances_tail";
const TREE_BLOCKS: &str = "instance_blocks";
const TREE_HOURS_OPEN: &str = "hours_open";
const TREE_HOUR_BLOCKS: &str = "hour_blocks";
const TREE_STRINGS: &str = "strings";
const TREE_FUNCTIONS: &str = "functions";
const TREE_META: &str = "meta";
const TREE_AUDIT: &str = "audit";
const TREE_GENERATIONS: &str = "generations";
const TREE_AUDIT_PENDING: &str = "audit_pending";
const TREE_QUARANTINE: &str = "quarantine";
const TREE_INSTANCE_STATE: &str = "instance_state";
/// Schema 1's trees, migrated and dropped at open.
const TREE_V1_INSTANCES: &str = "instances";
const TREE_V1_HOURS: &str = "hours";

/// Format byte in front of every schema 2 record value.
const FORMAT_V2: u8 = 2;

/// The audit journal is emptied (after a flush of sled) once it holds this much.
const JOURNAL_SETTLE_BYTES: u64 = journal::CAPACITY / 2;

/// Ended records per block: the tail is sealed into one sled value when it has this many.
pub const BLOCK_RECORDS: usize = 128;

/// Key of a log record (audit, generations): `at_ms` (u64 BE) · sequence (u64 BE).
pub type AuditKey = [u8; 16];
const KEY_SCHEMA_VERSION: &str = "schema_version";
/// Where schema 2 before checkpoint files kept the checkpoint (removed at open).
const KEY_LIVE_CHECKPOINT: &str = "live_checkpoint";
/// The id written into the checkpoint file of the last clean close, and whether nothing was
/// written since.
const KEY_CHECKPOINT_ID: &str = "checkpoint_id";
const KEY_CLEAN: &str = "clean";
/// The live model as of the last clean close: a file beside sled's, not a sled value. As one
/// value of ~30 bytes per record it stayed in sled's cache after the open (88 MB at 3M
/// records) and went through sled's log at every clean close.
pub const CHECKPOINT_FILE: &str = "checkpoint";
/// The kernel event ring (its identity) and the position up to which the records here reflect
/// its events.
const KEY_RING_MARK: &str = "ring_mark";
/// Format of the checkpoint (its first byte); another one is ignored (the model is rebuilt
/// from the records).
const CHECKPOINT_FORMAT: u8 = 5;

/// Default of `store.max_functions`: functions the store knows at most ([`Store::set_function_cap`]).
pub const DEFAULT_MAX_FUNCTIONS: usize = 10_000;
/// A refused function name is logged at most this often (the first at once).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
    #[error("cannot write the checkpoint {path}: {source}")]
    Checkpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A new function, and the cap on functions is reached.
    #[error(transparent)]
    FunctionsFull(#[from] FunctionsFull),
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
    /// Interned names and parent paths no retained record, live instance or function uses.
    pub strings_removed: u64,
}

/// Value of the `functions` tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FunctionRecord {
    first_seen_ms: u64,
    #[serde(default)]
    last_seen_ms: u64,
    /// Retained ended instances and hour buckets when last written (checkpoints, pruning):
    /// an open reserves that much, instead of growing each list by doubling (which left the
    /// rebuild of a 3M-record store at twice the model's size).
    #[serde(default, skip_serializing_if = "is_zero")]
    ended: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    hours: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An instance record as the store holds it (after the format byte, in postcard:
/// integers are varints). Its start time and cgroup id are the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInstance {
    /// `strings` id of the function name.
    function: u32,
    /// `strings` id of the cgroup's parent directory.
    parent: u32,
    /// Last component of the cgroup path.
    leaf: String,
    /// The instance name when it is not the last path component.
    instance: Option<String>,
    /// Run time (ended_at_ms - started_at_ms); None while live.
    ran_ms: Option<u64>,
    execs: u64,
    peak_bytes: u64,
    peak_source: u8,
    oom_kills: u64,
    max_bytes: Option<u64>,
    high_bytes: Option<u64>,
}

/// An hour bucket as the store holds it; the hour and the function are its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct StoredHour {
    instances_started: u64,
    execs: u64,
    invocations: u64,
    oom_kills: u64,
    peak_bytes: u64,
}

/// Function names and cgroup parent paths by id, both ways.
#[derive(Debug, Default)]
struct Strings {
    ids: HashMap<Arc<str>, u32>,
    by_id: HashMap<u32, Arc<str>>,
    next: u32,
}

/// The cap on functions ([`Store::set_function_cap`]) and the names it refused.
#[derive(Debug)]
struct FunctionCap {
    max: usize,
    /// Functions named in the config: admitted past the cap (the operator chose them).
    always: HashSet<String>,
    /// Functions admitted through [`Store::admit_function`] and known since: a new instance of
    /// one is admitted without the model's lock (the mkdir-to-limits path must not wait behind
    /// a prune). Pruning takes out the functions it forgets.
    admitted: HashSet<String>,
    /// Refusals since the store opened, and since the last log line.
    refused: u64,
    unlogged: u64,
    logged_at: Option<std::time::Instant>,
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
        // Reads are answered from the live model, so sled's page cache serves writes and
        // point reads only: 32 MiB instead of sled's default 1 GiB keeps the agent small.
        // No flusher thread of sled's own (it flushed every 500 ms): the agent flushes once a
        // second itself, when it also gives read events back to the kernel, and each flush is
        // a device cache flush that an audit record's O_DSYNC write meeting it waits for
        // (measured: mkdir-to-limits p99 6.1 -> 3.9 ms without sled's). sled flushes at drop.
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(STORE_CACHE_BYTES)
            .flush_every_ms(None);
        // The file lock of a handle just dropped (this process's, or an agent still exiting
        // while its successor starts) is released by sled's flusher thread a moment later.
        // What sled's log held before sled opens it (see below).
        let log_bytes = std::fs::metadata(path.join("db")).map_or(0, |m| m.len());
        let mut tries = 0;
        let db = loop {
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
                other => break other.map_err(open_err)?,
            }
        };
        let tree = |name: &str| db.open_tree(name).map_err(open_err);
        let meta = tree(TREE_META)?;
        let found = match meta.get(KEY_SCHEMA_VERSION)? {
            None => None,
            Some(raw) => {
                let found: u32 = decode_json(TREE_META, KEY_SCHEMA_VERSION, &raw)?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        path: path.to_path_buf(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(found)
            }
        };
        // sled cuts a damaged log at its last whole record while it opens, and says nothing.
        // A log that had bytes and kept not even the schema version (written at the first
        // open) lost everything: that is corruption, not a new store.
        if found.is_none() && log_bytes > 0 {
            return Err(StoreError::LogLost {
                path: path.join("db"),
                bytes: log_bytes,
            });
        }
        let (journal, journaled) =
            journal::Journal::open(path).map_err(|source| StoreError::CreateDir {
                path: path.join(journal::JOURNAL_FILE),
                source,
            })?;
        let mut store = Store {
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
        };
        store.replay_journal(journaled)?;
        store.load_strings()?;
        if found == Some(1) {
            store.migrate_v1()?;
        }
        if found != Some(SCHEMA_VERSION) {
            store
                .meta
                .insert(KEY_SCHEMA_VERSION, SCHEMA_VERSION.to_string().as_bytes())?;
        }
        let current = found == Some(SCHEMA_VERSION);
        match load {
            Load::Checkpoint if current && store.load_checkpoint() => store.from_checkpoint = true,
            Load::Checkpoint | Load::Records => {
                store.load_live()?;
                // Reading every block left sled's cache holding several times its capacity
                // (measured: 145 MB over the model at 3M records), and the model's buffers
                // interleaved with it. So sled is opened afresh, cold as after a clean close,
                // and the model is moved over encoded, so that it is decoded into memory of
                // its own once sled's is freed (keeping it as it was held 100 MB more).
                if load == Load::Checkpoint {
                    let encoded =
                        postcard::to_allocvec(&*store.state()).map_err(|e| StoreError::Encode {
                            tree: TREE_META,
                            key: CHECKPOINT_FILE.to_owned(),
                            reason: e.to_string(),
                        })?;
                    let corrupt = store.corrupt_at_open;
                    store.db.flush()?;
                    drop(store);
                    let reopened = Self::open_with(path, Load::Nothing)?;
                    *reopened.state() =
                        postcard::from_bytes(&encoded).map_err(|e| StoreError::Corrupt {
                            tree: TREE_META,
                            key: CHECKPOINT_FILE.to_owned(),
                            reason: e.to_string(),
                        })?;
                    drop(encoded);
                    release_free_heap();
                    return Ok(Store {
                        corrupt_at_open: corrupt + reopened.corrupt_at_open,
                        ..reopened
                    });
                }
            }
            Load::Nothing => {}
        }
        // From here on the checkpoint is stale until the next clean close; durably so before
        // any write, or a crash could leave a checkpoint that misses later writes.
        store.meta.insert(KEY_CLEAN, &b"0"[..])?;
        store.drop_orphan_states()?;
        if store.meta.remove(KEY_LIVE_CHECKPOINT)?.is_some() {
            tracing::info!(
                "store at {}: checkpoint moved to a file of its own",
                path.display()
            );
        }
        store.db.flush()?;
        // The load freed many buffers (records read, a checkpoint decoded, a first sled
        // handle): give them back rather than keep them as RSS.
        release_free_heap();
        Ok(store)
    }

    fn load_strings(&self) -> Result<(), StoreError> {
        let mut s = self.strings();
        for item in self.strings_tree.iter() {
            let (key, raw) = item?;
            let id = u32_of(&key);
            let text: Arc<str> = Arc::from(String::from_utf8_lossy(&raw).as_ref());
            s.ids.insert(text.clone(), id);
            s.by_id.insert(id, text);
            s.next = s.next.max(id.saturating_add(1));
        }
        Ok(())
    }

    /// The id of `text`, added to `strings` if new.
    fn intern(&self, text: &str) -> Result<u32, StoreError> {
        let mut s = self.strings();
        if let Some(id) = s.ids.get(text) {
            return Ok(*id);
        }
        // Ids go up and wrap (strings are removed with retention): the next one not in use.
        let mut id = s.next;
        while s.by_id.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        // Written before any record that uses it: sled recovers writes in order.
        self.strings_tree
            .insert(id.to_be_bytes(), text.as_bytes())?;
        let text: Arc<str> = Arc::from(text);
        s.ids.insert(text.clone(), id);
        s.by_id.insert(id, text);
        s.next = id.wrapping_add(1);
        Ok(id)
    }

    fn string(&self, id: u32) -> Option<Arc<str>> {
        self.strings().by_id.get(&id).cloned()
    }

    fn strings(&self) -> MutexGuard<'_, Strings> {
        self.strings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cap(&self) -> MutexGuard<'_, FunctionCap> {
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
    fn admit_locked(&self, model: &LiveModel, function: &str) -> Result<(), StoreError> {
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

    /// Schema 1 → 2: every record rewritten into the new trees, then the old trees dropped.
    /// Schema 1 → 2: every record written again through the schema 2 write path, then the old
    /// trees dropped. Values that do not decode are kept in `quarantine`. The model built on
    /// the way is thrown away: the open builds it from the new trees as always.
    fn migrate_v1(&mut self) -> Result<(), StoreError> {
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

    /// The live model from the checkpoint of the last clean close, if there is a valid one:
    /// the store is clean and the file carries the id the store noted when it was written.
    fn load_checkpoint(&self) -> bool {
        let clean = matches!(self.meta.get(KEY_CLEAN), Ok(Some(v)) if v.as_ref() == b"1");
        let id = match self.meta.get(KEY_CHECKPOINT_ID) {
            Ok(Some(v)) => v.to_vec(),
            _ => return false,
        };
        if !clean {
            return false;
        }
        let path = self.path.join(CHECKPOINT_FILE);
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!(
                    "cannot read {} ({e}): rebuilding from the records",
                    path.display()
                );
                return false;
            }
        };
        let Some((&format, rest)) = raw.split_first() else {
            return false;
        };
        if format != CHECKPOINT_FORMAT {
            tracing::info!("checkpoint of another format ignored: rebuilding");
            return false;
        }
        let Some(body) = rest.strip_prefix(id.as_slice()) else {
            tracing::warn!(
                "{} is not the last clean close's: rebuilding",
                path.display()
            );
            return false;
        };
        match postcard::from_bytes::<State>(body) {
            Ok(state) => {
                *self.state() = state;
                true
            }
            Err(e) => {
                tracing::warn!("unreadable checkpoint ({e}): rebuilding from the records");
                false
            }
        }
    }

    /// Writes the live model as the checkpoint the next open starts from, with every
    /// function's last-seen time, and marks the store clean. Called at a clean shutdown; any
    /// write after it makes the next open rebuild.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        let st = self.state();
        for name in st.model.names() {
            self.write_function(&st.model, &name)?;
        }
        // A new id each time: a file left by an earlier close never passes for this one.
        let id = self
            .meta
            .get(KEY_CHECKPOINT_ID)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(1, u64::from_be_bytes)
            .wrapping_add(1)
            .to_be_bytes();
        let mut raw = vec![CHECKPOINT_FORMAT];
        raw.extend_from_slice(&id);
        postcard::to_io(&*st, &mut raw).map_err(|e| StoreError::Encode {
            tree: TREE_META,
            key: CHECKPOINT_FILE.to_owned(),
            reason: e.to_string(),
        })?;
        drop(st);
        let path = self.path.join(CHECKPOINT_FILE);
        crate::files::replace(&path, &raw, 0o600).map_err(|source| StoreError::Checkpoint {
            path: path.clone(),
            source,
        })?;
        drop(raw);
        self.meta.insert(KEY_CHECKPOINT_ID, &id[..])?;
        self.meta.insert(KEY_CLEAN, &b"1"[..])?;
        self.flush()
    }

    /// Notes that the records written so far reflect the events of ring `ring` up to `pos`:
    /// written before each flush, so that a durable mark comes with durable effects, and a
    /// restarted agent that reads those events again from a pinned ring skips them.
    pub fn set_ring_mark(&self, ring: &str, pos: u64) -> Result<(), StoreError> {
        let raw = encode_json(TREE_META, KEY_RING_MARK.as_bytes(), &(ring, pos))?;
        self.meta.insert(KEY_RING_MARK, raw)?;
        Ok(())
    }

    /// The last [`Store::set_ring_mark`] that reached the disk.
    pub fn ring_mark(&self) -> Option<(String, u64)> {
        let raw = self.meta.get(KEY_RING_MARK).ok()??;
        serde_json::from_slice(&raw).ok()
    }

    /// Whether this open took the live model from a checkpoint (else it read the records).
    pub fn opened_from_checkpoint(&self) -> bool {
        self.from_checkpoint
    }

    /// What the live model holds.
    pub fn footprint(&self) -> crate::model::ModelFootprint {
        let mut fp = self.state().model.footprint();
        fp.strings = self.strings().by_id.len() as u64;
        fp
    }

    /// Values that did not decode at open (left out of the model, kept in `quarantine`).
    pub fn corrupt_at_open(&self) -> u64 {
        self.corrupt_at_open
    }

    /// Builds the live model and the index from the records (once, at open). A value that
    /// does not decode is left out, copied to `quarantine` and said, not fatal.
    fn load_live(&mut self) -> Result<(), StoreError> {
        let mut corrupt = Vec::new();
        {
            let mut st = self.state();
            let st = &mut *st;
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
            let add = |model: &mut LiveModel, rec: &InstanceRecord| {
                let last = rec.ended_at_ms.unwrap_or(0).max(rec.started_at_ms);
                model.seen(&rec.function, rec.started_at_ms, last);
                model.put_instance(None, rec);
            };
            for item in self.blocks.iter() {
                let (key, raw) = item?;
                let seq = u64_of(&key);
                let entries = match decode_v2::<Vec<BlockEntry>>(&raw) {
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
                            limit_bytes: e.record.max_bytes,
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
                    st.model.load_block(&function, block_id(seq), &recs);
                }
                st.index.blocks.insert(seq, info);
                st.index.next_block = st.index.next_block.max(seq + 1);
            }
            for (tree, name) in [(&self.tail, TREE_TAIL), (&self.live_tree, TREE_LIVE)] {
                for item in tree.iter() {
                    let (key, raw) = item?;
                    match self.decode_instance(&key, &raw) {
                        Ok(rec) => {
                            add(&mut st.model, &rec);
                            if name == TREE_TAIL {
                                if let Ok(s) = decode_v2::<StoredInstance>(&raw) {
                                    let end =
                                        rec.started_at_ms.saturating_add(s.ran_ms.unwrap_or(0));
                                    st.index.note_end([s.function, s.parent], end);
                                }
                                st.index
                                    .tail
                                    .insert((rec.started_at_ms, rec.cgroup_id), rec.function);
                            }
                        }
                        Err(e) => corrupt.push((name, key, raw, e)),
                    }
                }
            }
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
            st.model.shrink();
        }
        for (tree, key, raw, e) in &corrupt {
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

    fn settle_if_large(&self, journal: &mut journal::Journal) -> Result<(), StoreError> {
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
    fn replay_journal(&self, entries: Vec<journal::Entry>) -> Result<(), StoreError> {
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

    fn journal(&self) -> MutexGuard<'_, journal::Journal> {
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
        let value = encode_json(name, &key, rec)?;
        tree.insert(key, value)?;
        Ok(key)
    }

    /// Directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

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
            if *block != IN_TAIL {
                self.remove_from_block(&mut st, u64::from(*block), &[ikey])?;
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
        if st.index.tail.len() >= BLOCK_RECORDS {
            self.seal_tail(&mut st)?;
        }
        Ok(())
    }

    /// The ended record `key` wherever it is kept (tail or block), with its block.
    fn find_ended(
        &self,
        st: &State,
        function: &str,
        key: InstanceKey,
    ) -> Result<Option<(InstanceRecord, u32)>, StoreError> {
        // The index knows the tail: a new instance (the common write) reads nothing.
        if st.index.tail.contains_key(&key) {
            let raw_key = log_key(key.0, key.1);
            if let Some(raw) = self.tail.get(raw_key)? {
                // One that does not decode was never counted (it is in quarantine).
                return Ok(self
                    .decode_instance(&raw_key, &raw)
                    .ok()
                    .map(|r| (r, IN_TAIL)));
            }
        }
        let Some(block) = st.model.ended_block(function, key) else {
            return Ok(None);
        };
        let recs = self.read_block(u64::from(block))?;
        Ok(recs
            .into_iter()
            .find(|r| (r.started_at_ms, r.cgroup_id) == key)
            .map(|r| (r, block)))
    }

    /// Moves every tail record into a new block, atomically (a crash leaves them in one place
    /// or the other, never both).
    fn seal_tail(&self, st: &mut State) -> Result<(), StoreError> {
        let mut entries = Vec::with_capacity(st.index.tail.len());
        let mut unsealable = Vec::new();
        let mut keys_by_fn: HashMap<String, Vec<InstanceKey>> = HashMap::new();
        let (mut min_end, mut max_end) = (u64::MAX, 0u64);
        for (ikey, function) in &st.index.tail {
            let raw_key = log_key(ikey.0, ikey.1);
            let Some(stored) = self
                .tail
                .get(raw_key)?
                .and_then(|raw| decode_v2::<StoredInstance>(&raw).ok())
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
        let block = block_id(seq);
        for (function, keys) in keys_by_fn {
            st.model.set_block(&function, &keys, block);
        }
        Ok(())
    }

    /// Rewrites block `seq` without the records `keys` (removed when none is left).
    fn remove_from_block(
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

    fn write_block(&self, st: &mut State, seq: u64, kept: &[BlockEntry]) -> Result<(), StoreError> {
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

    fn read_block_entries(&self, seq: u64) -> Result<Vec<BlockEntry>, StoreError> {
        let key = seq.to_be_bytes();
        match self.blocks.get(key)? {
            None => Ok(Vec::new()),
            Some(raw) => decode_v2::<Vec<BlockEntry>>(&raw).map_err(|reason| StoreError::Corrupt {
                tree: TREE_BLOCKS,
                key: seq.to_string(),
                reason,
            }),
        }
    }

    fn read_block(&self, seq: u64) -> Result<Vec<InstanceRecord>, StoreError> {
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
        let Some(block) = st.model.ended_block(function, (started_at_ms, cgroup_id)) else {
            return Ok(None);
        };
        drop(st);
        Ok(self
            .read_block(u64::from(block))?
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
        let located: Vec<(InstanceKey, Option<u32>)> = keys
            .iter()
            .map(|k| (*k, st.model.ended_block(function, *k)))
            .collect();
        drop(st);
        let mut blocks: HashMap<u32, HashMap<InstanceKey, InstanceRecord>> = HashMap::new();
        let mut records = Vec::with_capacity(located.len());
        for (key, block) in located {
            match block {
                Some(b) if b != IN_TAIL => {
                    if let std::collections::hash_map::Entry::Vacant(slot) = blocks.entry(b) {
                        let recs = self.read_block(u64::from(b))?;
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
                _ => {
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

    /// Keeps `state` of the live instance `key`, in place of what was kept of that kind. It
    /// reaches the disk with the store's next flush ([`Store::flush`] to have it there now),
    /// and goes when the instance's record is written as ended.
    pub fn keep_state<T: KeptState>(&self, key: InstanceKey, state: &T) -> Result<(), StoreError> {
        let k = state_key(key, T::KIND);
        let mut value = vec![FORMAT_V2];
        postcard::to_io(state, &mut value).map_err(|e| StoreError::Encode {
            tree: TREE_INSTANCE_STATE,
            key: display_state_key(&k),
            reason: e.to_string(),
        })?;
        self.instance_state.insert(k, value)?;
        Ok(())
    }

    /// What is kept of kind `T` for the live instance `key`.
    pub fn kept_state<T: KeptState>(&self, key: InstanceKey) -> Result<Option<T>, StoreError> {
        let k = state_key(key, T::KIND);
        let Some(raw) = self.instance_state.get(k)? else {
            return Ok(None);
        };
        decode_v2(&raw)
            .map(Some)
            .map_err(|reason| StoreError::Corrupt {
                tree: TREE_INSTANCE_STATE,
                key: display_state_key(&k),
                reason,
            })
    }

    /// Drops what is kept of kind `T` for the instance `key`.
    pub fn forget_state<T: KeptState>(&self, key: InstanceKey) -> Result<(), StoreError> {
        self.instance_state.remove(state_key(key, T::KIND))?;
        Ok(())
    }

    /// Everything kept of kind `T`, by instance (read at start-up; an open has moved what does
    /// not decode aside).
    pub fn kept_states<T: KeptState>(&self) -> Result<Vec<(InstanceKey, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self.instance_state.iter() {
            let (k, raw) = item?;
            if k.len() != 17 || k[16] != T::KIND {
                continue;
            }
            match decode_v2(&raw) {
                Ok(v) => out.push(((u64_of(&k[..8]), u64_of(&k[8..16])), v)),
                Err(reason) => tracing::error!(
                    "{} of {}: {reason}; ignored",
                    T::NAME,
                    display_state_key(&k)
                ),
            }
        }
        Ok(out)
    }

    /// Drops everything kept of the instance whose record key is `key`.
    fn drop_states(&self, key: &[u8; 16]) -> Result<(), StoreError> {
        for k in self.instance_state.scan_prefix(key).keys() {
            self.instance_state.remove(k?)?;
        }
        Ok(())
    }

    /// At open: drops what is kept of instances that are not live (a write that raced the
    /// instance's end, or an end recorded while the entry was not yet on disk), and moves
    /// aside values that do not decode.
    fn drop_orphan_states(&mut self) -> Result<(), StoreError> {
        let (mut orphans, mut corrupt) = (0u64, 0u64);
        for item in self.instance_state.iter() {
            let (k, raw) = item?;
            let decodes = k.len() == 17
                && match k[16] {
                    RuntimeLimit::KIND => decode_v2::<RuntimeLimit>(&raw).is_ok(),
                    BurstWatch::KIND => decode_v2::<BurstWatch>(&raw).is_ok(),
                    SqueezeHold::KIND => decode_v2::<SqueezeHold>(&raw).is_ok(),
                    _ => false,
                };
            if !decodes {
                tracing::error!(
                    "`{TREE_INSTANCE_STATE}` value at {} does not decode; moved to \
                     `{TREE_QUARANTINE}`",
                    display_state_key(&k)
                );
                self.quarantine
                    .insert(quarantine_key(TREE_INSTANCE_STATE, &k), raw)?;
                self.instance_state.remove(&k)?;
                corrupt += 1;
            } else if !self.live_tree.contains_key(&k[..16])? {
                self.instance_state.remove(&k)?;
                orphans += 1;
            }
        }
        if orphans > 0 {
            tracing::info!("{orphans} kept states of instances that are not live dropped");
        }
        self.corrupt_at_open += corrupt;
        Ok(())
    }

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
    fn seal_hours(&self, st: &mut State, before_ms: u64) -> Result<(), StoreError> {
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
    fn hour_block_value(&self, st: &State, hour: u64) -> Result<Vec<u8>, StoreError> {
        let mut entries = Vec::new();
        for (name, b) in st.model.buckets_of_hour(hour) {
            entries.push((self.intern(&name)?, stored_hour(&b)));
        }
        let mut out = vec![FORMAT_V2];
        postcard::to_io(&entries, &mut out).map_err(|e| StoreError::Encode {
            tree: TREE_HOUR_BLOCKS,
            key: hour.to_string(),
            reason: e.to_string(),
        })?;
        Ok(out)
    }

    fn write_hour_block(&self, st: &State, hour: u64) -> Result<(), StoreError> {
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

    /// A function's idle times between uses, from memory (None when it is unknown).
    pub fn idle_times(&self, function: &str) -> Result<Option<Vec<u64>>, StoreError> {
        validate_name(function)?;
        Ok(self.state().model.idle_times(function))
    }

    /// The paper's per-function config, one entry per known function, sorted by name.
    ///
    /// `requests_per_hour` is the busiest retained hour's platform-reported invocations when
    /// any retained hour has some, else the busiest hour's execs; `max_memory_bytes` is the
    /// peak of the retained instance peaks.
    pub fn export(&self) -> Result<Vec<FunctionConfig>, StoreError> {
        Ok(self.state().model.export())
    }

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
    fn prune_retained(
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

    /// Audit records and generations before `cutoff` (the newest generation is kept: it
    /// carries the period across restarts).
    fn prune_logs(&self, cutoff: u64, report: &mut PruneReport) -> Result<(), StoreError> {
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

    /// Takes the strings nothing retained uses out of the in-memory map (with the state held,
    /// so no write in between can name them): known functions' names, strings of live records,
    /// and strings of ended records that ended at or after `cutoff` stay. A record written
    /// from now on with one of these texts gets a new id. Returns the ids to remove.
    fn retire_strings(&self, st: &mut State, cutoff: u64) -> Result<Vec<u32>, StoreError> {
        let mut live: HashSet<u32> = HashSet::new();
        for item in self.live_tree.iter() {
            let (_, raw) = item?;
            // One that does not decode names nothing this store can read.
            if let Ok(r) = decode_v2::<StoredInstance>(&raw) {
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
    fn remove_strings(&self, ids: &[u32]) -> Result<u64, StoreError> {
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

    /// The tree of a record kind by its name (for moving a corrupt value aside).
    fn tree_named(&self, name: &str) -> Option<&sled::Tree> {
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

    /// Persists the function's first/last-seen range as the model has it.
    fn write_function(&self, model: &LiveModel, name: &str) -> Result<(), StoreError> {
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

    /// The stored value of `rec`, and the ids of its function and parent directory.
    fn encode_instance(&self, rec: &InstanceRecord) -> Result<(Vec<u8>, [u32; 2]), StoreError> {
        let (parent, leaf) = match rec.cgroup_path.rsplit_once('/') {
            Some((p, l)) => (p, l),
            None => ("", rec.cgroup_path.as_str()),
        };
        let stored = StoredInstance {
            function: self.intern(&rec.function)?,
            parent: self.intern(parent)?,
            leaf: leaf.to_owned(),
            instance: (rec.instance != leaf).then(|| rec.instance.clone()),
            ran_ms: rec.ended_at_ms.map(|e| e.saturating_sub(rec.started_at_ms)),
            execs: rec.execs,
            peak_bytes: rec.peak_bytes,
            peak_source: match rec.peak_source {
                PeakSource::None => 0,
                PeakSource::KernelWatermark => 1,
                PeakSource::ChargeEvents => 2,
                PeakSource::UseWatermark => 3,
                PeakSource::LifetimeWatermark => 4,
            },
            oom_kills: rec.oom_kills,
            max_bytes: rec.limits.max_bytes,
            high_bytes: rec.limits.high_bytes,
        };
        let mut out = vec![FORMAT_V2];
        postcard::to_io(&stored, &mut out).map_err(|e| StoreError::Encode {
            tree: TREE_LIVE,
            key: format!("{}/{}", rec.started_at_ms, rec.cgroup_id),
            reason: e.to_string(),
        })?;
        Ok((out, [stored.function, stored.parent]))
    }

    /// A live or tail record (key: start · cgroup id).
    fn decode_instance(&self, key: &[u8], raw: &[u8]) -> Result<InstanceRecord, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: TREE_LIVE,
            key: display_numbers(key),
            reason,
        };
        if key.len() != 16 {
            return Err(corrupt(format!("key of {} bytes, not 16", key.len())));
        }
        let stored = decode_v2::<StoredInstance>(raw).map_err(corrupt)?;
        self.record_of(u64_of(&key[..8]), u64_of(&key[8..]), stored, TREE_LIVE)
    }

    fn record_of(
        &self,
        started_at_ms: u64,
        cgroup_id: u64,
        s: StoredInstance,
        tree: &'static str,
    ) -> Result<InstanceRecord, StoreError> {
        build_record(&self.strings(), started_at_ms, cgroup_id, s, tree)
    }

    /// An open hour bucket: (function, its id, bucket).
    fn decode_hour(&self, key: &[u8], raw: &[u8]) -> Result<(String, u32, HourBucket), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: TREE_HOURS_OPEN,
            key: display_numbers(key),
            reason,
        };
        if key.len() != 8 {
            return Err(corrupt(format!("key of {} bytes, not 8", key.len())));
        }
        let (hour, id) = (u32_of(&key[..4]), u32_of(&key[4..]));
        let s: StoredHour = decode_v2(raw).map_err(corrupt)?;
        let name = self
            .string(id)
            .ok_or_else(|| corrupt(format!("string id {id} is not in `{TREE_STRINGS}`")))?;
        Ok((
            name.to_string(),
            id,
            bucket_of(u64::from(hour) * HOUR_MS, &s),
        ))
    }

    fn decode_hour_block(
        &self,
        hour_start_ms: u64,
        raw: &[u8],
    ) -> Result<Vec<(Arc<str>, HourBucket)>, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: TREE_HOUR_BLOCKS,
            key: hour_start_ms.to_string(),
            reason,
        };
        let entries: Vec<(u32, StoredHour)> = decode_v2(raw).map_err(corrupt)?;
        let strings = self.strings();
        entries
            .into_iter()
            .map(|(id, s)| {
                let name =
                    strings.by_id.get(&id).cloned().ok_or_else(|| {
                        corrupt(format!("string id {id} is not in `{TREE_STRINGS}`"))
                    })?;
                Ok((name, bucket_of(hour_start_ms, &s)))
            })
            .collect()
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

/// The live model and where the store keeps what it holds: one lock, so that the two never
/// disagree. Saved whole in the checkpoint.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    model: LiveModel,
    index: LogIndex,
}

/// Where the records are: blocks and their end-time range, the tail, the open and the
/// sealed hours.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LogIndex {
    next_block: u64,
    blocks: BTreeMap<u64, BlockInfo>,
    /// Ended records not sealed into a block yet, with their function.
    tail: BTreeMap<InstanceKey, String>,
    /// (hour start, function id) of the buckets in `hours_open`.
    open_hours: BTreeSet<(u64, u32)>,
    /// Hours whose buckets are in `hour_blocks`.
    sealed_hours: BTreeSet<u64>,
    newest_hour: u64,
    /// Per string id, the latest end of an ended record naming it (function or parent
    /// directory): once that is before the retention's cutoff, pruning removed every such
    /// record ([`Store::prune`] then removes the string unless something else uses it).
    string_ends: HashMap<u32, u64>,
}

impl LogIndex {
    /// An ended record naming the strings `ids`, ended at `end_ms`.
    fn note_end(&mut self, ids: [u32; 2], end_ms: u64) {
        for id in ids {
            let e = self.string_ends.entry(id).or_insert(end_ms);
            *e = (*e).max(end_ms);
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct BlockInfo {
    min_ended: u64,
    max_ended: u64,
}

/// One record in a block.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BlockEntry {
    started_at_ms: u64,
    cgroup_id: u64,
    record: StoredInstance,
}

/// Gives freed heap memory back to the system (glibc keeps it as RSS otherwise; musl's
/// allocator returns memory on its own).
fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What an open builds the live model from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
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

/// The record a [`StoredInstance`] keyed by `(started_at_ms, cgroup_id)` stands for.
fn build_record(
    strings: &Strings,
    started_at_ms: u64,
    cgroup_id: u64,
    s: StoredInstance,
    tree: &'static str,
) -> Result<InstanceRecord, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        tree,
        key: format!("{started_at_ms}/{cgroup_id}"),
        reason,
    };
    let string = |id| {
        strings
            .by_id
            .get(&id)
            .ok_or_else(|| corrupt(format!("string id {id} is not in `{TREE_STRINGS}`")))
    };
    let function = string(s.function)?.to_string();
    let parent = string(s.parent)?;
    let peak_source = match s.peak_source {
        0 => PeakSource::None,
        1 => PeakSource::KernelWatermark,
        2 => PeakSource::ChargeEvents,
        3 => PeakSource::UseWatermark,
        4 => PeakSource::LifetimeWatermark,
        n => return Err(corrupt(format!("unknown peak source {n}"))),
    };
    Ok(InstanceRecord {
        function,
        instance: s.instance.unwrap_or_else(|| s.leaf.clone()),
        cgroup_id,
        cgroup_path: format!("{parent}/{}", s.leaf),
        started_at_ms,
        ended_at_ms: s.ran_ms.map(|r| started_at_ms.saturating_add(r)),
        execs: s.execs,
        peak_bytes: s.peak_bytes,
        peak_source,
        oom_kills: s.oom_kills,
        limits: Limits {
            max_bytes: s.max_bytes,
            high_bytes: s.high_bytes,
        },
    })
}

/// The model's 32-bit name of block `seq` (4 billion blocks of [`BLOCK_RECORDS`] records).
fn block_id(seq: u64) -> u32 {
    u32::try_from(seq).unwrap_or(IN_TAIL - 1).min(IN_TAIL - 1)
}

fn tx_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Db(e),
        sled::transaction::TransactionError::Abort(()) => {
            StoreError::Db(sled::Error::Unsupported("transaction aborted".into()))
        }
    }
}

fn journal_error(journal: &journal::Journal, source: std::io::Error) -> StoreError {
    StoreError::Journal {
        path: journal.path().to_path_buf(),
        source,
    }
}

/// A schema 2 value: the format byte, then postcard.
fn decode_v2<T: DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    match raw.split_first() {
        Some((&FORMAT_V2, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((b, _)) => Err(format!("unknown format byte {b:#04x}")),
        None => Err("empty value".into()),
    }
}

fn encode_block(entries: &[BlockEntry]) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT_V2];
    postcard::to_io(entries, &mut out).map_err(|e| StoreError::Encode {
        tree: TREE_BLOCKS,
        key: String::new(),
        reason: e.to_string(),
    })?;
    Ok(out)
}

fn stored_hour(b: &HourBucket) -> StoredHour {
    StoredHour {
        instances_started: b.instances_started,
        execs: b.execs,
        invocations: b.invocations,
        oom_kills: b.oom_kills,
        peak_bytes: b.peak_bytes,
    }
}

fn bucket_of(hour_start_ms: u64, s: &StoredHour) -> HourBucket {
    HourBucket {
        hour_start_ms,
        instances_started: s.instances_started,
        execs: s.execs,
        invocations: s.invocations,
        oom_kills: s.oom_kills,
        peak_bytes: s.peak_bytes,
    }
}

fn encode_hour(b: &HourBucket) -> Vec<u8> {
    let mut out = vec![FORMAT_V2];
    // Plain integers into a Vec: postcard cannot fail here.
    let _ = postcard::to_io(&stored_hour(b), &mut out);
    out
}

fn hour_block_key(hour_start_ms: u64) -> [u8; 4] {
    u32::try_from(hour_start_ms / HOUR_MS)
        .unwrap_or(u32::MAX)
        .to_be_bytes()
}

fn log_key(started_at_ms: u64, cgroup_id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&started_at_ms.to_be_bytes());
    k[8..].copy_from_slice(&cgroup_id.to_be_bytes());
    k
}

/// Key of an `instance_state` entry: the instance's record key, then the kind.
fn state_key(key: InstanceKey, kind: u8) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..16].copy_from_slice(&log_key(key.0, key.1));
    k[16] = kind;
    k
}

fn display_state_key(k: &[u8]) -> String {
    match k.len() {
        17 => format!("{}/{}#{}", u64_of(&k[..8]), u64_of(&k[8..16]), k[16]),
        _ => k.escape_ascii().to_string(),
    }
}

fn hour_log_key(hour_start_ms: u64, function_id: u32) -> [u8; 8] {
    // u32 hours since the epoch last until the year 491,937.
    let hour = u32::try_from(hour_start_ms / HOUR_MS).unwrap_or(u32::MAX);
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&hour.to_be_bytes());
    k[4..].copy_from_slice(&function_id.to_be_bytes());
    k
}

fn quarantine_key(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut k = tree.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(key);
    k
}

fn u64_of(b: &[u8]) -> u64 {
    let mut n = [0u8; 8];
    let len = b.len().min(8);
    n[8 - len..].copy_from_slice(&b[..len]);
    u64::from_be_bytes(n)
}

fn u32_of(b: &[u8]) -> u32 {
    u32::try_from(u64_of(&b[..b.len().min(4)])).unwrap_or(u32::MAX)
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

/// A key of big-endian numbers as `n1/n2…`.
fn display_numbers(key: &[u8]) -> String {
    match key.len() {
        16 => format!("{}/{}", u64_of(&key[..8]), u64_of(&key[8..])),
        8 => format!("{}/{}", u32_of(&key[..4]), u32_of(&key[4..])),
        _ => key.escape_ascii().to_string(),
    }
}

fn display_text(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Schema 1: the function name of an `instances` or `hours` key (`name · 0x00 · …`).
fn v1_function_of_key(key: &[u8]) -> String {
    let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
    String::from_utf8_lossy(&key[..end]).into_owned()
}

/// Schema 1: `function/n1/n2…`.
fn v1_display_key(key: &[u8]) -> String {
    let Some(nul) = key.iter().position(|&b| b == 0) else {
        return display_text(key);
    };
    format!(
        "{}/{}",
        String::from_utf8_lossy(&key[..nul]),
        display_numbers(&key[nul + 1..])
    )
}

fn read_log<T: DeserializeOwned>(
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

fn decode_json<T: DeserializeOwned>(
    tree: &'static str,
    key: &str,
    raw: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
        tree,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn encode_json<T: Serialize>(
    tree: &'static str,
    key: &[u8],
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        tree,
        key: display_numbers(key),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod audit_tests {
    use super::*;

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

#[cfg(test)]
mod tests {
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

    /// The checkpoint is a file of its own: one an earlier clean close wrote never passes for
    /// the last one's, and a checkpoint kept in sled by an older build is dropped at open.
    #[test]
    fn checkpoint_file_of_an_earlier_close_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let file = path.join(CHECKPOINT_FILE);
        {
            let s = Store::open(&path).unwrap();
            s.put_instance(&rec("f", 1, 1)).unwrap();
            s.checkpoint().unwrap();
        }
        let first = std::fs::read(&file).unwrap();
        {
            let s = Store::open(&path).unwrap();
            assert!(s.opened_from_checkpoint());
            s.put_instance(&rec("f", 2, 2)).unwrap();
            s.checkpoint().unwrap();
        }
        // The file of the first close put back: its id is not the store's.
        std::fs::write(&file, &first).unwrap();
        {
            let s = Store::open(&path).unwrap();
            assert!(
                !s.opened_from_checkpoint(),
                "an earlier close's checkpoint was used"
            );
            assert_eq!(s.functions().unwrap()[0].live_instances, 2);
            s.checkpoint().unwrap();
            // An older build's checkpoint value in sled.
            s.meta.insert(KEY_LIVE_CHECKPOINT, &[0u8; 64][..]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(s.opened_from_checkpoint());
        assert_eq!(s.meta.get(KEY_LIVE_CHECKPOINT).unwrap(), None);
        assert_eq!(s.functions().unwrap()[0].live_instances, 2);
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

    /// What is kept of a live instance survives a reopen (clean or not), goes when the
    /// instance ends, and an open drops entries of instances that are not live and moves
    /// aside values that do not decode.
    #[test]
    fn kept_state_lives_and_ends_with_its_instance() {
        use crate::model::kept::RuntimeLimitSource;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let hold = SqueezeHold {
            before: Limits {
                max_bytes: Some(64 * MIB),
                high_bytes: Some(48 * MIB),
            },
            hold_bytes: 12 * MIB,
            taken_at_ms: 1_500,
        };
        let watch = BurstWatch {
            ceiling_bytes: 128 * MIB,
            base_bytes: 32 * MIB,
            since_ms: 1_200,
        };
        let limit = RuntimeLimit {
            bytes: 64 * MIB,
            source: RuntimeLimitSource::Metadata,
        };
        {
            let s = Store::open(&path).unwrap();
            for (started, id) in [(1_000, 7), (1_001, 8)] {
                s.put_instance(&rec("f", started, id)).unwrap();
                s.keep_state((started, id), &hold).unwrap();
                s.keep_state((started, id), &watch).unwrap();
            }
            s.keep_state((1_000, 7), &limit).unwrap();
            assert_eq!(s.kept_state::<SqueezeHold>((1_000, 7)).unwrap(), Some(hold));
            assert_eq!(s.kept_state::<RuntimeLimit>((1_001, 8)).unwrap(), None);
            // Another instance on the same cgroup id (inode reused) has nothing kept.
            assert_eq!(s.kept_state::<SqueezeHold>((2_000, 7)).unwrap(), None);
            s.forget_state::<BurstWatch>((1_001, 8)).unwrap();
            // A write that raced the end of an instance never recorded as live.
            s.keep_state((3_000, 9), &hold).unwrap();
            // As a crash leaves it: no checkpoint, sled's own flush at drop.
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.kept_state::<SqueezeHold>((3_000, 9)).unwrap(),
            None,
            "orphan dropped"
        );
        let mut holds = s.kept_states::<SqueezeHold>().unwrap();
        holds.sort_by_key(|(k, _)| *k);
        assert_eq!(holds, vec![((1_000, 7), hold), ((1_001, 8), hold)]);
        assert_eq!(
            s.kept_states::<BurstWatch>().unwrap(),
            vec![((1_000, 7), watch)]
        );
        assert_eq!(
            s.kept_state::<RuntimeLimit>((1_000, 7)).unwrap(),
            Some(limit)
        );
        // The instance ends: everything kept of it goes, the other's stays.
        let mut ended = rec("f", 1_000, 7);
        ended.ended_at_ms = Some(5_000);
        s.put_instance(&ended).unwrap();
        assert_eq!(s.kept_state::<SqueezeHold>((1_000, 7)).unwrap(), None);
        assert_eq!(s.kept_state::<RuntimeLimit>((1_000, 7)).unwrap(), None);
        assert_eq!(s.kept_states::<SqueezeHold>().unwrap().len(), 1);
        // A value that does not decode is an error to read, and moved aside at the next open.
        s.instance_state
            .insert(
                state_key((1_001, 8), BurstWatch::KIND),
                &[FORMAT_V2, 0xff][..],
            )
            .unwrap();
        assert!(s.kept_state::<BurstWatch>((1_001, 8)).is_err());
        s.checkpoint().unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.kept_state::<BurstWatch>((1_001, 8)).unwrap(), None);
        assert_eq!(s.corrupt_at_open(), 1);
        assert_eq!(s.raw_tree(TREE_QUARANTINE).len(), 1);
        assert_eq!(s.kept_state::<SqueezeHold>((1_001, 8)).unwrap(), Some(hold));
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
            s.put_instance(&r).unwrap();
            r.peak_bytes = (i + 1) * MIB;
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
            s.state().model.ended_block(&first.function, k),
            Some(IN_TAIL)
        );
        first.peak_bytes = 999 * MIB;
        first.execs = 7;
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

    /// The strings `strings` holds, as text.
    fn stored_strings(s: &Store) -> BTreeSet<String> {
        s.raw_tree(TREE_STRINGS)
            .iter()
            .values()
            .map(|v| String::from_utf8(v.unwrap().to_vec()).unwrap())
            .collect()
    }

    /// An instance in a pod of its own (a parent directory of its own, as Kubernetes makes).
    fn pod_rec(function: &str, i: u64, start: u64, end: Option<u64>) -> InstanceRecord {
        let mut r = rec(function, start, i);
        r.cgroup_path = format!("/sys/fs/cgroup/kubepods/pod-{i}/c{i}");
        r.ended_at_ms = end;
        r
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
