//! The audit side of the actuator: intents made durable before a write, records of writes
//! not made (refused by a rule or by the caller), audited writes that set no limit (a
//! bind's watermark reset), the counters, and the closing of intents a stopped agent left.

use std::sync::atomic::Ordering;

use super::{Actuator, ActuatorError};
use crate::{
    model::audit::{AuditRecord, Outcome, Reason},
    model::{InstanceRecord, Limits},
    store::{AuditKey, StoreError},
};

impl Actuator {
    /// Audits a write that sets no limit (a bind's watermark reset): an intent record with
    /// `reason` before `write` runs, its outcome after. Nothing runs when the record cannot be
    /// stored. Allowed in observe mode: the platform asked for it, and no limit changes.
    pub fn audited<T, E: std::fmt::Display>(
        &self,
        inst: &InstanceRecord,
        reason: Reason,
        write: impl FnOnce() -> Result<T, E>,
    ) -> Result<Result<T, E>, ActuatorError> {
        let mut audit = AuditRecord::intent(inst, reason, None);
        // Recorded before, but not synced to disk per call: such a write (a bind's watermark
        // reset) changes no limit, and a platform makes one per use or invocation. The record
        // is made durable with the store's next flush.
        let key = self
            .audit
            .append_audit(audit.at_ms, &audit)
            .map_err(|source| {
                self.audit_error(&source);
                ActuatorError::AuditNotStored { source }
            })?;
        let result = write();
        match &result {
            Ok(_) => audit.outcome = Outcome::Ok,
            Err(e) => {
                audit.outcome = Outcome::Refused;
                audit.error = Some(e.to_string());
            }
        }
        if let Err(se) = self.audit.update_audit(&key, &audit) {
            self.audit_error(&se);
        }
        Ok(result)
    }

    /// Records a write its caller decided against (a burst raise at its ceiling): outcome
    /// `refused` with `why`, counted with the refusals. Nothing was written, so the record
    /// needs no durability of its own.
    pub fn refused(
        &self,
        inst: &InstanceRecord,
        reason: Reason,
        why: &str,
        signal: Option<&str>,
    ) -> AuditRecord {
        let mut audit = AuditRecord::intent(inst, reason, signal);
        audit.outcome = Outcome::Refused;
        audit.error = Some(why.to_owned());
        self.stats.refusals.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.audit.append_audit(audit.at_ms, &audit) {
            self.audit_error(&e);
        }
        audit
    }

    /// A write refused or failed before anything was written: counted, and recorded with
    /// why (it needs no durability of its own: nothing changed).
    pub(super) fn not_attempted(&self, audit: &mut AuditRecord, e: &ActuatorError) {
        self.count(e);
        audit.outcome = if e.is_refusal() {
            Outcome::Refused
        } else {
            Outcome::Failed
        };
        audit.error = Some(e.to_string());
        if let Err(se) = self.audit.append_audit(audit.at_ms, audit) {
            self.audit_error(&se);
        }
    }

    /// Makes a write's intent durable before the write; nothing is written when it cannot be.
    pub(super) fn durable_intent(&self, audit: &AuditRecord) -> Result<AuditKey, ActuatorError> {
        self.audit
            .append_audit_durable(audit.at_ms, audit)
            .map_err(|source| {
                self.audit_error(&source);
                ActuatorError::AuditNotDurable { source }
            })
    }

    pub(super) fn count(&self, e: &ActuatorError) {
        let counter = if e.is_refusal() {
            &self.stats.refusals
        } else {
            &self.stats.writes_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn audit_error(&self, e: &StoreError) {
        self.stats.audit_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!("audit log: {e}");
    }

    /// At start-up: closes the audit records of writes the last run did not finish, with what
    /// the instance's limit files hold now (when its cgroup is still the same one).
    pub fn close_interrupted(&self) -> Result<u64, StoreError> {
        self.audit.close_interrupted_audit(|mut rec: AuditRecord| {
            rec.outcome = Outcome::Interrupted;
            let now = self
                .open_recorded(&rec.cgroup_path, rec.cgroup_id)
                .ok()
                .and_then(|dir| dir.limits().ok());
            rec.error = Some(match now {
                Some(l) => {
                    rec.written = Limits {
                        max_bytes: rec
                            .new
                            .max_bytes
                            .filter(|_| l.max_bytes == rec.new.max_bytes),
                        high_bytes: rec
                            .new
                            .high_bytes
                            .filter(|_| l.high_bytes == rec.new.high_bytes),
                    };
                    format!(
                        "the agent stopped before recording the outcome; at restart the cgroup \
                         held max {:?}, high {:?}",
                        l.max_bytes, l.high_bytes
                    )
                }
                None => "the agent stopped before recording the outcome; the cgroup was gone \
                         at restart"
                    .to_owned(),
            });
            rec
        })
    }
}
