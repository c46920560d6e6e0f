//! Host pressure at run time (reactive mode's `squeeze`): when the kernel signals memory
//! pressure, idle instances give back their page cache (v2 memory.reclaim, v1
//! memory.force_empty) and are held near their working set (memory.high on v2, the soft limit
//! on v1), as Senpai and TMO do for idle memory. The hold is released when no pressure was
//! signalled for `release_after_s`, or at once when the instance wakes (it used CPU, or on v2
//! crossed the hold, which its memory.events tell). memory.max is never touched. Decisions are
//! [`ReactiveConfig::squeeze`]'s; signals `kernel/notify`'s.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use crate::kernel::cgroupfs::MemoryHierarchy;
use crate::kernel::notify::{PressureSignal, PressureSignals, PressureThresholds};
use crate::model::tracker::{Cgroups, Tracker};
use crate::model::{InstanceRecord, Limits, ReactiveInfo};
use crate::policy::actuator::{Actuator, BelowUsage, LimitRequest};
use crate::policy::reactive::ReactiveConfig;

/// An instance's CPU time at its last change.
struct Activity {
    ticks: u64,
    since: Instant,
}

/// What a squeeze changed, to be put back at release.
struct Held {
    before: Limits,
}

/// One squeezed instance, as the blocking squeeze task reports it.
pub struct Done {
    id: u64,
    before: Limits,
    reclaimed: u64,
    outcome: Outcome,
}

enum Outcome {
    Held,
    Failed,
    /// Nothing worth taking: passed over for the rest of the episode.
    Nothing,
}

pub struct Squeezer {
    config: ReactiveConfig,
    hierarchy: MemoryHierarchy,
    actuator: Arc<Actuator>,
    pressure: PressureSignals,
    setup_errors: Vec<String>,
    activity: HashMap<u64, Activity>,
    squeezed: HashMap<u64, Held>,
    /// Idle instances that had nothing worth taking in this episode.
    passed_over: HashSet<u64>,
    /// The squeeze under way (reclaim takes the kernel milliseconds per instance: off the
    /// event loop).
    running: Option<JoinHandle<Vec<Done>>>,
    /// When the signal that started the squeeze under way came.
    running_since: Option<Instant>,
    /// Milliseconds from that signal to the squeeze done (every idle instance), the last one.
    last_squeeze_ms: Option<u64>,
    last_pressure: Option<Instant>,
    /// The source of the last pressure signal, for the audit.
    last_signal: String,
    episode_start: Option<Instant>,
    last_sample: Option<Instant>,
    signals: u64,
    squeezes: u64,
    reclaimed_bytes: u64,
    releases: u64,
    failed: u64,
    /// Milliseconds from the first pressure signal of an episode to its last one.
    last_episode_ms: Option<u64>,
}

impl Squeezer {
    /// Arms pressure signals on the host and on each watched root (`roots`, absolute paths).
    /// Must be called inside a tokio runtime.
    pub fn new(
        config: ReactiveConfig,
        hierarchy: MemoryHierarchy,
        actuator: Arc<Actuator>,
        roots: &[PathBuf],
    ) -> (Self, UnboundedReceiver<PressureSignal>) {
        let host = Path::new("/proc/pressure/memory");
        let thresholds = PressureThresholds {
            stall_us: config.pressure_stall_ms * 1000,
            window_us: config.pressure_window_ms * 1000,
            v1_level: config.pressure_level_v1_str().unwrap_or("medium"),
        };
        let (pressure, rx, errors) = PressureSignals::new(
            hierarchy.version,
            host.exists().then_some(host),
            roots,
            thresholds,
        );
        let setup_errors: Vec<String> = errors
            .into_iter()
            .map(|(p, e)| format!("{}: {e}", p.display()))
            .collect();
        for e in &setup_errors {
            tracing::warn!("pressure signal not set up: {e}");
        }
        for s in &pressure.sources {
            tracing::info!("squeeze: watching {}", s.describe());
        }
        (
            Squeezer {
                config,
                hierarchy,
                actuator,
                pressure,
                setup_errors,
                activity: HashMap::new(),
                squeezed: HashMap::new(),
                passed_over: HashSet::new(),
                running: None,
                running_since: None,
                last_squeeze_ms: None,
                last_pressure: None,
                last_signal: String::new(),
                episode_start: None,
                last_sample: None,
                signals: 0,
                squeezes: 0,
                reclaimed_bytes: 0,
                releases: 0,
                failed: 0,
                last_episode_ms: None,
            },
            rx,
        )
    }

    fn idle_after(&self) -> Duration {
        Duration::from_secs(self.config.idle_after_s)
    }

    pub fn is_squeezed(&self, id: u64) -> bool {
        self.squeezed.contains_key(&id)
    }

    /// Reads the CPU time of each candidate (those with limits, `ids`) every third of
    /// `idle_after_s`, or now when `force`; forgets instances that are gone; releases a
    /// squeezed instance that woke up.
    pub fn sample<C: Cgroups>(
        &mut self,
        ids: &[u64],
        tracker: &mut Tracker<C>,
        now: Instant,
        force: bool,
    ) {
        let every = (self.idle_after() / 3).max(Duration::from_secs(1));
        if !force
            && self
                .last_sample
                .is_some_and(|t| now.duration_since(t) < every)
        {
            return;
        }
        self.last_sample = Some(now);
        let live: HashSet<u64> = ids.iter().copied().collect();
        self.activity.retain(|id, _| live.contains(id));
        if self.running.is_none() {
            self.squeezed.retain(|id, _| live.contains(id));
        }
        let mut woke = Vec::new();
        for &id in ids {
            let Some(rec) = tracker.live_record(id) else {
                continue;
            };
            let Ok(ticks) = self.hierarchy.cpu_ticks(Path::new(&rec.cgroup_path)) else {
                continue;
            };
            match self.activity.get_mut(&id) {
                Some(a) if a.ticks == ticks => {}
                Some(a) => {
                    a.ticks = ticks;
                    a.since = now;
                    woke.push(id);
                }
                None => {
                    self.activity.insert(id, Activity { ticks, since: now });
                }
            }
        }
        for id in woke {
            self.passed_over.remove(&id);
            if self.is_squeezed(id) {
                self.release(id, tracker, "the instance used CPU again");
            }
        }
        // Still under pressure (no release yet): instances that turned idle since the last
        // signal are squeezed too.
        if !force && self.last_pressure.is_some() {
            self.start_squeeze(ids, tracker, now);
        }
    }

    fn is_idle(&self, id: u64, now: Instant) -> bool {
        self.activity
            .get(&id)
            .is_some_and(|a| now.duration_since(a.since) >= self.idle_after())
    }

    /// A pressure signal: squeezes every idle candidate not squeezed yet, off the event loop.
    pub fn on_pressure<C: Cgroups>(
        &mut self,
        sig: PressureSignal,
        ids: &[u64],
        tracker: &mut Tracker<C>,
    ) {
        self.signals += 1;
        if self.episode_start.is_none() {
            self.episode_start = Some(sig.at);
        }
        self.last_pressure = Some(sig.at);
        self.last_signal = self
            .pressure
            .sources
            .get(sig.source)
            .map(|s| s.describe())
            .unwrap_or_default();
        if self.running.is_some() {
            return;
        }
        self.sample(ids, tracker, Instant::now(), true);
        self.start_squeeze(ids, tracker, sig.at);
    }

    /// Squeezes, off the event loop, every idle candidate not squeezed yet.
    fn start_squeeze<C: Cgroups>(&mut self, ids: &[u64], tracker: &mut Tracker<C>, at: Instant) {
        if self.running.is_some() {
            return;
        }
        let now = Instant::now();
        let signal = self.last_signal.clone();
        let victims: Vec<InstanceRecord> = ids
            .iter()
            .filter(|id| {
                !self.is_squeezed(**id)
                    && !self.passed_over.contains(*id)
                    && self.is_idle(**id, now)
            })
            .filter_map(|id| tracker.live_record(*id).cloned())
            .collect();
        if victims.is_empty() {
            return;
        }
        tracing::info!(
            "memory pressure ({signal}): squeezing {} idle instance(s)",
            victims.len()
        );
        let (config, hierarchy, actuator) = (
            self.config.clone(),
            self.hierarchy.clone(),
            self.actuator.clone(),
        );
        self.running_since = Some(at);
        self.running = Some(tokio::task::spawn_blocking(move || {
            victims
                .into_iter()
                .filter_map(|rec| squeeze_one(&config, &hierarchy, &actuator, rec, &signal))
                .collect()
        }));
    }

    /// Waits for the squeeze under way (pending forever when none is).
    pub async fn squeezed(&mut self) -> Vec<Done> {
        match self.running.as_mut() {
            Some(h) => {
                let done = h.await.unwrap_or_else(|e| {
                    tracing::error!("squeeze task: {e}");
                    Vec::new()
                });
                self.running = None;
                done
            }
            None => std::future::pending().await,
        }
    }

    /// Takes in what a squeeze did.
    pub fn record(&mut self, done: Vec<Done>) {
        if let Some(t) = self.running_since.take() {
            self.last_squeeze_ms = Some(t.elapsed().as_millis() as u64);
        }
        for d in done {
            self.reclaimed_bytes += d.reclaimed;
            match d.outcome {
                Outcome::Held => {
                    self.squeezes += 1;
                    self.squeezed.insert(d.id, Held { before: d.before });
                }
                Outcome::Failed => self.failed += 1,
                Outcome::Nothing => {
                    self.passed_over.insert(d.id);
                }
            }
        }
    }

    /// Once a second: releases every hold when pressure has been quiet for `release_after_s`.
    pub fn tick<C: Cgroups>(&mut self, ids: &[u64], tracker: &mut Tracker<C>, now: Instant) {
        self.sample(ids, tracker, now, false);
        let quiet = self.last_pressure.is_some_and(|t| {
            now.duration_since(t) >= Duration::from_secs(self.config.release_after_s)
        });
        if !quiet || self.running.is_some() {
            return;
        }
        if let (Some(first), Some(last)) = (self.episode_start.take(), self.last_pressure.take()) {
            self.last_episode_ms = Some(last.duration_since(first).as_millis() as u64);
        }
        self.passed_over.clear();
        let held: Vec<u64> = self.squeezed.keys().copied().collect();
        for id in held {
            self.release(id, tracker, "no memory pressure since the squeeze");
        }
    }

    /// Puts back what the squeeze of `id` held it at (audited, reason "release").
    pub fn release<C: Cgroups>(&mut self, id: u64, tracker: &mut Tracker<C>, why: &str) -> bool {
        let Some(held) = self.squeezed.remove(&id) else {
            return false;
        };
        let Some(rec) = tracker.live_record(id).cloned() else {
            return false;
        };
        // No hold of its own before: memory.high at memory.max is none in effect.
        let Some(back) = held.before.high_bytes.or(held.before.max_bytes) else {
            return false;
        };
        let mut current = rec.clone();
        if let Ok(l) = self.hierarchy.limits(Path::new(&rec.cgroup_path)) {
            current.limits = l;
        }
        let req = LimitRequest {
            max_bytes: None,
            high_bytes: Some(back),
        };
        let w = self.actuator.write_signalled(
            &current,
            req,
            BelowUsage::Raise,
            "release",
            None,
            Some(why),
        );
        match w.result {
            Ok(_) => {
                self.releases += 1;
                tracing::info!(
                    function = rec.function,
                    instance = rec.instance,
                    "squeeze released: {why}"
                );
                true
            }
            Err(e) => {
                self.failed += 1;
                tracing::warn!(cgroup = rec.cgroup_path, "squeeze not released: {e}");
                false
            }
        }
    }

    /// Fills in the squeeze's part of `/v1/info` → `reactive`.
    pub fn fill_info(&self, info: &mut ReactiveInfo) {
        info.squeeze = true;
        info.pressure_sources = self.pressure.sources.iter().map(|s| s.describe()).collect();
        info.pressure_errors = self.setup_errors.clone();
        info.pressure_signals = self.signals;
        let now = Instant::now();
        info.idle_now = self
            .activity
            .keys()
            .filter(|id| self.is_idle(**id, now))
            .count() as u64;
        info.squeezes = self.squeezes;
        info.squeezed_now = self.squeezed.len() as u64;
        info.reclaimed_bytes = self.reclaimed_bytes;
        info.releases = self.releases;
        info.squeeze_failed = self.failed;
        info.last_pressure_episode_ms = self.last_episode_ms;
        info.last_squeeze_ms = self.last_squeeze_ms;
    }
}

/// Reclaims an idle instance's page cache and holds it near its working set; `None` when it is
/// gone.
fn squeeze_one(
    config: &ReactiveConfig,
    hierarchy: &MemoryHierarchy,
    actuator: &Actuator,
    mut rec: InstanceRecord,
    signal: &str,
) -> Option<Done> {
    let dir = PathBuf::from(&rec.cgroup_path);
    let usage = hierarchy.usage(&dir).ok()?;
    let limits = hierarchy.limits(&dir).ok()?;
    let reclaimable = hierarchy.reclaimable_file(&dir).ok()?;
    let Some(plan) = config.squeeze(usage, reclaimable, limits) else {
        return Some(Done {
            id: rec.cgroup_id,
            before: limits,
            reclaimed: 0,
            outcome: Outcome::Nothing,
        });
    };
    rec.limits = limits;
    let reclaimed = match actuator.reclaim(&rec, plan.reclaim_bytes, "pressure", Some(signal)) {
        Ok(audit) => audit.reclaimed_bytes.unwrap_or(0),
        Err(e) => {
            tracing::warn!(cgroup = rec.cgroup_path, "reclaim failed: {e}");
            0
        }
    };
    let req = LimitRequest {
        max_bytes: None,
        high_bytes: Some(plan.hold_bytes),
    };
    let w = actuator.write_signalled(&rec, req, BelowUsage::Raise, "pressure", None, Some(signal));
    let outcome = match &w.result {
        Ok(a) => {
            tracing::info!(
                function = rec.function,
                instance = rec.instance,
                reclaimed,
                hold = ?a.new.high_bytes,
                "squeezed"
            );
            Outcome::Held
        }
        Err(e) => {
            tracing::warn!(cgroup = rec.cgroup_path, "squeeze hold not written: {e}");
            Outcome::Failed
        }
    };
    Some(Done {
        id: rec.cgroup_id,
        before: limits,
        reclaimed,
        outcome,
    })
}
