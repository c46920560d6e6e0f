//! The error answer, `{"error": message, "status": code}`, and the status each error of the
//! stages below becomes (store, actuator, policy, axum's extractors).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{ErrorBody, BODY_LIMIT};
use crate::kernel::cgroupfs::CgroupfsError;
use crate::model::tracker::FunctionsFull;
use crate::policy::actuator::ActuatorError;
use crate::policy::PolicyError;
use crate::store::StoreError;

/// An error answer: `{"error": message, "status": code}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub(super) fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(error = %message, "API request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            status: self.status.as_u16(),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // Only reachable if the store's rule is stricter than the API's.
            StoreError::InvalidName { .. } => ApiError::bad_request(e.to_string()),
            StoreError::FunctionsFull(e) => functions_full(&e),
            _ => ApiError::internal(format!("store error: {e}")),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "request body must be JSON: expected header `Content-Type: application/json`",
            ),
            // axum answers 422 for well-formed JSON of the wrong shape; we say 400.
            JsonRejection::JsonDataError(e) => ApiError::bad_request(format!(
                "invalid request body: {} (a JSON object as the operation's request body in \
                 GET /v1/openapi.json says)",
                source_text(&e)
            )),
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::bad_request(format!("malformed JSON body: {}", source_text(&e)))
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than the {BODY_LIMIT}-byte limit"),
            ),
            other => ApiError::new(other.status(), other.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::new(r.status(), format!("bad path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(format!("bad query string: {}", r.body_text()))
    }
}

/// A new function refused by `store.max_functions`: 507, the agent has no room to keep one
/// more function; it has again once retention prunes one.
pub(super) fn functions_full(e: &FunctionsFull) -> ApiError {
    ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
}

/// The innermost cause of an error, without axum's generic prefix.
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

impl From<ActuatorError> for ApiError {
    fn from(e: ActuatorError) -> Self {
        let status = match &e {
            ActuatorError::ObserveMode | ActuatorError::Replaced { .. } => StatusCode::CONFLICT,
            e if e.is_refusal() => StatusCode::UNPROCESSABLE_ENTITY,
            ActuatorError::Cgroup(CgroupfsError::Gone { .. }) => StatusCode::NOT_FOUND,
            ActuatorError::AuditNotDurable { .. } | ActuatorError::AuditNotStored { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => return ApiError::internal(e.to_string()),
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::ObserveMode | PolicyError::Busy => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            PolicyError::Store(e) => ApiError::from(e),
            e => ApiError::internal(e.to_string()),
        }
    }
}
