//! What the events alone do not keep current: the kernel's watermark and the limits of live
//! instances read again, instances whose cgroup is gone with no rmdir event (events lost), and
//! records of instances that ended while no agent ran.
use std::path::Path;

use super::{Cgroups, Effect, Tracker};
use crate::{
    kernel::cgroupfs::CgroupfsError,
    model::{HourDelta, InstanceRecord, PeakSource},
};

impl<C: Cgroups> Tracker<C> {
    /// Re-reads the kernel watermark and request counts of a live instance and saves it if
    /// they grew; requests counted since the last reading go to the hour of `at_ms`.
    pub(super) fn refresh(&mut self, id: u64, at_ms: u64, out: &mut Vec<Effect>) {
        let Some(mut rec) = self.live.remove(&id) else {
            return;
        };
        let before = (rec.peak_bytes, rec.peak_source, rec.limits);
        self.refresh_watermark(&mut rec, false);
        let counted = self.count_requests(&mut rec, at_ms, out);
        if counted || (rec.peak_bytes, rec.peak_source, rec.limits) != before {
            out.push(Effect::Save(rec.clone()));
        }
        self.live.insert(id, rec);
    }

    /// Adds what the kernel counted of the instance's connections and requests since the
    /// last reading to the instance and to the hour of `at_ms`; true when that was anything.
    /// The record holds the totals read so far, so a restart (the pinned kernel side kept
    /// counting) goes on from them.
    pub(super) fn count_requests(
        &mut self,
        rec: &mut InstanceRecord,
        at_ms: u64,
        out: &mut Vec<Effect>,
    ) -> bool {
        // A pooled cgroup's counts span all its uses: a use's requests are the platform's
        // to report (bind per invocation).
        if self.bound.contains_key(&rec.cgroup_id) {
            return false;
        }
        let Some(counts) = self.requests.as_mut() else {
            return false;
        };
        let Some(rel) = self.cgroups.rel_path(Path::new(&rec.cgroup_path)) else {
            return false;
        };
        let Some(now) = counts.read(rec.cgroup_id, &rel) else {
            return false;
        };
        let connections = now.connections.saturating_sub(rec.connections);
        let requests = now.requests.saturating_sub(rec.requests);
        if connections == 0 && requests == 0 {
            return false;
        }
        rec.connections += connections;
        rec.requests += requests;
        out.push(Effect::AddHour {
            function: rec.function.clone(),
            at_ms,
            delta: HourDelta {
                connections,
                requests,
                ..Default::default()
            },
        });
        true
    }

    /// `first`: the instance was just registered (a controller that is off is said then, and
    /// quietly afterwards).
    pub(super) fn refresh_watermark(&mut self, rec: &mut InstanceRecord, first: bool) {
        self.stats.watermark_reads += 1;
        let dir = Path::new(&rec.cgroup_path);
        // Limits may be set after mkdir (by the platform, or later by EMARS): keep them current.
        match self.cgroups.limits(dir) {
            Ok(limits) => rec.limits = limits,
            // Said once per instance; its reads stay quiet (debug) afterwards.
            Err(e @ CgroupfsError::ControllerOff { .. }) if first => tracing::warn!("{e}"),
            Err(_) => {}
        }
        if let Some(p) = self.bound.get_mut(&rec.cgroup_id) {
            match self.cgroups.use_peak(dir, p) {
                Ok((w, exact)) if w >= rec.peak_bytes => {
                    rec.peak_bytes = w;
                    rec.peak_source = if exact {
                        PeakSource::UseWatermark
                    } else {
                        PeakSource::LifetimeWatermark
                    };
                }
                Ok(_) => {}
                Err(CgroupfsError::Gone { .. }) => self.stats.vanished_reads += 1,
                Err(e) => tracing::debug!("{e}"),
            }
            return;
        }
        match self.cgroups.peak(dir) {
            Ok(Some(w)) if w >= rec.peak_bytes => {
                rec.peak_bytes = w;
                rec.peak_source = PeakSource::KernelWatermark;
            }
            Ok(_) => {}
            Err(CgroupfsError::Gone { .. }) => self.stats.vanished_reads += 1,
            Err(e @ CgroupfsError::ControllerOff { .. }) => tracing::debug!("{e}"),
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// Closes live instances whose cgroup is gone (or replaced) although no rmdir event came:
    /// the safety net for events lost to a full ring buffer. The others get their kernel
    /// watermark read again: without charge events, what keeps a long-lived instance's peak
    /// current between its execs and exits.
    pub fn reconcile(&mut self, now_ms: u64) -> Vec<Effect> {
        let (mut present, mut gone): (Vec<_>, Vec<_>) = self
            .live
            .iter()
            .map(|(id, rec)| {
                let here = self.cgroups.cgroup_id(Path::new(&rec.cgroup_path)) == Some(*id);
                (*id, here)
            })
            .partition(|(_, here)| *here);
        gone.sort_unstable();
        present.sort_unstable();
        let mut out = Vec::new();
        for (id, _) in present {
            self.refresh(id, now_ms, &mut out);
        }
        for (id, _) in gone {
            tracing::warn!(
                cgroup = id,
                "instance ended without an rmdir event (events lost?)"
            );
            self.end(id, 0, 0, now_ms, &mut out);
            self.stats.reconciled += 1;
        }
        out
    }

    /// Closes store records of instances whose cgroup disappeared while the agent was down.
    pub fn close_vanished(&mut self, stale: Vec<InstanceRecord>, now_ms: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        for mut rec in stale {
            if self.live.contains_key(&rec.cgroup_id) {
                continue;
            }
            rec.ended_at_ms = Some(now_ms.max(rec.started_at_ms));
            tracing::info!(
                function = rec.function,
                instance = rec.instance,
                "instance ended while the agent was down"
            );
            out.push(Effect::Save(rec));
        }
        out
    }
}
