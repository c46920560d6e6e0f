//! The API's request and response bodies: one definition for the server ([`super`]) and the
//! CLI ([`crate::cli::client`]), so that neither renders or parses untyped JSON.

use serde::{Deserialize, Serialize};

pub use crate::model::{AgentInfo, FunctionConfig, FunctionSummary, HourBucket, InstanceRecord};
pub use crate::policy::actuator::AuditRecord;
pub use crate::policy::recommend::Recommendation;
pub use crate::policy::Generation;

/// GET /healthz.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub ok: bool,
}

/// Body of the writes that take no arguments (POST /v1/apply, /v1/recommendations/generate):
/// `{}`. Like every write it is sent as JSON (the guard refuses other content types).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NoArguments {}

/// Every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What was wrong, with the value.
    pub error: String,
    pub status: u16,
}

/// GET /v1/functions/{name}: the [`FunctionSummary`] fields flattened at the top level, plus
/// `"hours"`, the function's hour buckets, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionDetail {
    #[serde(flatten)]
    pub summary: FunctionSummary,
    pub hours: Vec<HourBucket>,
}

/// GET /v1/functions/{name}/instances: oldest first. `?live=true` keeps only live instances,
/// `?live=false` only ended ones; `?limit=N` (1..=10000) keeps the newest N (after `live`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstancesResponse {
    pub function: String,
    pub instances: Vec<InstanceView>,
}

/// An instance as GET /v1/functions/{name}/instances shows it: its record, and for a live one
/// what its cgroup is charged now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceView {
    #[serde(flatten)]
    pub record: InstanceRecord,
    /// Bytes charged to the live instance's cgroup at this request (v2 memory.current, v1
    /// memory.usage_in_bytes); absent for ended instances, and where the cgroup could not be
    /// read (gone meanwhile, or no cgroup writer runs in this process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_bytes: Option<u64>,
}

/// GET /v1/functions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionsResponse {
    pub functions: Vec<FunctionSummary>,
}

/// GET /v1/export: the paper's per-function config {requests, max memory}.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExportResponse {
    pub generated_at_ms: u64,
    pub functions: Vec<FunctionConfig>,
}

/// Body of POST /v1/functions/{name}/invocations. Unknown fields are refused so that a typo
/// (`"atms"`) is not silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvocationsReport {
    /// 1..=1_000_000_000.
    pub count: u64,
    /// Unix ms the invocations belong to; now when absent.
    #[serde(default)]
    pub at_ms: Option<u64>,
}

/// Answer of POST /v1/functions/{name}/invocations (200).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InvocationsAccepted {
    pub function: String,
    pub count: u64,
    pub at_ms: u64,
}

pub use crate::policy::reactive::Admission;

/// Body of POST /v1/admission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdmissionBody {
    pub function: String,
}

/// One function's admission answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdmissionCount {
    pub admitted: u64,
    pub refused: u64,
}

/// GET /v1/admission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdmissionCounts {
    pub functions: std::collections::BTreeMap<String, AdmissionCount>,
}

/// Body of POST /v1/functions/{name}/instances/{instance}/limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsBody {
    #[serde(default)]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub high_bytes: Option<u64>,
}

/// GET /v1/recommendations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecommendationsResponse {
    /// "observe" or "enforce".
    pub mode: String,
    pub recommendations: Vec<Recommendation>,
}

/// GET /v1/generations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GenerationsResponse {
    pub generations: Vec<Generation>,
}

/// POST /v1/apply: one audit record per write attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WritesResponse {
    pub writes: Vec<AuditRecord>,
}

/// GET /v1/audit: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditResponse {
    pub audit: Vec<AuditRecord>,
}

/// GET /v1/functions/{name}/limits: the limits a new instance of the function gets, from the
/// live model (what the agent writes at mkdir or bind in enforce mode), for platforms that set
/// limits themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FunctionLimits {
    pub function: String,
    pub max_bytes: u64,
    pub high_bytes: u64,
    /// "pinned" (configured), "oom_bump" (raised after an OOM kill) or "history" (the
    /// percentile of the retained instance peaks, with margin).
    pub source: String,
    pub confidence: f64,
    pub computed_at_ms: u64,
}

/// GET /v1/functions/{name}/keepalive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeepAliveAdvice {
    pub function: String,
    #[serde(flatten)]
    pub advice: crate::policy::keepalive::KeepAlive,
}

/// POST /v1/bind: `cgroup` (the directory, or its path below the hierarchy as the kernel
/// shows it: "/pool/cg-3") now serves `function` as `instance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BindBody {
    pub cgroup: String,
    pub function: String,
    pub instance: String,
}

/// POST /v1/release: the use of `cgroup` ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    pub cgroup: String,
}
