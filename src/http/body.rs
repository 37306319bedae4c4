//! Request bodies: read with a size limit, parse as JSON, malformed → 400, wrong shape → 422.

use std::time::Duration;

use actix_web::web;
use serde::de::DeserializeOwned;

use super::errors::ApiError;

/// Longest a request body may take to arrive once its headers are in (their own limit is
/// actix's `client_request_timeout`, `startup::REQUEST_HEAD_TIMEOUT`). A client that promises a
/// body and never sends it is answered 408 and its connection closed, instead of holding a
/// worker's connection until the peer gives up.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the whole body, refusing more than `limit` bytes or taking longer than [`BODY_READ_TIMEOUT`].
pub async fn read_body(payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    match tokio::time::timeout(BODY_READ_TIMEOUT, payload.to_bytes_limited(limit)).await {
        Err(_) => Err(ApiError::RequestTimeout(BODY_READ_TIMEOUT)),
        Ok(Ok(Ok(bytes))) => Ok(bytes),
        Ok(Ok(Err(error))) => Err(ApiError::BadRequest(format!(
            "could not read the body: {error}"
        ))),
        Ok(Err(_)) => Err(ApiError::PayloadTooLarge(limit)),
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
