//! What limits instances get, and the one writer that puts them in place.
//!
//! Here (mod.rs): the predictive mode's front: per-function recommendations from the store's
//! instance peaks (cached), the periodic config generator (the paper's daily {requests, max
//! memory} file, kept per generation, exported), one-shot `apply`, and the limits of a new
//! instance. Beside it:
//! - `recommend`: the rule, pure, a chain of named steps;
//! - `actuator/`: the only cgroup writer (checks, durable audit intent, write, outcome);
//! - `reactive`: the reactive mode's decisions, pure (trigger point, raise step, ceiling,
//!   admission), and its settings;
//! - `burst`: the burst guard at run time (raises near the limit, through the actuator);
//! - `squeeze`: the host-pressure squeeze at run time (reclaim and hold idle instances);
//! - `keepalive`: Reuse/Recycle advice from idle times, pure;
//! - `prior`: a function's first limits from the host's other functions, pure;
//! - `fleet`: the other hosts' peaks of a function (`[fleet]`, read from Prometheus), pure;
//! - `sized`: input-aware limits, peak fitted against a bind's `input_bytes`, pure.
//!
//! The tracker's effects are carried out one stage up, in `daemon/effects.rs`.

pub mod actuator;
pub mod burst;
pub mod fleet;
pub mod keepalive;
pub mod prior;
pub mod reactive;
pub mod recommend;
pub mod sized;
pub mod squeeze;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    model::audit::{AuditRecord, Reason},
    model::LimitRequest,
    model::{InstanceRecord, RequestSource},
    policy::actuator::{Actuator, BelowUsage},
    policy::recommend::{recommend_blended, recommend_from_prior, PolicyParams, Recommendation},
    store::{Store, StoreError},
};

/// One function's line of a generated config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GeneratedConfig {
    pub function: String,
    /// Busiest hour's requests, counted from `requests_source`.
    pub requests_per_hour: u64,
    /// Where `requests_per_hour` is counted from: the platform's reported invocations, else
    /// HTTP requests counted in the kernel, else TCP connections counted in the kernel, else
    /// execs.
    #[serde(default)]
    pub requests_source: RequestSource,
    /// Peak of instance peaks seen (the paper's "max memory").
    pub max_memory_bytes: u64,
    pub memory_high_bytes: u64,
    pub memory_max_bytes: u64,
    pub confidence: f64,
    pub pinned: bool,
    /// Reuse/Recycle advice (`[policy.keepalive]`): load a new instance this long after a use
    /// ends (0: keep it loaded), and keep it this long from then.
    #[serde(default)]
    pub prewarm_ms: u64,
    #[serde(default)]
    pub keepalive_ms: u64,
}

/// A generated config: every function at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Generation {
    pub generated_at_ms: u64,
    /// "period" or "on_demand".
    pub trigger: String,
    pub functions: Vec<GeneratedConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("exporting the config to {path}: {source}")]
    Export {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding the exported config: {0}")]
    Encode(String),
    #[error("busy: the same operation is already running; try again when it is done")]
    Busy,
    #[error(
        "the agent is in observe mode, which writes no limits; set policy.mode = \"enforce\" in the agent's config to allow limit writes"
    )]
    ObserveMode,
}

/// What `apply` did: one audit record per write attempt, and the instances it left alone.
#[derive(Debug, Default)]
pub struct Applied {
    pub writes: Vec<AuditRecord>,
    pub kept: Vec<KeptInstance>,
}

/// A live instance `apply` left alone: an operator set its limits by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeptInstance {
    pub function: String,
    pub instance: String,
}

pub struct Policy {
    config: PolicyConfig,
    store: Store,
    host_memory: u64,
    cache: RwLock<HashMap<String, Recommendation>>,
    /// Each function's input-aware fit, or why it has none, computed with its recommendation.
    fits: RwLock<HashMap<String, Result<sized::SizedFit, sized::Fallback>>>,
    /// One generation at a time: the periodic one and `emars recommend --generate` share the
    /// export files.
    generating: std::sync::Mutex<()>,
    /// One `apply` at a time: it walks every live instance.
    applying: std::sync::Mutex<()>,
    /// The burst guard runs: only then does a function without history get the prior.
    guarded: AtomicBool,
    /// The prior from the cache (`[policy.prior]`), recomputed after the cache changed
    /// (`prior_stale`) when a function without history next needs it.
    prior: RwLock<Option<prior::Prior>>,
    prior_stale: AtomicBool,
    /// The other hosts' peaks per function (`[fleet]`), as of the last fetch still fresh.
    fleet: RwLock<Option<Arc<fleet::FleetView>>>,
}

/// The recommender's parameters for a function's effective policy (built-in defaults below).
pub fn params_of(p: &FunctionPolicy) -> PolicyParams {
    let d = PolicyParams::default();
    PolicyParams {
        percentile: p.percentile.unwrap_or(d.percentile),
        margin: p.margin.unwrap_or(d.margin),
        low_confidence_margin: p.low_confidence_margin.unwrap_or(d.low_confidence_margin),
        high_fraction: p.high_fraction.unwrap_or(d.high_fraction),
        floor_bytes: p.floor_bytes.unwrap_or(d.floor_bytes),
        ceiling_bytes: p.ceiling_bytes.or(d.ceiling_bytes),
        half_life: p
            .half_life_hours
            .map(|h| Duration::from_secs_f64(h * 3600.0))
            .unwrap_or(d.half_life),
        pin_max_bytes: p.pin_max_bytes,
        pin_high_bytes: p.pin_high_bytes,
        confidence_samples: d.confidence_samples,
    }
}

impl Policy {
    pub fn new(config: PolicyConfig, store: Store, host_memory: u64) -> Self {
        Self {
            config,
            store,
            host_memory,
            cache: RwLock::new(HashMap::new()),
            fits: RwLock::new(HashMap::new()),
            generating: std::sync::Mutex::new(()),
            applying: std::sync::Mutex::new(()),
            guarded: AtomicBool::new(false),
            prior: RwLock::new(None),
            prior_stale: AtomicBool::new(true),
            fleet: RwLock::new(None),
        }
    }

    /// A new fleet view (None: fleet data dropped, stale or off): every function it or the last
    /// one knew is recomputed, so a function this host never ran gets fleet-informed limits at
    /// its first instance, and one the fleet forgot goes back to local history. Runs off the
    /// event loop (the fetcher's task); the enforcement path reads only the cache.
    pub fn set_fleet(
        &self,
        view: Option<Arc<fleet::FleetView>>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let old = match self.fleet.write() {
            Ok(mut f) => std::mem::replace(&mut *f, view.clone()),
            Err(_) => return Ok(()),
        };
        let peaks = |v: &Option<Arc<fleet::FleetView>>, f: &str| {
            v.as_ref().and_then(|v| v.peaks(f).cloned())
        };
        let names = |v: &Option<Arc<fleet::FleetView>>| -> Vec<String> {
            v.as_ref()
                .map(|v| v.functions.keys().cloned().collect())
                .unwrap_or_default()
        };
        let mut touched: std::collections::BTreeSet<String> = names(&old).into_iter().collect();
        touched.extend(names(&view));
        // Only the functions whose fleet peaks changed; one that cannot be computed does not
        // keep the others from their new limits (the first error is returned at the end).
        let mut first_error = None;
        for f in &touched {
            if peaks(&old, f) == peaks(&view, f) {
                continue;
            }
            if let Err(e) = self.compute(f, now_ms) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The bump of `function`'s most recent OOM kill younger than one half-life on this host
    /// (what `/metrics` tells the fleet; `fleet::Exported`).
    pub fn recent_oom_bump(&self, function: &str, now_ms: u64) -> Option<u64> {
        let samples = self.store.samples(function, now_ms).ok()?;
        let params = params_of(&self.config.for_function(function));
        fleet::Exported::of(&samples, now_ms, params.half_life).recent_oom_bytes
    }

    /// A fresh fleet view knows `function` (it has limits before its first instance here).
    pub fn fleet_knows(&self, function: &str) -> bool {
        self.fleet_peaks(function).is_some()
    }

    /// The fleet's peaks of `function`, if a fresh view knows it.
    fn fleet_peaks(&self, function: &str) -> Option<Arc<fleet::FleetPeaks>> {
        self.fleet.read().ok()?.as_ref()?.peaks(function).cloned()
    }

    /// The burst guard started (or stopped): a function without history gets the prior's
    /// limits only while it runs.
    pub fn set_guarded(&self, on: bool) {
        self.guarded.store(on, Ordering::Relaxed);
    }

    /// The limits a new instance of `function` gets: its recommendation, else (no history,
    /// the guard on) the host's prior.
    pub fn new_instance_limits(&self, function: &str, now_ms: u64) -> Option<Recommendation> {
        self.cached(function)
            .or_else(|| self.first_limits(function, now_ms))
    }

    /// The prior's limits for a function without history; None while the guard is off, the
    /// prior off, or too few functions known.
    pub fn first_limits(&self, function: &str, now_ms: u64) -> Option<Recommendation> {
        if !self.guarded.load(Ordering::Relaxed) {
            return None;
        }
        let prior = self.prior()?;
        let params = params_of(&self.config.for_function(function));
        Some(recommend_from_prior(
            function,
            prior.max_bytes,
            &params,
            now_ms,
            self.host_memory,
        ))
    }

    /// The host's prior, while the guard runs (`first_limits`' basis and the base of the
    /// guard's ceiling for an instance started on it).
    pub fn prior(&self) -> Option<prior::Prior> {
        if !self.guarded.load(Ordering::Relaxed) {
            return None;
        }
        if self.prior_stale.swap(false, Ordering::AcqRel) {
            let mut medians: Vec<u64> = self
                .cache
                .read()
                .ok()?
                .values()
                .filter_map(prior::vote)
                .collect();
            let prior = self.config.prior.of(&mut medians);
            if let Ok(mut p) = self.prior.write() {
                *p = prior;
            }
        }
        *self.prior.read().ok()?
    }

    pub fn mode(&self) -> EnforceMode {
        self.config.mode
    }

    pub fn period(&self) -> Duration {
        Duration::from_secs(self.config.period_secs)
    }

    /// Recomputes a function's recommendation from the live model's samples (None: nothing
    /// measured, nothing pinned). Reads no history from disk.
    pub fn compute(
        &self,
        function: &str,
        now_ms: u64,
    ) -> Result<Option<Recommendation>, StoreError> {
        let samples = self.store.samples(function, now_ms)?;
        let params = params_of(&self.config.for_function(function));
        let fleet = self.fleet_peaks(function);
        let local = !samples.is_empty();
        let rec = recommend_blended(
            function,
            &samples,
            fleet.as_deref(),
            &params,
            now_ms,
            self.host_memory,
        );
        if local {
            self.compute_fit(function)?;
        } else if let Ok(mut f) = self.fits.write() {
            // No instance here (a fleet-only function): nothing to fit, nothing to keep.
            f.remove(function);
        }
        if let Ok(mut c) = self.cache.write() {
            match &rec {
                Some(r) => {
                    c.insert(function.to_owned(), r.clone());
                }
                None => {
                    c.remove(function);
                }
            }
        }
        // After the write: a prior computed from the cache before it is recomputed.
        self.prior_stale.store(true, Ordering::Release);
        Ok(rec)
    }

    /// Recomputes every known function, and forgets the recommendations of functions pruned
    /// since (but not those the config names or the fleet knows).
    pub fn compute_all(&self, now_ms: u64) -> Result<Vec<Recommendation>, StoreError> {
        let names = self.store.function_names()?;
        let mut out = Vec::new();
        for f in &names {
            if let Some(r) = self.compute(f, now_ms)? {
                out.push(r);
            }
        }
        // Configured functions and those the fleet knows have limits before any instance here
        // (the view read once, not under the cache's lock).
        let fleet = self.fleet.read().ok().and_then(|f| f.clone());
        let known_elsewhere = |f: &str| {
            self.config
                .functions
                .iter()
                .any(|c| c.name.as_deref() == Some(f))
                || fleet.as_ref().is_some_and(|v| v.peaks(f).is_some())
        };
        // Known before the loop or now: a function is known before it is computed, so one
        // computed meanwhile is in the second list, which is read without the cache held (the
        // enforcement path reads the cache and must not wait for the model's lock). One made
        // known and computed in the instant between that read and the retain below loses its
        // entry until its next computation, as if it had not been computed yet.
        let now_known = self.store.function_names()?;
        let known: std::collections::HashSet<&str> =
            names.iter().chain(&now_known).map(String::as_str).collect();
        if let Ok(mut c) = self.cache.write() {
            c.retain(|f, _| known.contains(f.as_str()) || known_elsewhere(f));
        }
        if let Ok(mut fits) = self.fits.write() {
            fits.retain(|f, _| known.contains(f.as_str()));
        }
        self.prior_stale.store(true, Ordering::Release);
        Ok(out)
    }

    /// Recommends for the functions the config names (pins): they have limits before their
    /// first instance is ever seen, which `compute_all` (known functions only) cannot give.
    pub fn compute_configured(&self, now_ms: u64) -> Result<(), StoreError> {
        for f in self
            .config
            .functions
            .iter()
            .filter_map(|f| f.name.as_deref())
        {
            self.compute(f, now_ms)?;
        }
        Ok(())
    }

    /// The last computed recommendation (the hot path of enforcement: no store access).
    /// The keep-alive settings (`[policy.keepalive]`).
    pub fn keepalive(&self) -> &keepalive::KeepAliveConfig {
        &self.config.keepalive
    }

    pub fn cached(&self, function: &str) -> Option<Recommendation> {
        self.cache.read().ok()?.get(function).cloned()
    }

    /// Writes a function's recommended limits into a new instance (enforce mode only).
    /// Returns the audit record, also when the write failed; None when there is nothing to do.
    /// `delay_start_ns`: the kernel time of its mkdir, when known.
    pub fn enforce_new_instance(
        &self,
        actuator: &Actuator,
        rec: &InstanceRecord,
        delay_start_ns: Option<u64>,
    ) -> Option<AuditRecord> {
        if self.config.mode != EnforceMode::Enforce {
            return None;
        }
        let Some(input) = rec.input_bytes else {
            let r = self.new_instance_limits(&rec.function, crate::clock::now_ms())?;
            return Some(self.write(actuator, rec, &r, Reason::NewInstance, delay_start_ns));
        };
        let sized = self.sized_limits(&rec.function, input)?;
        let reason = match sized.fallback {
            None => Reason::InputFit,
            Some(why) => {
                tracing::debug!(function = rec.function, input, why = why.as_str(), "no fit");
                Reason::InputFallback
            }
        };
        let req = LimitRequest {
            max_bytes: Some(sized.max_bytes),
            high_bytes: Some(sized.high_bytes),
        };
        Some(
            actuator
                .write(rec, req, BelowUsage::Raise, reason, delay_start_ns)
                .audit,
        )
    }

    /// Refits the function's peak against its bind hints ([`sized`]).
    fn compute_fit(&self, function: &str) -> Result<(), StoreError> {
        let fit = if self.config.sized.enabled {
            let samples = self.store.sized_samples(function, sized::MAX_FIT_SAMPLES)?;
            sized::fit(&samples, &self.config.sized)
        } else {
            Err(sized::Fallback::Disabled)
        };
        if let Ok(mut f) = self.fits.write() {
            f.insert(function.to_owned(), fit);
        }
        Ok(())
    }

    /// The limits an invocation of `input` bytes gets (cached: no store access): the fit's,
    /// bounded as the recommender bounds its own, else the function's recommendation, with
    /// why. None when the function has neither.
    pub fn sized_limits(&self, function: &str, input: u64) -> Option<SizedLimits> {
        let r = self.new_instance_limits(function, crate::clock::now_ms())?;
        let params = params_of(&self.config.for_function(function));
        let fit = self.fits.read().ok()?.get(function).cloned();
        let predicted = match fit {
            _ if params.pin_max_bytes.is_some() => Err(sized::Fallback::Pinned),
            Some(Ok(f)) => f.predict(input, self.config.sized.extrapolation),
            Some(Err(why)) => Err(why),
            None => Err(sized::Fallback::NoFit),
        };
        Some(match predicted {
            Ok(predicted) => {
                let bounded = sized::bounded(predicted, &params, self.host_memory);
                SizedLimits {
                    max_bytes: bounded.max_bytes,
                    high_bytes: bounded.high_bytes,
                    fallback: None,
                    recommendation: r,
                }
            }
            Err(why) => SizedLimits {
                max_bytes: r.max_bytes,
                high_bytes: r.high_bytes,
                fallback: Some(why),
                recommendation: r,
            },
        })
    }

    /// One-shot enforcement of every live instance of every function with a recommendation.
    /// Refused in observe mode, which writes nothing: each write it would have made is in
    /// the audit as refused (the actuator refuses it), so the request leaves a trace.
    /// Instances whose limits an operator set by hand keep them until they end (`kept`).
    pub fn apply_all(&self, actuator: &Actuator, now_ms: u64) -> Result<Applied, PolicyError> {
        let _one_at_a_time = one_at_a_time(&self.applying)?;
        self.compute_all(now_ms)?;
        let mut out = Applied::default();
        for inst in self.store.live_instances()? {
            let Some(r) = self.cached(&inst.function) else {
                continue;
            };
            if actuator.is_set_by_hand(&inst) {
                out.kept.push(KeptInstance {
                    function: inst.function.clone(),
                    instance: inst.instance.clone(),
                });
                continue;
            }
            out.writes
                .push(self.write(actuator, &inst, &r, Reason::Apply, None));
        }
        if self.config.mode != EnforceMode::Enforce {
            return Err(PolicyError::ObserveMode);
        }
        Ok(out)
    }

    fn write(
        &self,
        actuator: &Actuator,
        inst: &InstanceRecord,
        r: &Recommendation,
        reason: Reason,
        delay_start_ns: Option<u64>,
    ) -> AuditRecord {
        let req = LimitRequest {
            max_bytes: Some(r.max_bytes),
            high_bytes: Some(r.high_bytes),
        };
        actuator
            .write(inst, req, BelowUsage::Raise, reason, delay_start_ns)
            .audit
    }

    /// Generates and keeps a config for every function, and exports it as TOML and JSON.
    pub fn generate(&self, trigger: &str, now_ms: u64) -> Result<Generation, PolicyError> {
        let _one_at_a_time = one_at_a_time(&self.generating)?;
        let recs: HashMap<String, Recommendation> = self
            .compute_all(now_ms)?
            .into_iter()
            .map(|r| (r.function.clone(), r))
            .collect();
        let mut functions = Vec::new();
        for fc in self.store.export()? {
            let Some(r) = recs.get(&fc.function) else {
                continue;
            };
            let idle = self.store.idle_times(&fc.function)?.unwrap_or_default();
            let keep = self.config.keepalive.advise(&idle);
            functions.push(GeneratedConfig {
                prewarm_ms: keep.prewarm_ms,
                keepalive_ms: keep.keepalive_ms,
                function: fc.function,
                requests_per_hour: fc.requests_per_hour,
                requests_source: fc.requests_source,
                max_memory_bytes: fc.max_memory_bytes,
                memory_high_bytes: r.high_bytes,
                memory_max_bytes: r.max_bytes,
                confidence: r.confidence,
                pinned: r.pinned,
            });
        }
        let generation = Generation {
            generated_at_ms: now_ms,
            trigger: trigger.to_owned(),
            functions,
        };
        self.store.append_generation(now_ms, &generation)?;
        self.export(&generation)?;
        tracing::info!(
            functions = generation.functions.len(),
            dir = %self.config.export_dir.display(),
            "generated per-function config ({trigger})"
        );
        Ok(generation)
    }

    fn export(&self, g: &Generation) -> Result<(), PolicyError> {
        let dir = &self.config.export_dir;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PolicyError::Export { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        // The directory itself must not be a symlink planted to redirect root's writes.
        if fs::symlink_metadata(dir)
            .map_err(io(dir))?
            .file_type()
            .is_symlink()
        {
            return Err(PolicyError::Export {
                path: dir.clone(),
                source: std::io::Error::other("is a symbolic link; refusing to write through it"),
            });
        }
        let json =
            serde_json::to_string_pretty(g).map_err(|e| PolicyError::Encode(e.to_string()))?;
        let toml = toml::to_string_pretty(g).map_err(|e| PolicyError::Encode(e.to_string()))?;
        for (name, text) in [("emars-config.json", json), ("emars-config.toml", toml)] {
            let path = dir.join(name);
            // A platform never sees half a file, and no planted symlink is followed.
            crate::files::replace(&path, text.as_bytes(), 0o644).map_err(io(&path))?;
        }
        Ok(())
    }
}

/// The lock of an expensive operation; a second caller is told (busy), not queued.
fn one_at_a_time(
    lock: &std::sync::Mutex<()>,
) -> Result<std::sync::MutexGuard<'_, ()>, PolicyError> {
    match lock.try_lock() {
        Ok(g) => Ok(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => Err(PolicyError::Busy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: EnforceMode) -> (tempfile::TempDir, Policy) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let config = PolicyConfig {
            mode,
            export_dir: dir.path().join("export"),
            ..PolicyConfig::default()
        };
        (dir, Policy::new(config, store, 1 << 30))
    }

    #[test]
    fn expensive_operations_run_one_at_a_time() {
        let (_dir, p) = policy(EnforceMode::Enforce);
        let held = p.generating.lock().unwrap();
        assert!(matches!(p.generate("on_demand", 1), Err(PolicyError::Busy)));
        drop(held);
        assert!(p.generate("on_demand", 1).is_ok());
    }

    #[test]
    fn apply_is_refused_in_observe_mode() {
        let (dir, p) = policy(EnforceMode::Observe);
        let h = crate::kernel::cgroupfs::MemoryHierarchy {
            version: crate::kernel::cgroupfs::CgroupVersion::V2,
            mount: dir.path().join("cg"),
            hierarchy_id: 0,
        };
        let store = Store::open(&dir.path().join("store2")).unwrap();
        let act = Actuator::new(h, &["/emars".into()], 0, false, store);
        let e = p.apply_all(&act, 1).unwrap_err();
        assert!(matches!(e, PolicyError::ObserveMode), "{e}");
        assert!(e.to_string().contains("policy.mode = \"enforce\""));
    }

    fn ended(function: &str, start_ms: u64, peak_bytes: u64) -> InstanceRecord {
        InstanceRecord {
            function: function.into(),
            instance: "i".into(),
            cgroup_id: start_ms,
            cgroup_path: format!("/sys/fs/cgroup/emars/{function}/i"),
            started_at_ms: start_ms,
            ended_at_ms: Some(start_ms + 1_000),
            execs: 1,
            peak_bytes,
            peak_source: crate::model::PeakSource::KernelWatermark,
            oom_kills: 0,
            limits: Default::default(),
            input_bytes: None,
            connections: 0,
            requests: 0,
        }
    }

    /// A function without history gets the host's prior (P50 of the other functions'
    /// medians x 1.1) only with the burst guard on and once `min_functions` are known; one
    /// with history keeps its own; a function measured later moves the prior.
    #[test]
    fn first_limits_come_from_the_prior_with_the_guard_only() {
        use crate::policy::recommend::{page_up, DecayingHistogram};
        const MIB: u64 = 1 << 20;
        let (_dir, p) = policy(EnforceMode::Enforce);
        let now = 10 * crate::model::HOUR_MS;
        let median = |b: u64| DecayingHistogram::bucket_upper_edge(DecayingHistogram::bucket_of(b));
        let prior_of = |b: u64| page_up((median(b) as f64 * 1.1).ceil() as u64);
        for (i, (f, mib)) in [("a", 40), ("b", 60)].into_iter().enumerate() {
            p.store
                .put_instance(&ended(f, (i as u64 + 1) * 1000, mib * MIB))
                .unwrap();
        }
        p.compute_all(now).unwrap();
        p.set_guarded(true);
        // Two functions known, three needed.
        assert_eq!(p.new_instance_limits("new", now), None);
        p.store.put_instance(&ended("c", 3000, 80 * MIB)).unwrap();
        p.compute("c", now).unwrap();
        let r = p.new_instance_limits("new", now).unwrap();
        assert_eq!(r.prior_bytes, Some(prior_of(60 * MIB)));
        assert_eq!(r.max_bytes, prior_of(60 * MIB));
        assert!(r.high_bytes < r.max_bytes && r.high_bytes > 0);
        assert_eq!((r.samples, r.confidence), (0, 0.0));
        assert_eq!(p.new_instance_limits("a", now).unwrap().prior_bytes, None);
        // Two large functions later, the median of five medians is c's.
        for (i, f) in ["d", "e"].into_iter().enumerate() {
            p.store
                .put_instance(&ended(f, 4000 + i as u64 * 1000, 500 * MIB))
                .unwrap();
            p.compute(f, now).unwrap();
        }
        let r = p.new_instance_limits("new", now).unwrap();
        assert_eq!(r.prior_bytes, Some(prior_of(80 * MIB)));
        // The guard off: nothing for a function without history.
        p.set_guarded(false);
        assert_eq!(p.new_instance_limits("new", now), None);
        assert!(p.new_instance_limits("a", now).is_some());
    }

    /// A function retention pruned loses its cached recommendation at the next full
    /// computation (the cache would otherwise keep every name ever seen); a function the
    /// config names keeps its pinned one.
    #[test]
    fn recommendations_of_pruned_functions_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let config = PolicyConfig {
            functions: vec![FunctionPolicy {
                name: Some("pinned".into()),
                pin_max_bytes: Some(256 << 20),
                ..FunctionPolicy::default()
            }],
            ..PolicyConfig::default()
        };
        let p = Policy::new(config, store.clone(), 1 << 30);
        let hour = crate::model::HOUR_MS;
        for (f, start) in [("gone", hour), ("kept", 40 * hour)] {
            store.put_instance(&ended(f, start, 64 << 20)).unwrap();
        }
        p.compute_all(40 * hour).unwrap();
        p.compute_configured(40 * hour).unwrap();
        assert!(p.cached("gone").is_some() && p.cached("pinned").is_some());
        store
            .prune(41 * hour, Duration::from_millis(10 * hour))
            .unwrap();
        assert_eq!(store.function_names().unwrap(), ["kept"]);
        p.compute_all(41 * hour).unwrap();
        assert!(
            p.cached("gone").is_none(),
            "a pruned function's limits kept"
        );
        assert!(p.cached("kept").is_some());
        assert_eq!(p.cached("pinned").map(|r| r.max_bytes), Some(256 << 20));
    }
}

/// Whether the agent writes limits into cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforceMode {
    /// Recommend only; write nothing.
    #[default]
    Observe,
    /// Write each function's limits into new instance cgroups as they appear.
    Enforce,
}

/// Recommender knobs of one function; `None` = inherit (from `policy.defaults`, then built-in).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FunctionPolicy {
    /// The function, in `policy.functions` entries only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Percentile of instance peaks the limit covers, in percent (0, 100].
    pub percentile: Option<f64>,
    /// Fraction added on top of the percentile, e.g. 0.15.
    pub margin: Option<f64>,
    /// Extra margin while history is thin: margin + this × (1 − confidence).
    pub low_confidence_margin: Option<f64>,
    /// memory.high as a fraction of memory.max, (0, 1].
    pub high_fraction: Option<f64>,
    pub floor_bytes: Option<u64>,
    pub ceiling_bytes: Option<u64>,
    /// Half-life of a peak sample's weight, in hours.
    pub half_life_hours: Option<f64>,
    /// User-pinned limits: they always win over the recommendation.
    pub pin_max_bytes: Option<u64>,
    pub pin_high_bytes: Option<u64>,
}

/// Predictive mode: recommendations, the periodic config generator and enforcement.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub mode: EnforceMode,
    /// Seconds between two generated per-function configs (the paper: once a day).
    pub period_secs: u64,
    /// Where each generated config is exported as emars-config.toml and emars-config.json.
    pub export_dir: PathBuf,
    /// A limit is never set below an instance's current usage plus this many bytes.
    pub headroom_bytes: u64,
    /// Write memory.max above the limit a container's runtime gave it (`docker run --memory`,
    /// a bundle's `linux.resources.memory.limit`). Off: that limit is a ceiling.
    pub override_runtime_limits: bool,
    /// Policy for every function without an entry in `functions`.
    pub defaults: FunctionPolicy,
    /// Per-function overrides (with `name`); unset keys fall back to `defaults`.
    pub functions: Vec<FunctionPolicy>,
    /// Keep-alive and pre-warm advice (Reuse/Recycle).
    pub keepalive: keepalive::KeepAliveConfig,
    /// A function's first limits, before it has history (with the burst guard only).
    pub prior: prior::PriorConfig,
    /// Input-aware limits (`[policy.sized]`).
    pub sized: sized::SizedConfig,
}

/// The limits for one invocation's input ([`Policy::sized_limits`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SizedLimits {
    pub max_bytes: u64,
    pub high_bytes: u64,
    /// Why the function's recommendation gave them; None: the fit did.
    pub fallback: Option<sized::Fallback>,
    /// The function's recommendation (the fallback's limits).
    pub recommendation: Recommendation,
}
