//! Pooled cgroups (a platform's warm pool): bound to a function as one use (POST /v1/bind),
//! its watermark reset so that the peak is this use's, and released (POST /v1/release).
use std::path::PathBuf;

use super::{BindError, Cgroups, Effect, Tracker};
use crate::{
    kernel::cgroupfs::{CgroupfsError, UsePeak},
    model::{HourDelta, InstanceRecord, PeakSource},
};

impl<C: Cgroups> Tracker<C> {
    /// A pooled cgroup starts serving `function` as `instance` (POST /v1/bind): a new live
    /// instance record, its watermark reset so that its peak is this use's, and its function's
    /// limits due like a new instance's. `cgroup_id`: the id read when the bind was asked for;
    /// a cgroup with another id at the path by now is refused ([`BindError::Replaced`]).
    /// Returns its cgroup id.
    pub fn bind(
        &mut self,
        rel_path: &str,
        cgroup_id: u64,
        function: &str,
        instance: &str,
        input_bytes: Option<u64>,
        at_ms: u64,
    ) -> Result<(u64, Vec<Effect>), BindError> {
        if !crate::model::registry::valid_function_name(function) {
            return Err(BindError::Invalid(format!(
                "invalid function name {function:?}"
            )));
        }
        if !crate::model::registry::valid_instance_name(instance) {
            return Err(BindError::Invalid(format!(
                "invalid instance name {instance:?}"
            )));
        }
        let (id, dir) = self.bindable(rel_path, cgroup_id)?;
        self.admit(function, at_ms)?;
        let peak = self.reset_use_peak(rel_path, id)?;
        let rec = InstanceRecord {
            function: function.to_owned(),
            instance: instance.to_owned(),
            cgroup_id: id,
            cgroup_path: dir.display().to_string(),
            started_at_ms: at_ms,
            ended_at_ms: None,
            execs: 0,
            peak_bytes: 0,
            peak_source: PeakSource::None,
            oom_kills: 0,
            limits: self.cgroups.limits(&dir).unwrap_or_default(),
            input_bytes,
            connections: 0,
            requests: 0,
        };
        tracing::info!(
            function,
            instance,
            cgroup = rel_path,
            method = peak.method(),
            "bound"
        );
        let mut out = Vec::new();
        if self.dirty.remove(function) {
            out.push(Effect::Recompute {
                function: function.to_owned(),
                at_ms,
            });
        }
        out.push(Effect::Enforce {
            record: rec.clone(),
            mkdir_ts_ns: None,
        });
        out.push(Effect::AddHour {
            function: function.to_owned(),
            at_ms,
            delta: HourDelta {
                instances_started: 1,
                ..Default::default()
            },
        });
        self.awaiting.insert(id);
        self.bound.insert(id, peak);
        self.live.insert(id, rec);
        Ok((id, out))
    }

    /// The pooled cgroup at `rel_path`, still the one `cgroup_id` names and not an instance
    /// yet: its id and directory.
    fn bindable(&mut self, rel_path: &str, cgroup_id: u64) -> Result<(u64, PathBuf), BindError> {
        let (id, dir) = self.pooled(rel_path)?;
        if id != cgroup_id {
            return Err(BindError::Replaced {
                path: rel_path.to_owned(),
                expected: cgroup_id,
                found: id,
            });
        }
        // The platform says what the cgroup runs: no need to wait for a runtime's file.
        self.pending.remove(&id);
        if let Some(rec) = self.live.get(&id) {
            let (function, instance) = (rec.function.clone(), rec.instance.clone());
            let path = rel_path.to_owned();
            return Err(if self.bound.contains_key(&id) {
                BindError::AlreadyBound {
                    path,
                    function,
                    instance,
                }
            } else {
                BindError::PathInstance {
                    path,
                    function,
                    instance,
                }
            });
        }
        Ok((id, dir))
    }

    /// Starts the use's peak: the watermark reset through the cgroup's directory opened below
    /// its watched root and checked to be cgroup `id`.
    fn reset_use_peak(&self, rel_path: &str, id: u64) -> Result<UsePeak, BindError> {
        let root = self
            .registry
            .roots()
            .into_iter()
            .find(|r| {
                rel_path
                    .strip_prefix(r.as_str())
                    .is_some_and(|t| t.starts_with('/'))
            })
            .ok_or_else(|| BindError::Outside {
                path: rel_path.to_owned(),
            })?;
        self.cgroups
            .reset_peak(&root, rel_path, id)
            .map_err(|e| match e {
                CgroupfsError::Replaced {
                    expected, found, ..
                } => BindError::Replaced {
                    path: rel_path.to_owned(),
                    expected,
                    found,
                },
                CgroupfsError::OutsideRoot { .. } => BindError::Outside {
                    path: rel_path.to_owned(),
                },
                _ => BindError::NotFound {
                    path: rel_path.to_owned(),
                },
            })
    }

    /// The use of a pooled cgroup ends (POST /v1/release): its record is closed with the peak
    /// of this use. Returns the closed record.
    pub fn release(
        &mut self,
        rel_path: &str,
        at_ms: u64,
    ) -> Result<(InstanceRecord, Vec<Effect>), BindError> {
        let (id, _) = self.pooled(rel_path)?;
        if !self.bound.contains_key(&id) {
            return Err(BindError::NotBound {
                path: rel_path.to_owned(),
            });
        }
        if let Some(mut rec) = self.live.remove(&id) {
            self.refresh_watermark(&mut rec, false);
            self.live.insert(id, rec);
        }
        let mut out = Vec::new();
        let rec = self
            .close(id, at_ms, &mut out)
            .ok_or_else(|| BindError::NotBound {
                path: rel_path.to_owned(),
            })?;
        Ok((rec, out))
    }

    /// A cgroup below a watched root that exists (id, directory), for bind and release.
    pub(super) fn pooled(&mut self, rel_path: &str) -> Result<(u64, PathBuf), BindError> {
        if rel_path.split('/').any(|c| c == "." || c == "..") || !rel_path.starts_with('/') {
            return Err(BindError::Invalid(format!(
                "cgroup {rel_path:?}: give the path below the hierarchy (\"/pool/cg-1\") or \
                 the absolute directory, without . or .."
            )));
        }
        if !self.registry.is_under_root(rel_path)
            || self.registry.roots().iter().any(|r| r == rel_path)
        {
            return Err(BindError::Outside {
                path: rel_path.to_owned(),
            });
        }
        let dir = self.cgroups.dir(rel_path);
        let id = self
            .cgroups
            .cgroup_id(&dir)
            .ok_or_else(|| BindError::NotFound {
                path: rel_path.to_owned(),
            })?;
        if self.table.get(id).is_none() {
            // Created before the agent looked (or its mkdir is still in the ring).
            let identity = self.registry.classify(rel_path);
            self.table
                .insert(id, rel_path.to_owned(), identity, crate::clock::now_ms());
        }
        Ok((id, dir))
    }
}
