//! Predictive mode: per-function recommendations from the store's instance peaks, the periodic
//! config generator (the paper's daily {requests, max memory} file, kept per generation), and
//! the enforcement decisions the actuator carries out.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::RwLock,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    actuator::{Actuator, AuditRecord, BelowUsage, LimitRequest},
    config::{EnforceMode, FunctionPolicy, PolicyConfig},
    model::{InstanceRecord, Limits},
    recommend::{recommend, PolicyParams, Recommendation, Sample},
    store::{Store, StoreError},
};

/// One function's line of a generated config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedConfig {
    pub function: String,
    /// Busiest hour's requests (reported invocations, else execs).
    pub requests_per_hour: u64,
    /// Peak of instance peaks seen (the paper's "max memory").
    pub max_memory_bytes: u64,
    pub memory_high_bytes: u64,
    pub memory_max_bytes: u64,
    pub confidence: f64,
    pub pinned: bool,
}

/// A generated config: every function at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

pub struct Policy {
    config: PolicyConfig,
    store: Store,
    host_memory: u64,
    cache: RwLock<HashMap<String, Recommendation>>,
    /// One generation at a time: the periodic one and `emars recommend --generate` share the
    /// export files.
    generating: std::sync::Mutex<()>,
}

/// The recommender's samples: one per instance with a measured peak or an OOM kill (its limit
/// then says how much it needed at least). A live instance counts as of now.
pub fn samples_of(instances: &[InstanceRecord], now_ms: u64) -> Vec<Sample> {
    instances
        .iter()
        .filter(|r| r.peak_bytes > 0 || r.oom_kills > 0)
        .map(|r| Sample {
            at_ms: r.ended_at_ms.unwrap_or(now_ms.max(r.started_at_ms)),
            peak_bytes: r.peak_bytes,
            oom_killed: r.oom_kills > 0,
            limit_bytes: r.limits.max_bytes,
        })
        .collect()
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
            generating: std::sync::Mutex::new(()),
        }
    }

    pub fn mode(&self) -> EnforceMode {
        self.config.mode
    }

    pub fn period(&self) -> Duration {
        Duration::from_secs(self.config.period_secs)
    }

    /// Recomputes a function's recommendation from the store (None: nothing measured, nothing
    /// pinned).
    pub fn compute(
        &self,
        function: &str,
        now_ms: u64,
    ) -> Result<Option<Recommendation>, StoreError> {
        let instances = self.store.instances(function)?;
        let params = params_of(&self.config.for_function(function));
        let rec = recommend(
            function,
            &samples_of(&instances, now_ms),
            &params,
            now_ms,
            self.host_memory,
        );
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
        Ok(rec)
    }

    /// Recomputes every known function.
    pub fn compute_all(&self, now_ms: u64) -> Result<Vec<Recommendation>, StoreError> {
        let mut out = Vec::new();
        for f in self.store.function_names()? {
            if let Some(r) = self.compute(&f, now_ms)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The last computed recommendation (the hot path of enforcement: no store access).
    pub fn cached(&self, function: &str) -> Option<Recommendation> {
        self.cache.read().ok()?.get(function).cloned()
    }

    /// Writes a function's recommended limits into a new instance (enforce mode only).
    /// Returns the audit record, also when the write failed; None when there is nothing to do.
    pub fn enforce_new_instance(
        &self,
        actuator: &Actuator,
        rec: &InstanceRecord,
        delay_start_ns: u64,
        now_ms: u64,
    ) -> Option<AuditRecord> {
        if self.config.mode != EnforceMode::Enforce {
            return None;
        }
        let r = self.cached(&rec.function)?;
        Some(self.write(
            actuator,
            rec,
            &r,
            "new_instance",
            Some(delay_start_ns),
            now_ms,
        ))
    }

    /// One-shot enforcement of every live instance of every function with a recommendation.
    pub fn apply_all(
        &self,
        actuator: &Actuator,
        now_ms: u64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.compute_all(now_ms)?;
        let mut out = Vec::new();
        for inst in self.store.live_instances()? {
            if let Some(r) = self.cached(&inst.function) {
                out.push(self.write(actuator, &inst, &r, "apply", None, now_ms));
            }
        }
        Ok(out)
    }

    fn write(
        &self,
        actuator: &Actuator,
        inst: &InstanceRecord,
        r: &Recommendation,
        reason: &str,
        delay_start_ns: Option<u64>,
        now_ms: u64,
    ) -> AuditRecord {
        let req = LimitRequest {
            max_bytes: Some(r.max_bytes),
            high_bytes: Some(r.high_bytes),
        };
        let result = actuator.apply(Path::new(&inst.cgroup_path), req, BelowUsage::Raise);
        let delay_us =
            delay_start_ns.map(|t| crate::agent::monotonic_ns().saturating_sub(t) / 1000);
        audit_record(inst, reason, req, &result, delay_us, now_ms)
    }

    /// Generates and keeps a config for every function, and exports it as TOML and JSON.
    pub fn generate(&self, trigger: &str, now_ms: u64) -> Result<Generation, PolicyError> {
        let _one_at_a_time = self
            .generating
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
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
            functions.push(GeneratedConfig {
                function: fc.function,
                requests_per_hour: fc.requests_per_hour,
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
        let json =
            serde_json::to_string_pretty(g).map_err(|e| PolicyError::Encode(e.to_string()))?;
        let toml = toml::to_string_pretty(g).map_err(|e| PolicyError::Encode(e.to_string()))?;
        for (name, text) in [("emars-config.json", json), ("emars-config.toml", toml)] {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            // Write then rename: a platform reading the file never sees half of it.
            fs::write(&tmp, text).map_err(io(&tmp))?;
            fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        Ok(())
    }
}

/// The audit record of one write attempt.
pub fn audit_record(
    inst: &InstanceRecord,
    reason: &str,
    req: LimitRequest,
    result: &Result<crate::actuator::Applied, crate::actuator::ActuatorError>,
    delay_us: Option<u64>,
    now_ms: u64,
) -> AuditRecord {
    let (old, new, usage, raised, outcome) = match result {
        Ok(a) => (a.old, a.new, Some(a.usage), a.raised, "ok".to_owned()),
        Err(e) => (
            inst.limits,
            Limits {
                max_bytes: req.max_bytes,
                high_bytes: req.high_bytes,
            },
            None,
            false,
            e.to_string(),
        ),
    };
    AuditRecord {
        at_ms: now_ms,
        function: inst.function.clone(),
        instance: inst.instance.clone(),
        cgroup_path: inst.cgroup_path.clone(),
        reason: reason.to_owned(),
        old,
        new,
        usage_bytes: usage,
        delay_us,
        raised,
        outcome,
    }
}
