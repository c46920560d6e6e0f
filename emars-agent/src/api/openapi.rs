//! The API's OpenAPI 3.1 document. Nothing in it is written by hand but prose: the paths
//! come from the router's `#[utoipa::path]` operations, the schemas from the wire types'
//! `ToSchema` derives (which follow their serde attributes), so the document cannot drift from
//! what the server does without a test noticing (tests/tests/openapi.rs validates real
//! answers against it).

use axum::body::Bytes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref};

use super::ErrorBody;

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
    components(schemas(ErrorBody)),
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

/// Completes the document once the router has added its operations: every operation's
/// `default` answer (any error: `{"error", "status"}`), and the token on every write, as the
/// guard enforces it for every method but GET/HEAD. Stated once here rather than on each route.
pub fn finish(openapi: &mut OpenApi) {
    let error = ResponseBuilder::new()
        .description(
            "Any error (400 bad input, 401 no token, 403 foreign Host or cross-site, 404, \
             405, 409 observe mode or busy, 413, 415, 422 refused, 503 not running here): \
             what was wrong, with the value",
        )
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for item in openapi.paths.paths.values_mut() {
        let writes = [
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ];
        for op in writes.into_iter().flatten() {
            op.security = Some(vec![SecurityRequirement::new(
                "token",
                Vec::<String>::new(),
            )]);
        }
        let all = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ];
        for op in all.into_iter().flatten() {
            op.responses
                .responses
                .entry("default".to_owned())
                .or_insert_with(|| error.clone().into());
        }
    }
}

/// `{name}`: a function.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct FunctionPath {
    /// Function name: 1 to 128 of A-Z a-z 0-9 . _ : -
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    name: String,
}

/// `{name}/instances/{instance}`: one instance of a function.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct InstancePath {
    /// Function name: 1 to 128 of A-Z a-z 0-9 . _ : -
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    name: String,
    /// Instance name (a live instance of the function).
    instance: String,
}

/// `?live=…&limit=…&order=…&cursor=…` of the instances listing ([`super::paging`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct InstancesParams {
    /// true: live instances only; false: ended ones only.
    live: Option<bool>,
    /// Records per page (default 1000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u64>,
    /// `oldest` first (the default) or `newest` first, by start time then cgroup id.
    #[param(inline)]
    order: Option<ListOrder>,
    /// The `next` of the previous page (same `live` and `order`): the page starts after it.
    #[param(pattern = "^[0-9a-f]{32}$")]
    cursor: Option<String>,
}

/// `order=` of the instances listing.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum ListOrder {
    Oldest,
    Newest,
}

/// `?limit=N` of a listing, newest first.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct LimitParams {
    /// At most N (default 100).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u64>,
}

/// `?limit=N&function=F` of the generations listing.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct GenerationsParams {
    /// At most N (default 100).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u64>,
    /// Only this function's configs.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    function: Option<String>,
}

/// The document as served, encoded once when the router is built (a clone shares it).
#[derive(Clone)]
pub struct Document(Bytes);

impl Document {
    pub fn new(doc: &OpenApi) -> Self {
        // Encoding utoipa's own types cannot fail (string keys only); were it to, the route
        // answers an empty body and the log says why.
        let text = doc.to_pretty_json().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot encode the OpenAPI document");
            String::new()
        });
        Document(Bytes::from(text))
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
    ([(header::CONTENT_TYPE, "application/json")], doc.0).into_response()
}
