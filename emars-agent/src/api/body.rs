//! Request bodies as the document describes them: a JSON object, decoded into its wire type.
//!
//! serde would also take a JSON array for a struct (`[5]` as `{"count": 5}`), and an empty one
//! for a struct without fields; the document says `type: object`, so the body is read as an
//! object first and only then decoded. JSON Schema's `integer` is any number without a
//! fraction, `5.0` as well as `5`: such a number is taken as the integer it is.

use axum::extract::{FromRequest, Request};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

use super::ApiError;

/// A JSON object body decoded as `T`; every refusal is an [`ApiError`] (400, 413, 415).
#[derive(Debug)]
pub struct JsonObject<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonObject<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(object) = Json::<Map<String, Value>>::from_request(req, state).await?;
        let mut body = Value::Object(object);
        integral_floats_as_integers(&mut body);
        serde_json::from_value(body)
            .map(JsonObject)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}

/// Replaces every number written with a zero fraction (`5.0`, `1e3`) by that integer, where it
/// fits in an i64 or a u64.
fn integral_floats_as_integers(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // 2^64 and -2^63 are exact in f64; a float in [0, 2^64) or [-2^63, 0) converts
            // without saturating.
            let whole = f.is_finite() && f.fract() == 0.0;
            if whole && (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                *n = Number::from(f as u64);
            } else if whole && (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                *n = Number::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integral_floats_are_integers() {
        let mut v: Value = serde_json::from_str(
            r#"{"a": 160993.0, "b": [1e3, -2.0, 0.5, -0.0], "c": {"d": 1.8446744073709552e19},
                "e": 9.2e18, "f": -9.3e18, "g": 7}"#,
        )
        .unwrap();
        integral_floats_as_integers(&mut v);
        assert_eq!(
            v,
            json!({"a": 160993, "b": [1000, -2, 0.5, 0], "c": {"d": 1.8446744073709552e19},
                   "e": 9_200_000_000_000_000_000u64, "f": -9.3e18, "g": 7})
        );
        assert!(v["a"].is_u64() && v["b"][1].is_i64());
    }
}
