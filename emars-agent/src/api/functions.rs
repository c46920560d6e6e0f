//! Functions and their instances: `GET /v1/functions`, `GET /v1/functions/{name}`, a page of
//! its instances (`…/instances`, [`super::paging`]) and `POST …/invocations`, the platform's
//! count of requests.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;

use super::body::JsonObject;
use super::error::ApiResult;
use super::{
    blocking, function_name, json_bytes, openapi, paging, unknown_function, ApiError, ApiState,
    ErrorBody, FunctionDetail, FunctionsResponse, InstanceRecord, InstanceView, InstancesResponse,
    InvocationsAccepted, InvocationsReport,
};
use crate::clock::now_ms;

/// Largest `count` of one invocations report.
pub const MAX_INVOCATIONS_PER_REPORT: u64 = 1_000_000_000;
/// How far into the future a reported `at_ms` may lie (clocks of platform and host differ).
pub const MAX_FUTURE_MS: u64 = 5 * 60 * 1000;

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
pub(super) async fn list_functions(State(state): State<ApiState>) -> ApiResult<Response> {
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
pub(super) async fn get_function(
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
pub(super) async fn list_instances(
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
pub(super) async fn post_invocations(
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
