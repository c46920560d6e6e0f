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
//!   audit, no write), and the outcome (ok, partial, failed) replaces it afterwards;
//! - writes into one instance go one at a time (the API's, the burst guard's, the squeeze's run
//!   on different threads), so that each plans from what the one before wrote and noted.
//!
//! A failed write (cgroup gone, EBUSY, EINVAL) is an error value, never a crash.
//!
//! Here: the actuator, its errors and counters, and the hand-set rule (limits an operator set
//! stay until the instance ends). Beside it, one concern each: `plan` (the checks before a
//! write), `write` (the write path and the reclaim), `runtime_limit` (the container runtime's
//! limit) and `audit` (intents, records of writes not made, start-up's closing of intents).

mod audit;
mod plan;
mod runtime_limit;
mod write;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{atomic::AtomicU64, Mutex, MutexGuard},
};

use crate::{
    kernel::cgroupfs::{CgroupfsError, MemoryHierarchy},
    model::audit::Reason,
    model::live::InstanceKey,
    model::{InstanceRecord, Limits},
    store::{Store, StoreError},
};

use crate::model::audit::AuditRecord;

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
    /// Writes into one instance go one at a time (striped by cgroup id): a write's plan, its
    /// files and its note in `last_max` go together. Otherwise a write planned while another
    /// has written memory.max but not yet noted it (the API's and the burst guard's, on two
    /// threads) takes the agent's own value for one written by the runtime, and keeps it as a
    /// ceiling that clamps every later write.
    writing: [Mutex<()>; WRITE_STRIPES],
    /// Test seam: writes to this file fail with EINVAL, as the kernel's may.
    #[cfg(test)]
    fail_writes_to: Option<&'static str>,
    /// Test seam: called with the file's name right after each limit file is written.
    #[cfg(test)]
    after_file_write: std::sync::OnceLock<FileWritten>,
}

/// The test seam [`Actuator::after_file_write`].
#[cfg(test)]
type FileWritten = Box<dyn Fn(&str) + Send + Sync>;

/// Locks for [`Actuator::writing`]: instances whose ids share a stripe wait for each other,
/// which costs nothing but a short wait.
const WRITE_STRIPES: usize = 64;

/// What is in force in a live instance, read in one go: its limits, and the container
/// runtime's limit that no write goes above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InForce {
    pub limits: Limits,
    pub runtime_limit: Option<u64>,
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
            writing: std::array::from_fn(|_| Mutex::new(())),
            #[cfg(test)]
            fail_writes_to: None,
            #[cfg(test)]
            after_file_write: std::sync::OnceLock::new(),
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

    /// Held for the whole of one write into the instance with this cgroup id.
    fn writing(&self, cgroup_id: u64) -> MutexGuard<'_, ()> {
        self.writing[(cgroup_id % WRITE_STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn writes_allowed(&self) -> bool {
        self.writes_allowed
    }
}

#[cfg(test)]
mod tests {
    //! The safety rules on a fake cgroupfs in a temp dir (plain files stand in for the kernel's;
    //! the real kernel path is covered by tests/tests/predictive.rs and security.rs).
    use crate::model::LimitRequest;
    use std::{fs, os::unix::fs::MetadataExt, path::Path, sync::atomic::Ordering};

    use super::*;
    use crate::kernel::cgroupfs::CgroupVersion;
    use crate::model::audit::{ClampedBy, Outcome};
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
            input_bytes: None,
            connections: 0,
            requests: 0,
        }
    }

    impl Fake {
        fn write(&self, dir: &Path, req: LimitRequest, on_below: BelowUsage) -> Written {
            self.act
                .write(&record(dir), req, on_below, Reason::Api, None)
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
            Reason::NewInstance,
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
            Reason::Apply,
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
            Reason::Api,
            None,
        );
        assert!(w.result.is_ok() && w.audit.clamped_by.is_none(), "{w:?}");
        assert_eq!(read(&f.inst.join("memory.max")), "33554432");
        // A hold asked alone above it goes no higher either.
        let high = LimitRequest {
            max_bytes: None,
            high_bytes: Some(100 << 20),
        };
        let w = f
            .act
            .write(&inst, high, BelowUsage::Raise, Reason::Release, None);
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
            Reason::Apply,
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
                Reason::NewInstance,
                None,
            )
            .result
            .unwrap();
        // Nobody else wrote: no runtime limit.
        assert_eq!(f.act.runtime_limit_of(&inst, Some(256 << 20)), None);
        fs::write(f.inst.join("memory.max"), "67108864\n").unwrap();
        let w = f.act.write(
            &inst,
            req(256 << 20, 192 << 20),
            BelowUsage::Raise,
            Reason::Apply,
            None,
        );
        assert_eq!(w.audit.clamped_by, Some(ClampedBy::RuntimeLimit), "{w:?}");
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
                Reason::Api,
                None,
            )
            .result
            .unwrap();
        assert_eq!(
            f.act.runtime_limit_of(&inst, Some(32 << 20)),
            Some(64 << 20)
        );
        // The instance ended: what was noted of it goes.
        f.act.forget(&inst);
        assert_eq!(f.act.runtime_limit_of(&inst, Some(1 << 20)), Some(64 << 20));
    }

    /// A write into an instance waits while another write into it is under way (the API's on
    /// one thread, the burst guard's on another): the other's memory.max, written but not yet
    /// noted as the agent's own, is never taken for one the runtime wrote, which would clamp
    /// every later write to it. Deterministic: the API's write holds right after writing
    /// memory.max until the guard's write is done (or 300 ms, when the guard waits for it).
    #[test]
    fn a_concurrent_write_never_takes_the_agents_own_limit_for_the_runtimes() {
        use crate::model::kept::RuntimeLimit;
        use std::{sync::mpsc, time::Duration};
        let f = fake(CgroupVersion::V2, 10 << 20);
        let inst = &record(&f.inst);
        let key = (inst.started_at_ms, inst.cgroup_id);
        let act = &f.act;
        let by_hand = |max: u64| {
            let req = LimitRequest {
                max_bytes: Some(max),
                high_bytes: None,
            };
            act.write(inst, req, BelowUsage::Refuse, Reason::Api, None)
        };
        by_hand(128 << 20).result.unwrap();
        let (written_tx, written_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let (written_tx, done_rx) = (Mutex::new(written_tx), Mutex::new(done_rx));
        let hook = move |file: &str| {
            if file == "memory.max" {
                let _ = written_tx.lock().unwrap().send(());
                let _ = done_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_millis(300));
            }
        };
        assert!(f.act.after_file_write.set(Box::new(hook)).is_ok());
        let (api, guard) = std::thread::scope(|s| {
            let guard = s.spawn(move || {
                written_rx.recv().unwrap();
                let arm = LimitRequest {
                    max_bytes: None,
                    high_bytes: Some(100 << 20),
                };
                let w = act.write(inst, arm, BelowUsage::Refuse, Reason::BurstArm, None);
                done_tx.send(()).unwrap();
                w
            });
            (by_hand(129 << 20), guard.join().unwrap())
        });
        assert_eq!(api.audit.outcome, Outcome::Ok, "{api:?}");
        assert_eq!(guard.audit.outcome, Outcome::Ok, "{guard:?}");
        assert_eq!(guard.audit.clamped_by, None, "{guard:?}");
        assert_eq!(
            f.store.kept_state::<RuntimeLimit>(key).unwrap(),
            None,
            "the agent's own write kept as the runtime's limit"
        );
        assert_eq!(read(&f.inst.join("memory.high")), "104857600");
        // The next write by hand goes above it.
        let w = by_hand(130 << 20);
        assert_eq!((w.audit.outcome, w.audit.clamped_by), (Outcome::Ok, None));
        assert_eq!(read(&f.inst.join("memory.max")), "136314880");
    }

    /// A write its caller decided against is recorded as refused, with why.
    #[test]
    fn a_refusal_of_the_caller_is_recorded() {
        let f = fake(CgroupVersion::V2, 0);
        let inst = record(&f.inst);
        let a = f.act.refused(
            &inst,
            Reason::Burst,
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
            Reason::Api,
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
            Reason::Api,
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
