//! The local HTTP API (axum): what the agent knows, as JSON.
//!
//! | method | path                                   | answer                                              |
//! |--------|----------------------------------------|-----------------------------------------------------|
//! | GET    | `/`, `/assets/app.{js,css}`            | the web page ([`web`]), read-only                   |
//! | GET    | `/healthz`                             | `{"ok": true}`                                      |
//! | GET    | `/metrics`                             | Prometheus text or protobuf format ([`metrics`])    |
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
//!
//! Where each route's handler lives, by resource: [`status`] (/healthz, /metrics, /v1/info),
//! [`functions`] (functions, their instances and invocations), [`limits`] (recommendations,
//! the export, generating a config, limits read and written), [`admission`], [`bind`] (pooled
//! cgroups), [`history`] (audit and generations), [`openapi`] and [`web`]. This file holds what
//! they share (the state, the checks of a path's function name) and the router; [`error`] the
//! error answer and what each error becomes.

pub mod admission;
pub mod bind;
pub mod body;
pub mod error;
pub mod functions;
pub mod guard;
pub mod history;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod paging;
pub mod server;
pub mod start;
pub mod status;
pub mod token;
pub mod web;
pub mod wire;
pub mod work;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use error::ApiError;
pub use wire::*;

use std::future::Future;
use std::sync::{Arc, RwLock};

use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{middleware, Extension, Router};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::model::registry::{valid_function_name, FUNCTION_NAME_RULE};
pub use crate::model::tracker::BindError;
use crate::policy::actuator::Actuator;
use crate::policy::Policy;
use crate::store::{Store, StoreError};
use error::ApiResult;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 64 * 1024;

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
    pub pool: Option<tokio::sync::mpsc::UnboundedSender<crate::daemon::PoolCommand>>,
    /// The whole-model answers, shared by the requests that ask for them ([`work::Snapshot`]).
    pub snapshots: Arc<Snapshots>,
}

/// One [`work::Snapshot`] per whole-model answer.
#[derive(Debug, Default)]
pub struct Snapshots {
    metrics: work::Snapshot,
    metrics_protobuf: work::Snapshot,
    functions: work::Snapshot,
    recommendations: work::Snapshot,
    export: work::Snapshot,
    /// The model's footprint in /v1/info (a walk over every function).
    footprint: work::Snapshot<crate::model::ModelFootprint>,
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

/// Every route, each with its OpenAPI operation (`#[utoipa::path]` on the handler): a route
/// cannot be added here without being documented, and the document is made from these.
fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(web::index))
        .routes(routes!(web::app_js))
        .routes(routes!(web::app_css))
        .routes(routes!(status::healthz))
        .routes(routes!(status::metrics_text))
        .routes(routes!(openapi::document))
        .routes(routes!(status::info))
        .routes(routes!(functions::list_functions))
        .routes(routes!(functions::get_function))
        .routes(routes!(functions::list_instances))
        .routes(routes!(functions::post_invocations))
        .routes(routes!(limits::export))
        .routes(routes!(limits::get_recommendation))
        .routes(routes!(limits::get_limits))
        .routes(routes!(limits::get_keepalive))
        .routes(routes!(limits::list_recommendations))
        .routes(routes!(limits::generate))
        .routes(routes!(history::list_generations))
        .routes(routes!(limits::apply_all))
        .routes(routes!(history::list_audit))
        .routes(routes!(admission::admission, admission::admission_counts))
        .routes(routes!(bind::bind))
        .routes(routes!(bind::release))
        .routes(routes!(limits::set_limits))
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
            "invalid function name {shown:?}{more} ({} bytes): expected {FUNCTION_NAME_RULE}",
            name.len()
        )))
    }
}

/// 404 for a function the agent does not know.
fn unknown_function(name: &str) -> ApiError {
    ApiError::not_found(format!("unknown function {name:?}"))
}

/// What the predictive routes need, or 503 where this process runs none.
fn predictive(state: &ApiState) -> ApiResult<Predictive> {
    state.predictive.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "predictive mode is not running in this process",
        )
    })
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
