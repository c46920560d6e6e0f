//! The burst guard at run time: it watches every instance that got limits, and when the kernel
//! signals that one nears its memory.max, raises its limits (audited, reason "burst") before
//! the OOM killer acts. The decisions are [`ReactiveConfig`]'s; the signals `kernel/notify`'s.

use std::collections::VecDeque;

use std::sync::Arc;

use crate::kernel::cgroupfs::{CgroupVersion, MemoryHierarchy};
use crate::kernel::notify::{LimitSignals, Signal};
use crate::model::tracker::{Cgroups, Tracker};
use crate::model::{Limits, ReactiveInfo};
use crate::policy::actuator::{Actuator, BelowUsage, LimitRequest};
use crate::policy::enforcer::Enforcer;
use crate::policy::reactive::{host_available_bytes, ReactiveConfig};
use crate::policy::Policy;

/// Reaction times kept for the percentiles in /v1/info.
const KEPT_REACTIONS: usize = 1024;

pub struct BurstGuard {
    config: ReactiveConfig,
    hierarchy: MemoryHierarchy,
    actuator: Arc<Actuator>,
    signals: LimitSignals,
    /// Signals seen, raises written, raises not made (at the ceiling, host full, write failed).
    signals_seen: u64,
    raises: u64,
    denied: u64,
    watch_errors: u64,
    /// Microseconds from the kernel's signal to the limit written, latest last.
    reactions_us: VecDeque<u64>,
}

impl BurstGuard {
    pub fn new(
        config: ReactiveConfig,
        hierarchy: MemoryHierarchy,
        actuator: Arc<Actuator>,
    ) -> std::io::Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Signal>)> {
        let (signals, rx) = LimitSignals::new(hierarchy.version)?;
        Ok((
            BurstGuard {
                config,
                hierarchy,
                actuator,
                signals,
                signals_seen: 0,
                raises: 0,
                denied: 0,
                watch_errors: 0,
                reactions_us: VecDeque::new(),
            },
            rx,
        ))
    }

    /// The instances watched now: those with limits, the squeeze's candidates.
    pub fn watched_ids(&self) -> Vec<u64> {
        self.signals.watched_ids().collect()
    }

    /// Watches the instances that got limits since the last call and forgets those that ended.
    pub fn sync<C: Cgroups>(&mut self, enforcer: &mut Enforcer, tracker: &mut Tracker<C>) {
        for id in enforcer.ended.drain(..) {
            self.signals.unwatch(id);
        }
        for (id, limits) in std::mem::take(&mut enforcer.limits_written) {
            self.watch_instance(tracker, enforcer, id, limits);
        }
    }

    /// Watches a live instance that has `limits` now (written at mkdir or through the API).
    /// On cgroup v2 the kernel's early warning is memory.high: an instance with none below its
    /// max gets one at the trigger point first (audited, reason "burst_arm"), or the first
    /// signal would come at memory.max, when the OOM killer is already on its way.
    pub fn watch_instance<C: Cgroups>(
        &mut self,
        tracker: &mut Tracker<C>,
        enforcer: &mut Enforcer,
        id: u64,
        mut limits: Limits,
    ) {
        let Some(rec) = tracker.live_record(id).cloned() else {
            return;
        };
        let unarmed = limits
            .max_bytes
            .is_some_and(|max| limits.high_bytes.is_none_or(|h| h >= max));
        if self.hierarchy.version == CgroupVersion::V2 && unarmed {
            let Some(trigger) = self.config.trigger_bytes(Limits {
                high_bytes: None,
                ..limits
            }) else {
                return;
            };
            let mut current = rec.clone();
            current.limits = limits;
            let req = LimitRequest {
                max_bytes: None,
                high_bytes: Some(trigger),
            };
            let w = self
                .actuator
                .write(&current, req, BelowUsage::Refuse, "burst_arm", None);
            match w.result {
                Ok(_) => {
                    limits.high_bytes = Some(trigger);
                    let effects = tracker.limits_changed(id, limits);
                    enforcer.run(tracker, effects);
                }
                Err(e) => {
                    // Usage already past the trigger: the next memory.events change (max)
                    // still signals.
                    tracing::debug!(cgroup = rec.cgroup_path, "memory.high not armed: {e}");
                }
            }
        }
        self.watch(id, &rec.cgroup_path, limits);
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
    /// limits are raised by a step.
    pub fn on_signal<C: Cgroups>(
        &mut self,
        sig: Signal,
        tracker: &mut Tracker<C>,
        enforcer: &mut Enforcer,
        policy: &Policy,
    ) {
        self.signals_seen += 1;
        let Some(rec) = tracker.live_record(sig.cgroup_id).cloned() else {
            return;
        };
        let dir = std::path::PathBuf::from(&rec.cgroup_path);
        let (Ok(usage), Ok(limits)) = (self.hierarchy.usage(&dir), self.hierarchy.limits(&dir))
        else {
            return; // gone meanwhile
        };
        let Some(trigger) = self.config.trigger_bytes(limits) else {
            return;
        };
        if usage < trigger {
            return; // v1 signals a crossing downwards too; v2 other counters' moves
        }
        let recommended = policy
            .cached(&rec.function)
            .map(|r| r.max_bytes)
            .or(limits.max_bytes)
            .unwrap_or(0);
        let ceiling = ((recommended as f64) * self.config.ceiling_factor) as u64;
        let available = host_available_bytes().unwrap_or(0);
        let new = match self.config.burst_raise(limits, usage, ceiling, available) {
            Ok(l) => l,
            Err(why) => {
                self.denied += 1;
                tracing::warn!(
                    function = rec.function,
                    instance = rec.instance,
                    usage,
                    "burst not helped: {why}"
                );
                return;
            }
        };
        let mut current = rec.clone();
        current.limits = limits;
        let written = self
            .actuator
            .write(&current, new.into(), BelowUsage::Raise, "burst", None);
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
                    reaction_us = us,
                    "burst: limits raised"
                );
                let effects = tracker.limits_changed(sig.cgroup_id, applied.new);
                enforcer.run(tracker, effects);
                // v1 thresholds are fixed values: a new one at the new early-warning point.
                self.watch(sig.cgroup_id, &rec.cgroup_path, applied.new);
            }
            Err(e) => {
                self.denied += 1;
                tracing::warn!(
                    function = rec.function,
                    instance = rec.instance,
                    "burst raise failed: {e}"
                );
            }
        }
    }

    /// Fills in the burst guard's part of `/v1/info` → `reactive` (the API counts admissions
    /// into the same section).
    pub fn fill_info(&self, info: &mut ReactiveInfo) {
        let mut sorted: Vec<u64> = self.reactions_us.iter().copied().collect();
        sorted.sort_unstable();
        let pct = |p: f64| -> Option<u64> {
            let last = sorted.len().checked_sub(1)?;
            sorted.get((last as f64 * p).round() as usize).copied()
        };
        info.enabled = true;
        info.signal = self.signals.method().to_owned();
        info.watched = self.signals.watched() as u64;
        info.signals = self.signals_seen;
        info.raises = self.raises;
        info.denied = self.denied;
        info.watch_errors = self.watch_errors;
        info.reaction_p50_us = pct(0.5);
        info.reaction_p99_us = pct(0.99);
        info.reaction_max_us = sorted.last().copied();
    }
}
