//! Holds given back: the rules of a release (never over a value changed since the hold), the
//! holds kept in the store across restarts, and what other writers' limits mean for a hold.

use std::path::Path;

use super::*;

/// What limits another writer put in force mean for `hold`: None when they do not touch it (the
/// squeeze's own, or memory.high left as it was), Some(None) when memory.high is the hold again,
/// Some(Some(high)) when they replaced it with `high`.
pub(super) fn written_over(
    hold: &SqueezeHold,
    limits: Limits,
    by: LimitsBy,
) -> Option<Option<u64>> {
    if matches!(by, LimitsBy::SqueezeHold | LimitsBy::SqueezeRelease) {
        return None;
    }
    let high = limits.high_bytes?;
    Some((!same_limit(Some(high), Some(hold.hold_bytes))).then_some(high))
}

/// How a release went.
pub(super) enum Released {
    /// Put back: memory.high (the soft limit on v1) is this now.
    Yes(u64),
    /// Not written: the hold was not there any more (released already, changed since, or the
    /// cgroup gone).
    Dropped,
    Failed,
}

/// Puts back what `hold` replaced in `rec`'s cgroup (audited, reason "release"), and drops the
/// kept hold. A cgroup that holds something else than the hold now was changed since (an API
/// write, apply, a burst raise, the platform): that is said and left as it is.
pub(super) fn release_hold(
    actuator: &Actuator,
    hierarchy: &MemoryHierarchy,
    store: &Store,
    rec: &InstanceRecord,
    hold: &SqueezeHold,
    why: &str,
) -> Released {
    let key = key_of(rec);
    let (Some(back), Ok(now)) = (
        hold.release_to(),
        hierarchy.limits(Path::new(&rec.cgroup_path)),
    ) else {
        forget_hold(store, key);
        return Released::Dropped;
    };
    if !same_limit(now.high_bytes, Some(hold.hold_bytes)) {
        say_not_held(rec, hold, now.high_bytes);
        forget_hold(store, key);
        return Released::Dropped;
    }
    let mut current = rec.clone();
    current.limits = now;
    let req = LimitRequest {
        max_bytes: None,
        high_bytes: Some(back),
    };
    let w = actuator.write_signalled(
        &current,
        req,
        BelowUsage::Raise,
        Reason::Release,
        None,
        Some(why),
    );
    match w.result {
        Ok(_) => {
            tracing::info!(
                function = rec.function,
                instance = rec.instance,
                "squeeze released: {why}"
            );
            forget_hold(store, key);
            Released::Yes(back)
        }
        Err(e) => {
            // Kept: the next start tries again.
            tracing::warn!(cgroup = rec.cgroup_path, "squeeze not released: {e}");
            Released::Failed
        }
    }
}

/// At start-up with the squeeze off (or writes not allowed): the holds of the last run are
/// released at once, where writes are allowed; else they stay kept for a run that may write.
pub fn release_kept_holds<C: Cgroups>(
    actuator: &Actuator,
    hierarchy: &MemoryHierarchy,
    store: &Store,
    tracker: &Tracker<C>,
) -> Vec<Effect> {
    let holds = kept_holds(store, tracker);
    if holds.is_empty() {
        return Vec::new();
    }
    if !actuator.writes_allowed() {
        tracing::warn!(
            "{} squeeze hold(s) of an earlier run left in place: releasing them needs \
             policy.mode = \"enforce\"",
            holds.len()
        );
        return Vec::new();
    }
    let why = "the squeeze is off in this run";
    let released: Vec<Effect> = holds
        .iter()
        .filter_map(|(_, hold, rec)| {
            match release_hold(actuator, hierarchy, store, rec, hold, why) {
                Released::Yes(back) => Some(released_to(rec.cgroup_id, back)),
                Released::Dropped | Released::Failed => None,
            }
        })
        .collect();
    tracing::info!(
        "{} squeeze hold(s) of the last run released",
        released.len()
    );
    released
}

/// A hold released: memory.high (the soft limit on v1) put back to `back`.
pub(super) fn released_to(cgroup_id: u64, back: u64) -> Effect {
    Effect::LimitsInForce {
        cgroup_id,
        limits: Limits {
            max_bytes: None,
            high_bytes: Some(back),
        },
        by: LimitsBy::SqueezeRelease,
    }
}

/// The holds kept in the store whose instance is live, with its record; the others dropped.
pub(super) fn kept_holds<C: Cgroups>(
    store: &Store,
    tracker: &Tracker<C>,
) -> Vec<(InstanceKey, SqueezeHold, InstanceRecord)> {
    let holds = store.kept_states::<SqueezeHold>().unwrap_or_else(|e| {
        tracing::error!("reading the squeeze holds of the last run: {e}");
        Vec::new()
    });
    let mut out = Vec::new();
    for (key, hold) in holds {
        match tracker
            .live_record(key.1)
            .filter(|r| r.started_at_ms == key.0)
        {
            Some(rec) => out.push((key, hold, rec.clone())),
            None => forget_hold(store, key),
        }
    }
    out
}

/// Says why a hold is not put back: released already, or changed since by someone else.
pub(super) fn say_not_held(rec: &InstanceRecord, hold: &SqueezeHold, now: Option<u64>) {
    if same_limit(now, hold.release_to()) {
        tracing::info!(cgroup = rec.cgroup_path, "squeeze hold released already");
    } else {
        tracing::warn!(
            function = rec.function,
            instance = rec.instance,
            hold = hold.hold_bytes,
            now = ?now,
            "memory.high (soft limit) is no longer the squeeze's hold: changed since the \
             squeeze, left as it is"
        );
    }
}

pub(super) fn forget_hold(store: &Store, key: InstanceKey) {
    if let Err(e) = store.forget_state::<SqueezeHold>(key) {
        tracing::error!("dropping a squeeze hold: {e}");
    }
}

pub(super) fn key_of(rec: &InstanceRecord) -> InstanceKey {
    (rec.started_at_ms, rec.cgroup_id)
}

#[cfg(test)]
mod tests {
    //! Releases on a fake cgroupfs in a temp dir (plain files stand in for the kernel's; the
    //! kernel path, a kill -9 and a restart are covered by tests/tests/reactive.rs).
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::kernel::cgroupfs::CgroupVersion;
    use crate::model::{Limits, PeakSource};

    const MIB: u64 = 1 << 20;

    struct Fake {
        _tmp: tempfile::TempDir,
        hierarchy: MemoryHierarchy,
        actuator: Actuator,
        store: Store,
        rec: InstanceRecord,
    }

    /// An instance using 10 MiB, memory.max 64 MiB, held at 16 MiB (its memory.high was 48).
    fn held() -> (Fake, SqueezeHold) {
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path().join("cg");
        let dir = mount.join("emars/fn/i1");
        fs::create_dir_all(&dir).unwrap();
        for (file, value) in [
            ("memory.current", 10 * MIB),
            ("memory.max", 64 * MIB),
            ("memory.high", 16 * MIB),
        ] {
            fs::write(dir.join(file), value.to_string()).unwrap();
        }
        let hierarchy = MemoryHierarchy {
            version: CgroupVersion::V2,
            mount,
            hierarchy_id: 0,
        };
        let store = Store::open(&tmp.path().join("store")).unwrap();
        let actuator = Actuator::new(
            hierarchy.clone(),
            &["/emars".to_owned()],
            MIB,
            true,
            store.clone(),
        );
        let rec = InstanceRecord {
            function: "fn".into(),
            instance: "i1".into(),
            cgroup_id: fs::metadata(&dir).unwrap().ino(),
            cgroup_path: dir.display().to_string(),
            started_at_ms: 1,
            ended_at_ms: None,
            execs: 0,
            peak_bytes: 0,
            peak_source: PeakSource::KernelWatermark,
            oom_kills: 0,
            limits: Limits::default(),
            input_bytes: None,
            connections: 0,
            requests: 0,
        };
        store.put_instance(&rec).unwrap();
        let hold = SqueezeHold {
            before: Limits {
                max_bytes: Some(64 * MIB),
                high_bytes: Some(48 * MIB),
            },
            hold_bytes: 16 * MIB,
            taken_at_ms: 2,
        };
        store.keep_state(key_of(&rec), &hold).unwrap();
        let f = Fake {
            _tmp: tmp,
            hierarchy,
            actuator,
            store,
            rec,
        };
        (f, hold)
    }

    impl Fake {
        fn release(&self, hold: &SqueezeHold) -> Released {
            let why = "test";
            release_hold(
                &self.actuator,
                &self.hierarchy,
                &self.store,
                &self.rec,
                hold,
                why,
            )
        }
        fn high(&self) -> String {
            fs::read_to_string(Path::new(&self.rec.cgroup_path).join("memory.high")).unwrap()
        }
        fn kept(&self) -> Option<SqueezeHold> {
            self.store.kept_state(key_of(&self.rec)).unwrap()
        }
    }

    #[test]
    fn a_release_puts_back_what_the_hold_replaced() {
        let (f, hold) = held();
        assert!(matches!(f.release(&hold), Released::Yes(_)));
        assert_eq!(f.high(), (48 * MIB).to_string());
        assert_eq!(f.kept(), None, "the kept hold goes with its release");
        let audit: Vec<crate::model::audit::AuditRecord> = f.store.audit(10).unwrap();
        assert_eq!(audit[0].reason, "release");
        assert_eq!(audit[0].written.high_bytes, Some(48 * MIB));
    }

    /// Someone (an API write, apply, a raise) changed memory.high since the hold: it is not
    /// overwritten, and the hold is dropped.
    #[test]
    fn a_hold_changed_since_is_not_overwritten() {
        let (f, hold) = held();
        fs::write(
            Path::new(&f.rec.cgroup_path).join("memory.high"),
            "33554432",
        )
        .unwrap();
        assert!(matches!(f.release(&hold), Released::Dropped));
        assert_eq!(f.high(), "33554432");
        assert_eq!(f.kept(), None);
        let audit: Vec<crate::model::audit::AuditRecord> = f.store.audit(10).unwrap();
        assert!(audit.is_empty(), "nothing written: {audit:?}");
    }

    /// The agent's other writers tell the squeeze of their limits: a memory.high other than the
    /// hold replaces it, the squeeze's own writes and memory.max alone do not.
    #[test]
    fn other_writers_limits_replace_a_hold() {
        let (_f, hold) = held();
        let high = |h: u64| Limits {
            max_bytes: Some(64 * MIB),
            high_bytes: Some(h),
        };
        assert_eq!(
            written_over(&hold, high(32 * MIB), LimitsBy::Api),
            Some(Some(32 * MIB))
        );
        assert_eq!(
            written_over(&hold, high(40 * MIB), LimitsBy::BurstRaise),
            Some(Some(40 * MIB))
        );
        assert_eq!(
            written_over(&hold, high(16 * MIB), LimitsBy::Api),
            Some(None)
        );
        assert_eq!(
            written_over(&hold, high(48 * MIB), LimitsBy::SqueezeRelease),
            None
        );
        assert_eq!(
            written_over(&hold, high(16 * MIB), LimitsBy::SqueezeHold),
            None
        );
        let max_only = Limits {
            max_bytes: Some(80 * MIB),
            high_bytes: None,
        };
        assert_eq!(written_over(&hold, max_only, LimitsBy::Api), None);
    }

    /// The holds kept in the store are the live instances' only: those of instances that are
    /// gone are dropped.
    #[test]
    fn kept_holds_are_those_of_live_instances() {
        let (f, hold) = held();
        let registry =
            crate::model::registry::Registry::new(&[crate::model::registry::RootConfig {
                path: "/emars".into(),
                rules: Vec::new(),
                create: true,
            }])
            .unwrap();
        let mut tracker = Tracker::new(f.hierarchy.clone(), registry);
        // Not live in the tracker yet: dropped.
        assert!(kept_holds(&f.store, &tracker).is_empty());
        assert_eq!(f.kept(), None);
        f.store.keep_state(key_of(&f.rec), &hold).unwrap();
        tracker.add_cgroup(
            f.rec.cgroup_id,
            "/emars/fn/i1",
            1,
            Some(f.rec.clone()),
            crate::model::tracker::Found::Existing {
                new_since_start: false,
            },
        );
        let kept = kept_holds(&f.store, &tracker);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].1, hold);
    }
}
