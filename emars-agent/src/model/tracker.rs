//! Turns kernel events into instance records: the cgroup table says which cgroup is which
//! instance of which function; every change is written through to the store at once, so a
//! restart loses nothing that was seen.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    sync::Arc,
};

use crate::{
    kernel::cgroupfs::{CgroupfsError, MemoryHierarchy},
    kernel::events::KernelEvent,
    model::registry::{CgroupTable, Registry},
    model::{HourDelta, InstanceRecord, PeakSource},
    policy::actuator::Actuator,
    policy::Policy,
    store::{Store, StoreError},
};

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

/// Counters of what the tracker did, for /v1/info and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrackerStats {
    pub events: u64,
    pub watermark_reads: u64,
    /// Cgroups that were gone when we went to read them (normal for short instances).
    pub vanished_reads: u64,
    pub store_errors: u64,
    /// Paths cut short in their event, and those not found by id.
    pub paths_truncated: u64,
    pub paths_unresolved: u64,
    /// Limit writes into new instances (enforce mode) and how many failed.
    pub enforced: u64,
    pub enforce_failures: u64,
    /// Largest mkdir → limits-written delay seen, in microseconds.
    pub max_enforce_delay_us: u64,
    /// Instances closed by reconciliation because their rmdir event never came (ring full).
    pub reconciled: u64,
}

pub struct Tracker {
    hierarchy: MemoryHierarchy,
    registry: Registry,
    store: Store,
    table: CgroupTable,
    /// Live instances by cgroup id.
    live: HashMap<u64, InstanceRecord>,
    /// Predictive mode: recommendations to refresh, and to write into new instances.
    policy: Option<(Arc<Policy>, Arc<Actuator>)>,
    /// Functions with an instance ended since their recommendation was last computed.
    dirty: HashSet<String>,
    pub stats: TrackerStats,
}

impl Tracker {
    pub fn new(hierarchy: MemoryHierarchy, registry: Registry, store: Store) -> Self {
        Self {
            hierarchy,
            registry,
            store,
            table: CgroupTable::default(),
            live: HashMap::new(),
            policy: None,
            dirty: HashSet::new(),
            stats: TrackerStats::default(),
        }
    }

    pub fn with_policy(mut self, policy: Arc<Policy>, actuator: Arc<Actuator>) -> Self {
        self.policy = Some((policy, actuator));
        self
    }

    pub fn hierarchy(&self) -> &MemoryHierarchy {
        &self.hierarchy
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Registers a cgroup (from a mkdir event or the start-up scan). `resumed` is the record
    /// of the same instance kept in the store before a restart. `found` says how the cgroup
    /// was learned of, and so whether enforce mode writes its function's limits now.
    pub fn add_cgroup(
        &mut self,
        id: u64,
        rel_path: &str,
        started_at_ms: u64,
        resumed: Option<InstanceRecord>,
        found: Found,
    ) {
        if self.table.get(id).is_some() {
            return;
        }
        let identity = self.registry.classify(rel_path);
        self.table
            .insert(id, rel_path.to_owned(), identity.clone(), started_at_ms);
        let Some(identity) = identity else {
            return;
        };
        let dir = self.hierarchy.dir(rel_path);
        let limits = match self.hierarchy.limits(&dir) {
            Ok(l) => l,
            // Said once per instance; its reads stay quiet (debug) afterwards.
            Err(e @ CgroupfsError::ControllerOff { .. }) => {
                tracing::warn!("{e}");
                Default::default()
            }
            Err(_) => Default::default(),
        };
        let fresh = resumed.is_none();
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
            limits,
        });
        rec.limits = limits;
        let enforce = match found {
            Found::Mkdir { ts_ns } => Some(Some(ts_ns)),
            Found::Late => Some(None),
            Found::Existing { new_since_start } => (new_since_start && fresh).then_some(None),
        };
        if let Some(ts) = enforce {
            self.enforce(&mut rec, ts);
        }
        self.refresh_watermark(&mut rec);
        if fresh {
            let delta = HourDelta {
                instances_started: 1,
                ..Default::default()
            };
            self.add_hour(&rec.function, started_at_ms, delta);
        }
        self.save(&rec);
        self.live.insert(id, rec);
    }

    /// Writes the function's recommended limits into a new instance (enforce mode).
    fn enforce(&mut self, rec: &mut InstanceRecord, mkdir_ts_ns: Option<u64>) {
        // Instances of this function that ended since the last tick are not in its
        // recommendation yet: bring it up to date first, or this instance would get a stale
        // one (or none, for a function whose first instances just ended). Pinned functions
        // have theirs from start-up (Policy::compute_configured).
        if self.dirty.remove(&rec.function) {
            self.recompute(&rec.function, rec.started_at_ms);
        }
        let Some((policy, actuator)) = &self.policy else {
            return;
        };
        let Some(audit) = policy.enforce_new_instance(actuator, rec, mkdir_ts_ns) else {
            return;
        };
        if audit.is_ok() {
            self.stats.enforced += 1;
            rec.limits = audit.new;
            tracing::info!(
                function = rec.function,
                instance = rec.instance,
                max = ?audit.new.max_bytes,
                high = ?audit.new.high_bytes,
                delay_us = ?audit.delay_us,
                "limits written"
            );
        } else {
            self.stats.enforce_failures += 1;
            tracing::warn!(
                function = rec.function,
                instance = rec.instance,
                "limits not written ({}): {}",
                audit.outcome,
                audit.error.as_deref().unwrap_or("")
            );
        }
        self.stats.max_enforce_delay_us = self
            .stats
            .max_enforce_delay_us
            .max(audit.delay_us.unwrap_or(0));
    }

    /// Recomputes a function's recommendation (an instance ended, or was OOM-killed).
    fn recompute(&mut self, function: &str, now_ms: u64) {
        if let Some((policy, _)) = &self.policy {
            if let Err(e) = policy.compute(function, now_ms) {
                self.store_error(e);
            }
        }
    }

    /// Applies one kernel event; `at_ms` is its wall-clock time, `ts_ns` its kernel time.
    pub fn apply(&mut self, event: KernelEvent, at_ms: u64, ts_ns: u64) {
        self.stats.events += 1;
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
                        None => return,
                    }
                } else {
                    path
                };
                self.add_cgroup(id, &path, at_ms, None, Found::Mkdir { ts_ns })
            }
            KernelEvent::CgroupRmdir {
                id,
                peak,
                watermark,
                ..
            } => self.end(id, peak, watermark, at_ms),
            KernelEvent::TaskAttach { .. } => {}
            KernelEvent::Exec { id, pid, .. } => {
                let Some(id) = self.resolve(id, pid, at_ms) else {
                    return;
                };
                self.update(id, at_ms, |rec| {
                    rec.execs += 1;
                    HourDelta {
                        execs: 1,
                        ..Default::default()
                    }
                });
                self.refresh(id);
            }
            KernelEvent::Exit { id, .. } => self.refresh(id),
            KernelEvent::MemPeak { id, peak } => {
                if let Some(rec) = self.live.get_mut(&id) {
                    if peak > rec.peak_bytes {
                        rec.peak_bytes = peak;
                        rec.peak_source = PeakSource::ChargeEvents;
                    }
                }
                self.refresh(id);
            }
            KernelEvent::OomVictim { id, pid } => {
                let Some(id) = self.resolve(id, pid, at_ms) else {
                    tracing::debug!(pid, "OOM victim outside watched cgroups");
                    return;
                };
                tracing::warn!(pid, cgroup = id, "OOM kill in a watched instance");
                self.update(id, at_ms, |rec| {
                    rec.oom_kills += 1;
                    HourDelta {
                        oom_kills: 1,
                        ..Default::default()
                    }
                });
                // An OOM raises the function's recommendation at once, not at the next period;
                // with the peak as the kernel has it now.
                self.refresh(id);
                if let Some(f) = self.live.get(&id).map(|r| r.function.clone()) {
                    self.recompute(&f, at_ms);
                }
            }
        }
    }

    /// The whole path of a cgroup whose event carried a cut-short path: looked up by id below
    /// the last complete directory of what the event carried. None (and counted) when it
    /// cannot be found: an untracked cgroup beats one filed under a wrong name.
    fn full_path(&mut self, id: u64, cut: &str) -> Option<String> {
        self.stats.paths_truncated += 1;
        let parent = cut.rsplit_once('/').map_or("/", |(p, _)| p);
        let found = crate::kernel::cgroupfs::find_by_id(&self.hierarchy.dir(parent), id)
            .and_then(|d| self.hierarchy.rel_path(&d));
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
    fn resolve(&mut self, id: u64, pid: u32, at_ms: u64) -> Option<u64> {
        if id != 0 && self.table.get(id).is_some() {
            return Some(id);
        }
        let rel = self.hierarchy.cgroup_of(pid)?;
        if let Some(known) = self.table.by_path(&rel) {
            return Some(known);
        }
        if !self.registry.is_under_root(&rel) {
            return None;
        }
        let new_id = crate::kernel::cgroupfs::cgroup_id(&self.hierarchy.dir(&rel)).ok()?;
        // Its mkdir event was lost or never sent (program off): a new instance all the same.
        self.add_cgroup(new_id, &rel, at_ms, None, Found::Late);
        Some(new_id)
    }

    fn update(&mut self, id: u64, at_ms: u64, f: impl FnOnce(&mut InstanceRecord) -> HourDelta) {
        let Some(mut rec) = self.live.remove(&id) else {
            return;
        };
        let delta = f(&mut rec);
        self.add_hour(&rec.function, at_ms, delta);
        self.save(&rec);
        self.live.insert(id, rec);
    }

    /// Re-reads the kernel watermark of a live instance and saves it if it grew.
    fn refresh(&mut self, id: u64) {
        let Some(mut rec) = self.live.remove(&id) else {
            return;
        };
        let before = (rec.peak_bytes, rec.peak_source, rec.limits);
        self.refresh_watermark(&mut rec);
        if (rec.peak_bytes, rec.peak_source, rec.limits) != before {
            self.save(&rec);
        }
        self.live.insert(id, rec);
    }

    fn refresh_watermark(&mut self, rec: &mut InstanceRecord) {
        self.stats.watermark_reads += 1;
        let dir = std::path::Path::new(&rec.cgroup_path);
        // Limits may be set after mkdir (by the platform, or later by EMARS): keep them current.
        if let Ok(limits) = self.hierarchy.limits(dir) {
            rec.limits = limits;
        }
        match self.hierarchy.peak(dir) {
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
    fn end(&mut self, id: u64, kernel_peak: u64, watermark: u64, at_ms: u64) {
        self.table.remove(id);
        let Some(mut rec) = self.live.remove(&id) else {
            return;
        };
        if watermark > 0 {
            rec.peak_bytes = watermark;
            rec.peak_source = PeakSource::KernelWatermark;
        } else if kernel_peak > rec.peak_bytes {
            rec.peak_bytes = kernel_peak;
            rec.peak_source = PeakSource::ChargeEvents;
        }
        rec.ended_at_ms = Some(at_ms.max(rec.started_at_ms));
        let delta = HourDelta {
            peak_bytes: rec.peak_bytes,
            ..Default::default()
        };
        self.add_hour(&rec.function, at_ms, delta);
        self.save(&rec);
        // Recomputed on the next tick, not here: the event loop must keep draining the ring.
        self.dirty.insert(rec.function);
    }

    /// Recomputes the recommendations of functions whose instances ended since last time.
    pub fn recompute_dirty(&mut self, now_ms: u64) {
        for f in std::mem::take(&mut self.dirty) {
            self.recompute(&f, now_ms);
        }
    }

    /// Closes live instances whose cgroup is gone (or replaced) although no rmdir event came:
    /// the safety net for events lost to a full ring buffer. Returns how many it closed.
    pub fn reconcile(&mut self, now_ms: u64) -> usize {
        let gone: Vec<u64> = self
            .live
            .iter()
            .filter(|(id, rec)| {
                std::fs::metadata(&rec.cgroup_path).map_or(true, |m| m.ino() != **id)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            tracing::warn!(
                cgroup = id,
                "instance ended without an rmdir event (events lost?)"
            );
            self.end(*id, 0, 0, now_ms);
            self.stats.reconciled += 1;
        }
        gone.len()
    }

    /// Closes store records of instances whose cgroup disappeared while the agent was down.
    pub fn close_vanished(&mut self, stale: Vec<InstanceRecord>, now_ms: u64) {
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
            self.save(&rec);
        }
    }

    fn add_hour(&mut self, function: &str, at_ms: u64, delta: HourDelta) {
        if let Err(e) = self.store.add_hour(function, at_ms, delta) {
            self.store_error(e);
        }
    }

    fn save(&mut self, rec: &InstanceRecord) {
        if let Err(e) = self.store.put_instance(rec) {
            self.store_error(e);
        }
    }

    fn store_error(&mut self, e: StoreError) {
        self.stats.store_errors += 1;
        tracing::error!("store: {e}");
    }
}
