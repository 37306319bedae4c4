//! Check requests (`{"api_key_id", "tokens"?}`) and the reply body shared by AMQP and HTTP.

use serde::Serialize;
use serde_json::{Map, Value};

use super::quota::{ceiling_detail, denial_detail, format_instant, QuotaState};
use super::usage::{optional_count, required_key_id, Rejection};

/// A validated check request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckRequest {
    pub api_key_id: i64,
    /// Estimated tokens of the coming request.
    pub tokens: Option<i64>,
}

/// Decodes a check request from an AMQP body.
pub fn decode_check_request(body: &[u8]) -> Result<CheckRequest, Rejection> {
    let object = parse_object(body)?;
    Ok(CheckRequest {
        api_key_id: required_key_id(&object)?,
        tokens: optional_count(&object, "tokens")?,
    })
}

/// Decodes the optional `{"tokens": N}` body of `POST /keys/{id}/check`; an empty body means no estimate.
pub fn decode_check_estimate(body: &[u8]) -> Result<Option<i64>, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    optional_count(&parse_object(body)?, "tokens")
}

pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Rejection> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Rejection::new("body must be a JSON object")),
        Err(error) => Err(Rejection::new(format!("body is not valid JSON: {error}"))),
    }
}

/// The answer to a check, over AMQP and HTTP alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CheckReply {
    pub api_key_id: Option<i64>,
    pub known: bool,
    pub allowed: bool,
    pub status: u16,
    pub token_quota_monthly: Option<i64>,
    pub tokens_used_this_month: i64,
    pub remaining: Option<i64>,
    pub quota_reset_at: Option<String>,
    pub detail: Option<String>,
}

impl CheckReply {
    /// The reply for a known key whose state has already been rolled over to `now`.
    pub fn for_known_key(api_key_id: i64, state: &QuotaState, estimate: Option<i64>) -> Self {
        let decision = state.decide(estimate);
        let (status, detail) = match (decision.allowed, state.quota) {
            (false, Some(quota)) => (429, Some(denial_detail(state.used, quota, state.reset_at))),
            // Unlimited, yet denied: the counter is at its ceiling.
            (false, None) => (429, Some(ceiling_detail(state.used, state.reset_at))),
            _ => (200, None),
        };
        CheckReply {
            api_key_id: Some(api_key_id),
            known: true,
            allowed: decision.allowed,
            status,
            token_quota_monthly: state.quota,
            tokens_used_this_month: state.used,
            remaining: decision.remaining,
            quota_reset_at: Some(format_instant(state.reset_at)),
            detail,
        }
    }

    /// The reply for a key the database does not know, under the configured policy.
    pub fn for_unknown_key(api_key_id: i64, allow: bool) -> Self {
        CheckReply {
            api_key_id: Some(api_key_id),
            known: false,
            allowed: allow,
            status: if allow { 200 } else { 404 },
            token_quota_monthly: None,
            tokens_used_this_month: 0,
            remaining: None,
            quota_reset_at: None,
            detail: Some(format!("unknown API key {api_key_id}")),
        }
    }

    /// The reply when the key's state cannot be read (not resident and the database is down).
    pub fn unavailable(api_key_id: i64, reason: impl std::fmt::Display) -> Self {
        CheckReply {
            api_key_id: Some(api_key_id),
            known: false,
            allowed: false,
            status: 503,
            token_quota_monthly: None,
            tokens_used_this_month: 0,
            remaining: None,
            quota_reset_at: None,
            detail: Some(reason.to_string()),
        }
    }

    /// The reply to a request that could not be understood.
    pub fn malformed(api_key_id: Option<i64>, rejection: &Rejection) -> Self {
        CheckReply {
            api_key_id,
            known: false,
            allowed: false,
            status: 400,
            token_quota_monthly: None,
            tokens_used_this_month: 0,
            remaining: None,
            quota_reset_at: None,
            detail: Some(rejection.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_request_with_and_without_estimate() {
        assert_eq!(
            decode_check_request(br#"{"api_key_id": 42}"#).unwrap(),
            CheckRequest {
                api_key_id: 42,
                tokens: None
            }
        );
        assert_eq!(
            decode_check_request(br#"{"api_key_id": 42, "tokens": 800}"#).unwrap(),
            CheckRequest {
                api_key_id: 42,
                tokens: Some(800)
            }
        );
    }

    #[test]
    fn rejects_malformed_requests_with_a_reason() {
        for (body, reason) in [
            (&b"nope"[..], "not valid JSON"),
            (b"[1]", "JSON object"),
            (b"{}", "api_key_id"),
            (br#"{"api_key_id": "42"}"#, "api_key_id"),
            (br#"{"api_key_id": 0}"#, "api_key_id"),
            (br#"{"api_key_id": 1, "tokens": -1}"#, "tokens"),
            (br#"{"api_key_id": 1, "tokens": 1.5}"#, "tokens"),
        ] {
            let error = decode_check_request(body).unwrap_err().to_string();
            assert!(error.contains(reason), "{error} should mention {reason}");
        }
    }

    #[test]
    fn empty_http_body_means_no_estimate() {
        assert_eq!(decode_check_estimate(b"").unwrap(), None);
        assert_eq!(decode_check_estimate(br#"{"tokens": 5}"#).unwrap(), Some(5));
        assert!(decode_check_estimate(br#"{"tokens": "5"}"#).is_err());
    }
}
