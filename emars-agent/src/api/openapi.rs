//! The API's OpenAPI 3.1 document. Nothing in it is written by hand but prose: the paths
//! come from the router's `#[utoipa::path]` operations, the schemas from the wire types'
//! `ToSchema` derives (which follow their serde attributes), so the document cannot drift from
//! what the server does without a test noticing (tests/tests/openapi.rs validates real
//! answers against it).

use axum::body::Bytes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Schema};

use super::ErrorBody;
use crate::model::registry::FUNCTION_NAME_PATTERN;

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
    state_function_name_pattern(openapi);
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

/// The request bodies whose `function` is a function name the handlers check.
const FUNCTION_NAME_BODIES: [&str; 2] = ["AdmissionBody", "BindBody"];

/// States [`FUNCTION_NAME_PATTERN`], the registry's rule that every handler checks, wherever
/// the document takes a function name: each path's `{name}`, `?function=`, and the `function`
/// of [`FUNCTION_NAME_BODIES`]. Set here, from the one constant, rather than written into each
/// attribute.
fn state_function_name_pattern(openapi: &mut OpenApi) {
    let state = |schema: Option<&mut RefOr<Schema>>| {
        if let Some(RefOr::T(Schema::Object(o))) = schema {
            o.pattern = Some(FUNCTION_NAME_PATTERN.to_owned());
        }
    };
    for item in openapi.paths.paths.values_mut() {
        let ops: [&mut Option<Operation>; 5] = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ];
        for op in ops.into_iter().flatten() {
            for p in op.parameters.iter_mut().flatten() {
                let RefOr::T(p) = p else { continue };
                let names_a_function = matches!(
                    (&p.parameter_in, p.name.as_str()),
                    (ParameterIn::Path, "name") | (ParameterIn::Query, "function")
                );
                if names_a_function {
                    state(p.schema.as_mut());
                }
            }
        }
    }
    let Some(components) = openapi.components.as_mut() else {
        return;
    };
    for body in FUNCTION_NAME_BODIES {
        if let Some(RefOr::T(Schema::Object(o))) = components.schemas.get_mut(body) {
            state(o.properties.get_mut("function"));
        }
    }
}

/// `{name}`: a function.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct FunctionPath {
    /// Function name: 1 to 128 of A-Z a-z 0-9 . _ : -
    name: String,
}

/// `{name}/instances/{instance}`: one instance of a function.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct InstancePath {
    /// Function name: 1 to 128 of A-Z a-z 0-9 . _ : -
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

/// `?input_bytes=N` of a function's limits.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct FunctionLimitsParams {
    /// The limits a bind with this `input_bytes` gets (the function's fit of peak against
    /// input, else its recommendation: `source` and `fallback` say which).
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    input_bytes: Option<u64>,
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

#[cfg(test)]
mod tests {
    use crate::api::paging::{CURSOR_PATTERN, MAX_LIMIT};
    use crate::api::wire::{
        valid_cgroup_arg, CGROUP_PATTERN, INSTANCE_NAME_PATTERN, MAX_CGROUP_ARG_CHARS,
    };
    use crate::model::registry::{valid_function_name, valid_instance_name, FUNCTION_NAME_PATTERN};
    use serde_json::Value;

    fn document() -> Value {
        serde_json::to_value(crate::api::openapi_document()).unwrap()
    }

    /// Every pattern the document states is the one the handlers check, and a string matches
    /// it exactly when the handler's own check takes it.
    #[test]
    fn the_documented_patterns_are_the_handlers_rules() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        let param = |path: &str, name: &str| -> Value {
            let op = &doc["paths"][path]["get"];
            op["parameters"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .map(|p| p["schema"]["pattern"].clone())
                .unwrap_or(Value::Null)
        };
        for (at, found, want) in [
            (
                "BindBody.cgroup",
                &schemas["BindBody"]["properties"]["cgroup"]["pattern"],
                CGROUP_PATTERN,
            ),
            (
                "ReleaseBody.cgroup",
                &schemas["ReleaseBody"]["properties"]["cgroup"]["pattern"],
                CGROUP_PATTERN,
            ),
            (
                "BindBody.function",
                &schemas["BindBody"]["properties"]["function"]["pattern"],
                FUNCTION_NAME_PATTERN,
            ),
            (
                "AdmissionBody.function",
                &schemas["AdmissionBody"]["properties"]["function"]["pattern"],
                FUNCTION_NAME_PATTERN,
            ),
            (
                "BindBody.instance",
                &schemas["BindBody"]["properties"]["instance"]["pattern"],
                INSTANCE_NAME_PATTERN,
            ),
            (
                "InstancesResponse.next",
                &schemas["InstancesResponse"]["properties"]["next"]["pattern"],
                CURSOR_PATTERN,
            ),
            (
                "?cursor",
                &param("/v1/functions/{name}/instances", "cursor"),
                CURSOR_PATTERN,
            ),
            (
                "{name}",
                &param("/v1/functions/{name}", "name"),
                FUNCTION_NAME_PATTERN,
            ),
            (
                "?function",
                &param("/v1/generations", "function"),
                FUNCTION_NAME_PATTERN,
            ),
        ] {
            assert_eq!(found, want, "{at}");
        }
        assert_eq!(
            schemas["BindBody"]["properties"]["cgroup"]["maxLength"],
            MAX_CGROUP_ARG_CHARS
        );
        let re = |p: &str| regex::Regex::new(p).unwrap();
        let (function, instance, cgroup) = (
            re(FUNCTION_NAME_PATTERN),
            re(INSTANCE_NAME_PATTERN),
            re(CGROUP_PATTERN),
        );
        let names = [
            "",
            "a",
            ".",
            "..",
            "fn:v1.2_x-y",
            "a/b",
            "a b",
            "é",
            "tab\t",
            "a\u{7}b",
            "a\u{7f}",
            "a\u{85}b",
            "a\u{a0}b",
            "\u{1f600}",
        ];
        let long = [
            "x".repeat(128),
            "x".repeat(129),
            "x".repeat(255),
            "x".repeat(256),
            "é".repeat(255),
            "é".repeat(256),
        ];
        for s in names.iter().copied().chain(long.iter().map(String::as_str)) {
            assert_eq!(
                function.is_match(s),
                valid_function_name(s),
                "function {s:?}"
            );
            assert_eq!(
                instance.is_match(s),
                valid_instance_name(s),
                "instance {s:?}"
            );
        }
        let paths = [
            "",
            "/",
            "//",
            "/a",
            "a",
            "a/b",
            "/a/",
            "/a//b",
            "/.",
            "/..",
            "/a/.",
            "/a/..",
            "/a/../b",
            "/./a",
            "/.a",
            "/..a",
            "/...",
            "/a/./",
            "/a/b/",
            "/é/\u{0}",
            "/sys/fs/cgroup/memory/pool/cg-1",
        ];
        let long = [
            "/".to_owned() + &"x".repeat(4095),
            "/".to_owned() + &"x".repeat(4096),
        ];
        for s in paths.iter().copied().chain(long.iter().map(String::as_str)) {
            let documented = cgroup.is_match(s) && s.chars().count() <= MAX_CGROUP_ARG_CHARS;
            assert_eq!(documented, valid_cgroup_arg(s), "cgroup {s:?}");
        }
    }

    /// Every function name the document takes states the registry's pattern, and every
    /// `limit` the largest page the handlers take.
    #[test]
    fn every_function_name_and_limit_states_the_rule() {
        let doc = document();
        let (mut names, mut limits) = (0, 0);
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for p in op["parameters"].as_array().into_iter().flatten() {
                    match (p["in"].as_str(), p["name"].as_str()) {
                        (Some("path"), Some("name")) | (Some("query"), Some("function")) => {
                            names += 1;
                            assert_eq!(p["schema"]["pattern"], FUNCTION_NAME_PATTERN, "{p}");
                        }
                        (Some("query"), Some("limit")) => {
                            limits += 1;
                            assert_eq!(p["schema"]["maximum"], MAX_LIMIT, "{p}");
                        }
                        _ => {}
                    }
                }
            }
        }
        assert!(names >= 8 && limits == 3, "{names} names, {limits} limits");
    }

    /// The links the stateful tester follows name operations that exist, and the parameters
    /// those operations have.
    #[test]
    fn links_name_real_operations_and_parameters() {
        let doc = document();
        let mut ops = std::collections::BTreeMap::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                if let Some(id) = op["operationId"].as_str() {
                    ops.insert(id.to_owned(), op.clone());
                }
            }
        }
        let mut links = 0;
        for op in ops.values() {
            for response in op["responses"].as_object().unwrap().values() {
                for (name, link) in response["links"].as_object().into_iter().flatten() {
                    links += 1;
                    let target = &ops[link["operationId"].as_str().unwrap()];
                    for p in link["parameters"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|p| p.0)
                    {
                        let known = target["parameters"]
                            .as_array()
                            .is_some_and(|ps| ps.iter().any(|q| q["name"] == p.as_str()));
                        assert!(known, "link {name}: no parameter {p}");
                    }
                    if link.get("requestBody").is_some() {
                        assert!(target.get("requestBody").is_some(), "link {name}");
                    }
                }
            }
        }
        assert!(links >= 10, "{links} links");
    }
}
