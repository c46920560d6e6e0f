//! The API's request and response bodies: one definition for the server ([`super`]) and the
//! CLI, so that neither renders or parses untyped JSON. A function name's pattern is stated by
//! [`super::openapi`] from the registry's rule.

use serde::{Deserialize, Serialize};

pub use crate::model::audit::AuditRecord;
pub use crate::model::live::FunctionsResponse;
pub use crate::model::{AgentInfo, FunctionConfig, FunctionSummary, HourBucket, InstanceRecord};
pub use crate::policy::recommend::Recommendation;
pub use crate::policy::Generation;

/// GET /healthz.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub ok: bool,
}

/// The pattern of an instance name ([`crate::model::registry::valid_instance_name`]).
pub const INSTANCE_NAME_PATTERN: &str = "^[^\\x00-\\x1F\\x7F-\\x9F]{1,255}$";
/// The pattern of a cgroup named in a bind or release ([`valid_cgroup_arg`]).
pub const CGROUP_PATTERN: &str = "^(/+([^/.][^/]*|\\.[^/.][^/]*|\\.\\.[^/]+))+/*$";
/// The longest cgroup named in a bind or release, in characters.
pub const MAX_CGROUP_ARG_CHARS: usize = 4096;

/// Whether `cgroup` can name a cgroup for bind or release ([`CGROUP_PATTERN`]): an absolute
/// path of at most [`MAX_CGROUP_ARG_CHARS`] characters with at least one component and none
/// that is `.` or `..`. Whether it exists and is a pooled one is the event loop's to say.
pub fn valid_cgroup_arg(cgroup: &str) -> bool {
    cgroup.starts_with('/')
        && cgroup.chars().count() <= MAX_CGROUP_ARG_CHARS
        && cgroup.split('/').any(|c| !c.is_empty())
        && !cgroup.split('/').any(|c| c == "." || c == "..")
}

/// Body of the writes that take no arguments (POST /v1/apply, /v1/recommendations/generate):
/// `{}`, and nothing else. Like every write it is sent as JSON (the guard refuses other
/// content types).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({})))]
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

/// GET /v1/functions/{name}/instances: one page of a function's instances (see api::paging):
/// oldest first (`?order=newest`: newest first), at most `?limit=N` (default 1000, at most
/// 10000), only live or only ended ones with `?live=true|false`. `next`, present when more
/// follow, asks for them as `?cursor=<next>` with the same other parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstancesResponse {
    pub function: String,
    pub instances: Vec<InstanceView>,
    /// The cursor of the next page; absent on the last one. Opaque: pass it back as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9a-f]{32}$", nullable = false)]
    pub next: Option<String>,
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
#[schema(examples(json!({"count": 12})))]
pub struct InvocationsReport {
    /// 1..=1_000_000_000.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub count: u64,
    /// Unix ms the invocations belong to; now when absent. It must lie within the agent's
    /// retention and at most 5 minutes ahead of its clock (else 422).
    #[serde(default)]
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
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
#[schema(examples(json!({"function": "orders:resize"})))]
pub struct AdmissionBody {
    /// Function name: 1 to 128 of A-Z a-z 0-9 . _ : -
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

/// Body of POST /v1/functions/{name}/instances/{instance}/limits: memory.max and/or
/// memory.high to write, at least one of them (a field absent or null is left as it is).
pub use crate::model::LimitRequest as LimitsBody;

/// The limits to write.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct LimitsFields {
    /// memory.max (v1: memory.limit_in_bytes), bytes.
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
    max_bytes: Option<u64>,
    /// memory.high (v1: the soft limit), bytes; at most max_bytes.
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
    high_bytes: Option<u64>,
}

impl utoipa::ToSchema for LimitsBody {}

impl utoipa::PartialSchema for LimitsBody {
    /// The fields, closed to others, and at least one of them not null.
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            AdditionalProperties, AllOfBuilder, AnyOfBuilder, ObjectBuilder, Schema, Type,
        };
        let mut fields = match LimitsFields::schema() {
            utoipa::openapi::RefOr::T(Schema::Object(o)) => o,
            other => return other,
        };
        fields.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
        let given = |field: &str| {
            ObjectBuilder::new()
                .property(field, ObjectBuilder::new().schema_type(Type::Integer))
                .required(field)
        };
        AllOfBuilder::new()
            .description(Some(
                "memory.max and/or memory.high to write, at least one of them (a field absent \
                 or null is left as it is)",
            ))
            .item(Schema::Object(fields))
            .item(
                AnyOfBuilder::new()
                    .item(given("max_bytes"))
                    .item(given("high_bytes")),
            )
            .examples([
                serde_json::json!({"max_bytes": 268_435_456u64, "high_bytes": 201_326_592u64}),
            ])
            .into()
    }
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
    /// Live instances left alone because an operator set their limits by hand (set-limit):
    /// they keep them until they end.
    #[serde(default)]
    pub kept: Vec<crate::policy::KeptInstance>,
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
    /// "pinned" (configured), "oom_bump" (raised after an OOM kill), "history" (the
    /// percentile of the retained instance peaks, with margin: this host's, blended with the
    /// fleet's where `fleet_samples` > 0), "fleet" (no history here: the other hosts' peaks,
    /// `[fleet]`) or "prior" (no history here or in the fleet: from the host's other
    /// functions, `[policy.prior]`, with the burst guard behind it);
    /// asked with `input_bytes`: "input_fit" (the function's fit of peak against input) or
    /// "fallback" (the function's recommendation, `fallback` says why).
    pub source: String,
    pub confidence: f64,
    /// Where the samples behind the limits came from: this host's instances and the other
    /// hosts' (`[fleet]`, through Prometheus).
    pub local_samples: u64,
    pub fleet_samples: f64,
    pub computed_at_ms: u64,
    /// The `input_bytes` asked for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_bytes: Option<u64>,
    /// Why the fit did not answer for that input: "few_samples", "inputs_alike", "spread",
    /// "extrapolation" (far above the inputs seen), "pinned", "disabled" or "no_fit".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
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
#[schema(examples(json!({"cgroup": "/pool/cg-3", "function": "orders:resize", "instance": "use-42"})))]
pub struct BindBody {
    /// The cgroup directory, or its path below the hierarchy: absolute, without `.` or `..`
    /// components.
    #[schema(
        pattern = "^(/+([^/.][^/]*|\\.[^/.][^/]*|\\.\\.[^/]+))+/*$",
        max_length = 4096
    )]
    pub cgroup: String,
    /// Function name: 1 to 128 of A-Z a-z 0-9 . _ : -
    pub function: String,
    /// Instance name: 1 to 255 characters, no control characters.
    #[schema(pattern = "^[^\\x00-\\x1F\\x7F-\\x9F]{1,255}$")]
    pub instance: String,
    /// The size of the invocation's input in bytes (optional): the function's limits follow
    /// it once the agent has learned peak against input (`[policy.sized]`), and the record
    /// keeps it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "input_bytes_field"
    )]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub input_bytes: Option<u64>,
}

/// The largest `input_bytes` (in the body of a bind and the query of a function's limits):
/// what a signed 64-bit integer holds, as the document's `int64` says.
pub const MAX_INPUT_BYTES: u64 = i64::MAX as u64;

/// `input_bytes`: absent, null or a whole number of bytes up to [`MAX_INPUT_BYTES`]; anything
/// else is refused naming the field (serde's own message names only the type).
fn input_bytes_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    match &v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Number(n) if n.as_u64().is_some_and(|n| n <= MAX_INPUT_BYTES) => {
            Ok(n.as_u64())
        }
        other => {
            let shown: String = other.to_string().chars().take(40).collect();
            Err(serde::de::Error::custom(format!(
                "input_bytes must be a whole number of bytes from 0 to {MAX_INPUT_BYTES}, got \
                 {shown}"
            )))
        }
    }
}

/// POST /v1/release: the use of `cgroup` ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"cgroup": "/pool/cg-3"})))]
pub struct ReleaseBody {
    /// As in BindBody.
    #[schema(
        pattern = "^(/+([^/.][^/]*|\\.[^/.][^/]*|\\.\\.[^/]+))+/*$",
        max_length = 4096
    )]
    pub cgroup: String,
}
