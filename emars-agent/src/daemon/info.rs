//! The one place the agent's figures in /v1/info (and so in /metrics, which encodes the same
//! [`AgentInfo`]) are assembled: what is known at start-up, then, once a second, what the
//! tracker, the kernel side, the effects, the actuator and reactive mode count. Each stage
//! gives its figures as data (`BurstGuard::figures`, `Squeezer::figures`, the tracker's and
//! the actuator's stats); only this file puts them into the answer. The API fills in its own
//! parts (admissions, the model's footprint, the function cap) when it answers.

use std::sync::{atomic::AtomicU64, atomic::Ordering, RwLock};

use crate::{
    clock::now_ms,
    kernel::{
        cgroupfs::{CgroupVersion, MemoryHierarchy, UsePeak},
        probes::Probes,
    },
    model::{
        tracker::Tracker, AgentInfo, EnforcementInfo, KernelCounters, MetadataInfo, ReactiveInfo,
        StoreMovedAside,
    },
    policy::{actuator::Actuator, burst::BurstFigures, squeeze::SqueezeFigures, Policy},
};

use super::EffectStats;

/// /v1/info as start-up knows it: the kernel, the hierarchy, the probes and how they loaded.
pub(super) fn at_start(
    hierarchy: &MemoryHierarchy,
    roots: &[String],
    probes: &Probes,
    store_moved_aside: Option<StoreMovedAside>,
) -> AgentInfo {
    let report = &probes.report;
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        // The store's: each request takes it from there (api::status).
        agent_id: String::new(),
        kernel: kernel_release(),
        cgroup_mode: hierarchy.version.as_str().into(),
        memory_hierarchy: hierarchy.mount.display().to_string(),
        roots: roots
            .iter()
            .map(|r| hierarchy.dir(r).display().to_string())
            .collect(),
        features: report.features.clone(),
        programs: report.programs.clone(),
        fallbacks: report.fallbacks.clone(),
        notes: report.notes.clone(),
        events_received: 0,
        events_lost: 0,
        instances_reconciled: 0,
        container_metadata: Default::default(),
        cgroups_unnamed: Default::default(),
        started_at_ms: now_ms(),
        enforcement: Default::default(),
        fleet: Default::default(),
        kernel_counters: Default::default(),
        probes_pinned: report.pinned.clone(),
        probes_adopted: report.adopted,
        probes_unpinned: report.unpinned.clone(),
        model: Default::default(),
        reactive: Default::default(),
        per_use_peak: per_use_peak_method(hierarchy, roots),
        function_cap: Default::default(),
        store_moved_aside,
    }
}

/// What the event loop's tick reads the figures from.
pub(super) struct Sources<'a> {
    pub tracker: &'a Tracker,
    pub probes: &'a Probes,
    pub policy: &'a Policy,
    pub actuator: &'a Actuator,
    pub effects: EffectStats,
    pub burst: Option<BurstFigures>,
    pub squeeze: Option<SqueezeFigures>,
}

/// Brings /v1/info's figures up to date. Not waiting for the lock: a reader on a
/// (lower-priority) API thread may hold it, and the event loop must not queue behind the API;
/// the next tick updates.
pub(super) fn refresh(info: &RwLock<AgentInfo>, s: Sources<'_>) {
    let lost = s.probes.events_lost();
    let Ok(mut i) = info.try_write() else {
        return;
    };
    if lost > i.events_lost {
        tracing::warn!(
            "{} kernel events lost (ring buffer full)",
            lost - i.events_lost
        );
    }
    let stats = &s.tracker.stats;
    i.events_received = stats.events;
    i.events_lost = lost;
    i.instances_reconciled = stats.reconciled;
    i.container_metadata = MetadataInfo {
        waiting: s.tracker.pending_count() as u64,
        waited: stats.metadata_waits,
        named_after_wait: stats.metadata_named,
        fallbacks: stats.metadata_fallbacks,
    };
    i.cgroups_unnamed = stats
        .unnamed_by_reason()
        .map(|(why, n)| (why.as_str().to_owned(), n))
        .collect();
    i.kernel_counters = KernelCounters {
        paths_truncated: stats.paths_truncated,
        paths_unresolved: stats.paths_unresolved,
        ..s.probes.kernel_counters()
    };
    i.programs = s.probes.program_stats();
    if let Some(b) = &s.burst {
        burst_info(&mut i.reactive, b);
    }
    if let Some(q) = &s.squeeze {
        squeeze_info(&mut i.reactive, q);
    }
    i.enforcement = enforcement(s.policy, s.actuator, &s.effects);
}

fn enforcement(policy: &Policy, actuator: &Actuator, effects: &EffectStats) -> EnforcementInfo {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let a = &actuator.stats;
    EnforcementInfo {
        mode: format!("{:?}", policy.mode()).to_lowercase(),
        new_instance_writes: effects.enforced,
        writes_ok: load(&a.writes_ok),
        unchanged: load(&a.unchanged),
        writes_failed: load(&a.writes_failed),
        refusals: load(&a.refusals),
        audit_errors: load(&a.audit_errors),
        max_mkdir_to_write_us: effects.max_enforce_delay_us,
    }
}

/// The burst guard's part of `reactive` (the API counts admissions into the same section).
fn burst_info(r: &mut ReactiveInfo, b: &BurstFigures) {
    r.enabled = true;
    r.signal = b.signal.clone();
    r.watched = b.watched;
    r.signals = b.signals;
    r.raises = b.raises;
    r.denied = b.denied;
    r.watch_errors = b.watch_errors;
    r.reaction_p50_us = b.reaction_us(50.0);
    r.reaction_p99_us = b.reaction_us(99.0);
    r.reaction_max_us = b.reaction_max_us();
}

/// The squeeze's part of `reactive`.
fn squeeze_info(r: &mut ReactiveInfo, q: &SqueezeFigures) {
    r.squeeze = true;
    r.pressure_sources = q.pressure_sources.clone();
    r.pressure_errors = q.pressure_errors.clone();
    r.pressure_signals = q.pressure_signals;
    r.idle_now = q.idle_now;
    r.squeezes = q.squeezes;
    r.squeezed_now = q.squeezed_now;
    r.reclaimed_bytes = q.reclaimed_bytes;
    r.releases = q.releases;
    r.squeeze_failed = q.failed;
    r.last_pressure_episode_ms = q.last_pressure_episode_ms;
    r.last_squeeze_ms = q.last_squeeze_ms;
}

/// How this kernel measures one use of a pooled cgroup. v2: a per-descriptor reset of a
/// watched root's memory.peak, which changes nothing for any other reader; v1 is known
/// without trying (its reset would clear the root's own watermark).
fn per_use_peak_method(hierarchy: &MemoryHierarchy, roots: &[String]) -> String {
    match hierarchy.version {
        CgroupVersion::V1 => UsePeak::V1.method().to_owned(),
        CgroupVersion::V2 => roots
            .iter()
            .find_map(|r| hierarchy.open_root(r).and_then(|d| d.reset_peak()).ok())
            .map(|p| p.method().to_owned())
            .unwrap_or_default(),
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The burst guard's figures land in `reactive` as nearest-rank percentiles.
    #[test]
    fn burst_figures_fill_the_reactive_section() {
        let mut r = ReactiveInfo::default();
        burst_info(
            &mut r,
            &BurstFigures {
                signal: "memory.events".into(),
                watched: 3,
                raises: 2,
                reactions_us: vec![100, 300],
                ..Default::default()
            },
        );
        assert!(r.enabled);
        assert_eq!((r.watched, r.raises), (3, 2));
        assert_eq!(
            (r.reaction_p50_us, r.reaction_p99_us, r.reaction_max_us),
            (Some(100), Some(300), Some(300))
        );
    }
}
