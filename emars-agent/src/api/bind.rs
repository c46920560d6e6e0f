//! Pooled cgroups: `POST /v1/bind` (a pooled cgroup now serves a function) and `POST
//! /v1/release` (that use ends). The names are checked here, as the document states them; the
//! rest is the event loop's, which owns the tracker ([`PoolCommand`]).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::body::JsonObject;
use super::error::ApiResult;
use super::{
    wire, ApiError, ApiState, BindBody, BindError, ErrorBody, InstanceRecord, ReleaseBody,
};
use crate::daemon::{Bind, PoolCommand, PoolReply};
use crate::model::registry::{valid_function_name, valid_instance_name, FUNCTION_NAME_RULE};

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
            "invalid function name {shown:?}: expected {FUNCTION_NAME_RULE}"
        )));
    }
    if !valid_instance_name(&body.instance) {
        let shown: String = body.instance.chars().take(140).collect();
        return Err(ApiError::bad_request(format!(
            "invalid instance name {shown:?}: expected 1 to 255 characters, none a control \
             character"
        )));
    }
    Ok(())
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
pub(super) async fn bind(
    State(state): State<ApiState>,
    body: Result<JsonObject<BindBody>, ApiError>,
) -> ApiResult<Json<InstanceRecord>> {
    let JsonObject(body) = body?;
    check_bind(&body)?;
    let bind = Bind {
        cgroup: body.cgroup,
        function: body.function,
        instance: body.instance,
        input_bytes: body.input_bytes,
    };
    pool_command(&state, |reply| PoolCommand::Bind { bind, reply }).await
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
pub(super) async fn release(
    State(state): State<ApiState>,
    body: Result<JsonObject<ReleaseBody>, ApiError>,
) -> ApiResult<Json<InstanceRecord>> {
    let JsonObject(body) = body?;
    check_cgroup_arg(&body.cgroup)?;
    pool_command(&state, |reply| PoolCommand::Release {
        cgroup: body.cgroup,
        reply,
    })
    .await
}

pub(super) async fn pool_command(
    state: &ApiState,
    make: impl FnOnce(PoolReply) -> PoolCommand,
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
