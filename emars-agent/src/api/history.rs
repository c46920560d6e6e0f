//! What was done, newest first: `GET /v1/audit` (every limit write and reactive action) and
//! `GET /v1/generations` (the generated configs). Their query strings are
//! [`super::paging::parse_listing`]'s.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;

use super::error::ApiResult;
use super::{
    blocking, openapi, paging, ApiState, AuditRecord, AuditResponse, Generation,
    GenerationsResponse,
};

#[utoipa::path(
    get, path = "/v1/generations", tag = "predictive", params(openapi::GenerationsParams),
    responses((status = 200, description = "Generated configs, newest first", body = GenerationsResponse))
)]
pub(super) async fn list_generations(
    State(state): State<ApiState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<GenerationsResponse>> {
    let Query(pairs) = query?;
    let paging::Listing { limit, function } = paging::parse_listing(&pairs, true)?;
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
    get, path = "/v1/audit", tag = "enforcement", params(openapi::LimitParams),
    responses((status = 200, description = "Every limit write and reactive action, newest first",
        body = AuditResponse))
)]
pub(super) async fn list_audit(
    State(state): State<ApiState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<AuditResponse>> {
    let Query(pairs) = query?;
    let limit = paging::parse_listing(&pairs, false)?.limit;
    let store = state.store.clone();
    let audit: Vec<AuditRecord> = blocking(move || store.audit(limit)).await?;
    Ok(Json(AuditResponse { audit }))
}
