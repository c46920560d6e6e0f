//! The one stage that carries out the tracker's [`Effect`]s: it saves records and hour
//! buckets, refreshes recommendations, and — through the actuator, which audits before it
//! writes — puts a function's limits into each new instance. The tracker decides; this acts.

use std::sync::Arc;

use crate::{
    model::tracker::{drain, Cgroups, Effect, Tracker},
    policy::{actuator::Actuator, Policy},
    store::{Store, StoreError},
};

/// Counters of what the enforcer did, for /v1/info.
#[derive(Debug, Default, Clone, Copy)]
pub struct EnforcerStats {
    pub store_errors: u64,
    /// Limit writes into new instances (enforce mode) and how many failed.
    pub enforced: u64,
    pub enforce_failures: u64,
    /// Largest mkdir → limits-written delay seen, in microseconds.
    pub max_enforce_delay_us: u64,
    /// When limits were last written into a new instance (the agent flushes in the pauses).
    pub last_enforce: Option<std::time::Instant>,
}

pub struct Enforcer {
    store: Store,
    /// Predictive mode: the recommendations and the writer of limits.
    policy: Option<(Arc<Policy>, Arc<Actuator>)>,
    pub stats: EnforcerStats,
    /// Reactive mode: instances that got limits and instances that ended since the burst
    /// guard last looked (kept only while it is on).
    pub limits_written: Vec<(u64, crate::model::Limits)>,
    pub ended: Vec<u64>,
    track_limits: bool,
}

impl Enforcer {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            policy: None,
            stats: EnforcerStats::default(),
            limits_written: Vec::new(),
            ended: Vec::new(),
            track_limits: false,
        }
    }

    /// Keeps [`Enforcer::limits_written`] and [`Enforcer::ended`] for the burst guard.
    pub fn tracking_limits(mut self, on: bool) -> Self {
        self.track_limits = on;
        self
    }

    pub fn with_policy(mut self, policy: Arc<Policy>, actuator: Arc<Actuator>) -> Self {
        self.policy = Some((policy, actuator));
        self
    }

    /// Carries out `effects` in order, with whatever the tracker answers on the way.
    pub fn run<C: Cgroups>(&mut self, tracker: &mut Tracker<C>, effects: Vec<Effect>) {
        drain(tracker, effects, |t, e| self.one(t, e));
    }

    fn one<C: Cgroups>(&mut self, tracker: &mut Tracker<C>, effect: Effect) -> Vec<Effect> {
        match effect {
            Effect::Save(rec) => {
                if rec.ended_at_ms.is_some() {
                    if self.track_limits {
                        self.ended.push(rec.cgroup_id);
                    }
                    if let Some((_, actuator)) = &self.policy {
                        actuator.forget(&rec);
                    }
                }
                if let Err(e) = self.store.put_instance(&rec) {
                    self.store_error(e);
                }
            }
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
                let written = self.enforce(&record, mkdir_ts_ns);
                if let (true, Some(l)) = (self.track_limits, written) {
                    self.limits_written.push((record.cgroup_id, l));
                }
                return tracker.enforced(record.cgroup_id, written);
            }
        }
        Vec::new()
    }

    /// Writes the function's recommended limits into a new instance (enforce mode); the
    /// limits now in force when it did.
    fn enforce(
        &mut self,
        rec: &crate::model::InstanceRecord,
        mkdir_ts_ns: Option<u64>,
    ) -> Option<crate::model::Limits> {
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
