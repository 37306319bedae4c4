//! Request bodies: read with a size limit, parse as JSON, malformed → 400, wrong shape → 422.

use actix_web::web;
use serde::de::DeserializeOwned;

use super::errors::ApiError;

/// Reads the whole body, refusing more than `limit` bytes.
pub async fn read_body(payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    match payload.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => Err(ApiError::BadRequest(format!(
            "could not read the body: {error}"
        ))),
        Err(_) => Err(ApiError::PayloadTooLarge(limit)),
    }
}

/// Parses JSON: syntax errors are 400, well-formed JSON of the wrong shape 422.
/// An empty body parses as `T::default()` when `empty_is_default`.
pub fn parse_json<T: DeserializeOwned + Default>(
    bytes: &[u8],
    empty_is_default: bool,
) -> Result<T, ApiError> {
    if empty_is_default && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => {
            ApiError::Unprocessable(format!("invalid body: {error}"))
        }
        _ => ApiError::BadRequest(format!("malformed JSON: {error}")),
    })
}

/// Deserializes a present field as `Some(value)`, so `null` can be told from absent.
pub fn present<'de, T, D>(deserializer: D) -> Result<Option<T>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    T::deserialize(deserializer).map(Some)
}
