//! Admission ("Refuse"): `POST /v1/admission`, whether a new instance of a function fits on
//! this host now, and `GET /v1/admission`, the answers per function since the agent started.

use axum::extract::State;
use axum::Json;

use super::body::JsonObject;
use super::error::ApiResult;
use super::{predictive, Admission, AdmissionBody, AdmissionCounts, ApiError, ApiState};
use crate::clock::now_ms;
use crate::kernel::host::memory_available_bytes as host_available_bytes;
use crate::model::registry::valid_function_name;

/// Whether a new instance of a function fits ("Refuse"): its recommended memory.max against
/// the host's available memory above the reserve; from the live recommendation and one read of
/// /proc/meminfo, no store read and no cgroup scan.
#[utoipa::path(
    post, path = "/v1/admission", tag = "reactive", request_body = AdmissionBody,
    responses((status = 200, description = "Whether a new instance fits on this host now", body = Admission))
)]
pub(super) async fn admission(
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
    let predicted = p
        .policy
        .new_instance_limits(&b.function, now_ms())
        .map(|r| r.max_bytes);
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
pub(super) async fn admission_counts(
    State(state): State<ApiState>,
) -> ApiResult<Json<AdmissionCounts>> {
    let p = predictive(&state)?;
    let counts = p.admissions.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Json(AdmissionCounts {
        functions: counts.iter().map(|(f, c)| (f.clone(), *c)).collect(),
    }))
}
