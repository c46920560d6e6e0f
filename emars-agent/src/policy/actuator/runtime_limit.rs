//! The container runtime's limit: the memory.max a runtime gave an instance, which no write
//! goes above (unless `policy.override_runtime_limits`), kept per instance in the store, and
//! a later write by another than the agent taken as the runtime's new limit.

use super::{Actuator, ActuatorError, InForce};
use crate::{
    kernel::cgroupfs::CgroupDir,
    model::kept::{same_limit, RuntimeLimit, RuntimeLimitSource},
    model::live::InstanceKey,
    model::InstanceRecord,
};

impl Actuator {
    /// The limits in force in a live instance and the runtime's limit over them, read while
    /// no write into it is under way (one half done would look like another's).
    pub fn in_force(&self, inst: &InstanceRecord) -> Result<InForce, ActuatorError> {
        let _one_at_a_time = self.writing(inst.cgroup_id);
        let limits = self.open_instance(inst)?.limits()?;
        Ok(InForce {
            limits,
            runtime_limit: self.runtime_limit_of(inst, limits.max_bytes),
        })
    }

    /// The memory limit the container's runtime gave `inst`, which no write goes above; None
    /// when there is none or `policy.override_runtime_limits` lifts it. `current_max` is the
    /// memory.max in force now: one that differs from the agent's own last write was written
    /// by another since (a runtime that writes its limit after the mkdir, as runc does, or
    /// `docker update`), and is the runtime's limit from then on. Called with the instance's
    /// write lock held ([`Actuator::writing`]).
    pub(super) fn runtime_limit_of(
        &self,
        inst: &InstanceRecord,
        current_max: Option<u64>,
    ) -> Option<u64> {
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
    pub(super) fn keep_runtime_limit(&self, key: InstanceKey, limit: Option<u64>) {
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
    pub(super) fn written_by_another(
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
}
