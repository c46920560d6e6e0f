//! A cgroup's instance from first sight to its end: found (mkdir, scan, a task), named by the
//! rules (now, or once its container's metadata file is there), opened with the effects its
//! limits need, and closed; and the limits in force in it, as writes report them.
use std::path::Path;

use super::{Cgroups, Effect, Found, MetadataFacts, Named, Pending, Tracker};
use crate::{
    kernel::cgroupfs::{Limits, UsePeak},
    model::{
        kept::{RuntimeLimit, RuntimeLimitSource},
        registry::{Classified, Unnamed},
        runtime::MetadataRead,
        HourDelta, InstanceRecord, PeakSource,
    },
};

impl<C: Cgroups> Tracker<C> {
    /// Registers a cgroup (from a mkdir event or the start-up scan). `resumed` is the record
    /// of the same instance kept in the store before a restart. `found` says how the cgroup
    /// was learned of, and so whether its function's limits are to be enforced now.
    pub fn add_cgroup(
        &mut self,
        id: u64,
        rel_path: &str,
        started_at_ms: u64,
        resumed: Option<InstanceRecord>,
        found: Found,
    ) -> Vec<Effect> {
        if self.table.get(id).is_some() {
            tracing::debug!(id, rel_path, "cgroup known already");
            return Vec::new();
        }
        // A cgroup there before the agent (or resumed) has had its runtime's files written.
        let wait = resumed.is_none()
            && !matches!(
                found,
                Found::Existing {
                    new_since_start: false
                }
            );
        let (classified, metadata) = self.classify(rel_path, wait);
        let identity = match classified {
            Classified::Instance(identity) | Classified::Labelled(identity) => Some(identity),
            Classified::Pending { file } => {
                tracing::debug!(id, rel_path, file = %file.display(), "waiting for metadata");
                self.stats.metadata_waits += 1;
                self.table
                    .insert(id, rel_path.to_owned(), None, started_at_ms);
                self.pending.insert(
                    id,
                    Pending {
                        found,
                        file,
                        execs: 0,
                    },
                );
                return Vec::new();
            }
            Classified::NotInstance => None,
            Classified::Unnamed(why) => {
                self.note_unnamed(why, rel_path);
                None
            }
        };
        self.table
            .insert(id, rel_path.to_owned(), identity.clone(), started_at_ms);
        let Some(identity) = identity else {
            // No rule names it, yet the last run kept a live record of it: a use bound then
            // (only binds make records of such cgroups). The binding goes on.
            if let Some(rec) = resumed {
                return self.resume_binding(id, rec);
            }
            tracing::debug!(id, rel_path, "cgroup watched, not an instance");
            return Vec::new();
        };
        let named = Named { identity, metadata };
        self.open(id, rel_path, named, started_at_ms, resumed, found)
    }

    /// A pooled cgroup's use bound before a restart: live and bound again, its peak read as
    /// [`Cgroups::resumed_peak`] says, so that the platform's release finds it.
    pub(super) fn resume_binding(&mut self, id: u64, mut rec: InstanceRecord) -> Vec<Effect> {
        tracing::info!(
            function = rec.function,
            instance = rec.instance,
            cgroup = rec.cgroup_path,
            "use bound before the restart resumed"
        );
        self.bound.insert(id, self.cgroups.resumed_peak());
        self.refresh_watermark(&mut rec, false);
        let out = vec![Effect::Save(rec.clone())];
        self.live.insert(id, rec);
        out
    }

    /// Opens the live instance record of a classified cgroup.
    pub(super) fn open(
        &mut self,
        id: u64,
        rel_path: &str,
        named: Named,
        started_at_ms: u64,
        resumed: Option<InstanceRecord>,
        found: Found,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        let fresh = resumed.is_none();
        let identity = named.identity;
        // A resumed record's function is known. A refused one stays in the table, so that its
        // events find it and do nothing: no record, no limits, for its whole life.
        if fresh {
            if let Err(e) = self.admit(&identity.function, started_at_ms) {
                self.stats.functions_refused += 1;
                tracing::debug!(id, rel_path, "{e}");
                return out;
            }
        }
        tracing::debug!(id, rel_path, ?found, "instance");
        let dir = self.cgroups.dir(rel_path);
        if fresh {
            // Kept before anything is written into it: nothing the agent writes goes above it.
            if let Some(limit) = self.runtime_limit(id, &dir, named.metadata.limit) {
                out.push(Effect::RuntimeLimit {
                    key: (started_at_ms, id),
                    limit,
                });
            }
        }
        let mut rec = resumed.unwrap_or_else(|| InstanceRecord {
            function: identity.function.clone(),
            instance: identity.instance.clone(),
            cgroup_id: id,
            cgroup_path: dir.display().to_string(),
            started_at_ms,
            ended_at_ms: None,
            execs: 0,
            peak_bytes: 0,
            peak_source: PeakSource::None,
            oom_kills: 0,
            limits: Limits::default(),
            input_bytes: None,
            connections: 0,
            requests: 0,
        });
        let enforce = match found {
            Found::Mkdir { ts_ns } => Some(Some(ts_ns)),
            Found::Late => Some(None),
            Found::Existing { new_since_start } => (new_since_start && fresh).then_some(None),
        };
        // Came and went within the batch being applied: no limits; its rmdir, later in the
        // same batch, saves the record (closed).
        let write = enforce.filter(|_| self.came_and_went != Some(id));
        if enforce.is_some() {
            // Instances of this function that ended since the last tick are not in its
            // recommendation yet: bring it up to date first, or this instance would get a
            // stale one (or none, for a function whose first instances just ended).
            if self.dirty.remove(&rec.function) {
                out.push(Effect::Recompute {
                    function: rec.function.clone(),
                    at_ms: rec.started_at_ms,
                });
            }
        }
        if let Some(mkdir_ts_ns) = write {
            // Limits first: the platform's process may start allocating at once.
            out.push(Effect::Enforce {
                record: rec.clone(),
                mkdir_ts_ns,
            });
        }
        // After the limits: keeping the names takes the store's locks, which a limit write
        // has no reason to wait for (the peak starts at 0; each record write updates it).
        if let Some(names) = named.metadata.kubernetes.filter(|_| fresh) {
            out.push(Effect::ContainerNames {
                key: (started_at_ms, id),
                function: identity.function.clone(),
                names,
            });
        }
        self.refresh_watermark(&mut rec, true);
        if fresh {
            // Found now, while its cgroup is there: on a hybrid host the v2 directory that
            // holds its counts is joined by this path.
            self.count_requests(&mut rec, started_at_ms, &mut out);
            out.push(Effect::AddHour {
                function: rec.function.clone(),
                at_ms: started_at_ms,
                delta: HourDelta {
                    instances_started: 1,
                    ..Default::default()
                },
            });
        }
        if write.is_some() {
            self.awaiting.insert(id);
        } else if enforce.is_none() {
            out.push(Effect::Save(rec.clone()));
        }
        self.live.insert(id, rec);
        out
    }

    /// Classifies a cgroup waiting for its container's metadata again: the instance opens if
    /// the file is there now, or, with `give_up`, by the later rules. True when it is a live
    /// instance now.
    pub(super) fn settle(&mut self, id: u64, give_up: bool, out: &mut Vec<Effect>) -> bool {
        let Some(p) = self.pending.remove(&id) else {
            return false;
        };
        let Some((rel_path, started_at_ms)) = self
            .table
            .get(id)
            .map(|e| (e.rel_path.clone(), e.started_at_ms))
        else {
            return false;
        };
        let (classified, metadata) = self.classify(&rel_path, !give_up);
        let (identity, labelled) = match classified {
            Classified::Pending { .. } => {
                self.pending.insert(id, p);
                return false;
            }
            Classified::Labelled(identity) => (identity, true),
            Classified::Instance(identity) => (identity, false),
            Classified::NotInstance => {
                tracing::info!(cgroup = rel_path, file = %p.file.display(), "no metadata, and no later rule names it: not an instance");
                self.stats.metadata_fallbacks += 1;
                return false;
            }
            Classified::Unnamed(why) => {
                self.stats.metadata_fallbacks += 1;
                self.note_unnamed(why, &rel_path);
                return false;
            }
        };
        if labelled {
            self.stats.metadata_named += 1;
        } else {
            self.stats.metadata_fallbacks += 1;
            tracing::info!(
                cgroup = rel_path,
                file = %p.file.display(),
                function = identity.function,
                "container metadata not there, or without the label: named by a later rule"
            );
        }
        if let Some(e) = self.table.get_mut(id) {
            e.identity = Some(identity.clone());
        }
        let named = Named { identity, metadata };
        out.extend(self.open(id, &rel_path, named, started_at_ms, None, p.found));
        if p.execs > 0 {
            self.update(id, started_at_ms, out, |rec| {
                rec.execs += p.execs;
                HourDelta {
                    execs: p.execs,
                    ..Default::default()
                }
            });
        }
        true
    }

    /// Every cgroup waiting for metadata tries again; those that waited `metadata_wait_ms`
    /// are decided by the later rules. Run on the agent's tick.
    pub fn settle_pending(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut ids: Vec<(u64, bool)> = self
            .pending
            .keys()
            .map(|id| {
                let over = self.table.get(*id).is_none_or(|e| {
                    now_ms.saturating_sub(e.started_at_ms) >= self.metadata_wait_ms
                });
                (*id, over)
            })
            .collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for (id, give_up) in ids {
            self.settle(id, give_up, &mut out);
        }
        out
    }

    /// What the rules make of `rel_path`, reading container metadata through the cgroups
    /// reader, with what the container's runtime metadata says besides (if any was read): the
    /// memory limit it gives, the container's names in Kubernetes.
    pub(super) fn classify(&self, rel_path: &str, wait: bool) -> (Classified, MetadataFacts) {
        let cgroups = &self.cgroups;
        let mut facts = MetadataFacts::default();
        let classified = self.registry.classify_with(
            rel_path,
            &mut |f| {
                let m = cgroups.metadata(f);
                if let MetadataRead::Labels(labels) = &m.read {
                    facts = MetadataFacts {
                        limit: m.memory_limit_bytes,
                        kubernetes: crate::model::containers::KubernetesNames::from_labels(labels),
                    };
                }
                m.read
            },
            wait,
        );
        (classified, facts)
    }

    /// The memory limit a new instance's container runtime gave it: what its metadata says,
    /// and memory.max as found now, before the agent wrote anything into the cgroup (a runtime
    /// that wrote its limit before the agent saw the cgroup), unless the audit says the agent
    /// wrote that value; the lower of the two.
    pub(super) fn runtime_limit(
        &self,
        id: u64,
        dir: &Path,
        from_metadata: Option<u64>,
    ) -> Option<RuntimeLimit> {
        let found = self
            .cgroups
            .limits(dir)
            .ok()
            .and_then(|l| l.max_bytes)
            .filter(|f| self.own_writes.get(&id) != Some(f));
        let (bytes, source) = match (from_metadata, found) {
            (Some(m), f) if f.is_none_or(|f| m <= f) => (m, RuntimeLimitSource::Metadata),
            (_, Some(f)) => (f, RuntimeLimitSource::FirstSeen),
            _ => return None,
        };
        Some(RuntimeLimit { bytes, source })
    }

    /// Cgroups waiting for their container's metadata now.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Counts a cgroup whose rule gave an unusable name; the first of each reason is logged
    /// (a tenant's names must not flood the log), the rest are in /v1/info and /metrics.
    pub(super) fn note_unnamed(&mut self, why: Unnamed, rel_path: &str) {
        let n = &mut self.stats.unnamed[why as usize];
        *n += 1;
        if *n == 1 {
            tracing::warn!(
                "cgroup {rel_path:?} is not tracked: its rule gives a name that cannot be used \
                 ({}: {}); further ones are counted in /v1/info cgroups_unnamed and \
                 emars_cgroups_unnamed_total{{reason=\"{}\"}}",
                why.as_str(),
                why.rule(),
                why.as_str()
            );
        }
    }

    /// The cgroup was removed: close the instance with the kernel side's final figures — the
    /// exact watermark when the kernel layout is known, else the charge-event peak.
    pub(super) fn end(
        &mut self,
        id: u64,
        kernel_peak: u64,
        watermark: u64,
        at_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        self.table.remove(id);
        // A bound use removed with its cgroup: v1's watermark was reset at bind, so the
        // kernel's is this use's; v2's spans every use, so the last reading of the use stands.
        let bound = self.bound.get(&id).map(|p| matches!(p, UsePeak::V1));
        let Some(rec) = self.live.get_mut(&id) else {
            tracing::debug!(id, "rmdir of a cgroup that is not a live instance");
            self.awaiting.remove(&id);
            self.bound.remove(&id);
            return;
        };
        match bound {
            None if watermark > 0 => {
                rec.peak_bytes = watermark;
                rec.peak_source = PeakSource::KernelWatermark;
            }
            None if kernel_peak > rec.peak_bytes => {
                rec.peak_bytes = kernel_peak;
                rec.peak_source = PeakSource::ChargeEvents;
            }
            Some(true) if watermark > 0 => {
                rec.peak_bytes = watermark;
                rec.peak_source = PeakSource::UseWatermark;
            }
            _ => {}
        }
        self.close(id, at_ms, out);
    }

    /// Closes a live instance (its cgroup removed, or its use released); returns the record
    /// as saved.
    pub(super) fn close(
        &mut self,
        id: u64,
        at_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Option<InstanceRecord> {
        self.awaiting.remove(&id);
        let Some(mut rec) = self.live.remove(&id) else {
            self.bound.remove(&id);
            return None;
        };
        // The last requests: the kernel keeps an instance's counts until they are read here
        // (a bound use's are the platform's: not read, and the pooled cgroup's entry stays).
        self.count_requests(&mut rec, at_ms, out);
        if self.bound.remove(&id).is_none() {
            if let Some(counts) = self.requests.as_mut() {
                counts.forget(id);
            }
        }
        rec.ended_at_ms = Some(at_ms.max(rec.started_at_ms));
        out.push(Effect::AddHour {
            function: rec.function.clone(),
            at_ms,
            delta: HourDelta {
                peak_bytes: rec.peak_bytes,
                ..Default::default()
            },
        });
        // Recomputed on the next tick, not here: the event loop must keep draining the ring.
        self.dirty.insert(rec.function.clone());
        out.push(Effect::Save(rec.clone()));
        Some(rec)
    }

    /// Recomputes the recommendations of functions whose instances ended since last time.
    pub fn recompute_dirty(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut functions: Vec<String> = self.dirty.drain().collect();
        functions.sort_unstable();
        functions
            .into_iter()
            .map(|function| Effect::Recompute {
                function,
                at_ms: now_ms,
            })
            .collect()
    }

    /// Limits now in force in a live instance ([`Effect::LimitsInForce`]): the record is saved
    /// with them. A new instance's first limits (the answer to its [`Effect::Enforce`]) replace
    /// what it was found with; a later write changes only the files it wrote.
    pub fn limits_in_force(&mut self, id: u64, limits: Limits) -> Vec<Effect> {
        if self.awaiting.contains(&id) {
            return self.enforced(id, Some(limits));
        }
        match self.live.get_mut(&id) {
            Some(rec) => {
                rec.limits = Limits {
                    max_bytes: limits.max_bytes.or(rec.limits.max_bytes),
                    high_bytes: limits.high_bytes.or(rec.limits.high_bytes),
                };
                vec![Effect::Save(rec.clone())]
            }
            None => Vec::new(),
        }
    }

    /// The answer to an [`Effect::Enforce`]: the limits written (None: nothing written). The
    /// record is saved now, with them.
    pub fn enforced(&mut self, id: u64, written: Option<Limits>) -> Vec<Effect> {
        if !self.awaiting.remove(&id) {
            return Vec::new();
        }
        let Some(rec) = self.live.get_mut(&id) else {
            return Vec::new();
        };
        if let Some(l) = written {
            rec.limits = l;
        }
        vec![Effect::Save(rec.clone())]
    }
}
