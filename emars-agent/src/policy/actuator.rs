//! The cgroup writer: puts memory limits into instance cgroups, and only there.
//!
//! Safety rules, checked on every write:
//! - writes happen only when the policy mode allows them (never in observe mode);
//! - the cgroup lies strictly inside a watched root, reached without symlinks, and is the very
//!   cgroup the agent recorded (its inode is the recorded cgroup id: a cgroup removed and
//!   recreated under the same path is another instance and is not written);
//! - the directory is opened once and every file is read and written through that handle;
//! - a limit is never below the instance's usage plus headroom (checked again right before each
//!   file is written) and never above host memory;
//! - memory.max is never above the limit the container's runtime gave it (unless
//!   `policy.override_runtime_limits`): a request above it is clamped, and the audit says so;
//! - the intent is in the audit log, on disk, before the first byte is written (no durable
//!   audit, no write), and the outcome (ok, partial, failed) replaces it afterwards.
//!
//! A failed write (cgroup gone, EBUSY, EINVAL) is an error value, never a crash.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
};

use crate::{
    kernel::cgroupfs::{CgroupDir, CgroupfsError, MemoryHierarchy},
    model::kept::{same_limit, RuntimeLimit, RuntimeLimitSource},
    model::live::InstanceKey,
    model::audit::{ClampedBy, Outcome, Reason},
    model::{InstanceRecord, Limits},
    store::{AuditKey, Store, StoreError},
};

// Bridge for the files that still import these from here (policy/burst.rs, policy/squeeze.rs,
// agent.rs): they live in model/ now.
pub use crate::model::{audit::AuditRecord, LimitRequest};

/// The audit reason of a write an operator asked for (`POST .../limits`, `emars set-limit`).
pub const REASON_BY_HAND: Reason = Reason::Api;

#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error(
        "the agent is in observe mode, which writes no limits; set policy.mode = \
         \"enforce\" in the agent's config to allow limit writes"
    )]
    ObserveMode,
    #[error("{path} is not inside a watched root; EMARS only writes to cgroups it manages")]
    OutsideRoots { path: PathBuf },
    #[error(
        "{path} is no longer the instance's cgroup (recorded cgroup id {expected}, \
         found {found}): it was removed and created again"
    )]
    Replaced {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(
        "a limit of {requested} bytes is below the current usage {usage} bytes plus \
         headroom {headroom} bytes of {path}"
    )]
    BelowUsage {
        path: PathBuf,
        requested: u64,
        usage: u64,
        headroom: u64,
    },
    #[error("{requested} bytes is above host memory ({host} bytes)")]
    AboveHost { requested: u64, host: u64 },
    #[error("memory.high {high} bytes is above memory.max {max} bytes")]
    HighAboveMax { high: u64, max: u64 },
    #[error("nothing to write: no memory.max and no memory.high given")]
    Empty,
    #[error(
        "not written: the audit record of the write could not be made durable ({source}); \
         EMARS writes no limit that its audit log would not show"
    )]
    AuditNotDurable { source: StoreError },
    /// The record of a write that sets no limit (a bind's watermark reset) could not be stored.
    #[error("not done: its audit record could not be stored ({source})")]
    AuditNotStored { source: StoreError },
    #[error(transparent)]
    Cgroup(#[from] CgroupfsError),
    #[error("writing {value} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: u64,
        source: std::io::Error,
    },
}

impl ActuatorError {
    /// True for a refusal by the safety rules (a 4xx for the API), false for a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::ObserveMode
                | Self::OutsideRoots { .. }
                | Self::Replaced { .. }
                | Self::BelowUsage { .. }
                | Self::AboveHost { .. }
                | Self::HighAboveMax { .. }
                | Self::Empty
        ) || matches!(self, Self::Cgroup(CgroupfsError::OutsideRoot { .. }))
    }
}

/// What to do with a requested max below usage + headroom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BelowUsage {
    /// Raise the limit to usage + headroom (automatic enforcement).
    Raise,
    /// Refuse the request (a user asked for exactly this value).
    Refuse,
}

/// Counters of the actuator, for /v1/info.
#[derive(Debug, Default)]
pub struct ActuatorStats {
    pub writes_ok: AtomicU64,
    /// Writes not made because the limits asked for were in force (a warm pooled cgroup bound
    /// again to the function it served).
    pub unchanged: AtomicU64,
    pub writes_failed: AtomicU64,
    pub refusals: AtomicU64,
    /// Audit records that could not be stored (the write was then not made, or its outcome
    /// is missing from the log).
    pub audit_errors: AtomicU64,
}

pub struct Actuator {
    hierarchy: MemoryHierarchy,
    /// Kernel-style watched roots ("/emars").
    roots: Vec<String>,
    host_memory: u64,
    headroom: u64,
    writes_allowed: bool,
    /// `policy.override_runtime_limits`: memory.max may go above the runtime's limit.
    override_runtime_limits: bool,
    /// The memory.max this agent last wrote into each live instance (or found in force when
    /// it asked for the same), to tell a later write by another (the runtime's own) from its
    /// own. In memory: a restarted agent starts from what it finds.
    last_max: Mutex<HashMap<InstanceKey, u64>>,
    /// Live instances whose limits an operator set by hand (`set-limit`, reason "api"): `apply`
    /// keeps them until the instance ends. In memory: a restart forgets them.
    set_by_hand: Mutex<HashSet<InstanceKey>>,
    audit: Store,
    pub stats: ActuatorStats,
    /// Test seam: writes to this file fail with EINVAL, as the kernel's may.
    #[cfg(test)]
    fail_writes_to: Option<&'static str>,
}

/// The result of one write attempt and its audit record (already stored).
#[derive(Debug)]
pub struct Written {
    pub audit: AuditRecord,
    pub result: Result<Applied, ActuatorError>,
}

/// What a successful write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub old: Limits,
    pub new: Limits,
    pub usage: u64,
    pub raised: bool,
}

/// A checked request, ready to be written into an opened cgroup.
struct Plan {
    dir: CgroupDir,
    old: Limits,
    usage: u64,
    new: LimitRequest,
    raised: bool,
    /// The instance's key.
    key: InstanceKey,
    /// The container runtime's limit, when it bounds this write: no file goes above it.
    cap: Option<u64>,
    /// The request was bounded by `cap`.
    clamped: bool,
}

impl Actuator {
    /// `roots` are kernel-style paths relative to the hierarchy ("/emars"); `writes_allowed`
    /// is false in observe mode; every attempt is audited in `audit`.
    pub fn new(
        hierarchy: MemoryHierarchy,
        roots: &[String],
        headroom: u64,
        writes_allowed: bool,
        audit: Store,
    ) -> Self {
        Self {
            hierarchy,
            roots: roots.to_vec(),
            host_memory: crate::kernel::host::memory_total_bytes(),
            headroom,
            writes_allowed,
            override_runtime_limits: false,
            last_max: Mutex::default(),
            set_by_hand: Mutex::default(),
            audit,
            stats: ActuatorStats::default(),
            #[cfg(test)]
            fail_writes_to: None,
        }
    }

    /// `policy.override_runtime_limits`: write memory.max above the limit a container's
    /// runtime gave it.
    pub fn overriding_runtime_limits(mut self, on: bool) -> Self {
        self.override_runtime_limits = on;
        self
    }

    pub fn host_memory(&self) -> u64 {
        self.host_memory
    }

    /// No limit goes below an instance's usage plus this.
    pub fn headroom(&self) -> u64 {
        self.headroom
    }

    /// The memory limit the container's runtime gave `inst`, which no write goes above; None
    /// when there is none or `policy.override_runtime_limits` lifts it. `current_max` is the
    /// memory.max in force now: one that differs from the agent's own last write was written
    /// by another since (a runtime that writes its limit after the mkdir, as runc does, or
    /// `docker update`), and is the runtime's limit from then on.
    pub fn runtime_limit(&self, inst: &InstanceRecord, current_max: Option<u64>) -> Option<u64> {
        if self.override_runtime_limits {
            return None;
        }
        let key = (inst.started_at_ms, inst.cgroup_id);
        let ours = self.last_max().get(&key).copied();
        if let Some(ours) = ours.filter(|w| !same_limit(current_max, Some(*w))) {
            tracing::info!(
                function = inst.function,
                instance = inst.instance,
                ours,
                now = ?current_max,
                "memory.max was written by another since the agent's last write: the runtime's \
                 limit from now on"
            );
            self.keep_runtime_limit(key, current_max);
            return current_max;
        }
        match self.audit.kept_state::<RuntimeLimit>(key) {
            Ok(limit) => limit.map(|l| l.bytes),
            Err(e) => {
                tracing::error!("the runtime limit of {}: {e}", inst.cgroup_path);
                None
            }
        }
    }

    /// Keeps `limit`, written by another than the agent, as the instance's runtime limit (none:
    /// the limit was lifted).
    fn keep_runtime_limit(&self, key: InstanceKey, limit: Option<u64>) {
        let kept = match limit {
            Some(bytes) => {
                self.last_max().insert(key, bytes);
                let source = RuntimeLimitSource::LaterWrite;
                self.audit.keep_state(key, &RuntimeLimit { bytes, source })
            }
            None => {
                self.last_max().remove(&key);
                self.audit.forget_state::<RuntimeLimit>(key)
            }
        };
        if let Err(e) = kept {
            tracing::error!("keeping the runtime limit of cgroup {}: {e}", key.1);
        }
    }

    /// Right before memory.max is written: whether another wrote it since the write was
    /// planned from `planned_from` (a runtime writing its limit after the mkdir while this
    /// write was being made durable), to a value below `v`. That value is the runtime's limit
    /// from then on, and `v` is not written.
    fn written_by_another(
        &self,
        dir: &CgroupDir,
        key: InstanceKey,
        planned_from: Option<u64>,
        v: u64,
    ) -> Result<bool, ActuatorError> {
        if self.override_runtime_limits {
            return Ok(false);
        }
        let now = dir.limits()?.max_bytes;
        let ours = self.last_max().get(&key).copied();
        if same_limit(now, planned_from) || (ours.is_some() && same_limit(now, ours)) {
            return Ok(false);
        }
        tracing::info!(
            cgroup = %dir.path().display(),
            planned_from = ?planned_from,
            now = ?now,
            "memory.max was written by another while this write was made durable: the \
             runtime's limit from now on"
        );
        self.keep_runtime_limit(key, now);
        Ok(now.is_some_and(|now| v > now))
    }

    /// Forgets what it noted of an instance that ended (its last memory.max, and that its
    /// limits were set by hand).
    pub fn forget(&self, inst: &InstanceRecord) {
        let key = (inst.started_at_ms, inst.cgroup_id);
        self.last_max().remove(&key);
        self.hand_set().remove(&key);
    }

    /// Whether an operator set this live instance's limits by hand (see `set_by_hand`).
    pub fn is_set_by_hand(&self, inst: &InstanceRecord) -> bool {
        self.hand_set()
            .contains(&(inst.started_at_ms, inst.cgroup_id))
    }

    fn hand_set(&self) -> MutexGuard<'_, HashSet<InstanceKey>> {
        self.set_by_hand.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn last_max(&self) -> MutexGuard<'_, HashMap<InstanceKey, u64>> {
        self.last_max.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn writes_allowed(&self) -> bool {
        self.writes_allowed
    }

    /// Writes limits into a live instance's cgroup, audited before and after; `reason` says who
    /// asked ("new_instance", "apply", "api"), `delay_start_ns` the kernel time of its mkdir.
    pub fn write(
        &self,
        inst: &InstanceRecord,
        req: LimitRequest,
        on_below: BelowUsage,
        reason: impl Into<Reason>,
        delay_start_ns: Option<u64>,
    ) -> Written {
        self.write_signalled(inst, req, on_below, reason, delay_start_ns, None)
    }

    /// [`Actuator::write`] for a reactive action, with the kernel signal that caused it.
    pub fn write_signalled(
        &self,
        inst: &InstanceRecord,
        req: LimitRequest,
        on_below: BelowUsage,
        reason: impl Into<Reason>,
        delay_start_ns: Option<u64>,
        signal: Option<&str>,
    ) -> Written {
        let mut audit = AuditRecord {
            new: Limits {
                max_bytes: req.max_bytes,
                high_bytes: req.high_bytes,
            },
            ..AuditRecord::intent(inst, reason.into(), signal)
        };
        let plan = match self.plan(inst, req, on_below) {
            Ok(p) => p,
            Err(e) => {
                self.not_attempted(&mut audit, &e);
                return Written {
                    audit,
                    result: Err(e),
                };
            }
        };
        let ikey = (inst.started_at_ms, inst.cgroup_id);
        audit.old = plan.old;
        audit.new = Limits {
            max_bytes: plan.new.max_bytes,
            high_bytes: plan.new.high_bytes,
        };
        audit.usage_bytes = Some(plan.usage);
        audit.raised = plan.raised;
        if plan.clamped {
            audit.clamped_by = Some(ClampedBy::RuntimeLimit);
            audit.requested = Some(Limits {
                max_bytes: req.max_bytes,
                high_bytes: req.high_bytes,
            });
        }
        let in_force = |new: Option<u64>, old: Option<u64>| new.is_none() || new == old;
        if in_force(plan.new.max_bytes, plan.old.max_bytes)
            && in_force(plan.new.high_bytes, plan.old.high_bytes)
        {
            return self.unchanged(&plan, ikey, audit);
        }
        let key = match self.durable_intent(&audit) {
            Ok(k) => k,
            Err(e) => {
                self.count(&e);
                audit.outcome = Outcome::Failed;
                audit.error = Some(e.to_string());
                return Written {
                    audit,
                    result: Err(e),
                };
            }
        };
        let result = self.carry_out(plan, on_below, &mut audit);
        audit.delay_us =
            delay_start_ns.map(|t| crate::clock::monotonic_ns().saturating_sub(t) / 1000);
        match &result {
            Ok(_) => audit.outcome = Outcome::Ok,
            Err(e) => {
                self.count(e);
                let nothing = audit.written == Limits::default();
                audit.outcome = match (nothing, e.is_refusal()) {
                    (false, _) => Outcome::Partial,
                    (true, true) => Outcome::Refused,
                    (true, false) => Outcome::Failed,
                };
                audit.error = Some(e.to_string());
            }
        }
        if result.is_ok() {
            self.stats.writes_ok.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(m) = audit.written.max_bytes {
            self.last_max().insert(ikey, m);
        }
        if result.is_ok() && audit.reason == REASON_BY_HAND {
            self.hand_set().insert(ikey);
        }
        if let Err(se) = self.audit.complete_audit(&key, &audit) {
            self.audit_error(&se);
        }
        Written { audit, result }
    }

    /// A write whose limits are in force already: nothing to write, so nothing that needs an
    /// audit record (or its disk sync), unless the runtime's limit kept the ones asked for
    /// out, which is said.
    fn unchanged(&self, plan: &Plan, key: InstanceKey, mut audit: AuditRecord) -> Written {
        self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
        audit.outcome = Outcome::Unchanged;
        if let (Some(_), Some(m)) = (plan.new.max_bytes, plan.old.max_bytes) {
            self.last_max().insert(key, m);
        }
        if plan.clamped {
            if let Err(e) = self.audit.append_audit(audit.at_ms, &audit) {
                self.audit_error(&e);
            }
        }
        Written {
            audit,
            result: Ok(Applied {
                old: plan.old,
                new: plan.old,
                usage: plan.usage,
                raised: plan.raised,
            }),
        }
    }

    /// Asks the kernel to reclaim `bytes` from a live instance (v2 memory.reclaim; v1
    /// memory.force_empty, which takes what it can), audited before and after like a limit
    /// write: same mode, place and identity checks. No limit changes, so nothing can be set
    /// below usage; what usage fell by is in the record's `reclaimed_bytes`.
    pub fn reclaim(
        &self,
        inst: &InstanceRecord,
        bytes: u64,
        reason: impl Into<Reason>,
        signal: Option<&str>,
    ) -> Result<AuditRecord, ActuatorError> {
        let mut audit = AuditRecord {
            reclaim_requested_bytes: Some(bytes),
            ..AuditRecord::intent(inst, reason.into(), signal)
        };
        let checked = (|| {
            if !self.writes_allowed {
                return Err(ActuatorError::ObserveMode);
            }
            let dir = self.open_instance(inst)?;
            let usage = dir.usage()?;
            Ok((dir, usage))
        })();
        let (dir, before) = match checked {
            Ok(c) => c,
            Err(e) => {
                self.not_attempted(&mut audit, &e);
                return Err(e);
            }
        };
        audit.usage_bytes = Some(before);
        let key = self.durable_intent(&audit)?;
        let file = dir.reclaim_file();
        let result = dir
            .reclaim(bytes)
            .map_err(|source| write_error(&dir, file, bytes, source))
            .and_then(|()| Ok(dir.usage()?));
        match &result {
            Ok(after) => {
                audit.outcome = Outcome::Ok;
                audit.reclaimed_bytes = Some(before.saturating_sub(*after));
                self.stats.writes_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.count(e);
                audit.outcome = Outcome::Failed;
                audit.error = Some(e.to_string());
            }
        }
        if let Err(se) = self.audit.complete_audit(&key, &audit) {
            self.audit_error(&se);
        }
        result.map(|_| audit)
    }

    /// Audits a write that sets no limit (a bind's watermark reset): an intent record with
    /// `reason` before `write` runs, its outcome after. Nothing runs when the record cannot be
    /// stored. Allowed in observe mode: the platform asked for it, and no limit changes.
    pub fn audited<T, E: std::fmt::Display>(
        &self,
        inst: &InstanceRecord,
        reason: impl Into<Reason>,
        write: impl FnOnce() -> Result<T, E>,
    ) -> Result<Result<T, E>, ActuatorError> {
        let mut audit = AuditRecord::intent(inst, reason.into(), None);
        // Recorded before, but not synced to disk per call: such a write (a bind's watermark
        // reset) changes no limit, and a platform makes one per use or invocation. The record
        // is made durable with the store's next flush.
        let key = self
            .audit
            .append_audit(audit.at_ms, &audit)
            .map_err(|source| {
                self.audit_error(&source);
                ActuatorError::AuditNotStored { source }
            })?;
        let result = write();
        match &result {
            Ok(_) => audit.outcome = Outcome::Ok,
            Err(e) => {
                audit.outcome = Outcome::Refused;
                audit.error = Some(e.to_string());
            }
        }
        if let Err(se) = self.audit.update_audit(&key, &audit) {
            self.audit_error(&se);
        }
        Ok(result)
    }

    /// Records a write its caller decided against (a burst raise at its ceiling): outcome
    /// `refused` with `why`, counted with the refusals. Nothing was written, so the record
    /// needs no durability of its own.
    pub fn refused(
        &self,
        inst: &InstanceRecord,
        reason: impl Into<Reason>,
        why: &str,
        signal: Option<&str>,
    ) -> AuditRecord {
        let mut audit = AuditRecord::intent(inst, reason.into(), signal);
        audit.outcome = Outcome::Refused;
        audit.error = Some(why.to_owned());
        self.stats.refusals.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.audit.append_audit(audit.at_ms, &audit) {
            self.audit_error(&e);
        }
        audit
    }

    /// A write refused or failed before anything was written: counted, and recorded with
    /// why (it needs no durability of its own: nothing changed).
    fn not_attempted(&self, audit: &mut AuditRecord, e: &ActuatorError) {
        self.count(e);
        audit.outcome = if e.is_refusal() {
            Outcome::Refused
        } else {
            Outcome::Failed
        };
        audit.error = Some(e.to_string());
        if let Err(se) = self.audit.append_audit(audit.at_ms, audit) {
            self.audit_error(&se);
        }
    }

    /// Makes a write's intent durable before the write; nothing is written when it cannot be.
    fn durable_intent(&self, audit: &AuditRecord) -> Result<AuditKey, ActuatorError> {
        self.audit
            .append_audit_durable(audit.at_ms, audit)
            .map_err(|source| {
                self.audit_error(&source);
                ActuatorError::AuditNotDurable { source }
            })
    }

    fn count(&self, e: &ActuatorError) {
        let counter = if e.is_refusal() {
            &self.stats.refusals
        } else {
            &self.stats.writes_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn audit_error(&self, e: &StoreError) {
        self.stats.audit_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!("audit log: {e}");
    }

    /// Every check that needs no write: mode, place, identity, bounds.
    fn plan(
        &self,
        inst: &InstanceRecord,
        req: LimitRequest,
        on_below: BelowUsage,
    ) -> Result<Plan, ActuatorError> {
        if !self.writes_allowed {
            return Err(ActuatorError::ObserveMode);
        }
        if req.max_bytes.is_none() && req.high_bytes.is_none() {
            return Err(ActuatorError::Empty);
        }
        let dir = self.open_instance(inst)?;
        for v in [req.max_bytes, req.high_bytes].into_iter().flatten() {
            if v > self.host_memory {
                return Err(ActuatorError::AboveHost {
                    requested: v,
                    host: self.host_memory,
                });
            }
        }
        let old = dir.limits()?;
        let usage = dir.usage()?;
        let cap = self.runtime_limit(inst, old.max_bytes);
        let (req, mut clamped) = clamp_to(req, cap);
        let mut raised = false;
        let mut new = LimitRequest {
            max_bytes: self.floored(&dir, req.max_bytes, usage, on_below, &mut raised)?,
            high_bytes: self.floored(&dir, req.high_bytes, usage, on_below, &mut raised)?,
        };
        if let Some(cap) = cap {
            // The floor took a file past the runtime's limit: that file keeps what it holds.
            for v in [&mut new.max_bytes, &mut new.high_bytes] {
                if v.is_some_and(|v| v > cap) {
                    *v = None;
                    clamped = true;
                }
            }
        }
        if let (Some(high), Some(max)) = (new.high_bytes, new.max_bytes) {
            if high > max {
                if raised {
                    new.high_bytes = Some(max);
                } else {
                    return Err(ActuatorError::HighAboveMax { high, max });
                }
            }
        }
        Ok(Plan {
            dir,
            old,
            usage,
            new,
            raised,
            key: (inst.started_at_ms, inst.cgroup_id),
            cap,
            clamped,
        })
    }

    /// Bytes charged to a live instance's cgroup now (for the API's live view): read through
    /// the same checked open as a write.
    pub fn usage(&self, inst: &InstanceRecord) -> Result<u64, ActuatorError> {
        Ok(self.open_instance(inst)?.usage()?)
    }

    /// The instance's cgroup, opened inside its watched root and checked to be the recorded one.
    fn open_instance(&self, inst: &InstanceRecord) -> Result<CgroupDir, ActuatorError> {
        self.open_recorded(&inst.cgroup_path, inst.cgroup_id)
    }

    /// `cgroup_path` opened strictly inside a watched root, refused unless its id is
    /// `cgroup_id` (a cgroup removed and created again is another one).
    fn open_recorded(&self, cgroup_path: &str, cgroup_id: u64) -> Result<CgroupDir, ActuatorError> {
        let path = Path::new(cgroup_path);
        let outside = || ActuatorError::OutsideRoots {
            path: path.to_owned(),
        };
        let rel = self.hierarchy.rel_path(path).ok_or_else(outside)?;
        let root = self
            .roots
            .iter()
            .find(|r| {
                rel.strip_prefix(r.as_str())
                    .is_some_and(|t| t.starts_with('/'))
            })
            .ok_or_else(outside)?;
        let dir = self.hierarchy.open_below(root, &rel)?;
        let found = dir.id()?;
        if found != cgroup_id {
            return Err(ActuatorError::Replaced {
                path: path.to_owned(),
                expected: cgroup_id,
                found,
            });
        }
        Ok(dir)
    }

    /// A requested limit against the floor usage + headroom: kept, raised, or refused.
    fn floored(
        &self,
        dir: &CgroupDir,
        requested: Option<u64>,
        usage: u64,
        on_below: BelowUsage,
        raised: &mut bool,
    ) -> Result<Option<u64>, ActuatorError> {
        let floor = usage.saturating_add(self.headroom).min(self.host_memory);
        match requested {
            Some(v) if v < floor => match on_below {
                BelowUsage::Refuse => Err(ActuatorError::BelowUsage {
                    path: dir.path().to_owned(),
                    requested: v,
                    usage,
                    headroom: self.headroom,
                }),
                BelowUsage::Raise => {
                    *raised = true;
                    Ok(Some(floor))
                }
            },
            other => Ok(other),
        }
    }

    /// Writes the plan, max first (the kernel keeps no order between the two files, and max is
    /// the one that protects the host), checking the floor again right before each file:
    /// usage can grow between the plan and the write.
    fn carry_out(
        &self,
        plan: Plan,
        on_below: BelowUsage,
        audit: &mut AuditRecord,
    ) -> Result<Applied, ActuatorError> {
        let Plan {
            dir,
            old,
            mut usage,
            new,
            mut raised,
            key,
            cap,
            ..
        } = plan;
        let (max_file, high_file) = self.hierarchy.limit_files();
        let mut max_now = new.max_bytes.or(old.max_bytes);
        for (file, value, is_max) in [
            (max_file, new.max_bytes, true),
            (high_file, new.high_bytes, false),
        ] {
            let Some(v) = value else { continue };
            usage = dir.usage()?;
            let mut v = self
                .floored(&dir, Some(v), usage, on_below, &mut raised)?
                .unwrap_or(v);
            if !is_max && raised {
                // A raised high never goes above the max in force.
                v = max_now.map_or(v, |m| v.min(m));
            }
            if cap.is_some_and(|c| v > c)
                || (is_max && self.written_by_another(&dir, key, old.max_bytes, v)?)
            {
                // Usage grew past the runtime's limit less headroom since the plan, or the
                // runtime wrote a lower one meanwhile: the file keeps what it holds.
                audit.clamped_by = Some(ClampedBy::RuntimeLimit);
                continue;
            }
            #[cfg(test)]
            if self.fail_writes_to == Some(file) {
                return Err(ActuatorError::Write {
                    path: dir.path().join(file),
                    value: v,
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                });
            }
            dir.write(file, v)
                .map_err(|source| write_error(&dir, file, v, source))?;
            if is_max {
                audit.written.max_bytes = Some(v);
                max_now = Some(v);
            } else {
                audit.written.high_bytes = Some(v);
            }
        }
        audit.raised = raised;
        audit.usage_bytes = Some(usage);
        Ok(Applied {
            old,
            new: Limits {
                max_bytes: audit.written.max_bytes.or(old.max_bytes),
                high_bytes: audit.written.high_bytes.or(old.high_bytes),
            },
            usage,
            raised,
        })
    }

    /// At start-up: closes the audit records of writes the last run did not finish, with what
    /// the instance's limit files hold now (when its cgroup is still the same one).
    pub fn close_interrupted(&self) -> Result<u64, StoreError> {
        self.audit.close_interrupted_audit(|mut rec: AuditRecord| {
            rec.outcome = Outcome::Interrupted;
            let now = self
                .open_recorded(&rec.cgroup_path, rec.cgroup_id)
                .ok()
                .and_then(|dir| dir.limits().ok());
            rec.error = Some(match now {
                Some(l) => {
                    rec.written = Limits {
                        max_bytes: rec
                            .new
                            .max_bytes
                            .filter(|_| l.max_bytes == rec.new.max_bytes),
                        high_bytes: rec
                            .new
                            .high_bytes
                            .filter(|_| l.high_bytes == rec.new.high_bytes),
                    };
                    format!(
                        "the agent stopped before recording the outcome; at restart the cgroup \
                         held max {:?}, high {:?}",
                        l.max_bytes, l.high_bytes
                    )
                }
                None => "the agent stopped before recording the outcome; the cgroup was gone \
                         at restart"
                    .to_owned(),
            });
            rec
        })
    }
}

/// `req` bounded by a container runtime's limit `cap`: memory.max at most the limit, memory.high
/// keeping its ratio to the max asked for (or at most the limit, asked alone). True when it
/// was bounded.
fn clamp_to(req: LimitRequest, cap: Option<u64>) -> (LimitRequest, bool) {
    let Some(cap) = cap else {
        return (req, false);
    };
    match req.max_bytes {
        Some(max) if max > cap => {
            let high = req
                .high_bytes
                .map(|h| (u128::from(h) * u128::from(cap) / u128::from(max)) as u64);
            let bounded = LimitRequest {
                max_bytes: Some(cap),
                high_bytes: high,
            };
            (bounded, true)
        }
        _ => match req.high_bytes {
            Some(high) if high > cap => (
                LimitRequest {
                    high_bytes: Some(cap),
                    ..req
                },
                true,
            ),
            _ => (req, false),
        },
    }
}

/// A failed write into a cgroup file: the cgroup gone (removed meanwhile) or the kernel's no.
fn write_error(dir: &CgroupDir, file: &str, value: u64, source: std::io::Error) -> ActuatorError {
    match source.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) => ActuatorError::Cgroup(CgroupfsError::Gone {
            path: dir.path().to_owned(),
        }),
        _ => ActuatorError::Write {
            path: dir.path().join(file),
            value,
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    //! The safety rules on a fake cgroupfs in a temp dir (plain files stand in for the kernel's;
    //! the real kernel path is covered by tests/tests/predictive.rs and security.rs).
    use std::{fs, os::unix::fs::MetadataExt};

    use super::*;
    use crate::kernel::cgroupfs::CgroupVersion;
    use crate::model::PeakSource;

    struct Fake {
        tmp: tempfile::TempDir,
        act: Actuator,
        store: Store,
        inst: PathBuf,
        outside: PathBuf,
    }

    fn files(version: CgroupVersion) -> (&'static str, &'static str, &'static str, &'static str) {
        match version {
            CgroupVersion::V1 => (
                "memory.usage_in_bytes",
                "memory.limit_in_bytes",
                "memory.soft_limit_in_bytes",
                "9223372036854771712",
            ),
            CgroupVersion::V2 => ("memory.current", "memory.max", "memory.high", "max"),
        }
    }

    fn fake_dir(d: &Path, version: CgroupVersion, usage: u64) {
        fs::create_dir_all(d).unwrap();
        let (usage_f, max_f, high_f, unlimited) = files(version);
        fs::write(d.join(usage_f), usage.to_string()).unwrap();
        fs::write(d.join(max_f), unlimited).unwrap();
        fs::write(d.join(high_f), unlimited).unwrap();
    }

    fn fake_with(version: CgroupVersion, usage: u64, writes_allowed: bool) -> Fake {
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path().join("cg");
        let inst = mount.join("emars/fn/i1");
        let outside = mount.join("other/x");
        for d in [&inst, &outside] {
            fake_dir(d, version, usage);
        }
        let h = MemoryHierarchy {
            version,
            mount,
            hierarchy_id: 0,
        };
        let store = Store::open(&tmp.path().join("store")).unwrap();
        let mut act = Actuator::new(
            h,
            &["/emars".to_owned()],
            8 << 20,
            writes_allowed,
            store.clone(),
        );
        act.host_memory = 1 << 30;
        Fake {
            tmp,
            act,
            store,
            inst,
            outside,
        }
    }

    fn fake(version: CgroupVersion, usage: u64) -> Fake {
        fake_with(version, usage, true)
    }

    /// The agent's record of the instance in `dir`, as the tracker would have it.
    fn record(dir: &Path) -> InstanceRecord {
        InstanceRecord {
            function: "fn".into(),
            instance: "i1".into(),
            cgroup_id: fs::metadata(dir).map(|m| m.ino()).unwrap_or(7),
            cgroup_path: dir.display().to_string(),
            started_at_ms: 1,
            ended_at_ms: None,
            execs: 0,
            peak_bytes: 0,
            peak_source: PeakSource::KernelWatermark,
            oom_kills: 0,
            limits: Limits::default(),
        }
    }

    impl Fake {
        fn write(&self, dir: &Path, req: LimitRequest, on_below: BelowUsage) -> Written {
            self.act.write(&record(dir), req, on_below, "api", None)
        }

        fn audit(&self) -> Vec<AuditRecord> {
            self.store.audit(100).unwrap()
        }
    }

    fn req(max: u64, high: u64) -> LimitRequest {
        LimitRequest {
            max_bytes: Some(max),
            high_bytes: Some(high),
        }
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    #[test]
    fn writes_v2_and_v1_files_and_audits_them() {
        let f = fake(CgroupVersion::V2, 10 << 20);
        let w = f.write(&f.inst, req(64 << 20, 48 << 20), BelowUsage::Refuse);
        let a = w.result.unwrap();
        assert_eq!(a.old, Limits::default());
        assert_eq!(a.new.max_bytes, Some(64 << 20));
        assert_eq!(read(&f.inst.join("memory.max")), "67108864");
        assert_eq!(read(&f.inst.join("memory.high")), "50331648");
        assert_eq!(f.audit(), vec![w.audit.clone()]);
        assert_eq!(w.audit.outcome, Outcome::Ok);
        assert_eq!(w.audit.written, a.new);
        let f = fake(CgroupVersion::V1, 10 << 20);
        f.write(&f.inst, req(64 << 20, 48 << 20), BelowUsage::Refuse)
            .result
            .unwrap();
        assert_eq!(read(&f.inst.join("memory.limit_in_bytes")), "67108864");
        assert_eq!(f.act.stats.writes_ok.load(Ordering::Relaxed), 1);
    }

    /// Limits already in force are not written again, and leave no audit record: a warm
    /// pooled cgroup bound again to the function it served costs no write and no disk sync.
    #[test]
    fn limits_in_force_are_not_written_again() {
        let f = fake(CgroupVersion::V2, 10 << 20);
        f.write(&f.inst, req(64 << 20, 48 << 20), BelowUsage::Raise)
            .result
            .unwrap();
        // Marked, so that a second write would show.
        fs::write(f.inst.join("memory.max"), "67108864\n").unwrap();
        let w = f.write(&f.inst, req(64 << 20, 48 << 20), BelowUsage::Raise);
        assert_eq!(w.audit.outcome, Outcome::Unchanged);
        assert!(w.audit.is_ok());
        assert_eq!(w.result.unwrap().new.max_bytes, Some(64 << 20));
        assert_eq!(
            read(&f.inst.join("memory.max")),
            "67108864\n",
            "not rewritten"
        );
        assert_eq!(f.audit().len(), 1, "only the first write is in the log");
        assert_eq!(f.act.stats.unchanged.load(Ordering::Relaxed), 1);
        // One of the two differs: written, and audited.
        let w = f.write(&f.inst, req(64 << 20, 40 << 20), BelowUsage::Raise);
        assert_eq!(w.audit.outcome, Outcome::Ok);
        assert_eq!(f.audit().len(), 2);
    }

    /// The limit a container's runtime gave it bounds every write: memory.max clamped to it,
    /// memory.high keeping its ratio, the audit saying so; a write left with nothing to change
    /// is still recorded; `override_runtime_limits` lifts it.
    #[test]
    fn the_runtime_limit_is_a_ceiling() {
        use crate::model::kept::{RuntimeLimit, RuntimeLimitSource};
        let f = fake(CgroupVersion::V2, 10 << 20);
        let inst = record(&f.inst);
        let key = (inst.started_at_ms, inst.cgroup_id);
        let limit = RuntimeLimit {
            bytes: 64 << 20,
            source: RuntimeLimitSource::Metadata,
        };
        f.store.keep_state(key, &limit).unwrap();
        let w = f.act.write(
            &inst,
            req(256 << 20, 192 << 20),
            BelowUsage::Raise,
            "new_instance",
            None,
        );
        let a = w.result.unwrap();
        assert_eq!(a.new.max_bytes, Some(64 << 20));
        assert_eq!(a.new.high_bytes, Some(48 << 20), "the ratio kept");
        assert_eq!(read(&f.inst.join("memory.max")), "67108864");
        assert_eq!(w.audit.clamped_by, Some(ClampedBy::RuntimeLimit));
        assert_eq!(w.audit.requested.unwrap().max_bytes, Some(256 << 20));
        assert_eq!(f.audit()[0], w.audit);
        // Asked again: nothing to write, and yet the record says why it is not the function's.
        let w = f.act.write(
            &inst,
            req(256 << 20, 192 << 20),
            BelowUsage::Raise,
            "apply",
            None,
        );
        assert_eq!(w.audit.outcome, Outcome::Unchanged);
        assert_eq!(f.audit().len(), 2);
        assert_eq!(f.audit()[0].clamped_by, Some(ClampedBy::RuntimeLimit));
        // Within the limit: untouched, and no clamp said.
        let w = f.act.write(
            &inst,
            req(32 << 20, 24 << 20),
            BelowUsage::Refuse,
            "api",
            None,
        );
        assert!(w.result.is_ok() && w.audit.clamped_by.is_none(), "{w:?}");
        assert_eq!(read(&f.inst.join("memory.max")), "33554432");
        // A hold asked alone above it goes no higher either.
        let high = LimitRequest {
            max_bytes: None,
            high_bytes: Some(100 << 20),
        };
        let w = f.act.write(&inst, high, BelowUsage::Raise, "release", None);
        assert_eq!(w.result.unwrap().new.high_bytes, Some(64 << 20));
        // Overridden: the function's limit is written.
        let mut over = fake(CgroupVersion::V1, 10 << 20);
        over.act = Actuator::new(
            over.act.hierarchy.clone(),
            &["/emars".to_owned()],
            8 << 20,
            true,
            over.store.clone(),
        )
        .overriding_runtime_limits(true);
        over.act.host_memory = 1 << 30;
        let inst = record(&over.inst);
        over.store
            .keep_state((inst.started_at_ms, inst.cgroup_id), &limit)
            .unwrap();
        let w = over.act.write(
            &inst,
            req(256 << 20, 192 << 20),
            BelowUsage::Raise,
            "apply",
            None,
        );
        assert!(w.result.is_ok() && w.audit.clamped_by.is_none(), "{w:?}");
        assert_eq!(read(&over.inst.join("memory.limit_in_bytes")), "268435456");
    }

    /// A runtime that writes its limit after the agent's own write (runc writes it after the
    /// mkdir, which the agent answers at once): seen at the next write, and kept as the
    /// runtime's limit from then on.
    #[test]
    fn a_limit_written_by_another_after_the_agent_is_the_runtime_limit() {
        use crate::model::kept::{RuntimeLimit, RuntimeLimitSource};
        let f = fake(CgroupVersion::V2, 10 << 20);
        let inst = record(&f.inst);
        let key = (inst.started_at_ms, inst.cgroup_id);
        f.act
            .write(
                &inst,
                req(256 << 20, 192 << 20),
                BelowUsage::Raise,
                "new_instance",
                None,
            )
            .result
            .unwrap();
        // Nobody else wrote: no runtime limit.
        assert_eq!(f.act.runtime_limit(&inst, Some(256 << 20)), None);
        fs::write(f.inst.join("memory.max"), "67108864\n").unwrap();
        let w = f.act.write(
            &inst,
            req(256 << 20, 192 << 20),
            BelowUsage::Raise,
            "apply",
            None,
        );
        assert_eq!(
            w.audit.clamped_by,
            Some(ClampedBy::RuntimeLimit),
            "{w:?}"
        );
        assert_eq!(read(&f.inst.join("memory.max")).trim(), "67108864");
        assert_eq!(
            read(&f.inst.join("memory.high")),
            "50331648",
            "the ratio kept"
        );
        assert_eq!(
            f.store.kept_state::<RuntimeLimit>(key).unwrap(),
            Some(RuntimeLimit {
                bytes: 64 << 20,
                source: RuntimeLimitSource::LaterWrite
            })
        );
        // Its own writes below the limit are its own: the limit stays.
        f.act
            .write(
                &inst,
                req(32 << 20, 24 << 20),
                BelowUsage::Raise,
                "api",
                None,
            )
            .result
            .unwrap();
        assert_eq!(f.act.runtime_limit(&inst, Some(32 << 20)), Some(64 << 20));
        // The instance ended: what was noted of it goes.
        f.act.forget(&inst);
        assert_eq!(f.act.runtime_limit(&inst, Some(1 << 20)), Some(64 << 20));
    }

    /// A write its caller decided against is recorded as refused, with why.
    #[test]
    fn a_refusal_of_the_caller_is_recorded() {
        let f = fake(CgroupVersion::V2, 0);
        let inst = record(&f.inst);
        let a = f.act.refused(
            &inst,
            "burst",
            "at the ceiling 128 MiB",
            Some("memory.events"),
        );
        assert_eq!(a.outcome, Outcome::Refused);
        assert_eq!(f.audit(), vec![a]);
        assert_eq!(f.act.stats.refusals.load(Ordering::Relaxed), 1);
        assert_eq!(read(&f.inst.join("memory.max")), "max");
    }

    #[test]
    fn observe_mode_writes_nothing() {
        let f = fake_with(CgroupVersion::V2, 0, false);
        let w = f.write(&f.inst, req(64 << 20, 32 << 20), BelowUsage::Raise);
        assert!(matches!(w.result, Err(ActuatorError::ObserveMode)), "{w:?}");
        assert!(w.audit.error.unwrap_or_default().contains("policy.mode"));
        assert_eq!(read(&f.inst.join("memory.max")), "max");
    }

    #[test]
    fn never_outside_the_roots() {
        let f = fake(CgroupVersion::V2, 0);
        let refused = |dir: &Path| {
            let w = f.write(dir, req(64 << 20, 32 << 20), BelowUsage::Raise);
            assert!(w.result.as_ref().is_err_and(|e| e.is_refusal()), "{w:?}");
            assert_eq!(w.audit.outcome, Outcome::Refused);
        };
        refused(&f.outside);
        // Escapes through ".." are refused before anything is opened.
        refused(&f.inst.join("../../../other/x"));
        // The root itself is not an instance.
        refused(f.inst.parent().unwrap().parent().unwrap());
        // A symlink inside the root that leads out of it is not followed.
        let link = f.inst.parent().unwrap().join("link");
        std::os::unix::fs::symlink(&f.outside, &link).unwrap();
        refused(&link);
        assert_eq!(read(&f.outside.join("memory.max")), "max");
        assert_eq!(f.act.stats.refusals.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_recreated_cgroup_is_not_the_recorded_instance() {
        let f = fake(CgroupVersion::V2, 0);
        let recorded = record(&f.inst);
        // A placeholder keeps the old inode number from being reused at once.
        let keep = f.tmp.path().join("keep");
        fs::rename(&f.inst, &keep).unwrap();
        fake_dir(&f.inst, CgroupVersion::V2, 0);
        let w = f.act.write(
            &recorded,
            req(64 << 20, 32 << 20),
            BelowUsage::Raise,
            "api",
            None,
        );
        assert!(
            matches!(w.result, Err(ActuatorError::Replaced { .. })),
            "{w:?}"
        );
        assert_eq!(read(&f.inst.join("memory.max")), "max");
        assert_eq!(read(&keep.join("memory.max")), "max");
    }

    #[test]
    fn never_below_usage_plus_headroom() {
        let f = fake(CgroupVersion::V2, 100 << 20);
        let w = f.write(&f.inst, req(64 << 20, 32 << 20), BelowUsage::Refuse);
        let msg = w
            .result
            .map(|_| String::new())
            .unwrap_or_else(|e| e.to_string());
        assert!(msg.contains("below the current usage"), "{msg}");
        assert_eq!(read(&f.inst.join("memory.max")), "max");
        // memory.high below usage is refused too: it would throttle the instance at once.
        let high_only = LimitRequest {
            max_bytes: None,
            high_bytes: Some(1 << 20),
        };
        let w = f.write(&f.inst, high_only, BelowUsage::Refuse);
        assert!(matches!(w.result, Err(ActuatorError::BelowUsage { .. })));
        // Automatic enforcement raises instead, and says so.
        let w = f.write(&f.inst, req(64 << 20, 32 << 20), BelowUsage::Raise);
        let a = w.result.unwrap();
        assert!(a.raised && w.audit.raised);
        assert_eq!(a.new.max_bytes, Some((100 << 20) + (8 << 20)));
    }

    #[test]
    fn never_above_host_memory_or_inconsistent() {
        let f = fake(CgroupVersion::V2, 0);
        let w = f.write(&f.inst, req(2 << 30, 1 << 20), BelowUsage::Raise);
        assert!(matches!(w.result, Err(ActuatorError::AboveHost { .. })));
        let w = f.write(&f.inst, req(16 << 20, 32 << 20), BelowUsage::Refuse);
        assert!(matches!(w.result, Err(ActuatorError::HighAboveMax { .. })));
        let w = f.write(&f.inst, LimitRequest::default(), BelowUsage::Refuse);
        assert!(matches!(w.result, Err(ActuatorError::Empty)));
    }

    #[test]
    fn vanished_cgroup_is_an_error_not_a_crash() {
        let f = fake(CgroupVersion::V2, 0);
        let rec = record(&f.inst);
        fs::remove_dir_all(&f.inst).unwrap();
        let w = f.act.write(
            &rec,
            req(64 << 20, 32 << 20),
            BelowUsage::Raise,
            "api",
            None,
        );
        assert!(
            matches!(
                w.result,
                Err(ActuatorError::Cgroup(CgroupfsError::Gone { .. }))
            ),
            "{w:?}"
        );
        assert_eq!(w.audit.outcome, Outcome::Failed);
        assert_eq!(f.act.stats.writes_failed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_partial_write_is_recorded_as_exactly_that() {
        let mut f = fake(CgroupVersion::V2, 0);
        // The kernel refuses memory.high: max is written, high is not.
        f.act.fail_writes_to = Some("memory.high");
        let w = f.write(&f.inst, req(64 << 20, 32 << 20), BelowUsage::Raise);
        assert!(w.result.is_err(), "{w:?}");
        assert_eq!(w.audit.outcome, Outcome::Partial);
        assert_eq!(w.audit.written.max_bytes, Some(64 << 20));
        assert_eq!(w.audit.written.high_bytes, None);
        assert_eq!(f.audit()[0], w.audit);
    }

    #[test]
    fn interrupted_writes_are_closed_at_restart() {
        let f = fake(CgroupVersion::V2, 0);
        let mut rec = f
            .write(&f.inst, req(64 << 20, 32 << 20), BelowUsage::Raise)
            .audit;
        // As if the agent died between the write and its outcome.
        rec.outcome = Outcome::Pending;
        rec.written = Limits::default();
        f.store.append_audit_durable(rec.at_ms, &rec).unwrap();
        assert_eq!(f.act.close_interrupted().unwrap(), 1);
        let closed = &f.audit()[0];
        assert_eq!(closed.outcome, Outcome::Interrupted);
        assert_eq!(closed.written.max_bytes, Some(64 << 20));
        assert_eq!(f.act.close_interrupted().unwrap(), 0);
    }
}
