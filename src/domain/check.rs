//! Check requests (`{"api_key_id", "tokens"?}`, optionally asking for a hold: `reserve`,
//! `reservation_id`, `ttl_secs`) and the reply body shared by AMQP and HTTP.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::outcome::CheckOutcome;

use super::quota::{ceiling_detail, denial_detail, format_instant, QuotaState};
use super::reservation::{optional_reserve, Reservation, ReserveRequest};
use super::wire::{optional_count, parse_object, required_key_id, Rejection};

/// A validated check request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRequest {
    pub api_key_id: i64,
    pub ask: CheckAsk,
}

/// What a check asks of a key, whichever way it arrived (AMQP, HTTP, forwarded to the owner).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckAsk {
    /// Estimated tokens of the coming request.
    pub tokens: Option<i64>,
    /// Hold this many tokens if allowed; then `reserve` is the estimate the check is decided on.
    pub reserve: Option<ReserveRequest>,
}

impl CheckAsk {
    /// The tokens the decision is taken on: the hold's when one is asked, else `tokens`.
    pub fn estimate(&self) -> Option<i64> {
        self.reserve
            .as_ref()
            .map(|reserve| reserve.tokens)
            .or(self.tokens)
    }

    /// The request body of a check of `api_key_id` asking this, as a client would send it.
    pub fn to_body(&self, api_key_id: i64) -> Value {
        let mut request = serde_json::json!({ "api_key_id": api_key_id });
        if let Some(tokens) = self.tokens {
            request["tokens"] = tokens.into();
        }
        if let Some(reserve) = &self.reserve {
            request["reserve"] = reserve.tokens.into();
            request["reservation_id"] = reserve.id.clone().into();
            request["ttl_secs"] = reserve.ttl_secs.into();
        }
        request
    }
}

fn decode_ask(object: &Map<String, Value>) -> Result<CheckAsk, Rejection> {
    Ok(CheckAsk {
        tokens: optional_count(object, "tokens")?,
        reserve: optional_reserve(object)?,
    })
}

/// Decodes a check request from an AMQP body.
pub fn decode_check_request(body: &[u8]) -> Result<CheckRequest, Rejection> {
    let object = parse_object(body)?;
    Ok(CheckRequest {
        api_key_id: required_key_id(&object)?,
        ask: decode_ask(&object)?,
    })
}

/// Decodes the optional body of `POST /keys/{id}/check` (`tokens`, or a hold); an empty body
/// asks nothing but the check.
pub fn decode_check_body(body: &[u8]) -> Result<CheckAsk, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CheckAsk::default());
    }
    decode_ask(&parse_object(body)?)
}

/// The answer to a check, over AMQP and HTTP alike; on the wire it is a `CheckReplyBody`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReply {
    pub api_key_id: Option<i64>,
    pub outcome: CheckOutcome,
    pub token_quota_monthly: Option<i64>,
    pub tokens_used_this_month: i64,
    pub remaining: Option<i64>,
    pub quota_reset_at: Option<String>,
    pub detail: Option<String>,
    /// Tokens held by live reservations (0 without holds); counted against the quota like used ones.
    pub tokens_reserved: i64,
    /// The hold this check granted (or its earlier grant, for a repeated `reservation_id`).
    pub reservation: Option<Reservation>,
}

/// A check reply as it travels (SPEC §2.2): `known`, `allowed` and `status` spell out the
/// outcome. Borrows from a `CheckReply` to send one, owns what it received.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = CheckReply)]
pub struct CheckReplyBody<'a> {
    pub api_key_id: Option<i64>,
    pub known: bool,
    pub allowed: bool,
    pub status: u16,
    pub token_quota_monthly: Option<i64>,
    pub tokens_used_this_month: i64,
    pub remaining: Option<i64>,
    pub quota_reset_at: Option<Cow<'a, str>>,
    pub detail: Option<Cow<'a, str>>,
    /// Tokens held by live reservations (0 without holds); counted against the quota like used ones.
    #[serde(default)]
    pub tokens_reserved: i64,
    /// The hold this check granted (or its earlier grant, for a repeated `reservation_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<Cow<'a, Reservation>>,
}

impl Serialize for CheckReply {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        CheckReplyBody {
            api_key_id: self.api_key_id,
            known: self.outcome.known(),
            allowed: self.outcome.allowed(),
            status: self.outcome.wire_status(),
            token_quota_monthly: self.token_quota_monthly,
            tokens_used_this_month: self.tokens_used_this_month,
            remaining: self.remaining,
            quota_reset_at: self.quota_reset_at.as_deref().map(Cow::Borrowed),
            detail: self.detail.as_deref().map(Cow::Borrowed),
            tokens_reserved: self.tokens_reserved,
            reservation: self.reservation.as_ref().map(Cow::Borrowed),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CheckReply {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let body = CheckReplyBody::deserialize(deserializer)?;
        let outcome = CheckOutcome::from_wire(body.status, body.known).ok_or_else(|| {
            serde::de::Error::custom(format!("no check answers with status {}", body.status))
        })?;
        Ok(CheckReply {
            api_key_id: body.api_key_id,
            outcome,
            token_quota_monthly: body.token_quota_monthly,
            tokens_used_this_month: body.tokens_used_this_month,
            remaining: body.remaining,
            quota_reset_at: body.quota_reset_at.map(Cow::into_owned),
            detail: body.detail.map(Cow::into_owned),
            tokens_reserved: body.tokens_reserved,
            reservation: body.reservation.map(Cow::into_owned),
        })
    }
}

impl CheckReply {
    /// Whether the key may make the request.
    pub fn allowed(&self) -> bool {
        self.outcome.allowed()
    }

    /// The reply for a known key whose state has already been rolled over to `now`, with
    /// `reserved` tokens held: the decision reads `used` as used + reserved (SPEC §1).
    pub fn for_known_key(
        api_key_id: i64,
        state: &QuotaState,
        reserved: i64,
        estimate: Option<i64>,
    ) -> Self {
        let counted = QuotaState {
            used: state.used.saturating_add(reserved),
            ..*state
        };
        let decision = counted.decide(estimate);
        let (outcome, detail) = match (decision.allowed, state.quota) {
            (false, Some(quota)) => (
                CheckOutcome::QuotaReached,
                Some(denial_detail(counted.used, quota, state.reset_at)),
            ),
            // Unlimited, yet denied: the counter is at its ceiling.
            (false, None) => (
                CheckOutcome::QuotaReached,
                Some(ceiling_detail(counted.used, state.reset_at)),
            ),
            (true, _) => (CheckOutcome::Allowed, None),
        };
        CheckReply {
            api_key_id: Some(api_key_id),
            outcome,
            token_quota_monthly: state.quota,
            tokens_used_this_month: state.used,
            remaining: decision.remaining,
            quota_reset_at: Some(format_instant(state.reset_at)),
            detail,
            tokens_reserved: reserved,
            reservation: None,
        }
    }

    /// The reply that returns a hold already granted (a repeated `reservation_id`): allowed,
    /// whatever the key's state now, since the tokens are already held for this request.
    pub fn with_existing_hold(mut self, reservation: Reservation) -> Self {
        self.outcome = CheckOutcome::Allowed;
        self.detail = None;
        self.reservation = Some(reservation);
        self
    }

    /// A reply that says nothing of the key's state: `outcome` and why.
    fn without_state(api_key_id: Option<i64>, outcome: CheckOutcome, detail: String) -> Self {
        CheckReply {
            api_key_id,
            outcome,
            token_quota_monthly: None,
            tokens_used_this_month: 0,
            remaining: None,
            quota_reset_at: None,
            detail: Some(detail),
            tokens_reserved: 0,
            reservation: None,
        }
    }

    /// The reply for a key the database does not know, under the configured policy.
    pub fn for_unknown_key(api_key_id: i64, allow: bool) -> Self {
        Self::without_state(
            Some(api_key_id),
            CheckOutcome::UnknownKey { allowed: allow },
            format!("unknown API key {api_key_id}"),
        )
    }

    /// The reply when the key's state cannot be read (not resident and the database is down).
    pub fn unavailable(api_key_id: i64, reason: impl std::fmt::Display) -> Self {
        Self::without_state(
            Some(api_key_id),
            CheckOutcome::Unavailable,
            reason.to_string(),
        )
    }

    /// The reply to a request that could not be understood.
    pub fn malformed(api_key_id: Option<i64>, rejection: &Rejection) -> Self {
        Self::without_state(api_key_id, CheckOutcome::Malformed, rejection.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    #[test]
    fn decodes_a_request_with_and_without_estimate() {
        assert_eq!(
            decode_check_request(br#"{"api_key_id": 42}"#).unwrap(),
            CheckRequest {
                api_key_id: 42,
                ask: CheckAsk::default()
            }
        );
        assert_eq!(
            decode_check_request(br#"{"api_key_id": 42, "tokens": 800}"#).unwrap(),
            CheckRequest {
                api_key_id: 42,
                ask: CheckAsk {
                    tokens: Some(800),
                    reserve: None
                }
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
        assert_eq!(decode_check_body(b"").unwrap(), CheckAsk::default());
        assert_eq!(
            decode_check_body(br#"{"tokens": 5}"#).unwrap().tokens,
            Some(5)
        );
        assert!(decode_check_body(br#"{"tokens": "5"}"#).is_err());
    }

    #[test]
    fn a_hold_is_decided_on_its_tokens_and_survives_forwarding() {
        let request = decode_check_request(
            br#"{"api_key_id": 7, "tokens": 5, "reserve": 100, "reservation_id": "r", "ttl_secs": 60}"#,
        )
        .unwrap();
        assert_eq!(request.ask.estimate(), Some(100));
        let forwarded = request.ask.to_body(7).to_string();
        assert_eq!(decode_check_request(forwarded.as_bytes()).unwrap(), request);
        assert!(decode_check_request(br#"{"api_key_id": 7, "reserve": 100}"#).is_err());
    }

    fn state(quota: Option<i64>, used: i64) -> QuotaState {
        QuotaState {
            quota,
            used,
            reset_at: DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
                .unwrap()
                .with_timezone(&chrono::Utc),
        }
    }

    #[test]
    fn replies_travel_as_the_spec_writes_them() {
        let denied = CheckReply::for_known_key(42, &state(Some(1000), 1000), 0, None);
        assert_eq!(
            serde_json::to_string(&denied).unwrap(),
            r#"{"api_key_id":42,"known":true,"allowed":false,"status":429,"token_quota_monthly":1000,"tokens_used_this_month":1000,"remaining":0,"quota_reset_at":"2026-12-01T00:00:00Z","detail":"API key monthly token quota reached (1000/1000). Resets at 2026-12-01T00:00:00Z.","tokens_reserved":0}"#
        );
        let unknown = CheckReply::for_unknown_key(7, true);
        assert_eq!(
            serde_json::to_string(&unknown).unwrap(),
            r#"{"api_key_id":7,"known":false,"allowed":true,"status":200,"token_quota_monthly":null,"tokens_used_this_month":0,"remaining":null,"quota_reset_at":null,"detail":"unknown API key 7","tokens_reserved":0}"#
        );
        let held = CheckReply::for_known_key(1, &state(None, 5), 0, None).with_existing_hold(
            Reservation {
                id: "r".into(),
                tokens: 9,
                expires_at: "2026-11-23T10:15:00Z".into(),
            },
        );
        assert_eq!(
            serde_json::to_string(&held).unwrap(),
            r#"{"api_key_id":1,"known":true,"allowed":true,"status":200,"token_quota_monthly":null,"tokens_used_this_month":5,"remaining":null,"quota_reset_at":"2026-12-01T00:00:00Z","detail":null,"tokens_reserved":0,"reservation":{"id":"r","tokens":9,"expires_at":"2026-11-23T10:15:00Z"}}"#
        );
        let malformed = CheckReply::malformed(None, &Rejection::new("api_key_id is required"));
        assert_eq!(
            serde_json::to_string(&malformed).unwrap(),
            r#"{"api_key_id":null,"known":false,"allowed":false,"status":400,"token_quota_monthly":null,"tokens_used_this_month":0,"remaining":null,"quota_reset_at":null,"detail":"api_key_id is required","tokens_reserved":0}"#
        );
    }

    #[test]
    fn every_reply_reads_back_as_sent() {
        let replies = [
            CheckReply::for_known_key(1, &state(Some(10), 3), 2, Some(1)),
            CheckReply::for_known_key(1, &state(Some(10), 10), 0, None),
            CheckReply::for_unknown_key(2, true),
            CheckReply::for_unknown_key(2, false),
            CheckReply::unavailable(3, "quota state unavailable: database down"),
            CheckReply::malformed(Some(4), &Rejection::new("tokens must be an integer")),
        ];
        for reply in replies {
            let body = serde_json::to_vec(&reply).unwrap();
            assert_eq!(serde_json::from_slice::<CheckReply>(&body).unwrap(), reply);
        }
    }

    #[test]
    fn a_reply_with_a_status_no_check_sends_is_refused() {
        let odd = r#"{"api_key_id":1,"known":true,"allowed":true,"status":302,"token_quota_monthly":null,"tokens_used_this_month":0,"remaining":null,"quota_reset_at":null,"detail":null}"#;
        let error = serde_json::from_str::<CheckReply>(odd).unwrap_err();
        assert!(error.to_string().contains("status 302"), "{error}");
    }

    #[test]
    fn holds_count_against_the_quota_and_remaining() {
        let state = QuotaState {
            quota: Some(1000),
            used: 300,
            reset_at: DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
                .unwrap()
                .with_timezone(&chrono::Utc),
        };
        let reply = CheckReply::for_known_key(1, &state, 600, Some(100));
        assert!(reply.allowed());
        assert_eq!(reply.remaining, Some(100));
        assert_eq!(reply.tokens_reserved, 600);
        assert_eq!(reply.tokens_used_this_month, 300);
        let denied = CheckReply::for_known_key(1, &state, 600, Some(101));
        assert_eq!(denied.outcome, CheckOutcome::QuotaReached);
        assert!(denied.detail.unwrap().contains("(900/1000)"));
        assert!(!CheckReply::for_known_key(1, &state, 700, None).allowed());
    }
}
