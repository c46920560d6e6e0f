//! The burst guard at run time: it watches every instance that got limits, and when the kernel
//! signals that one nears its memory.max, raises its limits (audited, reason "burst") before
//! the OOM killer acts. The decisions are [`ReactiveConfig`]'s; the signals `kernel/notify`'s.
//!
//! Each watch has a fixed ceiling, set when the watch starts (`ceiling_factor` times the
//! function's recommended memory.max, else the limit then in force) and kept with the instance
//! in the store, so that the guard's own raises never move it and a restarted agent guards the
//! last run's instances with the same one ([`BurstGuard::rearm`]). An explicit write through
//! the API sets a new base.
//!
//! The guard learns of limits only from [`Effect::LimitsInForce`] (handed to
//! [`BurstGuard::limits_in_force`]) and of ends from [`BurstGuard::instance_ended`]; its own
//! writes come back as the same effect, for the daemon to carry out.

use std::collections::{HashMap, VecDeque};

use std::sync::Arc;

use crate::kernel::cgroupfs::{CgroupVersion, MemoryHierarchy};
use crate::kernel::host::memory_available_bytes as host_available_bytes;
use crate::kernel::notify::{LimitSignals, Signal};
use crate::model::kept::BurstWatch;
use crate::model::tracker::{Cgroups, Effect, LimitsBy, Tracker};
use crate::model::{audit::Reason, LimitRequest};
use crate::model::{nearest_rank, InstanceRecord, Limits};
use crate::policy::actuator::{Actuator, BelowUsage};
use crate::policy::reactive::{NoRaise, ReactiveConfig};
use crate::policy::Policy;
use crate::store::Store;

/// Reaction times kept for the percentiles in /v1/info.
const KEPT_REACTIONS: usize = 1024;

/// Where the limits of a watch come from: what sets its ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Written by the agent (a new instance, a bind) or found at a restart: the ceiling the
    /// instance has kept, else one from the recommendation, else from the limit in force.
    Agent,
    /// Written explicitly through the API (set-limit, apply): the memory.max written is the
    /// new base.
    Explicit,
}

/// One watched instance.
struct Watched {
    ceiling: u64,
    /// The memory.max at which a raise was last refused: said (log, audit, count) once.
    refused_at: Option<u64>,
}

pub struct BurstGuard {
    config: ReactiveConfig,
    hierarchy: MemoryHierarchy,
    actuator: Arc<Actuator>,
    policy: Arc<Policy>,
    store: Store,
    signals: LimitSignals,
    watches: HashMap<u64, Watched>,
    /// Signals seen, raises written, raises not made (at the ceiling, host full, write failed).
    signals_seen: u64,
    raises: u64,
    denied: u64,
    watch_errors: u64,
    /// Microseconds from the kernel's signal to the limit written, latest last.
    reactions_us: VecDeque<u64>,
    /// New instances' limits and instances ended since the guard last caught up
    /// ([`BurstGuard::arm_new`]): watches start once the pass that wrote them is done, so that
    /// a batch of new instances gets its limits first.
    new_limits: Vec<(u64, Limits)>,
    ended: Vec<u64>,
}

/// The burst guard's figures for /v1/info and /metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BurstFigures {
    /// How the kernel signals an instance nearing its limit.
    pub signal: String,
    pub watched: u64,
    pub signals: u64,
    pub raises: u64,
    pub denied: u64,
    pub watch_errors: u64,
    /// Signal to limits written, microseconds, over the last raises kept; ascending.
    pub reactions_us: Vec<u64>,
}

impl BurstFigures {
    /// Nearest-rank percentile of the reaction times (`p` in percent); None before a raise.
    pub fn reaction_us(&self, p: f64) -> Option<u64> {
        (!self.reactions_us.is_empty()).then(|| nearest_rank(&self.reactions_us, p))
    }

    pub fn reaction_max_us(&self) -> Option<u64> {
        self.reactions_us.last().copied()
    }
}

impl BurstGuard {
    pub fn new(
        config: ReactiveConfig,
        hierarchy: MemoryHierarchy,
        actuator: Arc<Actuator>,
        policy: Arc<Policy>,
        store: Store,
    ) -> std::io::Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Signal>)> {
        let (signals, rx) = LimitSignals::new(hierarchy.version)?;
        Ok((
            BurstGuard {
                config,
                hierarchy,
                actuator,
                policy,
                store,
                signals,
                watches: HashMap::new(),
                signals_seen: 0,
                raises: 0,
                denied: 0,
                watch_errors: 0,
                reactions_us: VecDeque::new(),
                new_limits: Vec::new(),
                ended: Vec::new(),
            },
            rx,
        ))
    }

    /// The instances watched now: those with limits, the squeeze's candidates.
    pub fn watched_ids(&self) -> Vec<u64> {
        self.signals.watched_ids().collect()
    }

    /// Limits in force in a live instance now ([`Effect::LimitsInForce`]): a new instance's
    /// are watched once the pass is done ([`BurstGuard::arm_new`]); an explicit write through
    /// the API is watched at once, at its new early-warning point, with a ceiling on the new
    /// base. The guard's own writes and the squeeze's change no watch.
    pub fn limits_in_force<C: Cgroups>(
        &mut self,
        tracker: &Tracker<C>,
        id: u64,
        limits: Limits,
        by: LimitsBy,
    ) -> Vec<Effect> {
        match by {
            LimitsBy::NewInstance => {
                self.new_limits.push((id, limits));
                Vec::new()
            }
            LimitsBy::Api => self.watch_instance(tracker, id, limits, Origin::Explicit),
            LimitsBy::BurstArm
            | LimitsBy::BurstRaise
            | LimitsBy::SqueezeHold
            | LimitsBy::SqueezeRelease => Vec::new(),
        }
    }

    /// An instance ended: its watch goes when the guard next catches up.
    pub fn instance_ended(&mut self, id: u64) {
        self.ended.push(id);
    }

    /// Catches up with the pass just done: forgets the instances that ended, then watches the
    /// new instances that got limits.
    pub fn arm_new<C: Cgroups>(&mut self, tracker: &Tracker<C>) -> Vec<Effect> {
        for id in std::mem::take(&mut self.ended) {
            self.signals.unwatch(id);
            self.watches.remove(&id);
        }
        let mut out = Vec::new();
        for (id, limits) in std::mem::take(&mut self.new_limits) {
            out.extend(self.watch_instance(tracker, id, limits, Origin::Agent));
        }
        out
    }

    /// At start-up, once the tracker knows the live instances: watches every one that has a
    /// memory.max, as at a new instance, each with the ceiling it kept in the last run.
    pub fn rearm<C: Cgroups>(&mut self, tracker: &Tracker<C>) -> Vec<Effect> {
        let mut out = self.arm_new(tracker);
        let limited: Vec<(u64, Limits)> = tracker
            .live_records()
            .filter(|r| r.limits.max_bytes.is_some() && !self.watches.contains_key(&r.cgroup_id))
            .map(|r| (r.cgroup_id, r.limits))
            .collect();
        let mut kept = 0;
        for (id, limits) in &limited {
            if let Some(rec) = tracker.live_record(*id) {
                kept += usize::from(self.kept_watch(rec).is_some());
            }
            out.extend(self.watch_instance(tracker, *id, *limits, Origin::Agent));
        }
        if !limited.is_empty() {
            tracing::info!(
                "burst guard: {} live instance(s) of the last run watched again ({kept} with \
                 the ceiling they kept)",
                limited.len()
            );
        }
        out
    }

    /// Watches a live instance that has `limits` now (written at mkdir or through the API).
    /// On cgroup v2 the kernel's early warning is memory.high: an instance with none below its
    /// max gets one at the trigger point first (audited, reason "burst_arm"), or the first
    /// signal would come at memory.max, when the OOM killer is already on its way.
    fn watch_instance<C: Cgroups>(
        &mut self,
        tracker: &Tracker<C>,
        id: u64,
        mut limits: Limits,
        origin: Origin,
    ) -> Vec<Effect> {
        let Some(rec) = tracker.live_record(id).cloned() else {
            return Vec::new();
        };
        self.set_ceiling(&rec, limits, origin);
        let mut out = Vec::new();
        let unarmed = limits
            .max_bytes
            .is_some_and(|max| limits.high_bytes.is_none_or(|h| h >= max));
        if self.hierarchy.version == CgroupVersion::V2 && unarmed {
            let Some(trigger) = self.config.trigger_bytes(Limits {
                high_bytes: None,
                ..limits
            }) else {
                return out;
            };
            let mut current = rec.clone();
            current.limits = limits;
            let req = LimitRequest {
                max_bytes: None,
                high_bytes: Some(trigger),
            };
            let w = self
                .actuator
                .write(&current, req, BelowUsage::Refuse, Reason::BurstArm, None);
            match w.result {
                Ok(_) => {
                    limits.high_bytes = Some(trigger);
                    out.push(Effect::LimitsInForce {
                        cgroup_id: id,
                        limits,
                        by: LimitsBy::BurstArm,
                    });
                }
                Err(e) => {
                    // Usage already past the trigger: the next memory.events change (max)
                    // still signals.
                    tracing::debug!(cgroup = rec.cgroup_path, "memory.high not armed: {e}");
                }
            }
        }
        self.watch(id, &rec.cgroup_path, limits);
        out
    }

    /// The watch's ceiling: kept from before (this run's, or the last run's in the store),
    /// else `ceiling_factor` times the recommended memory.max (for a function on the prior,
    /// times the largest median peak on the host, `Prior::ceiling_base_bytes`), else times the
    /// limit in force;
    /// an explicit write through the API sets a new base (the memory.max it wrote). Kept with
    /// the instance.
    fn set_ceiling(&mut self, rec: &InstanceRecord, limits: Limits, origin: Origin) {
        let id = rec.cgroup_id;
        let explicit = (origin == Origin::Explicit)
            .then_some(limits.max_bytes)
            .flatten();
        if explicit.is_none() {
            if self.watches.contains_key(&id) {
                return;
            }
            if let Some(kept) = self.kept_watch(rec) {
                self.watches.insert(id, watched(kept.ceiling_bytes));
                return;
            }
        }
        let now = crate::clock::now_ms();
        // A function on the prior has no history of its own: its raises are bounded from the
        // largest function this host knows.
        let recommended = || match self.policy.cached(&rec.function) {
            Some(r) => Some(r.max_bytes),
            None => self.policy.prior().map(|p| p.ceiling_base_bytes()),
        };
        let Some(base) = explicit.or_else(recommended).or(limits.max_bytes) else {
            return;
        };
        let ceiling = ((base as f64) * self.config.ceiling_factor) as u64;
        let watch = BurstWatch {
            ceiling_bytes: ceiling,
            base_bytes: base,
            since_ms: now,
        };
        let key = (rec.started_at_ms, rec.cgroup_id);
        if let Err(e) = self.store.keep_state(key, &watch) {
            tracing::error!("keeping the burst watch of {}: {e}", rec.cgroup_path);
        }
        tracing::debug!(cgroup = rec.cgroup_path, base, ceiling, "burst ceiling");
        self.watches.insert(id, watched(ceiling));
    }

    /// The watch the last run kept for `rec`, if any.
    fn kept_watch(&self, rec: &InstanceRecord) -> Option<BurstWatch> {
        self.store
            .kept_state::<BurstWatch>((rec.started_at_ms, rec.cgroup_id))
            .unwrap_or_else(|e| {
                tracing::error!("{e}");
                None
            })
    }

    fn watch(&mut self, id: u64, dir: &str, limits: Limits) {
        let Some(trigger) = self.config.trigger_bytes(limits) else {
            return;
        };
        if let Err(e) = self.signals.watch(id, std::path::Path::new(dir), trigger) {
            // A cgroup removed meanwhile; anything else is said once per instance.
            if e.kind() != std::io::ErrorKind::NotFound {
                self.watch_errors += 1;
                tracing::warn!(cgroup = dir, "cannot watch for bursts: {e}");
            }
        }
    }

    /// One signal: when the instance's usage is at or past its early-warning point, its
    /// limits are raised by a step, up to the watch's ceiling and the container runtime's
    /// limit.
    pub fn on_signal<C: Cgroups>(&mut self, sig: Signal, tracker: &Tracker<C>) -> Vec<Effect> {
        self.signals_seen += 1;
        let Some(rec) = tracker.live_record(sig.cgroup_id).cloned() else {
            return Vec::new();
        };
        let dir = std::path::PathBuf::from(&rec.cgroup_path);
        // The limits and the runtime's limit read in one go, never halfway through a write
        // (the API's, on another thread).
        let (Ok(usage), Ok(in_force)) = (self.hierarchy.usage(&dir), self.actuator.in_force(&rec))
        else {
            return Vec::new(); // gone meanwhile
        };
        let limits = in_force.limits;
        let Some(trigger) = self.config.trigger_bytes(limits) else {
            return Vec::new();
        };
        if usage < trigger {
            return Vec::new(); // v1 signals a crossing downwards too; v2 other counters' moves
        }
        self.set_ceiling(&rec, limits, Origin::Agent);
        let Some(ceiling) = self.watches.get(&sig.cgroup_id).map(|w| w.ceiling) else {
            return Vec::new();
        };
        let mut current = rec.clone();
        current.limits = limits;
        let runtime = in_force.runtime_limit;
        let raise = match (runtime, limits.max_bytes) {
            (Some(limit), Some(max)) if limit <= ceiling && max >= limit => {
                Err(NoRaise::AtRuntimeLimit { max, limit })
            }
            _ => {
                let bound = runtime.map_or(ceiling, |r| r.min(ceiling));
                let available = host_available_bytes().unwrap_or(0);
                self.config.burst_raise(limits, usage, bound, available)
            }
        };
        let new = match raise {
            Ok(l) => l,
            Err(why) => {
                self.refuse(&current, usage, &why);
                return Vec::new();
            }
        };
        let written =
            self.actuator
                .write(&current, new.into(), BelowUsage::Raise, Reason::Burst, None);
        let us = sig.at.elapsed().as_micros() as u64;
        match written.result {
            Ok(applied) => {
                self.raises += 1;
                if self.reactions_us.len() == KEPT_REACTIONS {
                    self.reactions_us.pop_front();
                }
                self.reactions_us.push_back(us);
                tracing::info!(
                    function = rec.function,
                    instance = rec.instance,
                    usage,
                    old_max = ?limits.max_bytes,
                    new_max = ?applied.new.max_bytes,
                    ceiling,
                    reaction_us = us,
                    "burst: limits raised"
                );
                // v1 thresholds are fixed values: a new one at the new early-warning point.
                self.watch(sig.cgroup_id, &rec.cgroup_path, applied.new);
                vec![Effect::LimitsInForce {
                    cgroup_id: sig.cgroup_id,
                    limits: applied.new,
                    by: LimitsBy::BurstRaise,
                }]
            }
            Err(e) => {
                self.denied += 1;
                tracing::warn!(
                    function = rec.function,
                    instance = rec.instance,
                    "burst raise failed: {e}"
                );
                Vec::new()
            }
        }
    }

    /// A raise not made: audited (reason "burst", outcome "refused", with why), counted and
    /// logged once per instance and memory.max (the kernel goes on signalling while the
    /// instance stays at its limit).
    fn refuse(&mut self, current: &InstanceRecord, usage: u64, why: &NoRaise) {
        let Some(w) = self.watches.get_mut(&current.cgroup_id) else {
            return;
        };
        if w.refused_at.is_some() && w.refused_at == current.limits.max_bytes {
            return;
        }
        w.refused_at = current.limits.max_bytes;
        self.denied += 1;
        tracing::warn!(
            function = current.function,
            instance = current.instance,
            usage,
            "burst not helped: {why}"
        );
        let signal = match self.hierarchy.version {
            CgroupVersion::V1 => "memory.usage_in_bytes threshold",
            CgroupVersion::V2 => "memory.events",
        };
        self.actuator
            .refused(current, Reason::Burst, &why.to_string(), Some(signal));
    }

    /// What the guard has done, for /v1/info and /metrics.
    pub fn figures(&self) -> BurstFigures {
        let mut reactions_us: Vec<u64> = self.reactions_us.iter().copied().collect();
        reactions_us.sort_unstable();
        BurstFigures {
            signal: self.signals.method().to_owned(),
            watched: self.signals.watched() as u64,
            signals: self.signals_seen,
            raises: self.raises,
            denied: self.denied,
            watch_errors: self.watch_errors + self.signals.failed_watches(),
            reactions_us,
        }
    }
}

fn watched(ceiling: u64) -> Watched {
    Watched {
        ceiling,
        refused_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reaction percentiles are the project's nearest-rank rule (`model::nearest_rank`).
    #[test]
    fn reaction_percentiles_are_nearest_rank() {
        let none = BurstFigures::default();
        assert_eq!(
            (none.reaction_us(50.0), none.reaction_max_us()),
            (None, None)
        );
        let one = BurstFigures {
            reactions_us: vec![700],
            ..Default::default()
        };
        assert_eq!(one.reaction_us(50.0), Some(700));
        assert_eq!(one.reaction_us(99.0), Some(700));
        let f = BurstFigures {
            reactions_us: (1..=100).map(|i| i * 10).collect(),
            ..Default::default()
        };
        assert_eq!(f.reaction_us(50.0), Some(500));
        assert_eq!(f.reaction_us(99.0), Some(990));
        assert_eq!(f.reaction_max_us(), Some(1000));
        // Two values: the median is the lower (rank ceil(0.5 * 2) = 1).
        let two = BurstFigures {
            reactions_us: vec![100, 300],
            ..Default::default()
        };
        assert_eq!(two.reaction_us(50.0), Some(100));
    }
}
