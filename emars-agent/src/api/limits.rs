//! Recommendations and limits: the export, one function's or every function's recommendation,
//! a new generation, the limits a new instance gets, keep-alive advice, `POST /v1/apply` and a
//! live instance's limits set by hand.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Json;

use super::body::JsonObject;
use super::error::ApiResult;
use super::{
    blocking, encode_json, function_name, json_bytes, openapi, paging, predictive,
    unknown_function, work, ApiError, ApiState, AuditRecord, ErrorBody, ExportResponse,
    FunctionLimits, Generation, KeepAliveAdvice, LimitsBody, NoArguments, Recommendation,
    RecommendationsResponse, WritesResponse,
};
use crate::clock::now_ms;
use crate::model::registry::valid_function_name;
use crate::model::LimitRequest;
use crate::policy::actuator::{ActuatorError, BelowUsage, REASON_BY_HAND};

#[utoipa::path(
    get, path = "/v1/export", tag = "predictive",
    responses((status = 200, description = "The paper's per-function config {requests, max memory}",
        body = ExportResponse))
)]
pub(super) async fn export(State(state): State<ApiState>) -> ApiResult<Response> {
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

#[utoipa::path(
    get, path = "/v1/functions/{name}/recommendation", tag = "predictive",
    params(openapi::FunctionPath),
    responses(
        (status = 200, description = "Recommended limits and the inputs behind them", body = Recommendation),
        (status = 404, description = "Unknown function, or no peak measured yet and no pin", body = ErrorBody),
    )
)]
pub(super) async fn get_recommendation(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Recommendation>> {
    let name = function_name(path)?;
    let p = predictive(&state)?;
    let lookup = name.clone();
    let store = state.store.clone();
    let found = blocking(move || {
        if store.function(&lookup)?.is_none() && !p.policy.fleet_knows(&lookup) {
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

/// The limits a new instance gets (with `input_bytes`: a bind with that hint), from the
/// policy's cache (or, for a function without history, the host's prior): no store read, no
/// computation beyond the fit's curve.
#[utoipa::path(
    get, path = "/v1/functions/{name}/limits", tag = "predictive",
    params(openapi::FunctionPath, openapi::FunctionLimitsParams),
    responses(
        (status = 200, description = "The limits a new instance gets, from the live model", body = FunctionLimits),
        (status = 400, description = "A bad query string", body = ErrorBody),
        (status = 404, description = "Unknown function, or no limits yet", body = ErrorBody),
    )
)]
pub(super) async fn get_limits(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<FunctionLimits>> {
    let name = function_name(path)?;
    let Query(pairs) = query?;
    let input = paging::parse_input_bytes(&pairs)?;
    let p = predictive(&state)?;
    if let Some(input) = input {
        return sized_limits(&p.policy, name, input);
    }
    let Some(r) = p.policy.new_instance_limits(&name, now_ms()) else {
        return Err(ApiError::not_found(format!(
            "no limits for {name:?}: the function is unknown, or has no measured instance peak \
             yet and no pinned limit (nor a prior: that needs the burst guard and \
             policy.prior.min_functions functions with history)"
        )));
    };
    let source = if r.prior_bytes.is_some() {
        "prior"
    } else if r.pinned {
        "pinned"
    } else if r.oom_bump_bytes.is_some() {
        "oom_bump"
    } else if r.samples == 0 && r.fleet_samples > 0.0 {
        "fleet"
    } else {
        "history"
    };
    Ok(Json(FunctionLimits {
        function: name,
        max_bytes: r.max_bytes,
        high_bytes: r.high_bytes,
        source: source.to_owned(),
        confidence: r.confidence,
        local_samples: r.samples,
        fleet_samples: r.fleet_samples,
        computed_at_ms: r.computed_at_ms,
        input_bytes: None,
        fallback: None,
    }))
}

/// GET .../limits?input_bytes=N: what a bind with that hint gets.
fn sized_limits(
    policy: &crate::policy::Policy,
    name: String,
    input: u64,
) -> ApiResult<Json<FunctionLimits>> {
    let Some(l) = policy.sized_limits(&name, input) else {
        return Err(ApiError::not_found(format!(
            "no limits for {name:?}: the function is unknown, or has no measured instance peak \
             yet and no pinned limit"
        )));
    };
    Ok(Json(FunctionLimits {
        function: name,
        max_bytes: l.max_bytes,
        high_bytes: l.high_bytes,
        source: if l.fallback.is_some() {
            "fallback"
        } else {
            "input_fit"
        }
        .to_owned(),
        confidence: l.recommendation.confidence,
        local_samples: l.recommendation.samples,
        fleet_samples: l.recommendation.fleet_samples,
        computed_at_ms: l.recommendation.computed_at_ms,
        input_bytes: Some(input),
        fallback: l.fallback.map(|f| f.as_str().to_owned()),
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
pub(super) async fn get_keepalive(
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
pub(super) async fn list_recommendations(State(state): State<ApiState>) -> ApiResult<Response> {
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
pub(super) async fn generate(
    State(state): State<ApiState>,
    body: Result<JsonObject<NoArguments>, ApiError>,
) -> ApiResult<Json<Generation>> {
    body?;
    let p = predictive(&state)?;
    let g = work::run(move || p.policy.generate("on_demand", now_ms())).await??;
    Ok(Json(g))
}

#[utoipa::path(
    post, path = "/v1/apply", tag = "enforcement", request_body = NoArguments,
    responses((status = 200, description = "One audit record per write attempt", body = WritesResponse))
)]
pub(super) async fn apply_all(
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
    post, path = "/v1/functions/{name}/instances/{instance}/limits", tag = "enforcement",
    params(openapi::InstancePath), request_body = LimitsBody,
    responses(
        (status = 200, description = "The write, as audited", body = AuditRecord),
        (status = 404, description = "No such live instance", body = ErrorBody),
        (status = 422, description = "Refused: below usage plus headroom, or outside the managed cgroups",
            body = ErrorBody),
    )
)]
pub(super) async fn set_limits(
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
