//! Host pressure at run time (reactive mode's `squeeze`): when the kernel signals memory
//! pressure, idle instances give back their page cache (v2 memory.reclaim, v1
//! memory.force_empty) and are held near their working set (memory.high on v2, the soft limit
//! on v1), as Senpai and TMO do for idle memory. The hold is released when no pressure was
//! signalled for `release_after_s`, or at once when the instance wakes (it used CPU, or on v2
//! crossed the hold, which its memory.events tell). memory.max is never touched. Decisions are
//! [`ReactiveConfig::squeeze`]'s; signals `kernel/notify`'s.
//!
//! Each hold is kept with its instance in the store, durably, before it is written: a
//! restarted agent, after a stop or a kill -9, takes the holds of the last run back
//! ([`Squeezer::adopt`]) and releases them on the same rules, or at once when the squeeze is off
//! ([`release_kept_holds`]). A hold that is no longer what the cgroup holds (changed since by an
//! API write, apply or a burst raise) is never overwritten: it is said and dropped.
//!
//! Each hold written and each released comes back as [`Effect::LimitsInForce`], for the daemon
//! to carry out (the instance's record keeps them); every other writer's limits come to the
//! squeeze the same way ([`Squeezer::limits_in_force`]), so a hold the agent itself overwrote
//! is dropped at release without a look at the cgroup. The look stays for writers outside the
//! agent (the platform). How a hold is given back, and the holds kept across restarts, are in
//! `hold`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use crate::kernel::cgroupfs::MemoryHierarchy;
use crate::kernel::notify::{PressureSignal, PressureSignals, PressureThresholds};
use crate::model::kept::{same_limit, SqueezeHold};
use crate::model::live::InstanceKey;
use crate::model::tracker::{Cgroups, Effect, LimitsBy, Tracker};
use crate::model::{audit::Reason, LimitRequest};
use crate::model::{InstanceRecord, Limits};
use crate::policy::actuator::{Actuator, ActuatorError, BelowUsage};
use crate::policy::reactive::ReactiveConfig;
use crate::store::Store;

/// A hold is this much above the usage plus headroom it was planned from: usage as the kernel
/// reports it moves a little without the instance doing anything (per-CPU charge batches).
const HOLD_SLACK_BYTES: u64 = 1 << 20;

mod hold;
pub use hold::release_kept_holds;
use hold::{
    forget_hold, kept_holds, key_of, release_hold, released_to, say_not_held, written_over,
    Released,
};

/// An instance's CPU time at its last change.
struct Activity {
    ticks: u64,
    since: Instant,
}

/// One squeezed instance, as the blocking squeeze task reports it.
pub struct Done {
    id: u64,
    key: InstanceKey,
    /// The hold written (with `Outcome::Held`).
    hold: Option<SqueezeHold>,
    reclaimed: u64,
    outcome: Outcome,
}

/// An instance reclaimed, with the hold it is to get.
struct Planned {
    rec: InstanceRecord,
    hold: SqueezeHold,
    reclaimed: u64,
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
    store: Store,
    pressure: PressureSignals,
    setup_errors: Vec<String>,
    activity: HashMap<u64, Activity>,
    /// The holds in force, by cgroup id: what each is to put back.
    squeezed: HashMap<u64, (InstanceKey, SqueezeHold)>,
    /// Held instances whose memory.high (soft limit) another of the agent's writers changed
    /// since the hold: what it wrote.
    overwritten: HashMap<u64, u64>,
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
        store: Store,
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
                store,
                pressure,
                setup_errors,
                activity: HashMap::new(),
                squeezed: HashMap::new(),
                overwritten: HashMap::new(),
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
        tracker: &Tracker<C>,
        now: Instant,
        force: bool,
    ) -> Vec<Effect> {
        let every = (self.idle_after() / 3).max(Duration::from_secs(1));
        if !force
            && self
                .last_sample
                .is_some_and(|t| now.duration_since(t) < every)
        {
            return Vec::new();
        }
        self.last_sample = Some(now);
        let live: HashSet<u64> = ids.iter().copied().collect();
        self.activity.retain(|id, _| live.contains(id));
        if self.running.is_none() {
            // Ended: what was kept of the hold went with the instance's record.
            self.squeezed
                .retain(|id, _| tracker.live_record(*id).is_some());
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
        let mut out = Vec::new();
        for id in woke {
            self.passed_over.remove(&id);
            if self.is_squeezed(id) {
                out.extend(self.release(id, tracker, "the instance used CPU again"));
            }
        }
        // Still under pressure (no release yet): instances that turned idle since the last
        // signal are squeezed too.
        if !force && self.last_pressure.is_some() {
            self.start_squeeze(ids, tracker, now);
        }
        out
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
        tracker: &Tracker<C>,
    ) -> Vec<Effect> {
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
            return Vec::new();
        }
        let out = self.sample(ids, tracker, Instant::now(), true);
        self.start_squeeze(ids, tracker, sig.at);
        out
    }

    /// Squeezes, off the event loop, every idle candidate not squeezed yet.
    fn start_squeeze<C: Cgroups>(&mut self, ids: &[u64], tracker: &Tracker<C>, at: Instant) {
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
        let ctx = SqueezeContext {
            config: self.config.clone(),
            hierarchy: self.hierarchy.clone(),
            actuator: self.actuator.clone(),
            store: self.store.clone(),
        };
        self.running_since = Some(at);
        self.running = Some(tokio::task::spawn_blocking(move || {
            ctx.squeeze_all(victims, &signal)
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

    /// Takes in what a squeeze did: the holds written, as limits in force.
    pub fn record<C: Cgroups>(&mut self, done: Vec<Done>, tracker: &Tracker<C>) -> Vec<Effect> {
        let mut out = Vec::new();
        if let Some(t) = self.running_since.take() {
            self.last_squeeze_ms = Some(t.elapsed().as_millis() as u64);
        }
        for d in done {
            self.reclaimed_bytes += d.reclaimed;
            match (d.outcome, d.hold) {
                (Outcome::Held, Some(hold)) => {
                    self.squeezes += 1;
                    let live = tracker
                        .live_record(d.id)
                        .is_some_and(|r| (r.started_at_ms, r.cgroup_id) == d.key);
                    if live {
                        out.push(Effect::LimitsInForce {
                            cgroup_id: d.id,
                            limits: Limits {
                                max_bytes: None,
                                high_bytes: Some(hold.hold_bytes),
                            },
                            by: LimitsBy::SqueezeHold,
                        });
                        self.squeezed.insert(d.id, (d.key, hold));
                    } else {
                        // Ended while it was squeezed: nothing left to release.
                        forget_hold(&self.store, d.key);
                    }
                }
                (Outcome::Held, None) => {}
                (Outcome::Failed, _) => self.failed += 1,
                (Outcome::Nothing, _) => {
                    self.passed_over.insert(d.id);
                }
            }
        }
        out
    }

    /// Once a second: releases every hold when pressure has been quiet for `release_after_s`.
    pub fn tick<C: Cgroups>(
        &mut self,
        ids: &[u64],
        tracker: &Tracker<C>,
        now: Instant,
    ) -> Vec<Effect> {
        let mut out = self.sample(ids, tracker, now, false);
        let quiet = self.last_pressure.is_some_and(|t| {
            now.duration_since(t) >= Duration::from_secs(self.config.release_after_s)
        });
        if !quiet || self.running.is_some() {
            return out;
        }
        if let (Some(first), Some(last)) = (self.episode_start.take(), self.last_pressure.take()) {
            self.last_episode_ms = Some(last.duration_since(first).as_millis() as u64);
        }
        self.passed_over.clear();
        let held: Vec<u64> = self.squeezed.keys().copied().collect();
        for id in held {
            out.extend(self.release(id, tracker, "no memory pressure since the squeeze"));
        }
        out
    }

    /// Limits another writer of the agent put in force ([`Effect::LimitsInForce`]): a hold
    /// whose memory.high (soft limit) they changed is no longer the squeeze's to put back.
    pub fn limits_in_force(&mut self, id: u64, limits: Limits, by: LimitsBy) {
        let Some((_, hold)) = self.squeezed.get(&id) else {
            return;
        };
        match written_over(hold, limits, by) {
            None => {}
            Some(None) => {
                self.overwritten.remove(&id);
            }
            Some(Some(high)) => {
                self.overwritten.insert(id, high);
            }
        }
    }

    /// Puts back what the squeeze of `id` held it at (audited, reason "release"), unless the
    /// hold was changed since: by another of the agent's writers (told), or by anyone (the
    /// cgroup read, see [`release_hold`]).
    pub fn release<C: Cgroups>(&mut self, id: u64, tracker: &Tracker<C>, why: &str) -> Vec<Effect> {
        let overwritten = self.overwritten.remove(&id);
        let Some((_, hold)) = self.squeezed.remove(&id) else {
            return Vec::new();
        };
        let Some(rec) = tracker.live_record(id).cloned() else {
            return Vec::new();
        };
        if let Some(now) = overwritten {
            say_not_held(&rec, &hold, Some(now));
            forget_hold(&self.store, key_of(&rec));
            return Vec::new();
        }
        match release_hold(
            &self.actuator,
            &self.hierarchy,
            &self.store,
            &rec,
            &hold,
            why,
        ) {
            Released::Yes(back) => {
                self.releases += 1;
                vec![released_to(id, back)]
            }
            Released::Dropped => Vec::new(),
            Released::Failed => {
                self.failed += 1;
                Vec::new()
            }
        }
    }

    /// At start-up, once the tracker knows the live instances: takes back the holds the last
    /// run kept, each still what its cgroup holds, to be released on the same rules (pressure
    /// quiet for `release_after_s` from now, the instance using CPU or crossing its hold). A
    /// hold whose instance ended, or whose cgroup holds something else now, is dropped.
    pub fn adopt<C: Cgroups>(&mut self, tracker: &Tracker<C>) {
        let mut adopted = 0;
        for (key, hold, rec) in kept_holds(&self.store, tracker) {
            let now = self.hierarchy.limits(Path::new(&rec.cgroup_path));
            match now {
                Ok(l) if same_limit(l.high_bytes, Some(hold.hold_bytes)) => {
                    self.squeezed.insert(rec.cgroup_id, (key, hold));
                    adopted += 1;
                }
                Ok(l) => {
                    say_not_held(&rec, &hold, l.high_bytes);
                    forget_hold(&self.store, key);
                }
                Err(_) => forget_hold(&self.store, key),
            }
        }
        if adopted > 0 {
            // As if pressure had been signalled now: released once it has been quiet since.
            let now = Instant::now();
            self.last_pressure.get_or_insert(now);
            self.episode_start.get_or_insert(now);
            self.last_signal = "a hold of the last run".to_owned();
            tracing::info!(
                "{adopted} squeeze hold(s) of the last run taken back: released after {} s \
                 without memory pressure",
                self.config.release_after_s
            );
        }
    }

    /// What the squeeze has done, for /v1/info and /metrics.
    pub fn figures(&self) -> SqueezeFigures {
        let now = Instant::now();
        SqueezeFigures {
            pressure_sources: self.pressure.sources.iter().map(|s| s.describe()).collect(),
            pressure_errors: self.setup_errors.clone(),
            pressure_signals: self.signals,
            idle_now: self
                .activity
                .keys()
                .filter(|id| self.is_idle(**id, now))
                .count() as u64,
            squeezes: self.squeezes,
            squeezed_now: self.squeezed.len() as u64,
            reclaimed_bytes: self.reclaimed_bytes,
            releases: self.releases,
            failed: self.failed,
            last_pressure_episode_ms: self.last_episode_ms,
            last_squeeze_ms: self.last_squeeze_ms,
        }
    }
}

/// The squeeze's figures for /v1/info and /metrics (see `ReactiveInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqueezeFigures {
    pub pressure_sources: Vec<String>,
    pub pressure_errors: Vec<String>,
    pub pressure_signals: u64,
    pub idle_now: u64,
    pub squeezes: u64,
    pub squeezed_now: u64,
    pub reclaimed_bytes: u64,
    pub releases: u64,
    pub failed: u64,
    pub last_pressure_episode_ms: Option<u64>,
    pub last_squeeze_ms: Option<u64>,
}

/// What a squeeze task needs, moved onto its blocking thread.
struct SqueezeContext {
    config: ReactiveConfig,
    hierarchy: MemoryHierarchy,
    actuator: Arc<Actuator>,
    store: Store,
}

impl SqueezeContext {
    /// Reclaims each idle instance's page cache, keeps the holds (durably: flushed before any
    /// is written, so that a restarted agent releases them even after a kill -9), then writes
    /// them.
    fn squeeze_all(&self, victims: Vec<InstanceRecord>, signal: &str) -> Vec<Done> {
        let mut done = Vec::new();
        let mut planned = Vec::new();
        for rec in victims {
            match self.reclaim(rec, signal) {
                Some(Ok(p)) => planned.push(p),
                Some(Err(nothing)) => done.push(nothing),
                None => {}
            }
        }
        let kept = !planned.is_empty() && self.keep(&planned);
        for p in planned {
            done.push(if kept {
                self.hold(p, signal)
            } else {
                forget_hold(&self.store, key_of(&p.rec));
                Done::of(&p.rec, None, p.reclaimed, Outcome::Failed)
            });
        }
        done
    }

    /// Reclaims an idle instance's page cache and plans its hold near its working set;
    /// `None` when it is gone, `Err` when there is nothing worth taking or holding.
    fn reclaim(&self, mut rec: InstanceRecord, signal: &str) -> Option<Result<Planned, Done>> {
        let dir = PathBuf::from(&rec.cgroup_path);
        let usage = self.hierarchy.usage(&dir).ok()?;
        let limits = self.hierarchy.limits(&dir).ok()?;
        let reclaimable = self.hierarchy.reclaimable_file(&dir).ok()?;
        let Some(plan) = self.config.squeeze(usage, reclaimable, limits) else {
            return Some(Err(Done::of(&rec, None, 0, Outcome::Nothing)));
        };
        rec.limits = limits;
        let reclaimed =
            match self
                .actuator
                .reclaim(&rec, plan.reclaim_bytes, Reason::Pressure, Some(signal))
            {
                Ok(audit) => audit.reclaimed_bytes.unwrap_or(0),
                Err(e) => {
                    tracing::warn!(cgroup = rec.cgroup_path, "reclaim failed: {e}");
                    0
                }
            };
        // What is left, plus headroom; never below what the writer allows now (usage plus its
        // headroom), so that the hold written is the one kept.
        let after = self.hierarchy.usage(&dir).ok()?;
        let hold = (after + self.actuator.headroom() + HOLD_SLACK_BYTES).max(plan.hold_bytes);
        let current = limits
            .high_bytes
            .into_iter()
            .chain(limits.max_bytes)
            .min()
            .unwrap_or(u64::MAX);
        if hold >= current {
            return Some(Err(Done::of(&rec, None, reclaimed, Outcome::Nothing)));
        }
        let hold = SqueezeHold {
            before: limits,
            hold_bytes: hold,
            taken_at_ms: crate::clock::now_ms(),
        };
        Some(Ok(Planned {
            rec,
            hold,
            reclaimed,
        }))
    }

    /// Keeps every planned hold in the store and flushes it: false (nothing to be written)
    /// when that fails.
    fn keep(&self, planned: &[Planned]) -> bool {
        let kept = planned
            .iter()
            .try_for_each(|p| self.store.keep_state(key_of(&p.rec), &p.hold))
            .and_then(|()| self.store.flush());
        if let Err(e) = &kept {
            tracing::error!("squeeze holds not written: they could not be kept in the store: {e}");
        }
        kept.is_ok()
    }

    /// Writes a kept hold. Usage that grew past it since (the writer refuses a hold below
    /// usage plus headroom) moves the hold up, kept again first, while it is still below the
    /// one the instance had.
    fn hold(&self, mut p: Planned, signal: &str) -> Done {
        let key = key_of(&p.rec);
        for _ in 0..3 {
            let req = LimitRequest {
                max_bytes: None,
                high_bytes: Some(p.hold.hold_bytes),
            };
            let w = self.actuator.write_signalled(
                &p.rec,
                req,
                BelowUsage::Refuse,
                Reason::Pressure,
                None,
                Some(signal),
            );
            match w.result {
                Ok(a) => {
                    tracing::info!(
                        function = p.rec.function,
                        instance = p.rec.instance,
                        reclaimed = p.reclaimed,
                        hold = ?a.new.high_bytes,
                        "squeezed"
                    );
                    return Done::of(&p.rec, Some(p.hold), p.reclaimed, Outcome::Held);
                }
                Err(ActuatorError::BelowUsage {
                    usage, headroom, ..
                }) => {
                    let higher = usage + headroom + HOLD_SLACK_BYTES;
                    let current = p.hold.before.high_bytes.or(p.hold.before.max_bytes);
                    if current.is_some_and(|c| higher >= c) {
                        forget_hold(&self.store, key);
                        return Done::of(&p.rec, None, p.reclaimed, Outcome::Nothing);
                    }
                    p.hold.hold_bytes = higher;
                    if !self.keep(std::slice::from_ref(&p)) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(cgroup = p.rec.cgroup_path, "squeeze hold not written: {e}");
                    break;
                }
            }
        }
        forget_hold(&self.store, key);
        Done::of(&p.rec, None, p.reclaimed, Outcome::Failed)
    }
}

impl Done {
    fn of(
        rec: &InstanceRecord,
        hold: Option<SqueezeHold>,
        reclaimed: u64,
        outcome: Outcome,
    ) -> Done {
        Done {
            id: rec.cgroup_id,
            key: key_of(rec),
            hold,
            reclaimed,
            outcome,
        }
    }
}
