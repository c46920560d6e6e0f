//! Every check a write needs before its first byte: mode, place (strictly inside a watched
//! root, the recorded cgroup), bounds (host memory, usage plus headroom, the runtime's
//! limit, high not above max). The result is a [`Plan`] the write path carries out.

use std::path::Path;

use super::{Actuator, ActuatorError, BelowUsage};
use crate::{
    kernel::cgroupfs::CgroupDir,
    model::live::InstanceKey,
    model::{InstanceRecord, LimitRequest, Limits},
};

impl Actuator {
    /// Every check that needs no write: mode, place, identity, bounds. Called with the
    /// instance's write lock held ([`Actuator::writing`]).
    pub(super) fn plan(
        &self,
        inst: &InstanceRecord,
        req: LimitRequest,
        on_below: BelowUsage,
    ) -> Result<Plan, ActuatorError> {
        if !self.writes_allowed {
            return Err(ActuatorError::ObserveMode);
        }
        if req.max_bytes.is_none() && req.high_bytes.is_none() {
            return Err(ActuatorError::Empty);
        }
        let dir = self.open_instance(inst)?;
        for v in [req.max_bytes, req.high_bytes].into_iter().flatten() {
            if v > self.host_memory {
                return Err(ActuatorError::AboveHost {
                    requested: v,
                    host: self.host_memory,
                });
            }
        }
        let old = dir.limits()?;
        let usage = dir.usage()?;
        let cap = self.runtime_limit_of(inst, old.max_bytes);
        let (req, mut clamped) = clamp_to(req, cap);
        let mut raised = false;
        let mut new = LimitRequest {
            max_bytes: self.floored(&dir, req.max_bytes, usage, on_below, &mut raised)?,
            high_bytes: self.floored(&dir, req.high_bytes, usage, on_below, &mut raised)?,
        };
        if let Some(cap) = cap {
            // The floor took a file past the runtime's limit: that file keeps what it holds.
            for v in [&mut new.max_bytes, &mut new.high_bytes] {
                if v.is_some_and(|v| v > cap) {
                    *v = None;
                    clamped = true;
                }
            }
        }
        if let (Some(high), Some(max)) = (new.high_bytes, new.max_bytes) {
            if high > max {
                if raised {
                    new.high_bytes = Some(max);
                } else {
                    return Err(ActuatorError::HighAboveMax { high, max });
                }
            }
        }
        Ok(Plan {
            dir,
            old,
            usage,
            new,
            raised,
            key: (inst.started_at_ms, inst.cgroup_id),
            cap,
            clamped,
        })
    }

    /// A requested limit against the floor usage + headroom: kept, raised, or refused.
    pub(super) fn floored(
        &self,
        dir: &CgroupDir,
        requested: Option<u64>,
        usage: u64,
        on_below: BelowUsage,
        raised: &mut bool,
    ) -> Result<Option<u64>, ActuatorError> {
        let floor = usage.saturating_add(self.headroom).min(self.host_memory);
        match requested {
            Some(v) if v < floor => match on_below {
                BelowUsage::Refuse => Err(ActuatorError::BelowUsage {
                    path: dir.path().to_owned(),
                    requested: v,
                    usage,
                    headroom: self.headroom,
                }),
                BelowUsage::Raise => {
                    *raised = true;
                    Ok(Some(floor))
                }
            },
            other => Ok(other),
        }
    }

    /// Bytes charged to a live instance's cgroup now (for the API's live view): read through
    /// the same checked open as a write.
    pub fn usage(&self, inst: &InstanceRecord) -> Result<u64, ActuatorError> {
        Ok(self.open_instance(inst)?.usage()?)
    }

    /// The instance's cgroup, opened inside its watched root and checked to be the recorded one.
    pub(super) fn open_instance(&self, inst: &InstanceRecord) -> Result<CgroupDir, ActuatorError> {
        self.open_recorded(&inst.cgroup_path, inst.cgroup_id)
    }

    /// `cgroup_path` opened strictly inside a watched root, refused unless its id is
    /// `cgroup_id` (a cgroup removed and created again is another one).
    pub(super) fn open_recorded(
        &self,
        cgroup_path: &str,
        cgroup_id: u64,
    ) -> Result<CgroupDir, ActuatorError> {
        let path = Path::new(cgroup_path);
        let outside = || ActuatorError::OutsideRoots {
            path: path.to_owned(),
        };
        let rel = self.hierarchy.rel_path(path).ok_or_else(outside)?;
        let root = self
            .roots
            .iter()
            .find(|r| {
                rel.strip_prefix(r.as_str())
                    .is_some_and(|t| t.starts_with('/'))
            })
            .ok_or_else(outside)?;
        let dir = self.hierarchy.open_below(root, &rel)?;
        let found = dir.id()?;
        if found != cgroup_id {
            return Err(ActuatorError::Replaced {
                path: path.to_owned(),
                expected: cgroup_id,
                found,
            });
        }
        Ok(dir)
    }
}

/// A checked request, ready to be written into an opened cgroup.
pub(super) struct Plan {
    pub(super) dir: CgroupDir,
    pub(super) old: Limits,
    pub(super) usage: u64,
    pub(super) new: LimitRequest,
    pub(super) raised: bool,
    /// The instance's key.
    pub(super) key: InstanceKey,
    /// The container runtime's limit, when it bounds this write: no file goes above it.
    pub(super) cap: Option<u64>,
    /// The request was bounded by `cap`.
    pub(super) clamped: bool,
}

/// `req` bounded by a container runtime's limit `cap`: memory.max at most the limit, memory.high
/// keeping its ratio to the max asked for (or at most the limit, asked alone). True when it
/// was bounded.
fn clamp_to(req: LimitRequest, cap: Option<u64>) -> (LimitRequest, bool) {
    let Some(cap) = cap else {
        return (req, false);
    };
    match req.max_bytes {
        Some(max) if max > cap => {
            let high = req
                .high_bytes
                .map(|h| (u128::from(h) * u128::from(cap) / u128::from(max)) as u64);
            let bounded = LimitRequest {
                max_bytes: Some(cap),
                high_bytes: high,
            };
            (bounded, true)
        }
        _ => match req.high_bytes {
            Some(high) if high > cap => (
                LimitRequest {
                    high_bytes: Some(cap),
                    ..req
                },
                true,
            ),
            _ => (req, false),
        },
    }
}
