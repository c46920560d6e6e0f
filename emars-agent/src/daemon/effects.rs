//! The one place the tracker's [`Effect`]s are carried out: records and hour buckets saved,
//! recommendations refreshed, and — through the actuator, which audits before it writes — a
//! function's limits put into each new instance. Every limit write ends in
//! [`Effect::LimitsInForce`], and this is where it is told to the instance's record and to the
//! burst guard; nothing else tells them. The tracker decides; this acts.

use std::sync::Arc;

use crate::{
    model::tracker::{drain, Cgroups, Effect, LimitsBy, Tracker},
    model::{InstanceRecord, Limits},
    policy::{actuator::Actuator, burst::BurstGuard, squeeze::Squeezer, Policy},
    store::{Store, StoreError},
};

/// Counters of what the effects did, for /v1/info.
#[derive(Debug, Default, Clone, Copy)]
pub struct EffectStats {
    pub store_errors: u64,
    /// Limit writes into new instances (enforce mode) and how many failed.
    pub enforced: u64,
    pub enforce_failures: u64,
    /// Largest mkdir → limits-written delay seen, in microseconds.
    pub max_enforce_delay_us: u64,
    /// When limits were last written into a new instance (the agent flushes in the pauses).
    pub last_enforce: Option<std::time::Instant>,
}

/// Carries out effects; holds the stages that act on them (the store, the policy and its
/// actuator, and in reactive mode the burst guard and the squeeze).
pub struct Effects {
    store: Store,
    /// Predictive mode: the recommendations and the writer of limits.
    policy: Option<(Arc<Policy>, Arc<Actuator>)>,
    /// Reactive mode: the burst guard (told every limit in force and every end) and the squeeze
    /// (told every limit in force).
    pub(super) burst: Option<BurstGuard>,
    pub(super) squeeze: Option<Squeezer>,
    stats: EffectStats,
}

impl Effects {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            policy: None,
            burst: None,
            squeeze: None,
            stats: EffectStats::default(),
        }
    }

    pub fn with_policy(mut self, policy: Arc<Policy>, actuator: Arc<Actuator>) -> Self {
        self.policy = Some((policy, actuator));
        self
    }

    /// Reactive mode's stages: on only where the agent writes limits.
    pub fn with_reactive(mut self, burst: Option<BurstGuard>, squeeze: Option<Squeezer>) -> Self {
        self.burst = burst;
        self.squeeze = squeeze;
        self
    }

    pub fn stats(&self) -> EffectStats {
        self.stats
    }

    /// Carries out `effects` in order, with whatever they answer on the way (a new instance's
    /// limits in force before its next effect).
    pub fn run<C: Cgroups>(&mut self, tracker: &mut Tracker<C>, effects: Vec<Effect>) {
        drain(tracker, effects, |t, e| self.one(t, e));
    }

    /// After each pass of the event loop: the burst guard watches the new instances that got
    /// limits in it (not before, so that a batch of new instances gets its limits first).
    pub fn catch_up<C: Cgroups>(&mut self, tracker: &mut Tracker<C>) {
        if let Some(b) = self.burst.as_mut() {
            let effects = b.arm_new(tracker);
            self.run(tracker, effects);
        }
    }

    fn one<C: Cgroups>(&mut self, tracker: &mut Tracker<C>, effect: Effect) -> Vec<Effect> {
        match effect {
            Effect::Save(rec) => self.save(&rec),
            Effect::AddHour {
                function,
                at_ms,
                delta,
            } => {
                if let Err(e) = self.store.add_hour(&function, at_ms, delta) {
                    self.store_error(e);
                }
            }
            Effect::RuntimeLimit { key, limit } => {
                tracing::debug!(
                    cgroup = key.1,
                    bytes = limit.bytes,
                    source = ?limit.source,
                    "the container's runtime limit"
                );
                if let Err(e) = self.store.keep_state(key, &limit) {
                    self.store_error(e);
                }
            }
            Effect::ContainerNames {
                key,
                function,
                names,
            } => {
                let now = crate::clock::now_ms();
                if let Err(e) = self.store.name_container(key, &function, &names, now) {
                    self.store_error(e);
                }
            }
            Effect::Recompute { function, at_ms } => {
                if let Some((policy, _)) = &self.policy {
                    if let Err(e) = policy.compute(&function, at_ms) {
                        self.store_error(e);
                    }
                }
            }
            Effect::Enforce {
                record,
                mkdir_ts_ns,
            } => {
                return match self.enforce(&record, mkdir_ts_ns) {
                    Some(limits) => vec![Effect::LimitsInForce {
                        cgroup_id: record.cgroup_id,
                        limits,
                        by: LimitsBy::NewInstance,
                    }],
                    // Nothing written: the record is saved with the limits it was found with.
                    None => tracker.enforced(record.cgroup_id, None),
                };
            }
            Effect::LimitsInForce {
                cgroup_id,
                limits,
                by,
            } => return self.limits_in_force(tracker, cgroup_id, limits, by),
        }
        Vec::new()
    }

    /// Limits in force: the instance's record saved with them first, then the squeeze and the
    /// burst guard told (the guard may write an early warning of its own, coming back as
    /// another).
    fn limits_in_force<C: Cgroups>(
        &mut self,
        tracker: &mut Tracker<C>,
        id: u64,
        limits: Limits,
        by: LimitsBy,
    ) -> Vec<Effect> {
        for saved in tracker.limits_in_force(id, limits) {
            self.one(tracker, saved);
        }
        if let Some(s) = self.squeeze.as_mut() {
            s.limits_in_force(id, limits, by);
        }
        match self.burst.as_mut() {
            Some(b) => b.limits_in_force(tracker, id, limits, by),
            None => Vec::new(),
        }
    }

    /// Saves a record; an ended instance is forgotten by the actuator and the burst guard.
    fn save(&mut self, rec: &InstanceRecord) {
        if rec.ended_at_ms.is_some() {
            if let Some(b) = self.burst.as_mut() {
                b.instance_ended(rec.cgroup_id);
            }
            if let Some((_, actuator)) = &self.policy {
                actuator.forget(rec);
            }
        }
        if let Err(e) = self.store.put_instance(rec) {
            self.store_error(e);
        }
    }

    /// Writes the function's recommended limits into a new instance (enforce mode); the
    /// limits now in force when it did.
    fn enforce(&mut self, rec: &InstanceRecord, mkdir_ts_ns: Option<u64>) -> Option<Limits> {
        let (policy, actuator) = self.policy.as_ref()?;
        let audit = policy.enforce_new_instance(actuator, rec, mkdir_ts_ns)?;
        self.stats.last_enforce = Some(std::time::Instant::now());
        self.stats.max_enforce_delay_us = self
            .stats
            .max_enforce_delay_us
            .max(audit.delay_us.unwrap_or(0));
        if audit.is_ok() {
            self.stats.enforced += 1;
            tracing::info!(
                function = rec.function,
                instance = rec.instance,
                max = ?audit.new.max_bytes,
                high = ?audit.new.high_bytes,
                delay_us = ?audit.delay_us,
                "limits written"
            );
            Some(audit.new)
        } else {
            self.stats.enforce_failures += 1;
            tracing::warn!(
                function = rec.function,
                instance = rec.instance,
                "limits not written ({}): {}",
                audit.outcome,
                audit.error.as_deref().unwrap_or("")
            );
            None
        }
    }

    fn store_error(&mut self, e: StoreError) {
        self.stats.store_errors += 1;
        tracing::error!("store: {e}");
    }
}
