//! Start-up recovery: what the last run left brought into the tracker before the event loop
//! starts. The last run's live instances resumed (when the kernel side kept recording while no
//! agent ran), the events queued meanwhile applied (a replaced kernel side's first), the
//! cgroups there now scanned, instances gone meanwhile closed; then reactive mode's state taken
//! back (burst watches, squeeze holds).

use std::path::Path;

use crate::{
    clock::now_ms,
    kernel::cgroupfs::{self, MemoryHierarchy},
    kernel::probes::{replaced::CarriedRing, Probes},
    kernel::ring::EventRing,
    model::{tracker::Found, InstanceRecord},
    policy::{actuator::Actuator, squeeze::release_kept_holds},
    store::Store,
};

use super::Daemon;

/// What start-up hands to recovery.
pub(super) struct LastRun<'a> {
    pub probes: &'a mut Probes,
    pub store: &'a Store,
    /// Rings of a replaced kernel side (another ring size, another probes.disable...).
    pub carried: Vec<CarriedRing>,
    pub roots: &'a [String],
    /// Cgroups created from here on are new instances, whether their mkdir event or the scan
    /// reports them first.
    pub agent_start_ms: u64,
}

/// Brings the last run's instances and the events queued while no agent ran into the tracker,
/// then the cgroups there now.
pub(super) fn recover(
    daemon: &mut Daemon,
    ring: &mut EventRing,
    last: LastRun<'_>,
) -> anyhow::Result<()> {
    let LastRun {
        probes,
        store,
        mut carried,
        roots,
        agent_start_ms,
    } = last;
    let mut stale = store.live_instances().unwrap_or_else(|e| {
        tracing::error!("reading the live instances of the last run: {e}");
        Vec::new()
    });
    // Records the last run read, applied and saved, but was killed before giving back.
    let mark = store.ring_mark();
    let applied_in = |ring: &EventRing| {
        mark.as_ref()
            .filter(|(id, _)| id == ring.identity())
            .map_or(0, |(_, pos)| *pos)
    };
    let recorded_meanwhile = probes.adopted() || !carried.is_empty();
    if recorded_meanwhile {
        // The kernel side kept recording while no agent ran: the last run's live instances
        // first, then what the ring holds (their ends with exact peaks, instances that came
        // and went meanwhile), then the scan finds only what neither knows.
        resume(daemon, std::mem::take(&mut stale));
    }
    // A replaced kernel side's records: the older, before anything of the new one.
    for c in &mut carried {
        let applied = applied_in(&c.ring);
        let n = daemon.drain_ring_after(&mut c.ring, applied);
        tracing::info!(
            "read {n} events the replaced kernel side {} queued while no agent ran",
            c.set
        );
    }
    if probes.adopted() {
        let applied = applied_in(ring);
        let n = daemon.drain_ring_after(ring, applied);
        tracing::info!("read {n} events queued while no agent ran");
    }
    scan_existing(daemon, probes, stale, roots, agent_start_ms)?;
    if recorded_meanwhile {
        // What came in while the queue was applied and the scan ran first: reconciliation must
        // not close an instance whose exact end waits in the ring (seen with churn through a
        // restart: ended with no peak, then recorded again from its rmdir). It closes resumed
        // instances whose cgroup is gone with no rmdir in the ring (it overflowed).
        daemon.reconcile(ring, now_ms());
        save_recorded_meanwhile(probes, store, carried, ring);
    }
    Ok(())
}

/// The last run's reactive state, once the live instances are known: its instances guarded
/// again, its squeeze holds taken back (or released, with the squeeze off).
pub(super) fn resume_reactive(
    daemon: &mut Daemon,
    actuator: &Actuator,
    hierarchy: &MemoryHierarchy,
    store: &Store,
) {
    if let Some(b) = daemon.effects.burst.as_mut() {
        let effects = b.rearm(&daemon.tracker);
        daemon.carry_out(effects);
    }
    match daemon.effects.squeeze.as_mut() {
        Some(s) => s.adopt(&daemon.tracker),
        None => {
            let effects = release_kept_holds(actuator, hierarchy, store, &daemon.tracker);
            daemon.carry_out(effects);
        }
    }
}

/// Saves at once what start-up applied from the rings (a replaced kernel side's, then the
/// adopted one's), each with its ring mark, and gives their room back; then unpins the
/// replaced sets. Until then a restart finds them and reads them again, skipping what the ring
/// mark says was saved: an agent killed moments after its start would otherwise apply the same
/// events twice.
fn save_recorded_meanwhile(
    probes: &Probes,
    store: &Store,
    carried: Vec<CarriedRing>,
    ring: &mut EventRing,
) {
    let save = |ring: &EventRing| {
        store
            .set_ring_mark(ring.identity(), ring.position())
            .and_then(|()| store.flush())
    };
    for mut c in carried {
        match save(&c.ring) {
            Ok(()) => {
                c.ring.commit(c.ring.position());
                probes.release_carried(&c.set);
            }
            // Kept pinned: the next start reads it again.
            Err(e) => tracing::error!(
                "saving the events of the replaced kernel side {}: {e}; it stays pinned",
                c.set
            ),
        }
    }
    match save(ring) {
        Ok(()) => ring.commit(ring.position()),
        Err(e) => tracing::error!("saving the events queued while no agent ran: {e}"),
    }
}

/// Puts the last run's live instances back into the tracker as they were saved, before the
/// events queued meanwhile are applied to them.
fn resume(daemon: &mut Daemon, stale: Vec<InstanceRecord>) {
    for rec in stale {
        let Some(rel) = daemon
            .tracker
            .cgroups()
            .rel_path(Path::new(&rec.cgroup_path))
        else {
            continue;
        };
        let (id, started) = (rec.cgroup_id, rec.started_at_ms);
        let effects = daemon.tracker.add_cgroup(
            id,
            &rel,
            started,
            Some(rec),
            Found::Existing {
                new_since_start: false,
            },
        );
        daemon.carry_out(effects);
    }
}

/// Audit records read at start-up for [`own_writes`]: a cgroup whose live record the last
/// agent did not save before it died had its limits written moments before, among the newest.
const OWN_WRITES_SCANNED: usize = 10_000;

/// The memory.max the agent last wrote (or was about to, when killed) into each cgroup, from
/// the newest audit records: what a restarted agent must not take for a runtime's limit.
pub(super) fn own_writes(store: &Store) -> std::collections::HashMap<u64, u64> {
    let mut out = std::collections::HashMap::new();
    let records = match store.audit::<crate::model::audit::AuditRecord>(OWN_WRITES_SCANNED) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("reading the audit for the limits written before: {e}");
            return out;
        }
    };
    // Newest first: the first seen per cgroup is its last.
    for r in records {
        let max = match r.outcome.as_str() {
            "ok" | "partial" => r.written.max_bytes.or(r.new.max_bytes),
            "interrupted" => r.new.max_bytes,
            _ => None,
        };
        if let Some(max) = max {
            out.entry(r.cgroup_id).or_insert(max);
        }
    }
    out
}

/// Registers cgroups that existed before the agent started, resuming their store records.
fn scan_existing(
    daemon: &mut Daemon,
    probes: &mut Probes,
    stale: Vec<InstanceRecord>,
    roots: &[String],
    agent_start_ms: u64,
) -> anyhow::Result<()> {
    let h = daemon.tracker.cgroups().clone();
    let mut found = 0usize;
    for root in roots {
        let dirs = match cgroupfs::descendants(&h.dir(root)) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("scanning {root}: {e}");
                continue;
            }
        };
        for dir in dirs {
            // Any of these may vanish under us: skip, never fail start-up.
            let (Some(rel), Ok(id)) = (h.rel_path(&dir), cgroupfs::cgroup_id(&dir)) else {
                continue;
            };
            let usage = h.usage(&dir).unwrap_or(0);
            let peak = h.peak(&dir).ok().flatten().unwrap_or(usage);
            if let Err(e) = probes.watch(id, usage, peak) {
                tracing::warn!("watching {}: {e}", dir.display());
                continue;
            }
            for tid in h.tids(&dir).unwrap_or_default() {
                let _ = probes.track_task(tid, id);
            }
            let resumed = stale
                .iter()
                .find(|r| r.cgroup_id == id && Path::new(&r.cgroup_path) == dir)
                .cloned();
            let started = resumed
                .as_ref()
                .map(|r| r.started_at_ms)
                .unwrap_or_else(|| created_ms(&dir));
            let new_since_start = resumed.is_none() && started >= agent_start_ms;
            let effects = daemon.tracker.add_cgroup(
                id,
                &rel,
                started,
                resumed,
                Found::Existing { new_since_start },
            );
            daemon.carry_out(effects);
            found += 1;
        }
    }
    let effects = daemon.tracker.close_vanished(stale, now_ms());
    daemon.carry_out(effects);
    tracing::info!(
        "watching {found} existing cgroups, {} live instances",
        daemon.tracker.live_count()
    );
    Ok(())
}

/// Best estimate of when a pre-existing cgroup was created: its directory's ctime.
fn created_ms(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .map(|m| (m.ctime() as u64) * 1000 + (m.ctime_nsec() as u64) / 1_000_000)
        .unwrap_or_else(|_| now_ms())
}
