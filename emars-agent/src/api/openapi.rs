//! The API's OpenAPI 3.1 document. Nothing in it is written by hand but prose: the paths
//! come from the router's `#[utoipa::path]` operations, the schemas from the wire types'
//! `ToSchema` derives (which follow their serde attributes), so the document cannot drift from
//! what the server does without a test noticing (tests/tests/openapi.rs validates real
//! answers against it).

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;

/// What the document says about itself; the router adds the paths and schemas.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "EMARS agent",
        description = "Per-function and per-instance peak memory from eBPF, recommended limits, \
                       limit writes, admission and pooled-cgroup binding. Reads are open on \
                       loopback; every write needs `Authorization: Bearer <token>` (the token is \
                       in the agent's root-only token file) and a JSON content type. Every error \
                       is `{\"error\": \"...\", \"status\": <code>}`."
    ),
    modifiers(&WriteToken),
    tags(
        (name = "agent", description = "The agent itself: health, metrics, probes, counters"),
        (name = "functions", description = "What was measured, per function and instance"),
        (name = "predictive", description = "Recommendations and the generated per-function configs"),
        (name = "enforcement", description = "Limit writes and their audit trail"),
        (name = "reactive", description = "Admission (Refuse)"),
        (name = "pool", description = "Pooled, reused cgroups bound to a function per use"),
        (name = "web", description = "The read-only web page"),
    )
)]
struct Base;

/// The bearer token every write needs (see the API guard).
struct WriteToken;

impl utoipa::Modify for WriteToken {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The agent's write token, from its root-only token file \
                         (default /var/lib/emars/api-token)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document's start: info, tags, the security scheme.
pub fn base() -> OpenApi {
    let mut doc = <Base as utoipa::OpenApi>::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// The document as served, encoded once when the router is built.
#[derive(Clone)]
pub struct Document(Arc<str>);

impl Document {
    pub fn new(doc: &OpenApi) -> Self {
        // Encoding utoipa's own types cannot fail (string keys only); an empty document would
        // show that it did.
        Document(Arc::from(doc.to_pretty_json().unwrap_or_default()))
    }
}

/// GET /v1/openapi.json.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "agent",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json"))
)]
pub async fn document(Extension(doc): Extension<Document>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.to_string(),
    )
        .into_response()
}
