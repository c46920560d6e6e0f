//! Kernel events applied: a whole batch read from the ring ([`Tracker::apply_batch`]: its
//! order, and the instances that came and went within it), and one event ([`Tracker::apply`]).
use std::collections::{HashMap, HashSet};

use super::{Cgroups, Effect, Found, Tracker};
use crate::{
    kernel::events::{KernelEvent, Timed},
    model::{HourDelta, InstanceRecord, PeakSource},
};

impl<C: Cgroups> Tracker<C> {
    /// Applies a batch of events read from the ring in the order [`mkdirs_first`] gives, and
    /// hands each event's effects to `carry_out` before the next one is applied: a new
    /// instance's limits are written, and its record saved, before anything else about it.
    /// A mkdir whose cgroup an rmdir later in the batch removes ([`gone_in_batch`]: it came and
    /// went before the agent read of it) gets no limits: the cgroup is gone, and its path may
    /// name another by now. Its record is saved once, closed, by that rmdir.
    pub fn apply_batch(
        &mut self,
        batch: Vec<Timed>,
        mut carry_out: impl FnMut(&mut Self, Vec<Effect>),
    ) {
        let gone = gone_in_batch(&batch);
        for t in mkdirs_first(batch) {
            self.came_and_went = match t.event {
                KernelEvent::CgroupMkdir { id, .. } if gone.contains(&(id, t.ts_ns)) => Some(id),
                _ => None,
            };
            let effects = self.apply(t.event, crate::clock::wall_ms_of(t.ts_ns), t.ts_ns);
            self.came_and_went = None;
            carry_out(self, effects);
        }
    }

    /// Applies one kernel event; `at_ms` is its wall-clock time, `ts_ns` its kernel time.
    pub fn apply(&mut self, event: KernelEvent, at_ms: u64, ts_ns: u64) -> Vec<Effect> {
        self.stats.events += 1;
        let mut out = Vec::new();
        match event {
            KernelEvent::CgroupMkdir {
                id,
                path,
                truncated,
                ..
            } => {
                let path = if truncated {
                    match self.full_path(id, &path) {
                        Some(p) => p,
                        None => return out,
                    }
                } else {
                    path
                };
                out = self.add_cgroup(id, &path, at_ms, None, Found::Mkdir { ts_ns });
            }
            KernelEvent::CgroupRmdir {
                id,
                peak,
                watermark,
                ..
            } => {
                // Gone before its metadata was read: named with what there is now.
                self.settle(id, true, &mut out);
                self.end(id, peak, watermark, at_ms, &mut out)
            }
            KernelEvent::TaskAttach { .. } => {}
            KernelEvent::Exec { id, pid, .. } => {
                let Some(id) = self.resolve(id, pid, at_ms, &mut out) else {
                    return out;
                };
                // runc has written its state by the time the container's program is exec'd.
                if self.pending.contains_key(&id) && !self.settle(id, false, &mut out) {
                    if let Some(p) = self.pending.get_mut(&id) {
                        p.execs += 1;
                    }
                    return out;
                }
                self.update(id, at_ms, &mut out, |rec| {
                    rec.execs += 1;
                    HourDelta {
                        execs: 1,
                        ..Default::default()
                    }
                });
                self.refresh(id, at_ms, &mut out);
            }
            KernelEvent::Exit { id, .. } => {
                self.settle(id, false, &mut out);
                self.refresh(id, at_ms, &mut out)
            }
            // The kernel side's charge peak spans a pooled cgroup's every use: not for a bound one.
            KernelEvent::MemPeak { id, .. } if self.bound.contains_key(&id) => {}
            KernelEvent::MemPeak { id, peak } => {
                self.settle(id, false, &mut out);
                if let Some(rec) = self.live.get_mut(&id) {
                    if peak > rec.peak_bytes {
                        rec.peak_bytes = peak;
                        rec.peak_source = PeakSource::ChargeEvents;
                    }
                }
                self.refresh(id, at_ms, &mut out);
            }
            KernelEvent::OomVictim { id, pid } => {
                let Some(id) = self.resolve(id, pid, at_ms, &mut out) else {
                    tracing::debug!(pid, "OOM victim outside watched cgroups");
                    return out;
                };
                self.settle(id, false, &mut out);
                tracing::warn!(pid, cgroup = id, "OOM kill in a watched instance");
                self.update(id, at_ms, &mut out, |rec| {
                    rec.oom_kills += 1;
                    HourDelta {
                        oom_kills: 1,
                        ..Default::default()
                    }
                });
                // An OOM raises the function's recommendation at once, not at the next period;
                // with the peak as the kernel has it now.
                self.refresh(id, at_ms, &mut out);
                if let Some(f) = self.live.get(&id).map(|r| r.function.clone()) {
                    out.push(Effect::Recompute { function: f, at_ms });
                }
            }
        }
        out
    }

    /// The whole path of a cgroup whose event carried a cut-short path: looked up by id below
    /// the last complete directory of what the event carried. None (and counted) when it
    /// cannot be found: an untracked cgroup beats one filed under a wrong name.
    pub(super) fn full_path(&mut self, id: u64, cut: &str) -> Option<String> {
        self.stats.paths_truncated += 1;
        let parent = cut.rsplit_once('/').map_or("/", |(p, _)| p);
        let found = self
            .cgroups
            .find_by_id(&self.cgroups.dir(parent), id)
            .and_then(|d| self.cgroups.rel_path(&d));
        if found.is_none() {
            self.stats.paths_unresolved += 1;
            tracing::warn!(
                cgroup = id,
                "cgroup path longer than an event carries, and not found: {cut}…"
            );
        }
        found
    }

    /// The watched cgroup of an event: the kernel's id if it knows the cgroup, else the
    /// task's cgroup from /proc (kernels or hosts where task tracking is incomplete).
    pub(super) fn resolve(
        &mut self,
        id: u64,
        pid: u32,
        at_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Option<u64> {
        if id != 0 && self.table.get(id).is_some() {
            return Some(id);
        }
        let rel = self.cgroups.cgroup_of(pid)?;
        if let Some(known) = self.table.by_path(&rel) {
            return Some(known);
        }
        if !self.registry.is_under_root(&rel) {
            return None;
        }
        let new_id = self.cgroups.cgroup_id(&self.cgroups.dir(&rel))?;
        // Its mkdir event was lost or never sent (program off): a new instance all the same.
        out.extend(self.add_cgroup(new_id, &rel, at_ms, None, Found::Late));
        Some(new_id)
    }

    pub(super) fn update(
        &mut self,
        id: u64,
        at_ms: u64,
        out: &mut Vec<Effect>,
        f: impl FnOnce(&mut InstanceRecord) -> HourDelta,
    ) {
        let Some(rec) = self.live.get_mut(&id) else {
            return;
        };
        let delta = f(rec);
        out.push(Effect::AddHour {
            function: rec.function.clone(),
            at_ms,
            delta,
        });
        out.push(Effect::Save(rec.clone()));
    }
}

/// The order to apply a batch of events read from the ring: every mkdir first (its limits are
/// due at once, and exec/exit/rmdir records that did not wake the agent may be queued ahead of
/// it), unless an earlier event in the batch is about the same cgroup id (an inode reused after
/// an rmdir still queued): then it keeps its place. The rest keep their order.
pub fn mkdirs_first(batch: Vec<Timed>) -> Vec<Timed> {
    let mut seen = HashSet::new();
    let mut first = Vec::new();
    let mut rest = Vec::with_capacity(batch.len());
    for t in batch {
        let id = t.event.cgroup_id();
        if matches!(t.event, KernelEvent::CgroupMkdir { .. }) && !seen.contains(&id) {
            first.push(t);
        } else {
            seen.insert(id);
            rest.push(t);
        }
    }
    first.extend(rest);
    first
}

/// The mkdirs of a batch whose cgroup is removed later in the same batch, as (cgroup id, kernel
/// time): instances that came and went before the agent read of them (it was down, or behind).
/// Their limits are not written: the cgroup is gone, and its path may already name another.
pub fn gone_in_batch(batch: &[Timed]) -> HashSet<(u64, u64)> {
    let mut gone = HashSet::new();
    let mut open: HashMap<u64, u64> = HashMap::new();
    for t in batch {
        match t.event {
            KernelEvent::CgroupMkdir { id, .. } => {
                open.insert(id, t.ts_ns);
            }
            KernelEvent::CgroupRmdir { id, .. } => {
                if let Some(ts) = open.remove(&id) {
                    gone.insert((id, ts));
                }
            }
            _ => {}
        }
    }
    gone
}
