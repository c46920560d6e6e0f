//! Request bodies as the document describes them: a JSON object, decoded into its wire type.
//!
//! serde would also take a JSON array for a struct (`[5]` as `{"count": 5}`), and an empty one
//! for a struct without fields; the document says `type: object`, so the body is read as an
//! object first and only then decoded.

use axum::extract::{FromRequest, Request};
use axum::Json;
use serde::de::DeserializeOwned;

use super::ApiError;

/// A JSON object body decoded as `T`; every refusal is an [`ApiError`] (400, 413, 415).
#[derive(Debug)]
pub struct JsonObject<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonObject<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(object) =
            Json::<serde_json::Map<String, serde_json::Value>>::from_request(req, state).await?;
        serde_json::from_value(serde_json::Value::Object(object))
            .map(JsonObject)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}
