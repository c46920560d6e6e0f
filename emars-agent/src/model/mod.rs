//! The data model: what EMARS knows about instances (one container cgroup each) and
//! functions (all instances that run the same code). Shared by the store, the API and the CLI.
//! Below it: `registry` (which cgroup is which instance of which function), `tracker`
//! (instances from kernel events), `live` (the in-memory model every read comes from),
//! `runtime` (what a container runtime's metadata says; the file is read by `kernel`), `kept`
//! (what is kept of a live instance besides its record) and `audit` (the audit record of a
//! limit write and its enums); `native` (the bucket grid of the exported native histograms);
//! `containers` (Kubernetes containers' names and peaks, for VPA).

pub mod audit;
pub mod containers;
pub mod kept;
pub mod live;
pub mod native;
pub mod registry;
pub mod runtime;
pub mod tracker;

pub use crate::kernel::cgroupfs::{LimitRequest, Limits};
pub use crate::kernel::probes::{KernelCounters, ProgramStatus};
use serde::{Deserialize, Serialize};

/// Where an instance's peak figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PeakSource {
    /// Nothing measured yet.
    #[default]
    None,
    /// The kernel's own watermark file (v2 memory.peak, v1 memory.max_usage_in_bytes).
    KernelWatermark,
    /// The in-kernel sum of memcg charge events (eBPF), used when the cgroup was gone before
    /// its watermark could be read.
    ChargeEvents,
    /// One use of a pooled cgroup (POST /v1/bind): the kernel's watermark reset at bind (v1
    /// memory.max_usage_in_bytes, v2 memory.peak through a descriptor, 6.12+), exact.
    UseWatermark,
    /// One use of a pooled cgroup on a kernel that cannot reset its watermark (v2 before
    /// 6.12): the cgroup's lifetime watermark, which may include earlier uses. Not exact.
    LifetimeWatermark,
}

/// One container instance: a cgroup that a registry rule mapped to a function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceRecord {
    pub function: String,
    pub instance: String,
    /// Kernel cgroup id (inode of the cgroup directory in the memory hierarchy).
    pub cgroup_id: u64,
    /// Absolute path of the cgroup directory.
    pub cgroup_path: String,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    /// None while the cgroup exists.
    pub ended_at_ms: Option<u64>,
    /// Successful execve() calls by tasks of this cgroup.
    pub execs: u64,
    /// Peak memory of the cgroup in bytes.
    pub peak_bytes: u64,
    pub peak_source: PeakSource,
    /// Processes of this cgroup chosen as OOM victims.
    pub oom_kills: u64,
    pub limits: Limits,
    /// The size of the invocation's input, as the platform gave it at bind (`input_bytes`);
    /// the policy learns peak against it (`policy::sized`). None when not given.
    #[serde(default)]
    pub input_bytes: Option<u64>,
    /// Inbound TCP connections accepted by this cgroup so far, counted in the kernel (0
    /// where kernel request counting is off).
    #[serde(default)]
    pub connections: u64,
    /// HTTP/1.x request lines that reached this cgroup so far, counted in the kernel (each
    /// request of a keep-alive connection counts).
    #[serde(default)]
    pub requests: u64,
}

impl InstanceRecord {
    pub fn is_live(&self) -> bool {
        self.ended_at_ms.is_none()
    }
}

/// Percentiles of the instance peaks of one function (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct PeakPercentiles {
    pub p50: u64,
    pub p90: u64,
    pub p95: u64,
    pub p99: u64,
}

/// What EMARS knows of one function, aggregated over its retained instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionSummary {
    pub name: String,
    pub instances: u64,
    pub live_instances: u64,
    pub execs: u64,
    /// Invocations reported by the platform through the API.
    pub invocations: u64,
    /// Inbound TCP connections accepted by its retained instances, counted in the kernel.
    #[serde(default)]
    pub connections: u64,
    /// HTTP/1.x requests its retained instances received, counted in the kernel.
    #[serde(default)]
    pub requests: u64,
    /// Where its requests per hour are counted from, chosen over its retained hours: the
    /// platform's invocations if any, else kernel-counted HTTP requests, else kernel-counted
    /// TCP connections, else execs.
    #[serde(default)]
    pub requests_source: RequestSource,
    /// Busiest retained hour's requests as `requests_source` counts them (the export's
    /// `requests_per_hour`).
    #[serde(default)]
    pub requests_per_hour: u64,
    pub oom_kills: u64,
    /// Peak of the instance peaks (bytes).
    pub peak_bytes: u64,
    pub peak_percentiles: PeakPercentiles,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

/// One hour of one function: the paper's workload model (requests) and memory model (peak)
/// at hour granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct HourBucket {
    /// Start of the hour, unix ms (a multiple of 3_600_000).
    pub hour_start_ms: u64,
    pub instances_started: u64,
    pub execs: u64,
    pub invocations: u64,
    pub oom_kills: u64,
    /// Highest instance peak observed during this hour (bytes).
    pub peak_bytes: u64,
    /// Inbound TCP connections accepted in the function's instance cgroups during this hour,
    /// counted in the kernel.
    #[serde(default)]
    pub connections: u64,
    /// HTTP/1.x request lines seen in the function's instance cgroups during this hour,
    /// counted in the kernel.
    #[serde(default)]
    pub requests: u64,
}

impl HourBucket {
    /// This hour's requests as `source` counts them.
    pub fn requests_by(&self, source: RequestSource) -> u64 {
        match source {
            RequestSource::Platform => self.invocations,
            RequestSource::KernelRequests => self.requests,
            RequestSource::KernelConnections => self.connections,
            RequestSource::Execs => self.execs,
        }
    }
}

/// A change to add into an hour bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HourDelta {
    pub instances_started: u64,
    pub execs: u64,
    pub invocations: u64,
    pub oom_kills: u64,
    /// Taken as a max, not added.
    pub peak_bytes: u64,
    /// Kernel-counted inbound TCP connections and HTTP/1.x request lines.
    pub connections: u64,
    pub requests: u64,
}

/// Where a function's requests are counted from: the paper's workload model needs requests,
/// and what counts one depends on the platform.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RequestSource {
    /// Invocations the platform reported (`POST /v1/functions/{name}/invocations`, binds).
    Platform,
    /// HTTP/1.x request lines counted in the kernel at the instance cgroups.
    KernelRequests,
    /// Inbound TCP connections accepted, counted in the kernel: for servers that do not speak
    /// HTTP/1 (one connection is taken as one request).
    KernelConnections,
    /// One exec is one request: right for a platform that runs a process per invocation.
    #[default]
    Execs,
}

impl RequestSource {
    /// Every source, in order of preference.
    pub const ALL: [RequestSource; 4] = [
        RequestSource::Platform,
        RequestSource::KernelRequests,
        RequestSource::KernelConnections,
        RequestSource::Execs,
    ];

    /// The source a function's requests are counted from, given its hours: the platform's
    /// report where there is one (it knows what an invocation is), else the kernel's HTTP
    /// request count, else its connection count, else execs.
    pub fn of_hours<B: std::borrow::Borrow<HourBucket>>(
        hours: impl IntoIterator<Item = B>,
    ) -> RequestSource {
        let (mut invocations, mut requests, mut connections) = (false, false, false);
        for h in hours {
            let h = h.borrow();
            invocations |= h.invocations > 0;
            requests |= h.requests > 0;
            connections |= h.connections > 0;
        }
        if invocations {
            RequestSource::Platform
        } else if requests {
            RequestSource::KernelRequests
        } else if connections {
            RequestSource::KernelConnections
        } else {
            RequestSource::Execs
        }
    }

    /// The name used in JSON and in metric labels (`kernel_requests`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RequestSource::Platform => "platform",
            RequestSource::KernelRequests => "kernel_requests",
            RequestSource::KernelConnections => "kernel_connections",
            RequestSource::Execs => "execs",
        }
    }

    /// What it counts, for people: "kernel: HTTP requests", ...
    pub fn describe(self) -> &'static str {
        match self {
            RequestSource::Platform => "platform: invocations",
            RequestSource::KernelRequests => "kernel: HTTP requests",
            RequestSource::KernelConnections => "kernel: TCP connections",
            RequestSource::Execs => "execs",
        }
    }
}

impl std::fmt::Display for RequestSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The paper's per-function config: {requests, max memory}, exported by GET /v1/export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionConfig {
    pub function: String,
    /// Busiest retained hour's requests, counted from `requests_source`.
    pub requests_per_hour: u64,
    /// Where `requests_per_hour` is counted from: the platform's invocations if it reported
    /// any, else HTTP requests counted in the kernel, else TCP connections counted in the
    /// kernel, else execs.
    #[serde(default)]
    pub requests_source: RequestSource,
    /// Peak of instance peaks (bytes).
    pub max_memory_bytes: u64,
}

/// GET /v1/info → `container_metadata`: cgroups whose rule reads the container runtime's
/// metadata file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct MetadataInfo {
    /// Waiting for the file now.
    pub waiting: u64,
    /// Cgroups that had to wait for it (runc writes it after the mkdir).
    pub waited: u64,
    /// Named from the file's labels after a wait.
    pub named_after_wait: u64,
    /// Named by a later rule (or not an instance) because the file never came or lacked
    /// the label.
    pub fallbacks: u64,
}

/// GET /v1/info.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct AgentInfo {
    pub version: String,
    /// This agent's id: 32 lowercase hex digits drawn when its store was created, kept with
    /// the store (the same across restarts). `/metrics` carries it as
    /// `emars_agent_info{agent_id}`, which tells this agent's series apart in a fleet's.
    #[serde(default)]
    pub agent_id: String,
    pub kernel: String,
    /// "v1" (memory controller on a v1 hierarchy) or "v2".
    pub cgroup_mode: String,
    /// Mount point of the hierarchy that holds the memory controller.
    pub memory_hierarchy: String,
    /// Watched cgroup roots (absolute paths).
    pub roots: Vec<String>,
    /// Facts probed at start-up (tracepoints present, BTF, memory.peak, ...).
    pub features: std::collections::BTreeMap<String, bool>,
    pub programs: Vec<ProgramStatus>,
    /// Human-readable fallbacks in use, e.g. "no memcg tracepoints: peak from watermark reads".
    pub fallbacks: Vec<String>,
    /// How this agent measures where that is its configured default (no loss), e.g. peaks
    /// from the kernel watermark without live charge events.
    #[serde(default)]
    pub notes: Vec<String>,
    pub events_received: u64,
    /// Events the kernel could not queue (ring buffer full); never silent.
    pub events_lost: u64,
    /// Instances closed because their cgroup vanished without an rmdir event reaching us.
    #[serde(default)]
    pub instances_reconciled: u64,
    /// Containers named from their runtime's metadata (rules with `metadata`).
    #[serde(default)]
    pub container_metadata: MetadataInfo,
    /// Cgroups a rule matched whose names cannot be used, by reason (`function_characters`,
    /// `function_too_long`, ...: every reason, zeros too): watched, not instances.
    #[serde(default)]
    pub cgroups_unnamed: std::collections::BTreeMap<String, u64>,
    pub started_at_ms: u64,
    /// Predictive mode and the cgroup writer's counters.
    #[serde(default)]
    pub enforcement: EnforcementInfo,
    /// Fleet learning through Prometheus (`[fleet]`).
    #[serde(default)]
    pub fleet: FleetInfo,
    /// What the kernel side could not do (full tables), and paths the agent had to recover.
    #[serde(default)]
    pub kernel_counters: KernelCounters,
    /// Where the kernel side is pinned in bpffs (null: not pinned, it detaches with the agent).
    #[serde(default)]
    pub probes_pinned: Option<String>,
    /// True when this agent adopted a kernel side that kept recording while no agent ran.
    #[serde(default)]
    pub probes_adopted: bool,
    /// Pinned sets of another version or other settings that start-up removed.
    #[serde(default)]
    pub probes_unpinned: Vec<String>,
    /// What the live model holds in memory, as of this request.
    #[serde(default)]
    pub model: ModelFootprint,
    /// Reactive mode: the burst guard and admission.
    #[serde(default)]
    pub reactive: ReactiveInfo,
    /// How the peak of one use of a pooled cgroup (POST /v1/bind) is measured here.
    #[serde(default)]
    pub per_use_peak: String,
    /// The cap on functions (`store.max_functions`) and the new names it refused.
    #[serde(default)]
    pub function_cap: FunctionCapInfo,
    /// Set when the store could not be opened at this start because its database was
    /// corrupt: it was moved aside and the agent runs on a fresh one.
    #[serde(default)]
    pub store_moved_aside: Option<StoreMovedAside>,
}

/// GET /v1/info → "store_moved_aside": a corrupt store moved aside at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoreMovedAside {
    /// Where the old store is now (`<store.path>.corrupt-<unix seconds>`, beside it, mode
    /// kept; its files as they were, sled's log as sled left it where sled failed after
    /// writing to it).
    pub path: String,
    /// Why it could not be opened.
    pub reason: String,
    pub at_ms: u64,
    /// The store moved aside had itself been started fresh after an earlier one was moved
    /// aside: a second corruption in a row (check the disk).
    pub again: bool,
    /// Older moved-aside copies removed to keep at most three.
    pub removed: Vec<String>,
}

/// GET /v1/info → "reactive".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReactiveInfo {
    /// The burst guard is on (`reactive.enabled` and enforce mode).
    pub enabled: bool,
    /// How the kernel signals an instance nearing its limit.
    pub signal: String,
    /// Instances watched now.
    pub watched: u64,
    /// Signals received, limits raised, raises not made (ceiling, host full, write failed).
    pub signals: u64,
    pub raises: u64,
    pub denied: u64,
    pub watch_errors: u64,
    /// Kernel signal to limits written, over the last 1024 raises.
    pub reaction_p50_us: Option<u64>,
    pub reaction_p99_us: Option<u64>,
    pub reaction_max_us: Option<u64>,
    /// POST /v1/admission answers.
    pub admitted: u64,
    pub refused: u64,
    /// The host-pressure squeeze is on (`reactive.squeeze`, with the burst guard).
    #[serde(default)]
    pub squeeze: bool,
    /// Where pressure is watched ("psi some 100000us/1000000us on /proc/pressure/memory"),
    /// and the sources that could not be set up, with why.
    #[serde(default)]
    pub pressure_sources: Vec<String>,
    #[serde(default)]
    pub pressure_errors: Vec<String>,
    /// Pressure signals received; idle instances squeezed (held), held now; page cache
    /// reclaimed from them; holds released; squeezes or releases that failed.
    #[serde(default)]
    pub pressure_signals: u64,
    /// Candidates (instances with limits) idle at the last CPU sample.
    #[serde(default)]
    pub idle_now: u64,
    #[serde(default)]
    pub squeezes: u64,
    #[serde(default)]
    pub squeezed_now: u64,
    #[serde(default)]
    pub reclaimed_bytes: u64,
    #[serde(default)]
    pub releases: u64,
    #[serde(default)]
    pub squeeze_failed: u64,
    /// First to last pressure signal of the last episode that ended (its holds released).
    #[serde(default)]
    pub last_pressure_episode_ms: Option<u64>,
    /// From the pressure signal to the last squeeze done (every idle instance reclaimed and
    /// held).
    #[serde(default)]
    pub last_squeeze_ms: Option<u64>,
}

/// GET /v1/info → "model": the live model's entries and their heap bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelFootprint {
    pub functions: u64,
    pub live: u64,
    pub ended: u64,
    pub hours: u64,
    /// Heap bytes of those entries, estimated from their sizes and capacities (allocator
    /// overhead left out).
    pub bytes: u64,
    /// Interned function names and cgroup parent paths (the store's `strings`; removed with
    /// retention once nothing retained names them).
    #[serde(default)]
    pub strings: u64,
}

/// GET /v1/info → "function_cap": the bound on how many functions the agent knows, which
/// tenants' names could otherwise grow without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct FunctionCapInfo {
    /// `store.max_functions`.
    pub max_functions: u64,
    /// New function names refused since the agent started because `max_functions` were
    /// known: one per instance not tracked, invocations report or bind refused.
    pub refused: u64,
}

/// GET /v1/info → "fleet": fleet learning (`[fleet]`), what the last fetches from Prometheus
/// gave and, when the agent is on local history alone, why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct FleetInfo {
    /// "off" (no prometheus_url), "waiting" (no fetch finished yet), "ok", "failing" (the last
    /// fetch failed; the view of an earlier one is still in use), "expired" (fetches failed for
    /// longer than max_age_s: local history alone).
    pub state: String,
    /// Why the last fetch failed (or why fleet learning is off); null when it succeeded.
    #[serde(default)]
    pub reason: Option<String>,
    pub prometheus_url: String,
    /// A fleet view is blended into the recommendations now.
    pub in_use: bool,
    /// Functions and samples in the view in use.
    pub functions: u64,
    pub samples: f64,
    /// Functions the last answer held beyond the cap (store.max_functions), left out.
    pub functions_left_out: u64,
    pub last_success_ms: Option<u64>,
    pub last_attempt_ms: Option<u64>,
    /// How long the last fetch took (request, read and parse), in milliseconds.
    pub last_fetch_ms: Option<u64>,
    /// Seconds since the view in use was fetched.
    pub age_s: Option<u64>,
    pub refreshes_ok: u64,
    pub refreshes_failed: u64,
}

/// GET /v1/info → "enforcement".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
pub struct EnforcementInfo {
    /// "observe" or "enforce".
    pub mode: String,
    /// Limits written into new instances at mkdir.
    pub new_instance_writes: u64,
    /// Writes of any kind (new instances, apply, API) that succeeded / failed / were refused.
    pub writes_ok: u64,
    /// Writes not made: the limits asked for were in force already (no audit record).
    #[serde(default)]
    pub unchanged: u64,
    pub writes_failed: u64,
    pub refusals: u64,
    /// Audit records that could not be stored (a write without a durable intent is not made).
    #[serde(default)]
    pub audit_errors: u64,
    /// Largest delay from a cgroup's mkdir to its limits being written, microseconds.
    pub max_mkdir_to_write_us: u64,
}

/// Nearest-rank percentile of an ascending slice: the smallest value such that at least `p`
/// percent of the values are at or below it (rank = ceil(p/100 · n), clamped to 1..=n).
/// `p` is in percent (50.0 = median). An empty slice gives 0.
pub fn nearest_rank(sorted: &[u64], p: f64) -> u64 {
    let n = sorted.len();
    if n == 0 {
        return 0;
    }
    // For integer p, p·n is exact in f64, so the ceil never rounds across an integer.
    let rank = (p * n as f64 / 100.0).ceil();
    let rank = if rank.is_nan() || rank < 1.0 {
        1
    } else {
        (rank as usize).min(n)
    };
    sorted[rank - 1]
}

impl PeakPercentiles {
    /// p50/p90/p95/p99 by nearest rank over an ascending slice (all zero when empty).
    pub fn from_sorted(sorted: &[u64]) -> Self {
        PeakPercentiles {
            p50: nearest_rank(sorted, 50.0),
            p90: nearest_rank(sorted, 90.0),
            p95: nearest_rank(sorted, 95.0),
            p99: nearest_rank(sorted, 99.0),
        }
    }
}

#[cfg(test)]
mod percentile_tests {
    use super::*;

    #[test]
    fn nearest_rank_edges() {
        assert_eq!(nearest_rank(&[], 50.0), 0);
        assert_eq!(nearest_rank(&[7], 0.0), 7);
        assert_eq!(nearest_rank(&[7], 99.0), 7);
        assert_eq!(nearest_rank(&[1, 2], 50.0), 1);
        assert_eq!(nearest_rank(&[1, 2], 51.0), 2);
        assert_eq!(nearest_rank(&[1, 2, 3], 100.0), 3);
        assert_eq!(nearest_rank(&[1, 2, 3], 150.0), 3);
        assert_eq!(nearest_rank(&[1, 2, 3], f64::NAN), 1);
    }

    #[test]
    fn percentiles_of_1_to_100() {
        let v: Vec<u64> = (1..=100).collect();
        let p = PeakPercentiles::from_sorted(&v);
        assert_eq!((p.p50, p.p90, p.p95, p.p99), (50, 90, 95, 99));
        // n = 10: p95 and p99 both round up to the maximum.
        let v: Vec<u64> = (1..=10).collect();
        let p = PeakPercentiles::from_sorted(&v);
        assert_eq!((p.p50, p.p90, p.p95, p.p99), (5, 9, 10, 10));
        assert_eq!(
            PeakPercentiles::from_sorted(&[]),
            PeakPercentiles::default()
        );
    }
}

#[cfg(test)]
mod request_source_tests {
    use super::*;

    fn hour(invocations: u64, requests: u64, connections: u64, execs: u64) -> HourBucket {
        HourBucket {
            hour_start_ms: HOUR_MS,
            invocations,
            requests,
            connections,
            execs,
            ..HourBucket::default()
        }
    }

    /// Platform over kernel requests over kernel connections over execs, as soon as any one
    /// hour has a count of the preferred kind.
    #[test]
    fn source_is_the_most_preferred_with_a_count() {
        use RequestSource::*;
        let of = |hours: &[HourBucket]| RequestSource::of_hours(hours);
        assert_eq!(of(&[]), Execs);
        assert_eq!(of(&[hour(0, 0, 0, 0)]), Execs);
        assert_eq!(of(&[hour(0, 0, 0, 9)]), Execs);
        assert_eq!(of(&[hour(0, 0, 0, 9), hour(0, 0, 1, 0)]), KernelConnections);
        assert_eq!(of(&[hour(0, 0, 5, 9), hour(0, 1, 0, 0)]), KernelRequests);
        assert_eq!(of(&[hour(0, 7, 5, 9), hour(1, 0, 0, 0)]), Platform);
        assert_eq!(of(&[hour(3, 0, 0, 0)]), Platform);
    }

    #[test]
    fn requests_by_reads_the_sources_counter() {
        let h = hour(1, 2, 3, 4);
        let got: Vec<u64> = RequestSource::ALL
            .iter()
            .map(|s| h.requests_by(*s))
            .collect();
        assert_eq!(got, [1, 2, 3, 4]);
    }

    /// The JSON names are the metric labels, and a summary or config without the new fields
    /// (an older agent's) reads as execs.
    #[test]
    fn source_names_and_defaults() {
        for s in RequestSource::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        let old = r#"{"function":"f","requests_per_hour":3,"max_memory_bytes":1}"#;
        let c: FunctionConfig = serde_json::from_str(old).unwrap();
        assert_eq!(c.requests_source, RequestSource::Execs);
        let old = r#"{"hour_start_ms":0,"instances_started":1,"execs":2,"invocations":0,
            "oom_kills":0,"peak_bytes":5}"#;
        let h: HourBucket = serde_json::from_str(old).unwrap();
        assert_eq!((h.connections, h.requests), (0, 0));
    }
}

/// One instance's outcome, from the store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When the instance ran (unix ms); its age sets its weight.
    pub at_ms: u64,
    pub peak_bytes: u64,
    pub oom_killed: bool,
    /// memory.max in force on the instance, when known.
    pub limit_bytes: Option<u64>,
}

/// One ended instance bound with a size hint, from the store: what the input-aware fit
/// (`policy::sized`) learns peak against input from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizedSample {
    /// When the instance ended (unix ms).
    pub at_ms: u64,
    /// The bind's `input_bytes`.
    pub input_bytes: u64,
    /// Its peak: exact unless OOM-killed, when it is a lower bound.
    pub peak_bytes: u64,
    pub oom_killed: bool,
    /// memory.max of an OOM-killed instance, when known (also a lower bound).
    pub limit_bytes: Option<u64>,
}

/// Length of an hour bucket in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;
