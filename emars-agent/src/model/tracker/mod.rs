//! Turns kernel events into instance records: a state machine. [`Tracker::apply_batch`] takes
//! the events read from the ring in one go and decides their order and what each one does;
//! [`Tracker::apply`] takes one event. Both return [`Effect`]s (save this record, add to that
//! hour, write limits into this new instance, recompute that function) for the daemon to carry
//! out (`daemon::effects`). The tracker writes nothing itself; what it reads about cgroups
//! (limits, watermarks, which cgroup a task is in) goes through [`Cgroups`], so its logic is
//! tested without root against a table of cgroups.
//!
//! - `events`: one event, and a whole batch (mkdirs first; instances that came and went).
//! - `lifecycle`: a cgroup found, named (now or once its container's metadata is there), its
//!   instance opened and closed, and the limits in force in it.
//! - `binding`: pooled cgroups bound to a function and released (POST /v1/bind, /v1/release).
//! - `reconcile`: watermarks (and the kernel's request counts) read again, instances whose
//!   rmdir never came, and those that ended while no agent ran.

mod binding;
mod events;
mod lifecycle;
mod reconcile;
#[cfg(test)]
mod tests;

pub use events::{gone_in_batch, mkdirs_first};

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
};

use crate::{
    kernel::{
        cgroupfs::{self, CgroupfsError, Limits, MemoryHierarchy, UsePeak},
        netcount::NetCounter,
    },
    model::{
        kept::RuntimeLimit,
        registry::{CgroupTable, Identity, Registry, Unnamed},
        runtime::ContainerMetadata,
        HourDelta, InstanceRecord,
    },
};

/// What the tracker reads about cgroups. [`MemoryHierarchy`] reads the real files.
pub trait Cgroups {
    /// Absolute directory of a path relative to the hierarchy root.
    fn dir(&self, rel_path: &str) -> PathBuf;
    /// The path relative to the hierarchy root of a directory under it.
    fn rel_path(&self, dir: &Path) -> Option<String>;
    fn limits(&self, dir: &Path) -> Result<Limits, CgroupfsError>;
    /// The kernel's watermark (v2 memory.peak, v1 memory.max_usage_in_bytes).
    fn peak(&self, dir: &Path) -> Result<Option<u64>, CgroupfsError>;
    /// The cgroup (relative path) of a process, from /proc.
    fn cgroup_of(&self, pid: u32) -> Option<String>;
    /// The id (directory inode) of a cgroup.
    fn cgroup_id(&self, dir: &Path) -> Option<u64>;
    /// The directory with cgroup id `id` below `dir`.
    fn find_by_id(&self, dir: &Path, id: u64) -> Option<PathBuf>;
    /// Starts a use of the pooled cgroup `rel_path` below the watched root `root`, whose id
    /// must be `id` (its watermark reset where the kernel can).
    fn reset_peak(&self, _root: &str, _rel_path: &str, _id: u64) -> Result<UsePeak, CgroupfsError> {
        Ok(UsePeak::Lifetime)
    }
    /// The peak of that use, and whether it is exact.
    fn use_peak(&self, dir: &Path, _p: &mut UsePeak) -> Result<(u64, bool), CgroupfsError> {
        Ok((self.peak(dir)?.unwrap_or(0), false))
    }
    /// How a use bound before a restart goes on being read.
    fn resumed_peak(&self) -> UsePeak {
        UsePeak::Lifetime
    }
    /// A container's labels, and the memory limit its runtime gave it, from the runtime's
    /// metadata file (rules with `metadata`).
    fn metadata(&self, file: &Path) -> ContainerMetadata {
        crate::model::runtime::read_metadata(file)
    }
}

impl Cgroups for MemoryHierarchy {
    fn dir(&self, rel_path: &str) -> PathBuf {
        MemoryHierarchy::dir(self, rel_path)
    }
    fn rel_path(&self, dir: &Path) -> Option<String> {
        MemoryHierarchy::rel_path(self, dir)
    }
    fn limits(&self, dir: &Path) -> Result<Limits, CgroupfsError> {
        MemoryHierarchy::limits(self, dir)
    }
    fn peak(&self, dir: &Path) -> Result<Option<u64>, CgroupfsError> {
        MemoryHierarchy::peak(self, dir)
    }
    fn cgroup_of(&self, pid: u32) -> Option<String> {
        MemoryHierarchy::cgroup_of(self, pid)
    }
    fn cgroup_id(&self, dir: &Path) -> Option<u64> {
        cgroupfs::cgroup_id(dir).ok()
    }
    fn find_by_id(&self, dir: &Path, id: u64) -> Option<PathBuf> {
        cgroupfs::find_by_id(dir, id)
    }
    /// Through the directory opened below its root without following symlinks and checked to
    /// be cgroup `id`, as the actuator writes limits: a cgroup removed and created again
    /// under the same path since is refused, never reset.
    fn reset_peak(&self, root: &str, rel_path: &str, id: u64) -> Result<UsePeak, CgroupfsError> {
        self.open_recorded(root, rel_path, id)?.reset_peak()
    }
    fn use_peak(&self, dir: &Path, p: &mut UsePeak) -> Result<(u64, bool), CgroupfsError> {
        MemoryHierarchy::use_peak(self, dir, p)
    }
    fn resumed_peak(&self) -> UsePeak {
        MemoryHierarchy::resumed_peak(self)
    }
}

/// What the kernel's socket program counted of an instance's inbound traffic so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelRequests {
    /// TCP connection requests to its listening sockets.
    pub connections: u64,
    /// HTTP/1.x request lines (each request of a keep-alive connection).
    pub requests: u64,
}

/// Where the tracker reads an instance's request counts: the kernel's `NET_COUNTS` map
/// ([`NetCounter`]); read at the moments its watermark is read and at its rmdir.
pub trait RequestCounts: Send {
    /// The totals of the instance whose memory cgroup is `id` at `rel_path` (relative to the
    /// hierarchy); None when it is not counted (its cgroup v2 directory is not known).
    fn read(&mut self, id: u64, rel_path: &str) -> Option<KernelRequests>;
    /// The instance ended and was read a last time.
    fn forget(&mut self, id: u64);
}

impl RequestCounts for NetCounter {
    fn read(&mut self, id: u64, rel_path: &str) -> Option<KernelRequests> {
        NetCounter::read(self, id, rel_path).map(|c| KernelRequests {
            connections: c.connections,
            requests: c.requests,
        })
    }
    fn forget(&mut self, id: u64) {
        NetCounter::forget(self, id)
    }
}

/// A new function name refused because `max` functions are known (`store.max_functions`):
/// names tenants choose must not grow the agent without bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "function {function:?} refused: the agent knows store.max_functions = {max} functions \
     already; a new name is tracked again once retention prunes a function (or raise \
     store.max_functions)"
)]
pub struct FunctionsFull {
    pub function: String,
    pub max: usize,
}

/// Whether a new instance's function may be tracked (the store's cap on functions). Asked once
/// per new instance before its record opens; a function admitted keeps its place.
pub trait FunctionAdmission: Send + Sync {
    fn admit(&self, function: &str, at_ms: u64) -> Result<(), FunctionsFull>;
}

/// Why a bind or release was refused (the API's 4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path} is not inside a watched root; EMARS binds only cgroups it watches")]
    Outside { path: String },
    #[error("no cgroup {path}")]
    NotFound { path: String },
    #[error(
        "{path} is an instance by the path rules ({function}/{instance}), not a pooled cgroup"
    )]
    PathInstance {
        path: String,
        function: String,
        instance: String,
    },
    #[error("{path} is bound already (to {function}/{instance}); release it first")]
    AlreadyBound {
        path: String,
        function: String,
        instance: String,
    },
    #[error("{path} is not bound")]
    NotBound { path: String },
    /// The cgroup was removed and another created under its path between the request and
    /// the bind: the new one is not bound and its watermark not reset.
    #[error(
        "{path} was removed and created again while it was being bound (cgroup id {found}, \
         not {expected}): not bound, its watermark not reset; bind it again"
    )]
    Replaced {
        path: String,
        expected: u64,
        found: u64,
    },
    /// The audit intent of the bind could not be made durable: nothing was done.
    #[error("not bound: {0}")]
    Unavailable(String),
    /// A function the agent does not know, and `store.max_functions` are known.
    #[error("not bound: {0}")]
    FunctionsFull(#[from] FunctionsFull),
}

/// What the tracker asks the rest of the agent to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Persist this version of the record.
    Save(InstanceRecord),
    /// Add to a function's hour bucket.
    AddHour {
        function: String,
        at_ms: u64,
        delta: HourDelta,
    },
    /// Bring a function's recommendation up to date (an OOM kill, instances that ended, or a
    /// new instance of a function with instances ended since the last computation).
    Recompute { function: String, at_ms: u64 },
    /// A new instance's container was given this memory limit by its runtime: kept with the
    /// instance (before its limits are written: no write goes above it).
    RuntimeLimit {
        /// The instance's key: (started_at_ms, cgroup_id).
        key: (u64, u64),
        limit: RuntimeLimit,
    },
    /// A new instance is this Kubernetes container (its runtime's metadata says so): kept
    /// with the instance, and exported per container ([`crate::model::containers`]).
    ContainerNames {
        /// The instance's key: (started_at_ms, cgroup_id).
        key: (u64, u64),
        function: String,
        names: crate::model::containers::KubernetesNames,
    },
    /// A new instance: write its function's limits if the mode says so, and answer before the
    /// next event: [`Effect::LimitsInForce`] when they were written, else
    /// [`Tracker::enforced`] (the record is saved then, with the limits it got).
    Enforce {
        record: InstanceRecord,
        mkdir_ts_ns: Option<u64>,
    },
    /// These limits are in force in a live instance now: every limit write the agent makes or
    /// hears of (a new instance's, the API's, the burst guard's, the squeeze's) ends in one.
    /// The instance's record is saved with them ([`Tracker::limits_in_force`]), the squeeze
    /// and the burst guard told; nothing else tells them. `limits`: the files written (None: left as it was).
    LimitsInForce {
        cgroup_id: u64,
        limits: Limits,
        by: LimitsBy,
    },
}

/// Who put limits in force ([`Effect::LimitsInForce`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitsBy {
    /// A new instance's first limits (its mkdir, the start-up scan, a bind).
    NewInstance,
    /// An explicit write through the API (set-limit, apply).
    Api,
    /// The burst guard's early-warning memory.high (reason `burst_arm`).
    BurstArm,
    /// The burst guard's raise (reason `burst`).
    BurstRaise,
    /// The squeeze's hold (reason `pressure`) and its release (reason `release`).
    SqueezeHold,
    SqueezeRelease,
}

/// How the tracker learned of a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Its mkdir event, with the kernel time of the mkdir.
    Mkdir { ts_ns: u64 },
    /// Later, from one of its tasks (the mkdir event was lost or not sent).
    Late,
    /// At start-up, already there; `new_since_start`: created after the agent started (in the
    /// window between attaching the programs and the scan).
    Existing { new_since_start: bool },
}

/// Default of `cgroup.metadata_wait_ms`.
pub const DEFAULT_METADATA_WAIT_MS: u64 = 10_000;

/// Counters of what the tracker saw, for /v1/info and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrackerStats {
    pub events: u64,
    pub watermark_reads: u64,
    /// Cgroups that were gone when we went to read them (normal for short instances).
    pub vanished_reads: u64,
    /// Paths cut short in their event, and those not found by id.
    pub paths_truncated: u64,
    pub paths_unresolved: u64,
    /// Instances closed by reconciliation because their rmdir event never came (ring full).
    pub reconciled: u64,
    /// Cgroups whose rule waited for the runtime's metadata file, and of those, the ones
    /// named from it and the ones that fell back to the later rules (file absent too long).
    pub metadata_waits: u64,
    pub metadata_named: u64,
    pub metadata_fallbacks: u64,
    /// New instances not tracked because their function was refused ([`FunctionAdmission`]).
    pub functions_refused: u64,
    /// Cgroups a rule matched whose names cannot be used, by [`Unnamed`] (as its discriminant).
    pub unnamed: [u64; Unnamed::ALL.len()],
}

impl TrackerStats {
    /// The unnamed cgroups by reason, for reports: every reason, zero ones too.
    pub fn unnamed_by_reason(&self) -> impl Iterator<Item = (Unnamed, u64)> + '_ {
        Unnamed::ALL
            .iter()
            .map(|&why| (why, self.unnamed[why as usize]))
    }
}

/// A cgroup the rules made an instance of, and what its container's runtime metadata said
/// (rules with `metadata`).
struct Named {
    identity: Identity,
    metadata: MetadataFacts,
}

/// What a container's runtime metadata said besides its labels' names: the memory limit the
/// runtime gave it, and its names in Kubernetes.
#[derive(Debug, Default)]
pub(super) struct MetadataFacts {
    limit: Option<u64>,
    kubernetes: Option<crate::model::containers::KubernetesNames>,
}

/// A cgroup whose rule waits for its container's metadata file (written by the runtime after
/// the mkdir): its instance opens once the file is there, or the wait is over. Its path and
/// start are in the cgroup table.
#[derive(Debug, Clone)]
struct Pending {
    found: Found,
    file: PathBuf,
    /// Execs seen while waiting, counted once the instance opens.
    execs: u64,
}

pub struct Tracker<C: Cgroups = MemoryHierarchy> {
    cgroups: C,
    registry: Registry,
    table: CgroupTable,
    /// Live instances by cgroup id.
    live: HashMap<u64, InstanceRecord>,
    /// Functions with an instance ended since their recommendation was last computed.
    dirty: HashSet<String>,
    /// New instances whose enforcement has not been answered yet.
    awaiting: HashSet<u64>,
    /// Pooled cgroups bound to a function (POST /v1/bind): how their use's peak is read.
    bound: HashMap<u64, UsePeak>,
    /// Cgroups waiting for their container's metadata file, by id.
    pending: HashMap<u64, Pending>,
    /// How long a cgroup waits for its metadata file before the later rules decide.
    metadata_wait_ms: u64,
    /// The cap on functions; None: every function is admitted.
    admission: Option<Box<dyn FunctionAdmission>>,
    /// The kernel's request counts; None: not counted in the kernel (requests come from
    /// execs and platform reports).
    requests: Option<Box<dyn RequestCounts>>,
    /// memory.max the agent (this run or the one before it) wrote into a cgroup, by cgroup id,
    /// from the audit: a value found there is not the container runtime's limit.
    own_writes: HashMap<u64, u64>,
    /// While [`Tracker::apply_batch`] applies a mkdir whose cgroup an rmdir later in the same
    /// batch removes: its id (no limits are written into it).
    came_and_went: Option<u64>,
    pub stats: TrackerStats,
}

impl<C: Cgroups> Tracker<C> {
    pub fn new(cgroups: C, registry: Registry) -> Self {
        Self {
            cgroups,
            registry,
            table: CgroupTable::default(),
            live: HashMap::new(),
            dirty: HashSet::new(),
            awaiting: HashSet::new(),
            bound: HashMap::new(),
            pending: HashMap::new(),
            metadata_wait_ms: DEFAULT_METADATA_WAIT_MS,
            admission: None,
            requests: None,
            own_writes: HashMap::new(),
            came_and_went: None,
            stats: TrackerStats::default(),
        }
    }

    /// The memory.max values the agent wrote (by cgroup id), read from the audit at start-up:
    /// a cgroup seen again after a restart (its record not yet saved when the last agent was
    /// killed) holds the last agent's limit, which is no runtime's.
    pub fn with_own_writes(mut self, own_writes: HashMap<u64, u64>) -> Self {
        self.own_writes = own_writes;
        self
    }

    /// Asks `admission` before a new instance of a function opens (the store's cap).
    /// Counts each instance's inbound connections and HTTP requests from the kernel.
    pub fn with_request_counts(mut self, counts: Box<dyn RequestCounts>) -> Self {
        self.requests = Some(counts);
        self
    }

    pub fn with_admission(mut self, admission: Box<dyn FunctionAdmission>) -> Self {
        self.admission = Some(admission);
        self
    }

    fn admit(&self, function: &str, at_ms: u64) -> Result<(), FunctionsFull> {
        self.admission
            .as_ref()
            .map_or(Ok(()), |a| a.admit(function, at_ms))
    }

    /// How long a new cgroup whose rule reads container metadata waits for the file.
    pub fn with_metadata_wait_ms(mut self, ms: u64) -> Self {
        self.metadata_wait_ms = ms;
        self
    }

    pub fn cgroups(&self) -> &C {
        &self.cgroups
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// A live instance's record as the tracker has it.
    pub fn live_record(&self, id: u64) -> Option<&InstanceRecord> {
        self.live.get(&id)
    }

    /// Every live instance's record.
    pub fn live_records(&self) -> impl Iterator<Item = &InstanceRecord> {
        self.live.values()
    }
}

/// Runs effects in order: the stage that owns the store and the actuator hands each one to
/// `run`, which may answer with more (an enforcement's outcome), handled in turn.
pub fn drain<C: Cgroups>(
    tracker: &mut Tracker<C>,
    effects: Vec<Effect>,
    mut run: impl FnMut(&mut Tracker<C>, Effect) -> Vec<Effect>,
) {
    let mut queue: VecDeque<Effect> = effects.into();
    while let Some(e) = queue.pop_front() {
        let more = run(tracker, e);
        for (i, m) in more.into_iter().enumerate() {
            queue.insert(i, m);
        }
    }
}
