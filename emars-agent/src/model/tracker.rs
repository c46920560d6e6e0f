//! Turns kernel events into instance records: a state machine. [`Tracker::apply`] takes an
//! event and returns [`Effect`]s (save this record, add to that hour, enforce limits on this
//! new instance, recompute that function) for the stage that owns the store and the actuator
//! to carry out (`policy::enforcer`). The tracker writes nothing itself; what it reads about
//! cgroups (limits, watermarks, which cgroup a task is in) goes through [`Cgroups`], so its
//! logic is tested without root against a table of cgroups.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
};

use crate::{
    kernel::{
        cgroupfs::{self, CgroupfsError, Limits, MemoryHierarchy, UsePeak},
        events::KernelEvent,
    },
    model::{
        kept::{RuntimeLimit, RuntimeLimitSource},
        registry::{CgroupTable, Classified, Identity, Registry, Unnamed},
        runtime::{ContainerMetadata, MetadataRead},
        HourDelta, InstanceRecord, PeakSource,
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
    /// A new instance: write its function's limits if the mode says so, and answer with
    /// [`Tracker::enforced`] before the next event (the record is saved then, with the limits
    /// it got).
    Enforce {
        record: InstanceRecord,
        mkdir_ts_ns: Option<u64>,
    },
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

/// A cgroup the rules made an instance of, and the memory limit its container's runtime
/// metadata gave (rules with `metadata`).
struct Named {
    identity: Identity,
    metadata_limit: Option<u64>,
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
    /// memory.max the agent (this run or the one before it) wrote into a cgroup, by cgroup id,
    /// from the audit: a value found there is not the container runtime's limit.
    own_writes: HashMap<u64, u64>,
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
            own_writes: HashMap::new(),
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

    /// Registers a cgroup (from a mkdir event or the start-up scan). `resumed` is the record
    /// of the same instance kept in the store before a restart. `found` says how the cgroup
    /// was learned of, and so whether its function's limits are to be enforced now.
    pub fn add_cgroup(
        &mut self,
        id: u64,
        rel_path: &str,
        started_at_ms: u64,
        resumed: Option<InstanceRecord>,
        found: Found,
    ) -> Vec<Effect> {
        if self.table.get(id).is_some() {
            tracing::debug!(id, rel_path, "cgroup known already");
            return Vec::new();
        }
        // A cgroup there before the agent (or resumed) has had its runtime's files written.
        let wait = resumed.is_none()
            && !matches!(
                found,
                Found::Existing {
                    new_since_start: false
                }
            );
        let (classified, metadata_limit) = self.classify(rel_path, wait);
        let identity = match classified {
            Classified::Instance(identity) | Classified::Labelled(identity) => Some(identity),
            Classified::Pending { file } => {
                tracing::debug!(id, rel_path, file = %file.display(), "waiting for metadata");
                self.stats.metadata_waits += 1;
                self.table
                    .insert(id, rel_path.to_owned(), None, started_at_ms);
                self.pending.insert(
                    id,
                    Pending {
                        found,
                        file,
                        execs: 0,
                    },
                );
                return Vec::new();
            }
            Classified::NotInstance => None,
            Classified::Unnamed(why) => {
                self.note_unnamed(why, rel_path);
                None
            }
        };
        self.table
            .insert(id, rel_path.to_owned(), identity.clone(), started_at_ms);
        let Some(identity) = identity else {
            // No rule names it, yet the last run kept a live record of it: a use bound then
            // (only binds make records of such cgroups). The binding goes on.
            if let Some(rec) = resumed {
                return self.resume_binding(id, rec);
            }
            tracing::debug!(id, rel_path, "cgroup watched, not an instance");
            return Vec::new();
        };
        let named = Named {
            identity,
            metadata_limit,
        };
        self.open(id, rel_path, named, started_at_ms, resumed, found)
    }

    /// A pooled cgroup's use bound before a restart: live and bound again, its peak read as
    /// [`Cgroups::resumed_peak`] says, so that the platform's release finds it.
    fn resume_binding(&mut self, id: u64, mut rec: InstanceRecord) -> Vec<Effect> {
        tracing::info!(
            function = rec.function,
            instance = rec.instance,
            cgroup = rec.cgroup_path,
            "use bound before the restart resumed"
        );
        self.bound.insert(id, self.cgroups.resumed_peak());
        self.refresh_watermark(&mut rec, false);
        let out = vec![Effect::Save(rec.clone())];
        self.live.insert(id, rec);
        out
    }

    /// Opens the live instance record of a classified cgroup.
    fn open(
        &mut self,
        id: u64,
        rel_path: &str,
        named: Named,
        started_at_ms: u64,
        resumed: Option<InstanceRecord>,
        found: Found,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        let fresh = resumed.is_none();
        let identity = named.identity;
        // A resumed record's function is known. A refused one stays in the table, so that its
        // events find it and do nothing: no record, no limits, for its whole life.
        if fresh {
            if let Err(e) = self.admit(&identity.function, started_at_ms) {
                self.stats.functions_refused += 1;
                tracing::debug!(id, rel_path, "{e}");
                return out;
            }
        }
        tracing::debug!(id, rel_path, ?found, "instance");
        let dir = self.cgroups.dir(rel_path);
        if fresh {
            // Kept before anything is written into it: nothing the agent writes goes above it.
            if let Some(limit) = self.runtime_limit(id, &dir, named.metadata_limit) {
                out.push(Effect::RuntimeLimit {
                    key: (started_at_ms, id),
                    limit,
                });
            }
        }
        let mut rec = resumed.unwrap_or_else(|| InstanceRecord {
            function: identity.function.clone(),
            instance: identity.instance.clone(),
            cgroup_id: id,
            cgroup_path: dir.display().to_string(),
            started_at_ms,
            ended_at_ms: None,
            execs: 0,
            peak_bytes: 0,
            peak_source: PeakSource::None,
            oom_kills: 0,
            limits: Limits::default(),
        });
        let enforce = match found {
            Found::Mkdir { ts_ns } => Some(Some(ts_ns)),
            Found::Late => Some(None),
            Found::Existing { new_since_start } => (new_since_start && fresh).then_some(None),
        };
        if let Some(mkdir_ts_ns) = enforce {
            // Instances of this function that ended since the last tick are not in its
            // recommendation yet: bring it up to date first, or this instance would get a
            // stale one (or none, for a function whose first instances just ended).
            if self.dirty.remove(&rec.function) {
                out.push(Effect::Recompute {
                    function: rec.function.clone(),
                    at_ms: rec.started_at_ms,
                });
            }
            // Limits first: the platform's process may start allocating at once.
            out.push(Effect::Enforce {
                record: rec.clone(),
                mkdir_ts_ns,
            });
        }
        self.refresh_watermark(&mut rec, true);
        if fresh {
            out.push(Effect::AddHour {
                function: rec.function.clone(),
                at_ms: started_at_ms,
                delta: HourDelta {
                    instances_started: 1,
                    ..Default::default()
                },
            });
        }
        if enforce.is_some() {
            self.awaiting.insert(id);
        } else {
            out.push(Effect::Save(rec.clone()));
        }
        self.live.insert(id, rec);
        out
    }

    /// Classifies a cgroup waiting for its container's metadata again: the instance opens if
    /// the file is there now, or, with `give_up`, by the later rules. True when it is a live
    /// instance now.
    fn settle(&mut self, id: u64, give_up: bool, out: &mut Vec<Effect>) -> bool {
        let Some(p) = self.pending.remove(&id) else {
            return false;
        };
        let Some((rel_path, started_at_ms)) = self
            .table
            .get(id)
            .map(|e| (e.rel_path.clone(), e.started_at_ms))
        else {
            return false;
        };
        let (classified, metadata_limit) = self.classify(&rel_path, !give_up);
        let (identity, labelled) = match classified {
            Classified::Pending { .. } => {
                self.pending.insert(id, p);
                return false;
            }
            Classified::Labelled(identity) => (identity, true),
            Classified::Instance(identity) => (identity, false),
            Classified::NotInstance => {
                tracing::info!(cgroup = rel_path, file = %p.file.display(), "no metadata, and no later rule names it: not an instance");
                self.stats.metadata_fallbacks += 1;
                return false;
            }
            Classified::Unnamed(why) => {
                self.stats.metadata_fallbacks += 1;
                self.note_unnamed(why, &rel_path);
                return false;
            }
        };
        if labelled {
            self.stats.metadata_named += 1;
        } else {
            self.stats.metadata_fallbacks += 1;
            tracing::info!(
                cgroup = rel_path,
                file = %p.file.display(),
                function = identity.function,
                "container metadata not there, or without the label: named by a later rule"
            );
        }
        if let Some(e) = self.table.get_mut(id) {
            e.identity = Some(identity.clone());
        }
        let named = Named {
            identity,
            metadata_limit,
        };
        out.extend(self.open(id, &rel_path, named, started_at_ms, None, p.found));
        if p.execs > 0 {
            self.update(id, started_at_ms, out, |rec| {
                rec.execs += p.execs;
                HourDelta {
                    execs: p.execs,
                    ..Default::default()
                }
            });
        }
        true
    }

    /// Every cgroup waiting for metadata tries again; those that waited `metadata_wait_ms`
    /// are decided by the later rules. Run on the agent's tick.
    pub fn settle_pending(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut ids: Vec<(u64, bool)> = self
            .pending
            .keys()
            .map(|id| {
                let over = self.table.get(*id).is_none_or(|e| {
                    now_ms.saturating_sub(e.started_at_ms) >= self.metadata_wait_ms
                });
                (*id, over)
            })
            .collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for (id, give_up) in ids {
            self.settle(id, give_up, &mut out);
        }
        out
    }

    /// What the rules make of `rel_path`, reading container metadata through the cgroups
    /// reader, with the memory limit the container's runtime metadata gives (if any was read).
    fn classify(&self, rel_path: &str, wait: bool) -> (Classified, Option<u64>) {
        let cgroups = &self.cgroups;
        let mut limit = None;
        let classified = self.registry.classify_with(
            rel_path,
            &mut |f| {
                let m = cgroups.metadata(f);
                if matches!(m.read, MetadataRead::Labels(_)) {
                    limit = m.memory_limit_bytes;
                }
                m.read
            },
            wait,
        );
        (classified, limit)
    }

    /// The memory limit a new instance's container runtime gave it: what its metadata says,
    /// and memory.max as found now, before the agent wrote anything into the cgroup (a runtime
    /// that wrote its limit before the agent saw the cgroup), unless the audit says the agent
    /// wrote that value; the lower of the two.
    fn runtime_limit(
        &self,
        id: u64,
        dir: &Path,
        from_metadata: Option<u64>,
    ) -> Option<RuntimeLimit> {
        let found = self
            .cgroups
            .limits(dir)
            .ok()
            .and_then(|l| l.max_bytes)
            .filter(|f| self.own_writes.get(&id) != Some(f));
        let (bytes, source) = match (from_metadata, found) {
            (Some(m), f) if f.is_none_or(|f| m <= f) => (m, RuntimeLimitSource::Metadata),
            (_, Some(f)) => (f, RuntimeLimitSource::FirstSeen),
            _ => return None,
        };
        Some(RuntimeLimit { bytes, source })
    }

    /// Cgroups waiting for their container's metadata now.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Counts a cgroup whose rule gave an unusable name; the first of each reason is logged
    /// (a tenant's names must not flood the log), the rest are in /v1/info and /metrics.
    fn note_unnamed(&mut self, why: Unnamed, rel_path: &str) {
        let n = &mut self.stats.unnamed[why as usize];
        *n += 1;
        if *n == 1 {
            tracing::warn!(
                "cgroup {rel_path:?} is not tracked: its rule gives a name that cannot be used \
                 ({}: {}); further ones are counted in /v1/info cgroups_unnamed and \
                 emars_cgroups_unnamed_total{{reason=\"{}\"}}",
                why.as_str(),
                why.rule(),
                why.as_str()
            );
        }
    }

    /// A pooled cgroup starts serving `function` as `instance` (POST /v1/bind): a new live
    /// instance record, its watermark reset so that its peak is this use's, and its function's
    /// limits due like a new instance's. `cgroup_id`: the id read when the bind was asked for;
    /// a cgroup with another id at the path by now is refused ([`BindError::Replaced`]).
    /// Returns its cgroup id.
    pub fn bind(
        &mut self,
        rel_path: &str,
        cgroup_id: u64,
        function: &str,
        instance: &str,
        at_ms: u64,
    ) -> Result<(u64, Vec<Effect>), BindError> {
        if !crate::model::registry::valid_function_name(function) {
            return Err(BindError::Invalid(format!(
                "invalid function name {function:?}"
            )));
        }
        if !crate::model::registry::valid_instance_name(instance) {
            return Err(BindError::Invalid(format!(
                "invalid instance name {instance:?}"
            )));
        }
        let (id, dir) = self.pooled(rel_path)?;
        if id != cgroup_id {
            return Err(BindError::Replaced {
                path: rel_path.to_owned(),
                expected: cgroup_id,
                found: id,
            });
        }
        // The platform says what the cgroup runs: no need to wait for a runtime's file.
        self.pending.remove(&id);
        if let Some(rec) = self.live.get(&id) {
            let (function, instance) = (rec.function.clone(), rec.instance.clone());
            let path = rel_path.to_owned();
            return Err(if self.bound.contains_key(&id) {
                BindError::AlreadyBound {
                    path,
                    function,
                    instance,
                }
            } else {
                BindError::PathInstance {
                    path,
                    function,
                    instance,
                }
            });
        }
        self.admit(function, at_ms)?;
        let root = self
            .registry
            .roots()
            .into_iter()
            .find(|r| {
                rel_path
                    .strip_prefix(r.as_str())
                    .is_some_and(|t| t.starts_with('/'))
            })
            .ok_or_else(|| BindError::Outside {
                path: rel_path.to_owned(),
            })?;
        let peak = self
            .cgroups
            .reset_peak(&root, rel_path, id)
            .map_err(|e| match e {
                CgroupfsError::Replaced {
                    expected, found, ..
                } => BindError::Replaced {
                    path: rel_path.to_owned(),
                    expected,
                    found,
                },
                CgroupfsError::OutsideRoot { .. } => BindError::Outside {
                    path: rel_path.to_owned(),
                },
                _ => BindError::NotFound {
                    path: rel_path.to_owned(),
                },
            })?;
        let rec = InstanceRecord {
            function: function.to_owned(),
            instance: instance.to_owned(),
            cgroup_id: id,
            cgroup_path: dir.display().to_string(),
            started_at_ms: at_ms,
            ended_at_ms: None,
            execs: 0,
            peak_bytes: 0,
            peak_source: PeakSource::None,
            oom_kills: 0,
            limits: self.cgroups.limits(&dir).unwrap_or_default(),
        };
        tracing::info!(
            function,
            instance,
            cgroup = rel_path,
            method = peak.method(),
            "bound"
        );
        let mut out = Vec::new();
        if self.dirty.remove(function) {
            out.push(Effect::Recompute {
                function: function.to_owned(),
                at_ms,
            });
        }
        out.push(Effect::Enforce {
            record: rec.clone(),
            mkdir_ts_ns: None,
        });
        out.push(Effect::AddHour {
            function: function.to_owned(),
            at_ms,
            delta: HourDelta {
                instances_started: 1,
                ..Default::default()
            },
        });
        self.awaiting.insert(id);
        self.bound.insert(id, peak);
        self.live.insert(id, rec);
        Ok((id, out))
    }

    /// The use of a pooled cgroup ends (POST /v1/release): its record is closed with the peak
    /// of this use. Returns the closed record.
    pub fn release(
        &mut self,
        rel_path: &str,
        at_ms: u64,
    ) -> Result<(InstanceRecord, Vec<Effect>), BindError> {
        let (id, _) = self.pooled(rel_path)?;
        if !self.bound.contains_key(&id) {
            return Err(BindError::NotBound {
                path: rel_path.to_owned(),
            });
        }
        if let Some(mut rec) = self.live.remove(&id) {
            self.refresh_watermark(&mut rec, false);
            self.live.insert(id, rec);
        }
        let mut out = Vec::new();
        let rec = self
            .close(id, at_ms, &mut out)
            .ok_or_else(|| BindError::NotBound {
                path: rel_path.to_owned(),
            })?;
        Ok((rec, out))
    }

    /// A cgroup below a watched root that exists (id, directory), for bind and release.
    fn pooled(&mut self, rel_path: &str) -> Result<(u64, PathBuf), BindError> {
        if rel_path.split('/').any(|c| c == "." || c == "..") || !rel_path.starts_with('/') {
            return Err(BindError::Invalid(format!(
                "cgroup {rel_path:?}: give the path below the hierarchy (\"/pool/cg-1\") or \
                 the absolute directory, without . or .."
            )));
        }
        if !self.registry.is_under_root(rel_path)
            || self.registry.roots().iter().any(|r| r == rel_path)
        {
            return Err(BindError::Outside {
                path: rel_path.to_owned(),
            });
        }
        let dir = self.cgroups.dir(rel_path);
        let id = self
            .cgroups
            .cgroup_id(&dir)
            .ok_or_else(|| BindError::NotFound {
                path: rel_path.to_owned(),
            })?;
        if self.table.get(id).is_none() {
            // Created before the agent looked (or its mkdir is still in the ring).
            let identity = self.registry.classify(rel_path);
            self.table
                .insert(id, rel_path.to_owned(), identity, crate::clock::now_ms());
        }
        Ok((id, dir))
    }

    /// A live instance's record as the tracker has it.
    pub fn live_record(&self, id: u64) -> Option<&InstanceRecord> {
        self.live.get(&id)
    }

    /// Every live instance's record.
    pub fn live_records(&self) -> impl Iterator<Item = &InstanceRecord> {
        self.live.values()
    }

    /// Limits written into a live instance after its start (reactive raises, the API): the
    /// record is saved with them. A file left out of the write keeps its value.
    pub fn limits_changed(&mut self, id: u64, limits: Limits) -> Vec<Effect> {
        match self.live.get_mut(&id) {
            Some(rec) => {
                rec.limits = Limits {
                    max_bytes: limits.max_bytes.or(rec.limits.max_bytes),
                    high_bytes: limits.high_bytes.or(rec.limits.high_bytes),
                };
                vec![Effect::Save(rec.clone())]
            }
            None => Vec::new(),
        }
    }

    /// The answer to an [`Effect::Enforce`]: the limits written (None: nothing written). The
    /// record is saved now, with them.
    pub fn enforced(&mut self, id: u64, written: Option<Limits>) -> Vec<Effect> {
        if !self.awaiting.remove(&id) {
            return Vec::new();
        }
        let Some(rec) = self.live.get_mut(&id) else {
            return Vec::new();
        };
        if let Some(l) = written {
            rec.limits = l;
        }
        vec![Effect::Save(rec.clone())]
    }

    /// Applies one kernel event; `at_ms` is its wall-clock time, `ts_ns` its kernel time.
    pub fn apply(&mut self, event: KernelEvent, at_ms: u64, ts_ns: u64) -> Vec<Effect> {
        self.stats.events += 1;
        let mut out = Vec::new();
        match event {
            KernelEvent::CgroupMkdir {
                id,
                path,
                truncated,
                ..
            } => {
                let path = if truncated {
                    match self.full_path(id, &path) {
                        Some(p) => p,
                        None => return out,
                    }
                } else {
                    path
                };
                out = self.add_cgroup(id, &path, at_ms, None, Found::Mkdir { ts_ns });
            }
            KernelEvent::CgroupRmdir {
                id,
                peak,
                watermark,
                ..
            } => {
                // Gone before its metadata was read: named with what there is now.
                self.settle(id, true, &mut out);
                self.end(id, peak, watermark, at_ms, &mut out)
            }
            KernelEvent::TaskAttach { .. } => {}
            KernelEvent::Exec { id, pid, .. } => {
                let Some(id) = self.resolve(id, pid, at_ms, &mut out) else {
                    return out;
                };
                // runc has written its state by the time the container's program is exec'd.
                if self.pending.contains_key(&id) && !self.settle(id, false, &mut out) {
                    if let Some(p) = self.pending.get_mut(&id) {
                        p.execs += 1;
                    }
                    return out;
                }
                self.update(id, at_ms, &mut out, |rec| {
                    rec.execs += 1;
                    HourDelta {
                        execs: 1,
                        ..Default::default()
                    }
                });
                self.refresh(id, &mut out);
            }
            KernelEvent::Exit { id, .. } => {
                self.settle(id, false, &mut out);
                self.refresh(id, &mut out)
            }
            // The kernel side's charge peak spans a pooled cgroup's every use: not for a bound one.
            KernelEvent::MemPeak { id, .. } if self.bound.contains_key(&id) => {}
            KernelEvent::MemPeak { id, peak } => {
                self.settle(id, false, &mut out);
                if let Some(rec) = self.live.get_mut(&id) {
                    if peak > rec.peak_bytes {
                        rec.peak_bytes = peak;
                        rec.peak_source = PeakSource::ChargeEvents;
                    }
                }
                self.refresh(id, &mut out);
            }
            KernelEvent::OomVictim { id, pid } => {
                let Some(id) = self.resolve(id, pid, at_ms, &mut out) else {
                    tracing::debug!(pid, "OOM victim outside watched cgroups");
                    return out;
                };
                self.settle(id, false, &mut out);
                tracing::warn!(pid, cgroup = id, "OOM kill in a watched instance");
                self.update(id, at_ms, &mut out, |rec| {
                    rec.oom_kills += 1;
                    HourDelta {
                        oom_kills: 1,
                        ..Default::default()
                    }
                });
                // An OOM raises the function's recommendation at once, not at the next period;
                // with the peak as the kernel has it now.
                self.refresh(id, &mut out);
                if let Some(f) = self.live.get(&id).map(|r| r.function.clone()) {
                    out.push(Effect::Recompute { function: f, at_ms });
                }
            }
        }
        out
    }

    /// The whole path of a cgroup whose event carried a cut-short path: looked up by id below
    /// the last complete directory of what the event carried. None (and counted) when it
    /// cannot be found: an untracked cgroup beats one filed under a wrong name.
    fn full_path(&mut self, id: u64, cut: &str) -> Option<String> {
        self.stats.paths_truncated += 1;
        let parent = cut.rsplit_once('/').map_or("/", |(p, _)| p);
        let found = self
            .cgroups
            .find_by_id(&self.cgroups.dir(parent), id)
            .and_then(|d| self.cgroups.rel_path(&d));
        if found.is_none() {
            self.stats.paths_unresolved += 1;
            tracing::warn!(
                cgroup = id,
                "cgroup path longer than an event carries, and not found: {cut}…"
            );
        }
        found
    }

    /// The watched cgroup of an event: the kernel's id if it knows the cgroup, else the
    /// task's cgroup from /proc (kernels or hosts where task tracking is incomplete).
    fn resolve(&mut self, id: u64, pid: u32, at_ms: u64, out: &mut Vec<Effect>) -> Option<u64> {
        if id != 0 && self.table.get(id).is_some() {
            return Some(id);
        }
        let rel = self.cgroups.cgroup_of(pid)?;
        if let Some(known) = self.table.by_path(&rel) {
            return Some(known);
        }
        if !self.registry.is_under_root(&rel) {
            return None;
        }
        let new_id = self.cgroups.cgroup_id(&self.cgroups.dir(&rel))?;
        // Its mkdir event was lost or never sent (program off): a new instance all the same.
        out.extend(self.add_cgroup(new_id, &rel, at_ms, None, Found::Late));
        Some(new_id)
    }

    fn update(
        &mut self,
        id: u64,
        at_ms: u64,
        out: &mut Vec<Effect>,
        f: impl FnOnce(&mut InstanceRecord) -> HourDelta,
    ) {
        let Some(rec) = self.live.get_mut(&id) else {
            return;
        };
        let delta = f(rec);
        out.push(Effect::AddHour {
            function: rec.function.clone(),
            at_ms,
            delta,
        });
        out.push(Effect::Save(rec.clone()));
    }

    /// Re-reads the kernel watermark of a live instance and saves it if it grew.
    fn refresh(&mut self, id: u64, out: &mut Vec<Effect>) {
        let Some(mut rec) = self.live.remove(&id) else {
            return;
        };
        let before = (rec.peak_bytes, rec.peak_source, rec.limits);
        self.refresh_watermark(&mut rec, false);
        if (rec.peak_bytes, rec.peak_source, rec.limits) != before {
            out.push(Effect::Save(rec.clone()));
        }
        self.live.insert(id, rec);
    }

    /// `first`: the instance was just registered (a controller that is off is said then, and
    /// quietly afterwards).
    fn refresh_watermark(&mut self, rec: &mut InstanceRecord, first: bool) {
        self.stats.watermark_reads += 1;
        let dir = Path::new(&rec.cgroup_path);
        // Limits may be set after mkdir (by the platform, or later by EMARS): keep them current.
        match self.cgroups.limits(dir) {
            Ok(limits) => rec.limits = limits,
            // Said once per instance; its reads stay quiet (debug) afterwards.
            Err(e @ CgroupfsError::ControllerOff { .. }) if first => tracing::warn!("{e}"),
            Err(_) => {}
        }
        if let Some(p) = self.bound.get_mut(&rec.cgroup_id) {
            match self.cgroups.use_peak(dir, p) {
                Ok((w, exact)) if w >= rec.peak_bytes => {
                    rec.peak_bytes = w;
                    rec.peak_source = if exact {
                        PeakSource::UseWatermark
                    } else {
                        PeakSource::LifetimeWatermark
                    };
                }
                Ok(_) => {}
                Err(CgroupfsError::Gone { .. }) => self.stats.vanished_reads += 1,
                Err(e) => tracing::debug!("{e}"),
            }
            return;
        }
        match self.cgroups.peak(dir) {
            Ok(Some(w)) if w >= rec.peak_bytes => {
                rec.peak_bytes = w;
                rec.peak_source = PeakSource::KernelWatermark;
            }
            Ok(_) => {}
            Err(CgroupfsError::Gone { .. }) => self.stats.vanished_reads += 1,
            Err(e @ CgroupfsError::ControllerOff { .. }) => tracing::debug!("{e}"),
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// The cgroup was removed: close the instance with the kernel side's final figures — the
    /// exact watermark when the kernel layout is known, else the charge-event peak.
    fn end(
        &mut self,
        id: u64,
        kernel_peak: u64,
        watermark: u64,
        at_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        self.table.remove(id);
        // A bound use removed with its cgroup: v1's watermark was reset at bind, so the
        // kernel's is this use's; v2's spans every use, so the last reading of the use stands.
        let bound = self.bound.get(&id).map(|p| matches!(p, UsePeak::V1));
        let Some(rec) = self.live.get_mut(&id) else {
            tracing::debug!(id, "rmdir of a cgroup that is not a live instance");
            self.awaiting.remove(&id);
            self.bound.remove(&id);
            return;
        };
        match bound {
            None if watermark > 0 => {
                rec.peak_bytes = watermark;
                rec.peak_source = PeakSource::KernelWatermark;
            }
            None if kernel_peak > rec.peak_bytes => {
                rec.peak_bytes = kernel_peak;
                rec.peak_source = PeakSource::ChargeEvents;
            }
            Some(true) if watermark > 0 => {
                rec.peak_bytes = watermark;
                rec.peak_source = PeakSource::UseWatermark;
            }
            _ => {}
        }
        self.close(id, at_ms, out);
    }

    /// Closes a live instance (its cgroup removed, or its use released); returns the record
    /// as saved.
    fn close(&mut self, id: u64, at_ms: u64, out: &mut Vec<Effect>) -> Option<InstanceRecord> {
        self.awaiting.remove(&id);
        self.bound.remove(&id);
        let mut rec = self.live.remove(&id)?;
        rec.ended_at_ms = Some(at_ms.max(rec.started_at_ms));
        out.push(Effect::AddHour {
            function: rec.function.clone(),
            at_ms,
            delta: HourDelta {
                peak_bytes: rec.peak_bytes,
                ..Default::default()
            },
        });
        // Recomputed on the next tick, not here: the event loop must keep draining the ring.
        self.dirty.insert(rec.function.clone());
        out.push(Effect::Save(rec.clone()));
        Some(rec)
    }

    /// Recomputes the recommendations of functions whose instances ended since last time.
    pub fn recompute_dirty(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut functions: Vec<String> = self.dirty.drain().collect();
        functions.sort_unstable();
        functions
            .into_iter()
            .map(|function| Effect::Recompute {
                function,
                at_ms: now_ms,
            })
            .collect()
    }

    /// Closes live instances whose cgroup is gone (or replaced) although no rmdir event came:
    /// the safety net for events lost to a full ring buffer. The others get their kernel
    /// watermark read again: without charge events, what keeps a long-lived instance's peak
    /// current between its execs and exits.
    pub fn reconcile(&mut self, now_ms: u64) -> Vec<Effect> {
        let (mut present, mut gone): (Vec<_>, Vec<_>) = self
            .live
            .iter()
            .map(|(id, rec)| {
                let here = self.cgroups.cgroup_id(Path::new(&rec.cgroup_path)) == Some(*id);
                (*id, here)
            })
            .partition(|(_, here)| *here);
        gone.sort_unstable();
        present.sort_unstable();
        let mut out = Vec::new();
        for (id, _) in present {
            self.refresh(id, &mut out);
        }
        for (id, _) in gone {
            tracing::warn!(
                cgroup = id,
                "instance ended without an rmdir event (events lost?)"
            );
            self.end(id, 0, 0, now_ms, &mut out);
            self.stats.reconciled += 1;
        }
        out
    }

    /// Closes store records of instances whose cgroup disappeared while the agent was down.
    pub fn close_vanished(&mut self, stale: Vec<InstanceRecord>, now_ms: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        for mut rec in stale {
            if self.live.contains_key(&rec.cgroup_id) {
                continue;
            }
            rec.ended_at_ms = Some(now_ms.max(rec.started_at_ms));
            tracing::info!(
                function = rec.function,
                instance = rec.instance,
                "instance ended while the agent was down"
            );
            out.push(Effect::Save(rec));
        }
        out
    }
}

/// The order to apply a batch of events read from the ring: every mkdir first (its limits are
/// due at once, and exec/exit/rmdir records that did not wake the agent may be queued ahead of
/// it), unless an earlier event in the batch is about the same cgroup id (an inode reused after
/// an rmdir still queued): then it keeps its place. The rest keep their order.
pub fn mkdirs_first(batch: Vec<crate::kernel::events::Timed>) -> Vec<crate::kernel::events::Timed> {
    let mut seen = HashSet::new();
    let mut first = Vec::new();
    let mut rest = Vec::with_capacity(batch.len());
    for t in batch {
        let id = t.event.cgroup_id();
        if matches!(t.event, KernelEvent::CgroupMkdir { .. }) && !seen.contains(&id) {
            first.push(t);
        } else {
            seen.insert(id);
            rest.push(t);
        }
    }
    first.extend(rest);
    first
}

/// The mkdirs of a batch whose cgroup is removed later in the same batch, as (cgroup id, kernel
/// time): instances that came and went before the agent read of them (it was down, or behind).
/// Their limits are not written: the cgroup is gone, and its path may already name another.
pub fn gone_in_batch(batch: &[crate::kernel::events::Timed]) -> HashSet<(u64, u64)> {
    let mut gone = HashSet::new();
    let mut open: HashMap<u64, u64> = HashMap::new();
    for t in batch {
        match t.event {
            KernelEvent::CgroupMkdir { id, .. } => {
                open.insert(id, t.ts_ns);
            }
            KernelEvent::CgroupRmdir { id, .. } => {
                if let Some(ts) = open.remove(&id) {
                    gone.insert((id, ts));
                }
            }
            _ => {}
        }
    }
    gone
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

#[cfg(test)]
mod tests {
    //! The state machine alone: a table of cgroups stands in for the files (the integration
    //! tests run the same code against real cgroups and real eBPF events).

    use std::cell::RefCell;

    use super::*;
    use crate::model::registry::RootConfig;

    const MIB: u64 = 1 << 20;

    /// Cgroups by relative path: (id, limits, watermark); processes by pid.
    #[derive(Default)]
    struct Table {
        cgroups: RefCell<HashMap<String, (u64, Limits, u64)>>,
        procs: HashMap<u32, String>,
        /// Container metadata files and their labels.
        meta: RefCell<HashMap<PathBuf, crate::model::runtime::Labels>>,
    }

    impl Table {
        fn add(&self, rel: &str, id: u64) {
            self.cgroups
                .borrow_mut()
                .insert(rel.to_owned(), (id, Limits::default(), 0));
        }
        fn set_max(&self, rel: &str, max: u64) {
            if let Some(c) = self.cgroups.borrow_mut().get_mut(rel) {
                c.1.max_bytes = Some(max);
            }
        }
        fn set_peak(&self, rel: &str, peak: u64) {
            if let Some(c) = self.cgroups.borrow_mut().get_mut(rel) {
                c.2 = peak;
            }
        }
        fn remove(&self, rel: &str) {
            self.cgroups.borrow_mut().remove(rel);
        }
        fn rel(dir: &Path) -> String {
            dir.to_string_lossy().trim_start_matches("/cg").to_owned()
        }
    }

    impl Cgroups for &Table {
        fn dir(&self, rel_path: &str) -> PathBuf {
            PathBuf::from(format!("/cg{rel_path}"))
        }
        fn rel_path(&self, dir: &Path) -> Option<String> {
            Some(Table::rel(dir))
        }
        fn limits(&self, dir: &Path) -> Result<Limits, CgroupfsError> {
            let c = self.cgroups.borrow();
            c.get(&Table::rel(dir))
                .map(|c| c.1)
                .ok_or(CgroupfsError::Gone {
                    path: dir.to_path_buf(),
                })
        }
        fn peak(&self, dir: &Path) -> Result<Option<u64>, CgroupfsError> {
            let c = self.cgroups.borrow();
            c.get(&Table::rel(dir))
                .map(|c| Some(c.2))
                .ok_or(CgroupfsError::Gone {
                    path: dir.to_path_buf(),
                })
        }
        fn cgroup_of(&self, pid: u32) -> Option<String> {
            self.procs.get(&pid).cloned()
        }
        fn cgroup_id(&self, dir: &Path) -> Option<u64> {
            self.cgroups.borrow().get(&Table::rel(dir)).map(|c| c.0)
        }
        fn find_by_id(&self, dir: &Path, id: u64) -> Option<PathBuf> {
            let under = Table::rel(dir);
            self.cgroups
                .borrow()
                .iter()
                .find(|(rel, c)| c.0 == id && rel.starts_with(&under))
                .map(|(rel, _)| self.dir(rel))
        }
        /// The pseudo-label `memory` stands for the runtime's memory limit in the file.
        fn metadata(&self, file: &Path) -> ContainerMetadata {
            let meta = self.meta.borrow();
            let Some(labels) = meta.get(file) else {
                return MetadataRead::Absent.into();
            };
            ContainerMetadata {
                read: MetadataRead::Labels(labels.clone()),
                memory_limit_bytes: labels.get("memory").and_then(|m| m.parse().ok()),
            }
        }
    }

    /// runc's layout: `/docker/<id>` named by the `fn` label of `/run/runc/<id>/state.json`,
    /// else "docker".
    fn runc_tracker(table: &Table) -> Tracker<&Table> {
        let toml = r#"
[[cgroup.roots]]
path = "/docker"
[[cgroup.roots.rules]]
pattern = "{id}"
metadata = "/run/runc/{id}/state.json"
function = "{label:fn}"
instance = "{id}"
[[cgroup.roots.rules]]
pattern = "{id}"
function = "docker"
instance = "{id}"
"#;
        let config = crate::config::Config::from_toml_str(toml).unwrap();
        Tracker::new(table, Registry::new(&config.cgroup.roots).unwrap())
            .with_metadata_wait_ms(5_000)
    }

    fn exec(id: u64) -> KernelEvent {
        KernelEvent::Exec {
            id,
            pid: 1,
            filename: "/bin/sh".into(),
        }
    }

    fn label_file(table: &Table, id: &str, pairs: &[(&str, &str)]) {
        table.meta.borrow_mut().insert(
            PathBuf::from(format!("/run/runc/{id}/state.json")),
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }

    /// A container's cgroup is made before runc writes its state: the instance opens when the
    /// file is there (at an exec), with the execs seen meanwhile and its limits due from the
    /// mkdir; without the file it waits, then the path rule names it; removed while waiting,
    /// it is named with what there is then and closed with its exact peak.
    #[test]
    fn containers_wait_for_their_runtime_metadata() {
        let table = Table::default();
        for (rel, id) in [("/docker/aa", 40), ("/docker/bb", 41), ("/docker/cc", 42)] {
            table.add(rel, id);
        }
        table.add("/docker/old", 43);
        let mut t = runc_tracker(&table);
        assert!(t.apply(mkdir(40, "/docker/aa"), 1_000, 7).is_empty());
        assert_eq!(t.pending_count(), 1);
        assert!(t.apply(exec(40), 1_010, 8).is_empty(), "no file yet");
        assert!(t.live_record(40).is_none());
        label_file(&table, "aa", &[("fn", "resize"), ("bundle", "/b/aa")]);
        let fx = t.apply(exec(40), 1_020, 9);
        let Some(Effect::Enforce {
            record,
            mkdir_ts_ns,
        }) = fx.first()
        else {
            panic!("limits first: {fx:?}")
        };
        assert_eq!(
            (record.function.as_str(), record.instance.as_str()),
            ("resize", "aa")
        );
        assert_eq!((record.started_at_ms, *mkdir_ts_ns), (1_000, Some(7)));
        t.enforced(40, None);
        assert_eq!(t.live_record(40).unwrap().execs, 2, "both execs counted");
        assert_eq!(t.pending_count(), 0);

        // No file: waits its time out, then the path rule decides.
        t.apply(mkdir(41, "/docker/bb"), 2_000, 10);
        assert!(t.settle_pending(6_999).is_empty());
        let fx = t.settle_pending(7_000);
        assert!(
            matches!(fx.first(), Some(Effect::Enforce { record, .. }) if record.function == "docker"),
            "{fx:?}"
        );
        assert_eq!(t.live_record(41).unwrap().function, "docker");

        // A file without the label: the path rule, at once (the file is there).
        label_file(&table, "cc", &[("other", "x")]);
        t.apply(mkdir(42, "/docker/cc"), 3_000, 11);
        assert_eq!(t.live_record(42).unwrap().function, "docker");
        assert_eq!(t.pending_count(), 0);
        // The same after a wait: a fallback, not a name from metadata.
        table.add("/docker/ee", 45);
        t.apply(mkdir(45, "/docker/ee"), 3_500, 12);
        label_file(&table, "ee", &[("other", "x")]);
        t.apply(exec(45), 3_600, 13);
        assert_eq!(t.live_record(45).unwrap().function, "docker");

        // Removed while waiting: named now, closed with the rmdir's watermark.
        table.add("/docker/dd", 44);
        t.apply(mkdir(44, "/docker/dd"), 4_000, 12);
        label_file(&table, "dd", &[("fn", "short")]);
        let fx = t.apply(
            KernelEvent::CgroupRmdir {
                id: 44,
                path: String::new(),
                peak: 0,
                watermark: 9 * MIB,
            },
            4_050,
            13,
        );
        let closed = saved(&fx);
        let last = closed.last().expect("a closed record");
        assert_eq!(
            (last.function.as_str(), last.peak_bytes),
            ("short", 9 * MIB)
        );
        assert_eq!(last.ended_at_ms, Some(4_050));

        // There before the agent: its runtime's file is not waited for.
        t.add_cgroup(
            43,
            "/docker/old",
            500,
            None,
            Found::Existing {
                new_since_start: false,
            },
        );
        assert_eq!(t.live_record(43).unwrap().function, "docker");
        assert_eq!(
            (
                t.stats.metadata_waits,
                t.stats.metadata_named,
                t.stats.metadata_fallbacks
            ),
            (4, 2, 2)
        );
    }

    /// A new instance's runtime limit is kept before its limits are written: from its
    /// runtime's metadata, or memory.max as found before the agent wrote anything, the lower
    /// of the two; none for a resumed instance (kept from its first run) or without either.
    #[test]
    fn a_new_instance_keeps_its_runtime_limit_before_its_limits() {
        let table = Table::default();
        let mut t = runc_tracker(&table);
        let runtime_limit = |fx: &[Effect]| {
            let at = fx
                .iter()
                .position(|e| matches!(e, Effect::RuntimeLimit { .. }))?;
            let enforce = fx.iter().position(|e| matches!(e, Effect::Enforce { .. }));
            assert!(
                enforce.is_none_or(|e| at < e),
                "kept before the write: {fx:?}"
            );
            match &fx[at] {
                Effect::RuntimeLimit { key, limit } => Some((*key, limit.bytes, limit.source)),
                _ => None,
            }
        };
        // runc wrote its state (and its limit) before the agent looked.
        table.add("/docker/aa", 50);
        table.set_max("/docker/aa", 64 * MIB);
        label_file(&table, "aa", &[("fn", "f"), ("memory", "67108864")]);
        let fx = t.apply(mkdir(50, "/docker/aa"), 1_000, 1);
        assert_eq!(
            runtime_limit(&fx),
            Some(((1_000, 50), 64 * MIB, RuntimeLimitSource::Metadata))
        );
        // The metadata says nothing of memory: memory.max as first seen.
        table.add("/docker/bb", 51);
        table.set_max("/docker/bb", 32 * MIB);
        label_file(&table, "bb", &[("fn", "f")]);
        let fx = t.apply(mkdir(51, "/docker/bb"), 1_100, 2);
        assert_eq!(
            runtime_limit(&fx),
            Some(((1_100, 51), 32 * MIB, RuntimeLimitSource::FirstSeen))
        );
        // The runtime set a lower limit than its metadata asked: the lower one.
        table.add("/docker/cc", 52);
        table.set_max("/docker/cc", 16 * MIB);
        label_file(&table, "cc", &[("fn", "f"), ("memory", "67108864")]);
        let fx = t.apply(mkdir(52, "/docker/cc"), 1_200, 3);
        assert_eq!(runtime_limit(&fx).map(|r| r.1), Some(16 * MIB));
        // No limit anywhere: nothing kept.
        table.add("/docker/dd", 53);
        label_file(&table, "dd", &[("fn", "f")]);
        let fx = t.apply(mkdir(53, "/docker/dd"), 1_300, 4);
        assert_eq!(runtime_limit(&fx), None);
        // Resumed after a restart: its memory.max may be the agent's own by now.
        table.add("/docker/ee", 54);
        table.set_max("/docker/ee", 8 * MIB);
        let mut resumed = t.live_record(50).unwrap().clone();
        resumed.cgroup_id = 54;
        resumed.cgroup_path = "/cg/docker/ee".into();
        let fx = t.add_cgroup(
            54,
            "/docker/ee",
            1_000,
            Some(resumed),
            Found::Existing {
                new_since_start: false,
            },
        );
        assert_eq!(runtime_limit(&fx), None, "{fx:?}");
    }

    /// After a kill -9 that came before a new instance's record was saved, the next agent sees
    /// the cgroup as new; the memory.max in it is the last agent's own write (the audit says
    /// so), not a runtime's limit. A value the audit does not name still is one.
    #[test]
    fn the_last_agents_own_write_is_no_runtime_limit() {
        let table = Table::default();
        let own = HashMap::from([(60, 36 * MIB), (61, 36 * MIB)]);
        let mut t = runc_tracker(&table).with_own_writes(own);
        let runtime_limit = |fx: &[Effect]| {
            fx.iter().find_map(|e| match e {
                Effect::RuntimeLimit { limit, .. } => Some(limit.bytes),
                _ => None,
            })
        };
        table.add("/docker/ff", 60);
        table.set_max("/docker/ff", 36 * MIB);
        label_file(&table, "ff", &[("fn", "f")]);
        let fx = t.apply(mkdir(60, "/docker/ff"), 1_000, 1);
        assert_eq!(runtime_limit(&fx), None, "{fx:?}");
        // Another value than the agent wrote: someone else's, the runtime's.
        table.add("/docker/gg", 61);
        table.set_max("/docker/gg", 20 * MIB);
        label_file(&table, "gg", &[("fn", "f")]);
        let fx = t.apply(mkdir(61, "/docker/gg"), 1_100, 2);
        assert_eq!(runtime_limit(&fx), Some(20 * MIB), "{fx:?}");
    }

    fn tracker(table: &Table) -> Tracker<&Table> {
        let registry = Registry::new(&[RootConfig {
            path: "/emars".into(),
            rules: Vec::new(),
            create: true,
        }])
        .unwrap();
        Tracker::new(table, registry)
    }

    fn mkdir(id: u64, path: &str) -> KernelEvent {
        KernelEvent::CgroupMkdir {
            id,
            path: path.into(),
            level: 3,
            truncated: false,
        }
    }

    fn rmdir(id: u64) -> KernelEvent {
        KernelEvent::CgroupRmdir {
            id,
            path: String::new(),
            peak: 0,
            watermark: 0,
        }
    }

    fn saved(effects: &[Effect]) -> Vec<&InstanceRecord> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Save(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// A pooled cgroup bound twice in a row: each use is an instance of its own, started at
    /// bind, closed at release with that use's reading; wrong binds and releases say why.
    #[test]
    fn pooled_cgroup_uses_are_instances_of_their_own() {
        let table = Table::default();
        table.add("/emars/cg-1", 30);
        table.add("/emars/fn/i1", 31);
        let mut t = tracker(&table);
        t.apply(mkdir(30, "/emars/cg-1"), 1_000, 1);
        t.apply(mkdir(31, "/emars/fn/i1"), 1_000, 2);
        t.enforced(31, None);
        assert!(
            t.live_record(30).is_none(),
            "a pool slot is no instance by itself"
        );
        let (id, fx) = t.bind("/emars/cg-1", 30, "fa", "a1", 2_000).unwrap();
        assert_eq!(id, 30);
        assert!(
            matches!(
                fx.as_slice(),
                [
                    Effect::Enforce {
                        mkdir_ts_ns: None,
                        ..
                    },
                    Effect::AddHour { .. }
                ]
            ),
            "{fx:?}"
        );
        t.enforced(30, None);
        assert!(matches!(
            t.bind("/emars/cg-1", 30, "fb", "b1", 2_100),
            Err(BindError::AlreadyBound { .. })
        ));
        table.set_peak("/emars/cg-1", 100 * MIB);
        let (a, fx) = t.release("/emars/cg-1", 3_000).unwrap();
        assert_eq!(
            (a.function.as_str(), a.peak_bytes, a.ended_at_ms),
            ("fa", 100 * MIB, Some(3_000))
        );
        assert_eq!(a.peak_source, PeakSource::LifetimeWatermark);
        assert_eq!(saved(&fx).len(), 1);
        assert!(matches!(
            t.release("/emars/cg-1", 3_100),
            Err(BindError::NotBound { .. })
        ));
        // The slot lives on: bound again, then removed while bound.
        t.bind("/emars/cg-1", 30, "fb", "b1", 4_000).unwrap();
        t.enforced(30, None);
        let fx = t.apply(rmdir(30), 5_000, 3);
        let b = saved(&fx);
        assert_eq!(
            (b[0].function.as_str(), b[0].ended_at_ms),
            ("fb", Some(5_000))
        );
        for (path, id, want) in [
            ("/emars/fn/i1", 31, "path rules"),
            ("/emars", 1, "not inside"),
            ("/other/x", 1, "not inside"),
            ("/emars/cg-9", 1, "no cgroup"),
            ("/emars/../x", 1, "without . or .."),
            // Removed and created again (id 30 then) after the bind was asked for.
            ("/emars/cg-1", 29, "removed and created again"),
        ] {
            let e = t.bind(path, id, "fc", "c1", 6_000).unwrap_err();
            assert!(e.to_string().contains(want), "{path}: {e}");
        }
        assert!(matches!(
            t.bind("/emars/cg-1", 30, "bad name", "c1", 6_000),
            Err(BindError::Invalid(_))
        ));
    }

    /// A cap of two functions, counted as a store would: the names it holds, in order.
    struct TwoFunctions(std::sync::Mutex<Vec<String>>);

    impl FunctionAdmission for TwoFunctions {
        fn admit(&self, function: &str, _at_ms: u64) -> Result<(), FunctionsFull> {
            let mut known = self.0.lock().unwrap();
            if known.iter().any(|k| k == function) || known.len() < 2 {
                if !known.iter().any(|k| k == function) {
                    known.push(function.to_owned());
                }
                return Ok(());
            }
            Err(FunctionsFull {
                function: function.to_owned(),
                max: 2,
            })
        }
    }

    /// Past the cap, a new function's instance is not tracked at all (no limits, no record,
    /// nothing for its execs or its rmdir), and a bind under a new name is refused; instances
    /// of functions already admitted go on as before, and a resumed record is not asked about.
    #[test]
    fn refused_functions_are_not_tracked() {
        let table = Table::default();
        for (rel, id) in [
            ("/emars/fa/1", 1),
            ("/emars/fb/1", 2),
            ("/emars/fc/1", 3),
            ("/emars/fa/2", 4),
            ("/emars/cg-1", 5),
            ("/emars/fd/1", 6),
        ] {
            table.add(rel, id);
        }
        let mut t = tracker(&table).with_admission(Box::new(TwoFunctions(Default::default())));
        for (id, rel) in [(1, "/emars/fa/1"), (2, "/emars/fb/1")] {
            assert!(!t.apply(mkdir(id, rel), 1_000, 1).is_empty());
            t.enforced(id, None);
        }
        assert!(t.apply(mkdir(3, "/emars/fc/1"), 1_100, 2).is_empty());
        assert!(t.live_record(3).is_none());
        assert_eq!(t.stats.functions_refused, 1);
        assert!(t.apply(exec(3), 1_200, 3).is_empty(), "its exec");
        assert!(t.apply(rmdir(3), 1_300, 4).is_empty(), "its rmdir");
        // A known function's new instance is tracked past the cap.
        let fx = t.apply(mkdir(4, "/emars/fa/2"), 1_400, 5);
        assert!(
            matches!(fx.first(), Some(Effect::Enforce { record, .. }) if record.function == "fa"),
            "{fx:?}"
        );
        t.enforced(4, None);
        t.apply(mkdir(5, "/emars/cg-1"), 1_500, 6);
        match t.bind("/emars/cg-1", 5, "fnew", "x", 1_600) {
            Err(e @ BindError::FunctionsFull(_)) => {
                assert!(e.to_string().contains("store.max_functions = 2"), "{e}")
            }
            other => panic!("expected FunctionsFull, got {other:?}"),
        }
        assert!(t.live_record(5).is_none());
        t.bind("/emars/cg-1", 5, "fb", "x", 1_700).unwrap();
        // The last run's live record: its function is known to the store, no question asked.
        let mut resumed = InstanceRecord {
            function: "fd".into(),
            instance: "1".into(),
            cgroup_id: 6,
            cgroup_path: "/cg/emars/fd/1".into(),
            started_at_ms: 500,
            ended_at_ms: None,
            execs: 0,
            peak_bytes: 0,
            peak_source: PeakSource::None,
            oom_kills: 0,
            limits: Limits::default(),
        };
        resumed.execs = 1;
        t.add_cgroup(
            6,
            "/emars/fd/1",
            500,
            Some(resumed),
            Found::Existing {
                new_since_start: false,
            },
        );
        assert_eq!(t.live_record(6).map(|r| r.execs), Some(1));
        assert_eq!(t.stats.functions_refused, 1);
    }

    /// A new instance: limits first (nothing saved until the enforcement is answered), then
    /// the record with the limits it got.
    #[test]
    fn mkdir_enforces_before_saving() {
        let table = Table::default();
        table.add("/emars/fn/i1", 10);
        let mut t = tracker(&table);
        let fx = t.apply(mkdir(10, "/emars/fn/i1"), 1_000, 77);
        match fx.as_slice() {
            [Effect::Enforce {
                record,
                mkdir_ts_ns: Some(77),
            }, Effect::AddHour {
                function,
                at_ms: 1_000,
                delta,
            }] => {
                assert_eq!(
                    (record.function.as_str(), record.instance.as_str()),
                    ("fn", "i1")
                );
                assert_eq!(function, "fn");
                assert_eq!(delta.instances_started, 1);
            }
            other => panic!("unexpected effects {other:?}"),
        }
        let limits = Limits {
            max_bytes: Some(64 * MIB),
            high_bytes: Some(60 * MIB),
        };
        let fx = t.enforced(10, Some(limits));
        assert_eq!(saved(&fx).len(), 1);
        assert_eq!(saved(&fx)[0].limits, limits);
        // Answered once: a second answer does nothing.
        assert!(t.enforced(10, None).is_empty());
    }

    /// Instances of a function that ended since the last tick make its next new instance
    /// recompute the recommendation before the limits are written; the tick recomputes the
    /// others, once.
    #[test]
    fn ended_instances_recompute_before_the_next_enforcement() {
        let table = Table::default();
        table.add("/emars/fn/a", 1);
        table.add("/emars/gn/b", 2);
        let mut t = tracker(&table);
        for (id, p) in [(1, "/emars/fn/a"), (2, "/emars/gn/b")] {
            t.apply(mkdir(id, p), 0, 0);
            t.enforced(id, None);
        }
        table.set_peak("/emars/fn/a", 5 * MIB);
        for (id, p) in [(1, "/emars/fn/a"), (2, "/emars/gn/b")] {
            let fx = t.apply(
                KernelEvent::CgroupRmdir {
                    id,
                    path: p.into(),
                    peak: 0,
                    watermark: 7 * MIB,
                },
                50,
                0,
            );
            let s = saved(&fx);
            assert_eq!(s.len(), 1);
            assert_eq!((s[0].ended_at_ms, s[0].peak_bytes), (Some(50), 7 * MIB));
            assert_eq!(s[0].peak_source, PeakSource::KernelWatermark);
            table.remove(p);
        }
        table.add("/emars/fn/c", 3);
        let fx = t.apply(mkdir(3, "/emars/fn/c"), 60, 0);
        assert!(
            matches!(&fx[..2], [Effect::Recompute { function, .. }, Effect::Enforce { .. }] if function == "fn"),
            "{fx:?}"
        );
        assert_eq!(
            t.recompute_dirty(70),
            vec![Effect::Recompute {
                function: "gn".into(),
                at_ms: 70
            }]
        );
        assert!(t.recompute_dirty(80).is_empty());
    }

    /// Execs count and save; a watermark that grew is saved, one that did not is not; an OOM
    /// kill saves, counts and recomputes at once.
    #[test]
    fn execs_peaks_and_oom_kills() {
        let table = Table::default();
        table.add("/emars/fn/i", 5);
        let mut t = tracker(&table);
        t.apply(mkdir(5, "/emars/fn/i"), 0, 0);
        t.enforced(5, None);
        let exec = KernelEvent::Exec {
            id: 5,
            pid: 100,
            filename: "/bin/x".into(),
        };
        let fx = t.apply(exec.clone(), 10, 0);
        assert_eq!(saved(&fx)[0].execs, 1);
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::AddHour { delta, at_ms: 10, .. } if delta.execs == 1)));
        // Nothing grew: an exit saves nothing.
        assert!(t
            .apply(KernelEvent::Exit { id: 5, pid: 100 }, 11, 0)
            .is_empty());
        table.set_peak("/emars/fn/i", 9 * MIB);
        let fx = t.apply(
            KernelEvent::MemPeak {
                id: 5,
                peak: 8 * MIB,
            },
            12,
            0,
        );
        let s = saved(&fx);
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].peak_bytes, s[0].peak_source),
            (9 * MIB, PeakSource::KernelWatermark)
        );
        let fx = t.apply(KernelEvent::OomVictim { id: 5, pid: 100 }, 13, 0);
        assert_eq!(saved(&fx)[0].oom_kills, 1);
        assert!(
            matches!(fx.last(), Some(Effect::Recompute { function, at_ms: 13 }) if function == "fn")
        );
    }

    /// An event from a task of a cgroup whose mkdir was never seen registers it late (and
    /// enforces); a cut-short path is found by id; a cgroup gone without an rmdir is closed by
    /// reconciliation; one that existed before the agent is saved without enforcement.
    #[test]
    fn late_truncated_reconciled_and_existing() {
        let mut table = Table::default();
        table.procs.insert(42, "/emars/fn/late".into());
        table.add("/emars/fn/late", 20);
        table.add("/emars/fn/a-very-long-instance-name", 21);
        table.add("/emars/fn/old", 22);
        let mut t = tracker(&table);
        let fx = t.apply(
            KernelEvent::Exec {
                id: 0,
                pid: 42,
                filename: "x".into(),
            },
            5,
            0,
        );
        assert!(
            matches!(&fx[0], Effect::Enforce { record, mkdir_ts_ns: None } if record.instance == "late"),
            "{fx:?}"
        );
        assert_eq!(saved(&t.enforced(20, None))[0].execs, 1);

        let fx = t.apply(
            KernelEvent::CgroupMkdir {
                id: 21,
                path: "/emars/fn/a-very".into(),
                level: 3,
                truncated: true,
            },
            6,
            0,
        );
        assert!(
            matches!(&fx[0], Effect::Enforce { record, .. } if record.instance == "a-very-long-instance-name"),
            "{fx:?}"
        );
        assert_eq!(t.stats.paths_truncated, 1);
        let fx = t.apply(
            KernelEvent::CgroupMkdir {
                id: 99,
                path: "/emars/fn/gon".into(),
                level: 3,
                truncated: true,
            },
            6,
            0,
        );
        assert!(fx.is_empty());
        assert_eq!(t.stats.paths_unresolved, 1);

        let fx = t.add_cgroup(
            22,
            "/emars/fn/old",
            1,
            None,
            Found::Existing {
                new_since_start: false,
            },
        );
        assert!(!fx.iter().any(|e| matches!(e, Effect::Enforce { .. })));
        assert_eq!(saved(&fx).len(), 1);

        table.remove("/emars/fn/late");
        let fx = t.reconcile(100);
        let s = saved(&fx);
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].instance.as_str(), s[0].ended_at_ms),
            ("late", Some(100))
        );
        assert_eq!(t.stats.reconciled, 1);
        assert_eq!(t.live_count(), 2);
    }

    /// A mkdir moves ahead of queued events about other cgroups, not ahead of one about its
    /// own id (a reused inode whose rmdir is still queued).
    #[test]
    fn mkdirs_go_first_unless_their_id_came_before() {
        use crate::kernel::events::Timed;
        let ev = |event| Timed { ts_ns: 0, event };
        let exit = |id| KernelEvent::Exit { id, pid: 1 };
        let batch = vec![
            ev(exit(1)),
            ev(rmdir(1)),
            ev(rmdir(2)),
            ev(mkdir(3, "/emars/f/c")),
            ev(mkdir(2, "/emars/f/reused")),
            ev(exit(3)),
        ];
        let order: Vec<(u64, bool)> = mkdirs_first(batch)
            .iter()
            .map(|t| {
                (
                    t.event.cgroup_id(),
                    matches!(t.event, KernelEvent::CgroupMkdir { .. }),
                )
            })
            .collect();
        assert_eq!(
            order,
            vec![
                (3, true),
                (1, false),
                (1, false),
                (2, false),
                (2, true),
                (3, false)
            ]
        );
    }

    /// The mkdirs whose cgroup an rmdir later in the same batch removes (no limits for them).
    #[test]
    fn instances_gone_within_a_batch_are_found() {
        let t = |ts_ns, event| crate::kernel::events::Timed { ts_ns, event };
        let batch = vec![
            t(1, mkdir(5, "/r/f/a")),
            t(2, mkdir(6, "/r/f/b")),
            t(3, rmdir(5)),
            // Id 5 reused by a new cgroup that stays.
            t(4, mkdir(5, "/r/f/c")),
            // An rmdir of a cgroup made before the batch.
            t(5, rmdir(9)),
        ];
        let gone = gone_in_batch(&batch);
        assert_eq!(gone, HashSet::from([(5, 1)]));
    }

    /// Effects answered with more are run in order, the answer first.
    #[test]
    fn drain_runs_answers_before_the_rest() {
        let table = Table::default();
        table.add("/emars/fn/i", 1);
        let mut t = tracker(&table);
        let fx = t.apply(mkdir(1, "/emars/fn/i"), 0, 0);
        let mut order = Vec::new();
        drain(&mut t, fx, |t, e| {
            order.push(match &e {
                Effect::Enforce { .. } => "enforce",
                Effect::Save(_) => "save",
                Effect::AddHour { .. } => "hour",
                Effect::Recompute { .. } => "recompute",
                Effect::RuntimeLimit { .. } => "runtime limit",
            });
            match e {
                Effect::Enforce { record, .. } => t.enforced(record.cgroup_id, None),
                _ => Vec::new(),
            }
        });
        assert_eq!(order, vec!["enforce", "save", "hour"]);
    }
}
