//! The local HTTP API (axum): what the agent knows, as JSON.
//!
//! | method | path                                   | answer                                              |
//! |--------|----------------------------------------|-----------------------------------------------------|
//! | GET    | `/`, `/assets/app.{js,css}`            | the web page ([`web`]), read-only                   |
//! | GET    | `/healthz`                             | `{"ok": true}`                                      |
//! | GET    | `/metrics`                             | Prometheus text format ([`metrics`])                |
//! | GET    | `/v1/openapi.json`                     | this API as an OpenAPI 3.1 document ([`openapi`])  |
//! | GET    | `/v1/info`                             | [`AgentInfo`]                                       |
//! | GET    | `/v1/functions`                        | `{"functions": [FunctionSummary…]}`                 |
//! | GET    | `/v1/functions/{name}`                 | [`FunctionDetail`]: the summary's fields + `"hours"` |
//! | GET    | `/v1/functions/{name}/instances`       | `{"function", "instances": [InstanceView…], "next"}`: a page ([`paging`]) |
//! | POST   | `/v1/functions/{name}/invocations`     | `{"function", "count", "at_ms"}`                    |
//! | GET    | `/v1/export`                           | `{"generated_at_ms", "functions": [FunctionConfig…]}` |
//! | GET    | `/v1/functions/{name}/recommendation`  | [`Recommendation`]: the numbers and the inputs behind them |
//! | GET    | `/v1/recommendations`                  | `{"mode", "recommendations": [Recommendation…]}`    |
//! | POST   | `/v1/recommendations/generate`         | a new [`Generation`], kept and exported             |
//! | GET    | `/v1/generations?limit=N&function=F`   | `{"generations": [Generation…]}`, newest first      |
//! | POST   | `/v1/apply`                            | `{"writes": [AuditRecord…]}`: one-shot enforcement  |
//! | GET    | `/v1/audit?limit=N`                    | `{"audit": [AuditRecord…]}`, newest first           |
//! | POST   | `/v1/functions/{name}/instances/{instance}/limits` | `{"max_bytes", "high_bytes"}` → [`AuditRecord`]; 422 when refused |
//!
//! Every error, including unknown routes (404), wrong methods (405, with `Allow`) and rejected
//! bodies (400/413/415), is `{"error": "<what was wrong, with the value>", "status": <code>}`.
//! A function name that does not satisfy [`valid_function_name`] is a 400 on every route.
//!
//! Before any route: [`guard`] refuses foreign Host headers and cross-site requests (403) and
//! every write without the token (401); then a method the route does not take is a 405 with
//! `Allow`, and a routed write without a JSON content type a 415. Request bodies are JSON
//! objects as the document describes them ([`body`]), anything else a 400. [`server`] bounds
//! connections and time. Writes in observe mode are 409, as is an expensive operation while
//! another one runs; a well-formed request the agent refuses for what it finds (usage, clock,
//! roots) is a 422, where the document says so. A write that would add a function past
//! `store.max_functions` (invocations, bind) is 507: the agent has no room for one more
//! function until retention prunes one.

pub mod body;
pub mod guard;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod paging;
pub mod server;
pub mod token;
pub mod web;
pub mod wire;
pub mod work;

pub use wire::*;

use crate::clock::now_ms;
use crate::policy::reactive::host_available_bytes;
use std::future::Future;
use std::sync::{Arc, RwLock};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{middleware, Extension, Json, Router};
use body::JsonObject;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::kernel::cgroupfs::CgroupfsError;
use crate::model::registry::valid_function_name;
pub use crate::model::tracker::BindError;
use crate::model::tracker::FunctionsFull;
use crate::model::LimitRequest;
use crate::policy::actuator::{Actuator, ActuatorError, BelowUsage, REASON_BY_HAND};
use crate::policy::{Policy, PolicyError};
use crate::store::{Store, StoreError};

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Largest `count` of one invocations report.
pub const MAX_INVOCATIONS_PER_REPORT: u64 = 1_000_000_000;
/// How far into the future a reported `at_ms` may lie (clocks of platform and host differ).
pub const MAX_FUTURE_MS: u64 = 5 * 60 * 1000;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    /// Updated by the agent as programs attach and events arrive.
    pub info: Arc<RwLock<AgentInfo>>,
    /// Recommendations and the cgroup writer; None in API-only tests (503 on those routes).
    pub predictive: Option<Predictive>,
    /// The store's retention: reported invocations older than this are refused.
    pub retention_ms: u64,
    /// Bind and release of pooled cgroups, carried out by the agent's event loop (which owns
    /// the tracker); None where no event loop runs (503 on those routes).
    pub pool: Option<tokio::sync::mpsc::UnboundedSender<PoolCommand>>,
    /// The whole-model answers, shared by the requests that ask for them ([`work::Snapshot`]).
    pub snapshots: Arc<Snapshots>,
}

/// One [`work::Snapshot`] per whole-model answer.
#[derive(Debug, Default)]
pub struct Snapshots {
    metrics: work::Snapshot,
    functions: work::Snapshot,
    recommendations: work::Snapshot,
    export: work::Snapshot,
    /// The model's footprint in /v1/info (a walk over every function).
    footprint: work::Snapshot<crate::model::ModelFootprint>,
}

/// A bind or release for the event loop, with where to answer.
#[derive(Debug)]
pub enum PoolCommand {
    Bind {
        body: BindBody,
        reply: tokio::sync::oneshot::Sender<Result<InstanceRecord, BindError>>,
    },
    Release {
        body: ReleaseBody,
        reply: tokio::sync::oneshot::Sender<Result<InstanceRecord, BindError>>,
    },
}

/// What the predictive routes need.
#[derive(Clone)]
pub struct Predictive {
    pub policy: Arc<Policy>,
    pub actuator: Arc<Actuator>,
    /// Admission's reserve and the burst guard's settings.
    pub reactive: crate::policy::reactive::ReactiveConfig,
    /// Limits written here (apply, set-limit) told to the agent's event loop, which keeps the
    /// instance's record and the burst guard's watch in step with them.
    pub limits_written: Option<tokio::sync::mpsc::UnboundedSender<(u64, crate::model::Limits)>>,
    /// Admission answers per function since the agent started.
    pub admissions: Arc<std::sync::Mutex<std::collections::BTreeMap<String, AdmissionCount>>>,
}

impl Predictive {
    fn tell(&self, audit: &AuditRecord) {
        if let (Some(tx), true) = (&self.limits_written, audit.is_ok()) {
            let _ = tx.send((audit.cgroup_id, audit.new));
        }
    }
}

/// An error answer: `{"error": message, "status": code}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(error = %message, "API request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            status: self.status.as_u16(),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // Only reachable if the store's rule is stricter than the API's.
            StoreError::InvalidName { .. } => ApiError::bad_request(e.to_string()),
            StoreError::FunctionsFull(e) => functions_full(&e),
            _ => ApiError::internal(format!("store error: {e}")),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "request body must be JSON: expected header `Content-Type: application/json`",
            ),
            // axum answers 422 for well-formed JSON of the wrong shape; we say 400.
            JsonRejection::JsonDataError(e) => ApiError::bad_request(format!(
                "invalid request body: {} (a JSON object as the operation's request body in \
                 GET /v1/openapi.json says)",
                source_text(&e)
            )),
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::bad_request(format!("malformed JSON body: {}", source_text(&e)))
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than the {BODY_LIMIT}-byte limit"),
            ),
            other => ApiError::new(other.status(), other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::new(r.status(), format!("bad path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(format!("bad query string: {}", r.body_text()))
    }
}

/// A new function refused by `store.max_functions`: 507, the agent has no room to keep one
/// more function; it has again once retention prunes one.
fn functions_full(e: &FunctionsFull) -> ApiError {
    ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
}

/// The innermost cause of an error, without axum's generic prefix.
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

type ApiResult<T> = Result<T, ApiError>;

/// Every route, each with its OpenAPI operation (`#[utoipa::path]` on the handler): a route
/// cannot be added here without being documented, and the document is made from these.
fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(web::index))
        .routes(routes!(web::app_js))
        .routes(routes!(web::app_css))
        .routes(routes!(healthz))
        .routes(routes!(metrics_text))
        .routes(routes!(openapi::document))
        .routes(routes!(info))
        .routes(routes!(list_functions))
        .routes(routes!(get_function))
        .routes(routes!(list_instances))
        .routes(routes!(post_invocations))
        .routes(routes!(export))
        .routes(routes!(get_recommendation))
        .routes(routes!(get_limits))
        .routes(routes!(get_keepalive))
        .routes(routes!(list_recommendations))
        .routes(routes!(generate))
        .routes(routes!(list_generations))
        .routes(routes!(apply_all))
        .routes(routes!(list_audit))
        .routes(routes!(admission, admission_counts))
        .routes(routes!(bind))
        .routes(routes!(release))
        .routes(routes!(set_limits))
}

/// The routes and the finished document they make: one place for both the server and
/// `emars openapi`, so that what is printed is what is served.
fn routes_and_document() -> (axum::Router<ApiState>, utoipa::openapi::OpenApi) {
    let (routes, mut document) = routes().split_for_parts();
    openapi::finish(&mut document);
    (routes, document)
}

/// The API's OpenAPI 3.1 document (served at GET /v1/openapi.json, printed by `emars openapi`).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    routes_and_document().1
}

/// The API's routes, with JSON 404/405 fallbacks and the body limit, behind the guard.
pub fn router(state: ApiState, guard: Arc<guard::Guard>) -> Router {
    let (routes, document) = routes_and_document();
    routes
        // On routed requests only: a method a route does not take is a 405 (with `Allow`)
        // before any body is looked at.
        .route_layer(middleware::from_fn(guard::json_body))
        // Applies to the routes added above, so it must come after them.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(Extension(openapi::Document::new(&document)))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // Outermost, so it also covers the fallbacks and every route added later.
        .layer(middleware::from_fn_with_state(guard, guard::layer))
        .with_state(state)
}

/// Serves the API on `listeners` until `shutdown` completes, then finishes open requests.
/// Runs on the caller's runtime; the agent uses [`spawn`].
pub async fn serve(
    listeners: listen::Listeners,
    state: ApiState,
    guard: Arc<guard::Guard>,
    bounds: server::Bounds,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(listeners, router(state, guard), bounds, shutdown).await
}

/// Threads of the API's own runtime: the agent's event loop and store flush run on another,
/// so that no request (nor a storm of them) delays them.
pub const API_THREADS: usize = 2;

/// Niceness of the API's threads: when the CPU is short, the event loop (mkdir to limits) and
/// the store flush go first. Raising one's own niceness needs no privilege.
const API_NICE: i32 = 10;

/// Lowers the calling thread's priority (Linux: setpriority on thread id 0 is this thread).
fn yield_to_the_event_path() {
    // SAFETY: setpriority on the calling thread; no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, API_NICE) } != 0 {
        tracing::debug!(
            "API thread priority not lowered: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Serves the API ([`serve`]) on a runtime of its own, in a thread of its own.
pub fn spawn(
    listeners: listen::Listeners,
    state: ApiState,
    guard: Arc<guard::Guard>,
    bounds: server::Bounds,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(API_THREADS)
        // The work gates let this many run; the rest is headroom for tokio's own use.
        .max_blocking_threads(work::RUNNING + 2)
        .thread_name("emars-api")
        .on_thread_start(yield_to_the_event_path)
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("emars-api".into())
        .spawn(move || rt.block_on(serve(listeners, state, guard, bounds, shutdown)))
}

/// Runs a blocking store call off the async workers, within the API's work bounds
/// ([`work::run`]).
async fn blocking<T, F>(f: F) -> ApiResult<T>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    work::run(f).await?.map_err(ApiError::from)
}

/// A JSON answer from bytes already encoded (a snapshot).
fn json_bytes(body: bytes::Bytes) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// `v` encoded as JSON, for a snapshot.
fn encode_json<T: serde::Serialize>(v: &T) -> ApiResult<bytes::Bytes> {
    serde_json::to_vec(v)
        .map(bytes::Bytes::from)
        .map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))
}

/// The function name of the path, checked against [`valid_function_name`].
fn function_name(path: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let Path(name) = path?;
    if valid_function_name(&name) {
        Ok(name)
    } else {
        let shown: String = name.chars().take(140).collect();
        let more = if shown.len() < name.len() { "…" } else { "" };
        Err(ApiError::bad_request(format!(
            "invalid function name {shown:?}{more} ({} bytes): expected 1 to 128 characters of A-Z a-z 0-9 . _ : -",
            name.len()
        )))
    }
}

/// A cgroup named in a bind or release, checked as the document states it
/// ([`wire::valid_cgroup_arg`]); where it is and what it serves is the event loop's to check.
fn check_cgroup_arg(cgroup: &str) -> ApiResult<()> {
    if wire::valid_cgroup_arg(cgroup) {
        return Ok(());
    }
    let shown: String = cgroup.chars().take(200).collect();
    Err(ApiError::bad_request(format!(
        "invalid cgroup {shown:?}: give the path below the hierarchy (\"/pool/cg-1\") or the \
         absolute directory, at most {} characters, without . or .. components",
        wire::MAX_CGROUP_ARG_CHARS
    )))
}

/// A bind's names, checked as the document states them, before the event loop is asked.
fn check_bind(body: &BindBody) -> ApiResult<()> {
    check_cgroup_arg(&body.cgroup)?;
    if !valid_function_name(&body.function) {
        let shown: String = body.function.chars().take(140).collect();
        return Err(ApiError::bad_request(format!(
            "invalid function name {shown:?}: expected 1 to 128 characters of A-Z a-z 0-9 . _ : -"
        )));
    }
    if !crate::model::registry::valid_instance_name(&body.instance) {
        let shown: String = body.instance.chars().take(140).collect();
        return Err(ApiError::bad_request(format!(
            "invalid instance name {shown:?}: expected 1 to 255 characters, none a control \
             character"
        )));
    }
    Ok(())
}

fn unknown_function(name: &str) -> ApiError {
    ApiError::not_found(format!("unknown function {name:?}"))
}

#[utoipa::path(
    get, path = "/healthz", tag = "agent",
    responses((status = 200, description = "The agent answers", body = Health))
)]
async fn healthz() -> Json<Health> {
    Json(Health { ok: true })
}

/// The agent's info as the event loop last wrote it, with the store's cap on functions now.
fn agent_info(state: &ApiState) -> AgentInfo {
    // A writer that panicked leaves plain data behind; reading it is still fine.
    let mut info = state
        .info
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    info.function_cap = state.store.function_cap();
    info
}

/// The Prometheus exposition ([`metrics`]), assembled off the async threads.
#[utoipa::path(
    get, path = "/metrics", tag = "agent",
    responses((status = 200, description = "Prometheus / OpenMetrics text exposition (docs/metrics.md)",
        content_type = "application/openmetrics-text", body = String))
)]
async fn metrics_text(State(state): State<ApiState>) -> ApiResult<Response> {
    let snapshots = state.snapshots.clone();
    // Counters move every second: rebuilt at most once a second, whoever asks.
    let text = snapshots
        .metrics
        .get(
            || None,
            move || {
                let info = agent_info(&state);
                let bounds = metrics::peak_buckets();
                let peaks = state.store.peak_histograms(&bounds);
                let functions = state.store.functions()?;
                let limits = match &state.predictive {
                    Some(p) => functions
                        .iter()
                        .filter_map(|f| {
                            let r = p.policy.cached(&f.name)?;
                            Some((f.name.clone(), r.max_bytes, r.high_bytes))
                        })
                        .collect(),
                    None => Vec::new(),
                };
                let snap = metrics::Snapshot {
                    bounds,
                    peaks,
                    functions,
                    limits,
                    info,
                };
                snap.render()
                    .map(bytes::Bytes::from)
                    .map_err(|e| ApiError::internal(format!("encoding the metrics: {e}")))
            },
        )
        .await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The agent's info, with the model's footprint (which the metrics do not carry) as of the
/// model's last change (counted again at most once a second).
#[utoipa::path(
    get, path = "/v1/info", tag = "agent",
    responses((status = 200, description = "Kernel, cgroup mode, programs attached, fallbacks, counters",
        body = AgentInfo))
)]
async fn info(State(state): State<ApiState>) -> ApiResult<Json<AgentInfo>> {
    let mut info = agent_info(&state);
    let (store, version) = (state.store.clone(), state.store.clone());
    info.model = state
        .snapshots
        .footprint
        .get(
            move || Some(version.changes()),
            move || Ok(store.footprint()),
        )
        .await?;
    Ok(Json(info))
}

/// A [`FunctionsResponse`], assembled from JSON the live model keeps per function.
#[utoipa::path(
    get, path = "/v1/functions", tag = "functions",
    responses((status = 200, description = "Every function", body = FunctionsResponse,
        links(
            ("function" = (operation_id = "get_function", parameters(("name" = "$response.body#/functions/0/name")),
                description = "The first function")),
            ("instances" = (operation_id = "list_instances", parameters(("name" = "$response.body#/functions/0/name")),
                description = "The first function's instances")),
        )))
)]
async fn list_functions(State(state): State<ApiState>) -> ApiResult<Response> {
    let (snapshots, store) = (state.snapshots.clone(), state.store.clone());
    let body = snapshots
        .functions
        .get(
            move || Some(store.changes()),
            move || Ok(bytes::Bytes::from(state.store.functions_json())),
        )
        .await?;
    Ok(json_bytes(body))
}

#[utoipa::path(
    get, path = "/v1/functions/{name}", tag = "functions", params(openapi::FunctionPath),
    responses(
        (status = 200, description = "The function's summary and hour buckets, oldest first", body = FunctionDetail),
        (status = 404, description = "Unknown function", body = ErrorBody),
    )
)]
async fn get_function(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<FunctionDetail>> {
    let name = function_name(path)?;
    let lookup = name.clone();
    let found = blocking(move || {
        let Some(summary) = state.store.function(&lookup)? else {
            return Ok(None);
        };
        let hours = state.store.hours(&lookup)?;
        Ok(Some(FunctionDetail { summary, hours }))
    })
    .await?;
    found.map(Json).ok_or_else(|| unknown_function(&name))
}

#[utoipa::path(
    get, path = "/v1/functions/{name}/instances", tag = "functions",
    params(openapi::FunctionPath, openapi::InstancesParams),
    responses(
        (status = 200, description = "A page of instances (oldest first unless `order=newest`), live ones with \
            their usage now; `next` when more follow", body = InstancesResponse,
            links(
                ("limits" = (operation_id = "set_limits", parameters(("name" = "$response.body#/function"),
                    ("instance" = "$response.body#/instances/0/instance")),
                    description = "Limits for the page's first instance")),
                ("next" = (operation_id = "list_instances", parameters(("name" = "$response.body#/function"),
                    ("cursor" = "$response.body#/next")), description = "The next page")),
                ("release" = (operation_id = "release",
                    request_body = json!({"cgroup": "$response.body#/instances/0/cgroup_path"}),
                    description = "Ends the use of the page's first instance, if it is a bound pooled cgroup")),
            )),
        (status = 404, description = "Unknown function", body = ErrorBody),
    )
)]
async fn list_instances(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<InstancesResponse>> {
    let name = function_name(path)?;
    let Query(pairs) = query?;
    let q = paging::parse_query(&pairs)?;
    let lookup = name.clone();
    let actuator = state.predictive.as_ref().map(|p| p.actuator.clone());
    let found = blocking(move || {
        // Only the page's records are read (the model knows which they are).
        let page = state.store.instances_page(&lookup, &q)?;
        // No instances: either a function known only through invocations, or unknown.
        if page.records.is_empty() && state.store.function(&lookup)?.is_none() {
            return Ok(None);
        }
        // Live instances with what they use now: one read of their cgroup each, through the
        // cgroup writer's checked open (inside a watched root, the recorded cgroup only).
        let view = |record: InstanceRecord| {
            let usage_bytes = match (&actuator, record.is_live()) {
                (Some(a), true) => a
                    .usage(&record)
                    .inspect_err(|e| tracing::debug!(error = %e, "no usage for a live instance"))
                    .ok(),
                _ => None,
            };
            InstanceView {
                record,
                usage_bytes,
            }
        };
        let instances = page.records.into_iter().map(view).collect();
        Ok(Some((instances, page.next.map(paging::encode_cursor))))
    })
    .await?;
    let Some((instances, next)) = found else {
        return Err(unknown_function(&name));
    };
    Ok(Json(InstancesResponse {
        function: name,
        instances,
        next,
    }))
}

#[utoipa::path(
    post, path = "/v1/functions/{name}/invocations", tag = "functions",
    params(openapi::FunctionPath), request_body = InvocationsReport,
    responses(
        (status = 200, description = "Counted", body = InvocationsAccepted,
            links(("function" = (operation_id = "get_function",
                parameters(("name" = "$response.body#/function")),
                description = "The function, with the invocations counted")))),
        (status = 422, description = "`at_ms` before the retention or more than 5 minutes ahead of the \
            agent's clock", body = ErrorBody),
        (status = 507, description = "A function the agent does not know, and it knows store.max_functions functions already",
            body = ErrorBody),
    )
)]
async fn post_invocations(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<JsonObject<InvocationsReport>, ApiError>,
) -> ApiResult<Json<InvocationsAccepted>> {
    let name = function_name(path)?;
    let JsonObject(report) = body?;
    if !(1..=MAX_INVOCATIONS_PER_REPORT).contains(&report.count) {
        return Err(ApiError::bad_request(format!(
            "`count` must be in 1..={MAX_INVOCATIONS_PER_REPORT}, got {}",
            report.count
        )));
    }
    let now = now_ms();
    let at_ms = report.at_ms.unwrap_or(now);
    let oldest = now.saturating_sub(state.retention_ms);
    if at_ms < oldest || at_ms > now.saturating_add(MAX_FUTURE_MS) {
        // Well-formed, but not for this agent's clock and retention: refused, not malformed.
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "`at_ms` {at_ms} is out of range: it must lie within the retention (not before \
                 {oldest}) and at most {} s ahead of the agent's clock ({now})",
                MAX_FUTURE_MS / 1000
            ),
        ));
    }
    let count = report.count;
    let function = name.clone();
    blocking(move || state.store.add_invocations(&function, count, at_ms)).await?;
    tracing::debug!(function = %name, count, at_ms, "invocations reported");
    Ok(Json(InvocationsAccepted {
        function: name,
        count,
        at_ms,
    }))
}

#[utoipa::path(
    get, path = "/v1/export", tag = "predictive",
    responses((status = 200, description = "The paper's per-function config {requests, max memory}",
        body = ExportResponse))
)]
async fn export(State(state): State<ApiState>) -> ApiResult<Response> {
    let (snapshots, store) = (state.snapshots.clone(), state.store.clone());
    let body = snapshots
        .export
        .get(
            move || Some(store.changes()),
            move || {
                encode_json(&ExportResponse {
                    generated_at_ms: now_ms(),
                    functions: state.store.export()?,
                })
            },
        )
        .await?;
    Ok(json_bytes(body))
}

fn predictive(state: &ApiState) -> ApiResult<Predictive> {
    state.predictive.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "predictive mode is not running in this process",
        )
    })
}

/// `?limit=N` (1..=10000, default 100) and, where allowed, `?function=NAME`.
fn limit_and_function(
    pairs: &[(String, String)],
    allow_function: bool,
) -> ApiResult<(usize, Option<String>)> {
    let mut limit = 100usize;
    let mut function = None;
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "query parameter `limit` must be an integer in 1..=10000, got {v:?}"
                        ))
                    })?
            }
            "function" if allow_function => {
                if !valid_function_name(v) {
                    return Err(ApiError::bad_request(format!(
                        "invalid function name {v:?}"
                    )));
                }
                function = Some(v.clone());
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    Ok((limit, function))
}

#[utoipa::path(
    get, path = "/v1/functions/{name}/recommendation", tag = "predictive",
    params(openapi::FunctionPath),
    responses(
        (status = 200, description = "Recommended limits and the inputs behind them", body = Recommendation),
        (status = 404, description = "Unknown function, or no peak measured yet and no pin", body = ErrorBody),
    )
)]
async fn get_recommendation(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Recommendation>> {
    let name = function_name(path)?;
    let p = predictive(&state)?;
    let lookup = name.clone();
    let store = state.store.clone();
    let found = blocking(move || {
        if store.function(&lookup)?.is_none() {
            return Ok(Err(unknown_function(&lookup)));
        }
        Ok(p.policy.compute(&lookup, now_ms())?.ok_or_else(|| {
            ApiError::not_found(format!(
                "function {lookup:?} has no measured instance peak yet and no pinned limit"
            ))
        }))
    })
    .await?;
    found.map(Json)
}

/// POST /v1/bind: a pooled cgroup now serves a function (a new instance record, its
/// watermark reset, its limits written in enforce mode).
#[utoipa::path(
    post, path = "/v1/bind", tag = "pool", request_body = BindBody,
    responses(
        (status = 200, description = "The new instance record (watermark reset; limits written in enforce mode)",
            body = InstanceRecord,
            links(
                ("release" = (operation_id = "release",
                    request_body = json!({"cgroup": "$response.body#/cgroup_path"}),
                    description = "Ends this use of the cgroup")),
                ("limits" = (operation_id = "set_limits", parameters(("name" = "$response.body#/function"),
                    ("instance" = "$response.body#/instance")), description = "Limits for the new instance")),
                ("instances" = (operation_id = "list_instances", parameters(("name" = "$response.body#/function"),
                    ("live" = "true")), description = "The function's live instances, this one among them")),
            )),
        (status = 404, description = "No such cgroup", body = ErrorBody),
        (status = 409, description = "Bound already, named by a path rule, or removed and created again while being bound", body = ErrorBody),
        (status = 422, description = "Outside the watched roots", body = ErrorBody),
        (status = 507, description = "A function the agent does not know, and it knows store.max_functions functions already",
            body = ErrorBody),
    )
)]
async fn bind(
    State(state): State<ApiState>,
    body: Result<JsonObject<BindBody>, ApiError>,
) -> ApiResult<Json<InstanceRecord>> {
    let JsonObject(body) = body?;
    check_bind(&body)?;
    pool_command(&state, |reply| PoolCommand::Bind { body, reply }).await
}

/// POST /v1/release: the use of a pooled cgroup ends; answers the closed record.
#[utoipa::path(
    post, path = "/v1/release", tag = "pool", request_body = ReleaseBody,
    responses(
        (status = 200, description = "The closed instance record with its peak", body = InstanceRecord,
            links(("instances" = (operation_id = "list_instances", parameters(("name" = "$response.body#/function"),
                ("order" = "newest")), description = "The function's instances, this one first")))),
        (status = 404, description = "No such cgroup", body = ErrorBody),
        (status = 409, description = "Not bound", body = ErrorBody),
        (status = 422, description = "Outside the watched roots", body = ErrorBody),
    )
)]
async fn release(
    State(state): State<ApiState>,
    body: Result<JsonObject<ReleaseBody>, ApiError>,
) -> ApiResult<Json<InstanceRecord>> {
    let JsonObject(body) = body?;
    check_cgroup_arg(&body.cgroup)?;
    pool_command(&state, |reply| PoolCommand::Release { body, reply }).await
}

async fn pool_command(
    state: &ApiState,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<InstanceRecord, BindError>>) -> PoolCommand,
) -> ApiResult<Json<InstanceRecord>> {
    let tx = state.pool.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no event loop runs in this process to bind cgroups",
        )
    })?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    tx.send(make(reply))
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"))?;
    let answer = answer
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"))?;
    answer.map(Json).map_err(|e| {
        let status = match &e {
            BindError::Invalid(_) => StatusCode::BAD_REQUEST,
            BindError::NotFound { .. } => StatusCode::NOT_FOUND,
            BindError::Outside { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            BindError::PathInstance { .. }
            | BindError::AlreadyBound { .. }
            | BindError::NotBound { .. }
            | BindError::Replaced { .. } => StatusCode::CONFLICT,
            BindError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            BindError::FunctionsFull(_) => StatusCode::INSUFFICIENT_STORAGE,
        };
        ApiError::new(status, e.to_string())
    })
}

/// The limits a new instance gets, from the policy's cache: no store read, no computation.
#[utoipa::path(
    get, path = "/v1/functions/{name}/limits", tag = "predictive", params(openapi::FunctionPath),
    responses(
        (status = 200, description = "The limits a new instance gets, from the live model", body = FunctionLimits),
        (status = 404, description = "Unknown function, or no limits yet", body = ErrorBody),
    )
)]
async fn get_limits(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<FunctionLimits>> {
    let name = function_name(path)?;
    let p = predictive(&state)?;
    let Some(r) = p.policy.cached(&name) else {
        return Err(ApiError::not_found(format!(
            "no limits for {name:?}: the function is unknown, or has no measured instance peak \
             yet and no pinned limit"
        )));
    };
    let source = if r.pinned {
        "pinned"
    } else if r.oom_bump_bytes.is_some() {
        "oom_bump"
    } else {
        "history"
    };
    Ok(Json(FunctionLimits {
        function: name,
        max_bytes: r.max_bytes,
        high_bytes: r.high_bytes,
        source: source.to_owned(),
        confidence: r.confidence,
        computed_at_ms: r.computed_at_ms,
    }))
}

/// Keep-alive and pre-warm advice from the idle times between the function's uses.
#[utoipa::path(
    get, path = "/v1/functions/{name}/keepalive", tag = "predictive",
    params(openapi::FunctionPath),
    responses(
        (status = 200, description = "Keep-alive and pre-warm advice from the idle times between uses",
            body = KeepAliveAdvice),
        (status = 404, description = "Unknown function", body = ErrorBody),
    )
)]
async fn get_keepalive(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<KeepAliveAdvice>> {
    let name = function_name(path)?;
    let p = predictive(&state)?;
    let store = state.store.clone();
    let lookup = name.clone();
    let idle = blocking(move || store.idle_times(&lookup)).await?;
    let idle = idle.ok_or_else(|| unknown_function(&name))?;
    let advice = p.policy.keepalive().advise(&idle);
    Ok(Json(KeepAliveAdvice {
        function: name,
        advice,
    }))
}

#[utoipa::path(
    get, path = "/v1/recommendations", tag = "predictive",
    responses((status = 200, description = "Every function's recommendation", body = RecommendationsResponse))
)]
async fn list_recommendations(State(state): State<ApiState>) -> ApiResult<Response> {
    let p = predictive(&state)?;
    let (snapshots, store) = (state.snapshots.clone(), state.store.clone());
    let body = snapshots
        .recommendations
        .get(
            move || Some(store.changes()),
            move || {
                encode_json(&RecommendationsResponse {
                    mode: format!("{:?}", p.policy.mode()).to_lowercase(),
                    recommendations: p.policy.compute_all(now_ms())?,
                })
            },
        )
        .await?;
    Ok(json_bytes(body))
}

#[utoipa::path(
    post, path = "/v1/recommendations/generate", tag = "predictive", request_body = NoArguments,
    responses((status = 200, description = "A new generation, kept and exported", body = Generation))
)]
async fn generate(
    State(state): State<ApiState>,
    body: Result<JsonObject<NoArguments>, ApiError>,
) -> ApiResult<Json<Generation>> {
    body?;
    let p = predictive(&state)?;
    let g = work::run(move || p.policy.generate("on_demand", now_ms())).await??;
    Ok(Json(g))
}

#[utoipa::path(
    get, path = "/v1/generations", tag = "predictive", params(openapi::GenerationsParams),
    responses((status = 200, description = "Generated configs, newest first", body = GenerationsResponse))
)]
async fn list_generations(
    State(state): State<ApiState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<GenerationsResponse>> {
    let Query(pairs) = query?;
    let (limit, function) = limit_and_function(&pairs, true)?;
    let store = state.store.clone();
    let mut gens: Vec<Generation> = blocking(move || store.generations(limit)).await?;
    if let Some(f) = &function {
        for g in &mut gens {
            g.functions.retain(|c| &c.function == f);
        }
    }
    Ok(Json(GenerationsResponse { generations: gens }))
}

#[utoipa::path(
    post, path = "/v1/apply", tag = "enforcement", request_body = NoArguments,
    responses((status = 200, description = "One audit record per write attempt", body = WritesResponse))
)]
async fn apply_all(
    State(state): State<ApiState>,
    body: Result<JsonObject<NoArguments>, ApiError>,
) -> ApiResult<Json<WritesResponse>> {
    body?;
    let p = predictive(&state)?;
    let applied = work::run({
        let p = p.clone();
        move || p.policy.apply_all(&p.actuator, now_ms())
    })
    .await??;
    for w in &applied.writes {
        p.tell(w);
    }
    Ok(Json(WritesResponse {
        writes: applied.writes,
        kept: applied.kept,
    }))
}

#[utoipa::path(
    get, path = "/v1/audit", tag = "enforcement", params(openapi::LimitParams),
    responses((status = 200, description = "Every limit write and reactive action, newest first",
        body = AuditResponse))
)]
async fn list_audit(
    State(state): State<ApiState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<AuditResponse>> {
    let Query(pairs) = query?;
    let (limit, _) = limit_and_function(&pairs, false)?;
    let store = state.store.clone();
    let audit: Vec<AuditRecord> = blocking(move || store.audit(limit)).await?;
    Ok(Json(AuditResponse { audit }))
}

/// Whether a new instance of a function fits ("Refuse"): its recommended memory.max against
/// the host's available memory above the reserve; from the live recommendation and one read of
/// /proc/meminfo, no store read and no cgroup scan.
#[utoipa::path(
    post, path = "/v1/admission", tag = "reactive", request_body = AdmissionBody,
    responses((status = 200, description = "Whether a new instance fits on this host now", body = Admission))
)]
async fn admission(
    State(state): State<ApiState>,
    body: Result<JsonObject<AdmissionBody>, ApiError>,
) -> ApiResult<Json<Admission>> {
    let JsonObject(b) = body?;
    if !valid_function_name(&b.function) {
        return Err(ApiError::bad_request(format!(
            "invalid function name {:?}",
            b.function.chars().take(140).collect::<String>()
        )));
    }
    let p = predictive(&state)?;
    let predicted = p.policy.cached(&b.function).map(|r| r.max_bytes);
    let available = host_available_bytes()
        .ok_or_else(|| ApiError::internal("cannot read MemAvailable from /proc/meminfo"))?;
    let answer = p.reactive.admit(predicted, available);
    if let Ok(mut i) = state.info.write() {
        if answer.admit {
            i.reactive.admitted += 1;
        } else {
            i.reactive.refused += 1;
        }
    }
    // Counted one by one for as many functions as the store may know; beyond, in the totals.
    let per_function = usize::try_from(state.store.function_cap().max_functions).unwrap_or(0);
    let mut counts = p.admissions.lock().unwrap_or_else(|e| e.into_inner());
    if counts.len() < per_function || counts.contains_key(&b.function) {
        let c = counts.entry(b.function.clone()).or_default();
        if answer.admit {
            c.admitted += 1;
        } else {
            c.refused += 1;
        }
    }
    drop(counts);
    tracing::debug!(function = b.function, admit = answer.admit, "admission");
    Ok(Json(answer))
}

/// GET /v1/admission: the answers per function since the agent started.
#[utoipa::path(
    get, path = "/v1/admission", tag = "reactive",
    responses((status = 200, description = "Admission answers per function since the agent started",
        body = AdmissionCounts))
)]
async fn admission_counts(State(state): State<ApiState>) -> ApiResult<Json<AdmissionCounts>> {
    let p = predictive(&state)?;
    let counts = p.admissions.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Json(AdmissionCounts {
        functions: counts.iter().map(|(f, c)| (f.clone(), *c)).collect(),
    }))
}

#[utoipa::path(
    post, path = "/v1/functions/{name}/instances/{instance}/limits", tag = "enforcement",
    params(openapi::InstancePath), request_body = LimitsBody,
    responses(
        (status = 200, description = "The write, as audited", body = AuditRecord),
        (status = 404, description = "No such live instance", body = ErrorBody),
        (status = 422, description = "Refused: below usage plus headroom, or outside the managed cgroups",
            body = ErrorBody),
    )
)]
async fn set_limits(
    State(state): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<JsonObject<LimitsBody>, ApiError>,
) -> ApiResult<Json<AuditRecord>> {
    let Path((name, instance)) = path?;
    if !valid_function_name(&name) {
        return Err(ApiError::bad_request(format!(
            "invalid function name {name:?}"
        )));
    }
    let JsonObject(b) = body?;
    if b.max_bytes.is_none() && b.high_bytes.is_none() {
        return Err(ApiError::bad_request(
            "nothing to write: give max_bytes and/or high_bytes (not null)",
        ));
    }
    let p = predictive(&state)?;
    // Observe mode is the actuator's refusal, audited like every other one.
    let store = state.store.clone();
    let outcome = blocking(move || {
        let Some(inst) = store.live_instance(&name, &instance)? else {
            // No instance to write or audit; in observe mode the answer that helps is the mode.
            if !p.actuator.writes_allowed() {
                return Ok(Err(ApiError::from(ActuatorError::ObserveMode)));
            }
            return Ok(Err(ApiError::not_found(format!(
                "no live instance {instance:?} of function {name:?}"
            ))));
        };
        let req = LimitRequest {
            max_bytes: b.max_bytes,
            high_bytes: b.high_bytes,
        };
        let w = p
            .actuator
            .write(&inst, req, BelowUsage::Refuse, REASON_BY_HAND, None);
        p.tell(&w.audit);
        Ok(match w.result {
            Ok(_) => Ok(w.audit),
            Err(e) => Err(ApiError::from(e)),
        })
    })
    .await?;
    outcome.map(Json)
}

impl From<ActuatorError> for ApiError {
    fn from(e: ActuatorError) -> Self {
        let status = match &e {
            ActuatorError::ObserveMode | ActuatorError::Replaced { .. } => StatusCode::CONFLICT,
            e if e.is_refusal() => StatusCode::UNPROCESSABLE_ENTITY,
            ActuatorError::Cgroup(CgroupfsError::Gone { .. }) => StatusCode::NOT_FOUND,
            ActuatorError::AuditNotDurable { .. } | ActuatorError::AuditNotStored { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => return ApiError::internal(e.to_string()),
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::ObserveMode | PolicyError::Busy => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            PolicyError::Store(e) => ApiError::from(e),
            e => ApiError::internal(e.to_string()),
        }
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::{Client, ClientError};
    use crate::model::{Limits, ModelFootprint, PeakSource};
    use serde_json::json;
    use std::net::SocketAddr;
    use std::thread::JoinHandle;

    const HOUR: u64 = 3_600_000;
    const T0: u64 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR;

    /// A real server on 127.0.0.1:0 over a real store, on its own runtime thread.
    struct TestServer {
        addr: SocketAddr,
        /// The local socket (this process's user may use it: it runs the server).
        socket: std::path::PathBuf,
        token: String,
        store: Store,
        info: Arc<RwLock<AgentInfo>>,
        shutdown: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<JoinHandle<std::io::Result<()>>>,
        _dir: tempfile::TempDir,
    }

    impl TestServer {
        fn start() -> TestServer {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(&dir.path().join("db")).expect("open store");
            let info = Arc::new(RwLock::new(AgentInfo {
                version: "0.1.0".into(),
                kernel: "6.1.0-test".into(),
                cgroup_mode: "v2".into(),
                ..AgentInfo::default()
            }));
            let state = ApiState {
                store: store.clone(),
                info: info.clone(),
                predictive: None,
                retention_ms: 3650 * 86_400_000,
                pool: None,
                snapshots: Default::default(),
            };
            let token = token::Token::load_or_create(&dir.path().join("token")).expect("token");
            let socket = dir.path().join("run/api.sock");
            let config = crate::config::ApiConfig {
                listen: "127.0.0.1:0".parse().expect("address"),
                socket: socket.clone(),
                ..Default::default()
            };
            let listeners = listen::open(&config, listen::Inherited::default()).expect("listeners");
            let token_text = token.as_str().to_owned();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let addr = listeners
                        .tcp
                        .as_ref()
                        .map(|l| l.local_addr())
                        .transpose()?
                        .ok_or_else(|| std::io::Error::other("no TCP listener"))?;
                    let _ = addr_tx.send(addr);
                    let guard = Arc::new(guard::Guard::new(token, addr, &[]));
                    serve(
                        listeners,
                        state,
                        guard,
                        server::Bounds::default(),
                        async move {
                            let _ = rx.await;
                        },
                    )
                    .await
                })
            });
            let addr = addr_rx.recv().expect("server address");
            TestServer {
                addr,
                socket,
                token: token_text,
                store,
                info,
                shutdown: Some(tx),
                thread: Some(thread),
                _dir: dir,
            }
        }

        fn client(&self) -> Client {
            Client::new(&self.addr.to_string()).with_token(&self.token)
        }

        /// A raw POST carrying the write token.
        fn post(&self, path: &str) -> ureq::Request {
            ureq::post(&self.url(path)).set("Authorization", &format!("Bearer {}", self.token))
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{}", self.addr, path)
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            if let Some(tx) = self.shutdown.take() {
                let _ = tx.send(());
            }
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn rec(
        function: &str,
        instance: &str,
        start: u64,
        end: Option<u64>,
        peak: u64,
    ) -> InstanceRecord {
        InstanceRecord {
            function: function.into(),
            instance: instance.into(),
            cgroup_id: start / 1000,
            cgroup_path: format!("/sys/fs/cgroup/fns/{function}/{instance}"),
            started_at_ms: start,
            ended_at_ms: end,
            execs: 2,
            peak_bytes: peak,
            peak_source: PeakSource::KernelWatermark,
            oom_kills: 0,
            limits: Limits {
                max_bytes: Some(256 << 20),
                high_bytes: None,
            },
        }
    }

    fn seeded() -> TestServer {
        let s = TestServer::start();
        s.store
            .put_instance(&rec("fn-a", "i1", T0, Some(T0 + 1000), 10 << 20))
            .unwrap();
        s.store
            .put_instance(&rec("fn-a", "i2", T0 + 2000, Some(T0 + 3000), 30 << 20))
            .unwrap();
        s.store
            .put_instance(&rec("fn-a", "i3", T0 + 4000, None, 20 << 20))
            .unwrap();
        s.store
            .put_instance(&rec("fn-b", "j1", T0 + HOUR, None, 5 << 20))
            .unwrap();
        s
    }

    /// Status and parsed JSON body of a raw request, error or not; checks the content type.
    fn raw(resp: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
        let resp = match resp {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("transport error: {e}"),
        };
        let status = resp.status();
        assert_eq!(resp.content_type(), "application/json", "status {status}");
        let v: serde_json::Value = resp.into_json().expect("JSON body");
        (status, v)
    }

    fn expect_api_err(r: Result<serde_json::Value, ClientError>, status: u16, needle: &str) {
        match r {
            Err(ClientError::Api { status: s, message }) => {
                assert_eq!(s, status, "{message}");
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
            other => panic!("expected API error {status}, got {other:?}"),
        }
    }

    #[test]
    fn healthz_and_info() {
        let s = TestServer::start();
        let c = s.client();
        assert_eq!(c.get("/healthz").unwrap(), json!({"ok": true}));
        s.info.write().unwrap().events_received = 42;
        let v = c.get("/v1/info").unwrap();
        let info: AgentInfo = serde_json::from_value(v).unwrap();
        assert_eq!(info.kernel, "6.1.0-test");
        assert_eq!(info.events_received, 42);
        assert_eq!(c.info().unwrap(), info);
        assert_eq!(info.model, ModelFootprint::default());
        // The model's entries, counted as of the request.
        let s = seeded();
        let m = s.client().info().unwrap().model;
        assert_eq!((m.functions, m.live, m.ended, m.hours), (2, 2, 2, 0));
        assert!(m.bytes > 0, "{m:?}");
    }

    #[test]
    fn functions_list_and_detail() {
        let s = seeded();
        s.store.add_invocations("fn-a", 7, T0 + 10).unwrap();
        let c = s.client();
        let v = c.get("/v1/functions").unwrap();
        let list: FunctionsResponse = serde_json::from_value(v).unwrap();
        let names: Vec<_> = list.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["fn-a", "fn-b"]);
        let a = &list.functions[0];
        assert_eq!((a.instances, a.live_instances, a.execs), (3, 1, 6));
        assert_eq!(a.peak_bytes, 30 << 20);
        assert_eq!(a.invocations, 7);

        let v = c.get("/v1/functions/fn-a").unwrap();
        assert_eq!(v["name"], "fn-a");
        assert_eq!(v["instances"], 3);
        let detail: FunctionDetail = serde_json::from_value(v).unwrap();
        assert_eq!(&detail.summary, a);
        assert_eq!(detail.hours.len(), 1);
        assert_eq!(detail.hours[0].hour_start_ms, T0);
        assert_eq!(detail.hours[0].invocations, 7);

        let (d, instances) = c.function("fn-a", None).unwrap();
        assert_eq!(d, detail);
        assert_eq!(instances.len(), 3);
        let (_, newest) = c.function("fn-a", Some(1)).unwrap();
        assert_eq!(newest.len(), 1);

        expect_api_err(c.get("/v1/functions/nope"), 404, "\"nope\"");
        expect_api_err(c.get("/v1/functions/a%2Fb"), 400, "\"a/b\"");
        let long = "x".repeat(200);
        expect_api_err(c.get(&format!("/v1/functions/{long}")), 400, "200 bytes");
        expect_api_err(c.get("/v1/functions/%FF"), 400, "bad path");
    }

    #[test]
    fn instances_filters() {
        let s = seeded();
        let c = s.client();
        let get = |q: &str| -> InstancesResponse {
            serde_json::from_value(c.get(&format!("/v1/functions/fn-a/instances{q}")).unwrap())
                .unwrap()
        };
        let ids = |r: &InstancesResponse| -> Vec<String> {
            r.instances
                .iter()
                .map(|i| i.record.instance.clone())
                .collect()
        };
        let all = get("");
        assert_eq!(all.function, "fn-a");
        assert_eq!(ids(&all), ["i1", "i2", "i3"]);
        assert_eq!(all.next, None);
        assert_eq!(
            all.instances[0].record,
            rec("fn-a", "i1", T0, Some(T0 + 1000), 10 << 20)
        );
        // No cgroup writer in this server: no usage, and the field is left out.
        assert_eq!(all.instances[0].usage_bytes, None);
        assert_eq!(ids(&get("?live=true")), ["i3"]);
        assert_eq!(ids(&get("?live=false")), ["i1", "i2"]);
        assert_eq!(ids(&get("?order=newest")), ["i3", "i2", "i1"]);
        assert_eq!(ids(&get("?live=false&order=newest&limit=1")), ["i2"]);
        assert_eq!(ids(&get("?limit=10000")).len(), 3);
        // A page that ends exactly at the last record says there is no next one.
        assert_eq!(get("?limit=3").next, None);
        // Pages of 2: a cursor to the rest, and none after the last.
        let first = get("?limit=2");
        assert_eq!(ids(&first), ["i1", "i2"]);
        let next = first.next.clone().expect("a next page");
        assert_eq!(next, paging::encode_cursor((T0 + 2000, (T0 + 2000) / 1000)));
        let second = get(&format!("?limit=2&cursor={next}"));
        assert_eq!((ids(&second), second.next), (vec!["i3".to_owned()], None));
        let newest = get("?limit=2&order=newest");
        assert_eq!(ids(&newest), ["i3", "i2"]);
        let older = get(&format!(
            "?limit=2&order=newest&cursor={}",
            newest.next.unwrap()
        ));
        assert_eq!((ids(&older), older.next), (vec!["i1".to_owned()], None));
        // A cursor past the end is an empty page of a known function, not a 404.
        let past = paging::encode_cursor((u64::MAX, u64::MAX));
        assert!(get(&format!("?cursor={past}")).instances.is_empty());

        expect_api_err(c.get("/v1/functions/fn-a/instances?limit=0"), 400, "\"0\"");
        expect_api_err(
            c.get("/v1/functions/fn-a/instances?limit=10001"),
            400,
            "10001",
        );
        expect_api_err(c.get("/v1/functions/fn-a/instances?limit=x"), 400, "limit");
        expect_api_err(
            c.get("/v1/functions/fn-a/instances?live=yes"),
            400,
            "\"yes\"",
        );
        expect_api_err(
            c.get("/v1/functions/fn-a/instances?cursor=nope"),
            400,
            "`cursor`",
        );
        expect_api_err(
            c.get("/v1/functions/fn-a/instances?order=up"),
            400,
            "oldest or newest",
        );
        expect_api_err(
            c.get("/v1/functions/fn-a/instances?lve=true"),
            400,
            "\"lve\"",
        );
        expect_api_err(
            c.get("/v1/functions/fn-a/instances?live=true&live=false"),
            400,
            "twice",
        );
        expect_api_err(c.get("/v1/functions/nope/instances"), 404, "\"nope\"");

        // Known only through invocations: an empty list, not a 404.
        s.store.add_invocations("fn-c", 1, T0).unwrap();
        assert!(get_c(&c).instances.is_empty());
        fn get_c(c: &Client) -> InstancesResponse {
            serde_json::from_value(c.get("/v1/functions/fn-c/instances").unwrap()).unwrap()
        }
    }

    #[test]
    fn the_cli_pages_through_the_newest_instances() {
        let s = TestServer::start();
        for i in 0..25u64 {
            let end = (i % 3 != 0).then_some(T0 + i * 1000 + 500);
            s.store
                .put_instance(&rec(
                    "fn-p",
                    &format!("i{i:02}"),
                    T0 + i * 1000,
                    end,
                    1 << 20,
                ))
                .unwrap();
        }
        let c = s.client();
        let names = |v: &[InstanceRecord]| -> Vec<String> {
            v.iter().map(|r| r.instance.clone()).collect()
        };
        // All of them, oldest first, whatever the page size.
        let (_, all) = c.function("fn-p", None).unwrap();
        let expected: Vec<String> = (0..25).map(|i| format!("i{i:02}")).collect();
        assert_eq!(names(&all), expected);
        let (_, newest) = c.function("fn-p", Some(7)).unwrap();
        assert_eq!(names(&newest), expected[18..]);
        let (_, more) = c.function("fn-p", Some(100)).unwrap();
        assert_eq!(names(&more), expected);
        // In pages of 4: 7 requests, each record once, newest first.
        let paged = c.newest_instances("fn-p", usize::MAX, 4).unwrap();
        let mut reversed = expected.clone();
        reversed.reverse();
        assert_eq!(names(&paged), reversed);
        assert_eq!(
            names(&c.newest_instances("fn-p", 9, 4).unwrap()),
            reversed[..9]
        );
    }

    #[test]
    fn invocations_post_then_get() {
        let s = seeded();
        let c = s.client();
        let v = c
            .post(
                "/v1/functions/fn-a/invocations",
                &json!({"count": 5, "at_ms": T0 + 5}),
            )
            .unwrap();
        assert_eq!(v, json!({"function": "fn-a", "count": 5, "at_ms": T0 + 5}));
        c.post(
            "/v1/functions/fn-a/invocations",
            &json!({"count": 3, "at_ms": T0 + HOUR}),
        )
        .unwrap();
        // Unknown but valid: accepted, and the function becomes known. No at_ms: now.
        let v = c
            .post("/v1/functions/new.fn:v1/invocations", &json!({"count": 1}))
            .unwrap();
        assert!(v["at_ms"].as_u64().unwrap() > T0);

        let detail: FunctionDetail =
            serde_json::from_value(c.get("/v1/functions/fn-a").unwrap()).unwrap();
        assert_eq!(detail.summary.invocations, 8);
        let per_hour: Vec<_> = detail
            .hours
            .iter()
            .map(|h| (h.hour_start_ms, h.invocations))
            .collect();
        assert_eq!(per_hour, [(T0, 5), (T0 + HOUR, 3)]);
        let v = c.get("/v1/functions/new.fn:v1").unwrap();
        assert_eq!(v["invocations"], 1);
    }

    #[test]
    fn the_local_socket_needs_no_token_and_tcp_sends_none_unless_told() {
        let s = seeded();
        let body = json!({"count": 2, "at_ms": T0 + 5});
        let path = "/v1/functions/fn-a/invocations";
        let local = Client::local(&s.socket);
        assert_eq!(local.post(path, &body).unwrap()["count"], 2);
        assert!(local.base().starts_with("unix:"));
        let list: FunctionsResponse = local.get_as("/v1/functions").unwrap();
        assert_eq!(list.functions.len(), 2);

        let e = Client::new(&s.addr.to_string())
            .post(path, &body)
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("401") && text.contains("--token-file"),
            "{text}"
        );
        let missing = s._dir.path().join("no-such-token");
        let e = Client::new(&s.addr.to_string())
            .with_token_file(&missing)
            .post(path, &body)
            .unwrap_err()
            .to_string();
        assert!(e.contains("401") && e.contains("does not exist"), "{e}");
        // Only the 2 reported through the socket were counted.
        let detail: FunctionDetail = s.client().get_as("/v1/functions/fn-a").unwrap();
        assert_eq!(detail.summary.invocations, 2);

        // No agent at a socket: the error says what to check.
        let e = Client::local(&s._dir.path().join("none.sock"))
            .get("/healthz")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is the agent running"), "{e}");
    }

    #[test]
    fn invocations_rejections() {
        let s = seeded();
        let c = s.client();
        let path = "/v1/functions/fn-a/invocations";
        expect_api_err(c.post(path, &json!({"count": 0})), 400, "got 0");
        expect_api_err(
            c.post(path, &json!({"count": 1_000_000_001u64})),
            400,
            "1000000001",
        );
        expect_api_err(c.post(path, &json!({"count": -1})), 400, "-1");
        expect_api_err(c.post(path, &json!({"count": "5"})), 400, "invalid type");
        expect_api_err(c.post(path, &json!({})), 400, "missing field `count`");
        expect_api_err(c.post(path, &json!({"count": 1, "atms": 5})), 400, "atms");
        expect_api_err(
            c.post("/v1/functions/a%2Fb/invocations", &json!({"count": 1})),
            400,
            "\"a/b\"",
        );
        let long = "y".repeat(200);
        expect_api_err(
            c.post(
                &format!("/v1/functions/{long}/invocations"),
                &json!({"count": 1}),
            ),
            400,
            "invalid function name",
        );

        let (st, v) = raw(s
            .post(path)
            .set("Content-Type", "application/json")
            .send_string("{\"count\": "));
        assert_eq!((st, v["status"].as_u64()), (400, Some(400)));
        assert!(
            v["error"].as_str().unwrap().contains("malformed JSON"),
            "{v}"
        );

        let (st, v) = raw(s
            .post(path)
            .set("Content-Type", "text/plain")
            .send_string("{\"count\": 1}"));
        assert_eq!((st, v["status"].as_u64()), (415, Some(415)));
        assert!(v["error"].as_str().unwrap().contains("Content-Type"), "{v}");

        let (st, _) = raw(s.post(path).call());
        assert_eq!(st, 415);
        // Without the token, nothing else is looked at.
        let (st, v) = raw(ureq::post(&s.url(path))
            .set("Content-Type", "application/json")
            .send_string("{\"count\": 1}"));
        assert_eq!(st, 401, "{v}");

        let big = format!("{{\"count\": 1, \"pad\": \"{}\"}}", "z".repeat(BODY_LIMIT));
        let (st, v) = raw(s
            .post(path)
            .set("Content-Type", "application/json")
            .send_string(&big));
        assert_eq!((st, v["status"].as_u64()), (413, Some(413)));

        // Nothing of the above was recorded.
        let v = c.get("/v1/functions/fn-a").unwrap();
        assert_eq!(v["invocations"], 0);
    }

    #[test]
    fn export_content() {
        let s = seeded();
        let c = s.client();
        c.post(
            "/v1/functions/fn-b/invocations",
            &json!({"count": 40, "at_ms": T0}),
        )
        .unwrap();
        c.post(
            "/v1/functions/fn-b/invocations",
            &json!({"count": 9, "at_ms": T0 + HOUR}),
        )
        .unwrap();
        let v = c.get("/v1/export").unwrap();
        let e: ExportResponse = serde_json::from_value(v).unwrap();
        assert!(e.generated_at_ms > T0);
        assert_eq!(
            e.functions,
            [
                FunctionConfig {
                    function: "fn-a".into(),
                    requests_per_hour: 0,
                    max_memory_bytes: 30 << 20,
                },
                FunctionConfig {
                    function: "fn-b".into(),
                    requests_per_hour: 40,
                    max_memory_bytes: 5 << 20,
                },
            ]
        );
    }

    #[test]
    fn unknown_routes_and_methods() {
        let s = TestServer::start();
        let c = s.client();
        expect_api_err(c.get("/nope"), 404, "GET /nope");
        expect_api_err(
            c.get("/v1/functions/fn-a/other"),
            404,
            "/v1/functions/fn-a/other",
        );
        expect_api_err(c.post("/v1/info", &json!({})), 405, "POST");
        expect_api_err(c.get("/v1/functions/fn-a/invocations"), 405, "GET");

        let (st, v) = raw(ureq::get(&s.url("/v2/x")).call());
        assert_eq!((st, v["status"].as_u64()), (404, Some(404)));
        let head = ureq::head(&s.url("/healthz")).call().unwrap();
        assert_eq!(head.status(), 200);

        let (st, _) = raw(ureq::delete(&s.url("/v1/functions")).call());
        assert_eq!(st, 401, "writes of any method need the token first");
        let resp = ureq::delete(&s.url("/v1/functions"))
            .set("Authorization", &format!("Bearer {}", s.token))
            .call();
        let Err(ureq::Error::Status(405, r)) = resp else {
            panic!("expected 405");
        };
        assert_eq!(r.header("allow"), Some("GET,HEAD"));
        let (st, v) = raw(Ok(r));
        assert_eq!((st, v["status"].as_u64()), (405, Some(405)));
        // With the token, a method the route does not take is a 405 whatever the body: the
        // content type is looked at only on a route that takes the method.
        for path in [
            "/v1/functions",
            "/v1/apply",
            "/v1/functions/fn-a/invocations",
        ] {
            let resp = ureq::put(&s.url(path))
                .set("Authorization", &format!("Bearer {}", s.token))
                .set("Content-Type", "text/plain")
                .send_string("x");
            let Err(ureq::Error::Status(405, r)) = resp else {
                panic!("PUT {path}: expected 405, got {resp:?}");
            };
            assert!(r.header("allow").is_some(), "PUT {path}");
        }
        let (st, _) = raw(s
            .post("/v1/apply")
            .set("Content-Type", "text/plain")
            .send_string("{}"));
        assert_eq!(st, 415, "a routed write still needs JSON");
    }

    #[test]
    fn store_error_is_500() {
        let e = ApiError::from(StoreError::Db(sled::Error::Unsupported("boom".into())));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.message.contains("boom"));
    }
}
