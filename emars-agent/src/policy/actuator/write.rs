//! The write path: a checked plan carried out file by file (max first, the floor checked
//! again before each), its intent made durable before the first byte and its outcome after;
//! and the reclaim, audited the same way.

use std::sync::atomic::Ordering;

use super::{plan::Plan, Actuator, ActuatorError, Applied, BelowUsage, Written, REASON_BY_HAND};
use crate::{
    kernel::cgroupfs::{CgroupDir, CgroupfsError},
    model::audit::{AuditRecord, ClampedBy, Outcome, Reason},
    model::live::InstanceKey,
    model::{InstanceRecord, LimitRequest, Limits},
};

impl Actuator {
    /// Writes limits into a live instance's cgroup, audited before and after; `reason` says who
    /// asked ("new_instance", "apply", "api"), `delay_start_ns` the kernel time of its mkdir.
    pub fn write(
        &self,
        inst: &InstanceRecord,
        req: LimitRequest,
        on_below: BelowUsage,
        reason: Reason,
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
        reason: Reason,
        delay_start_ns: Option<u64>,
        signal: Option<&str>,
    ) -> Written {
        let _one_at_a_time = self.writing(inst.cgroup_id);
        let mut audit = AuditRecord {
            new: Limits {
                max_bytes: req.max_bytes,
                high_bytes: req.high_bytes,
            },
            ..AuditRecord::intent(inst, reason, signal)
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
    pub(super) fn unchanged(
        &self,
        plan: &Plan,
        key: InstanceKey,
        mut audit: AuditRecord,
    ) -> Written {
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
        reason: Reason,
        signal: Option<&str>,
    ) -> Result<AuditRecord, ActuatorError> {
        let mut audit = AuditRecord {
            reclaim_requested_bytes: Some(bytes),
            ..AuditRecord::intent(inst, reason, signal)
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

    /// Writes the plan, max first (the kernel keeps no order between the two files, and max is
    /// the one that protects the host), checking the floor again right before each file:
    /// usage can grow between the plan and the write.
    pub(super) fn carry_out(
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
            #[cfg(test)]
            if let Some(hook) = self.after_file_write.get() {
                hook(file);
            }
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
