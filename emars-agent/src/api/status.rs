//! The agent itself: `GET /healthz`, `GET /metrics` (the exposition is [`super::metrics`]'s)
//! and `GET /v1/info`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiResult;
use super::{metrics, AgentInfo, ApiError, ApiState, Health};

#[utoipa::path(
    get, path = "/healthz", tag = "agent",
    responses((status = 200, description = "The agent answers", body = Health))
)]
pub(super) async fn healthz() -> Json<Health> {
    Json(Health { ok: true })
}

/// The agent's info as the event loop last wrote it, with the store's cap on functions now
/// and the store's agent id.
fn agent_info(state: &ApiState) -> AgentInfo {
    // A writer that panicked leaves plain data behind; reading it is still fine.
    let mut info = state
        .info
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    info.function_cap = state.store.function_cap();
    state.store.agent_id().clone_into(&mut info.agent_id);
    info
}

/// The Prometheus exposition ([`metrics`]) in the format the request's `Accept` asks for,
/// assembled off the async threads.
#[utoipa::path(
    get, path = "/metrics", tag = "agent",
    responses((status = 200, description = "Prometheus / OpenMetrics text exposition, or, when \
        `Accept` asks for it, Prometheus's protobuf exposition with native histograms \
        (docs/metrics.md)",
        content(
            (String = "application/openmetrics-text"),
            (Vec<u8> = "application/vnd.google.protobuf"),
        )))
)]
pub(super) async fn metrics_text(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = metrics::Format::of_accept(accept);
    let snapshots = state.snapshots.clone();
    let snapshot = match format {
        metrics::Format::Text => &snapshots.metrics,
        metrics::Format::Protobuf => &snapshots.metrics_protobuf,
    };
    // Counters move every second: rebuilt at most once a second, whoever asks.
    let body = snapshot
        .get(
            || None,
            move || {
                let snap = metrics_snapshot(&state, format)?;
                snap.render(format)
                    .map(bytes::Bytes::from)
                    .map_err(|e| ApiError::internal(format!("encoding the metrics: {e}")))
            },
        )
        .await?;
    // The answer depends on Accept: a cache in between must key on it.
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, format.content_type()),
            (axum::http::header::VARY, "Accept"),
        ],
        body,
    )
        .into_response())
}

/// One scrape's figures, with the peaks in the buckets `format` carries.
fn metrics_snapshot(
    state: &ApiState,
    format: metrics::Format,
) -> Result<metrics::Snapshot, ApiError> {
    let info = agent_info(state);
    let peaks = match format {
        metrics::Format::Text => {
            let bounds = metrics::peak_buckets();
            let per_function = state.store.peak_histograms(&bounds);
            metrics::PeakBuckets::Classic {
                bounds,
                per_function,
            }
        }
        // The recommender's values: an OOM-killed instance at its bump (`[fleet]` reads these).
        metrics::Format::Protobuf => metrics::PeakBuckets::Native(
            state
                .store
                .native_peaks(crate::policy::recommend::sample_value),
        ),
    };
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
    let now = crate::clock::now_ms();
    let recent_oom = match &state.predictive {
        Some(p) => functions
            .iter()
            .filter(|f| f.oom_kills > 0)
            .filter_map(|f| Some((f.name.clone(), p.policy.recent_oom_bump(&f.name, now)?)))
            .collect(),
        None => Vec::new(),
    };
    Ok(metrics::Snapshot {
        peaks,
        functions,
        limits,
        recent_oom,
        containers: state.store.container_peaks(now),
        info,
    })
}

/// The agent's info, with the model's footprint (which the metrics do not carry) as of the
/// model's last change (counted again at most once a second).
#[utoipa::path(
    get, path = "/v1/info", tag = "agent",
    responses((status = 200, description = "Kernel, cgroup mode, programs attached, fallbacks, counters",
        body = AgentInfo))
)]
pub(super) async fn info(State(state): State<ApiState>) -> ApiResult<Json<AgentInfo>> {
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
