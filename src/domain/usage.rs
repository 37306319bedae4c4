//! Usage events (SPEC §2.1): decoding and validation, each rejection with a short reason.

use chrono::{DateTime, Datelike, Utc};
use serde_json::Value;

use super::reservation::optional_reservation_id;
// Re-exported: the usage decoder's refusal, as its callers (the usage consumer) name it.
pub use super::wire::Rejection;
use super::wire::{
    checked_identifier, optional_count, parse_object, required_key_id, MAX_TOKEN_COUNT,
};

/// Largest token total one event may carry.
pub const MAX_EVENT_TOKENS: i64 = MAX_TOKEN_COUNT;
/// Earliest and latest years of an accepted `occurred_at` (in UTC).
pub const MIN_OCCURRED_YEAR: i32 = 1970;
pub const MAX_OCCURRED_YEAR: i32 = 9999;
/// Longest accepted `event_id`, in characters.
pub const MAX_EVENT_ID_CHARS: usize = 128;

/// A validated usage event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageEvent {
    pub event_id: String,
    pub api_key_id: i64,
    pub tokens: i64,
    pub occurred_at: DateTime<Utc>,
    /// The hold this event settles (or voids, with 0 tokens), SPEC §2.3.
    pub reservation_id: Option<String>,
}

/// Decodes a usage event; `received_at` is used when `occurred_at` is absent.
///
/// When `tokens` is present it is the total and `input_tokens`/`output_tokens` are only
/// validated, so a client that sends all three is not counted twice.
pub fn decode_usage_event(
    body: &[u8],
    received_at: DateTime<Utc>,
) -> Result<UsageEvent, Rejection> {
    let object = parse_object(body)?;
    let event_id = match object.get("event_id") {
        None | Some(Value::Null) => return Err(Rejection::new("event_id is required")),
        Some(Value::String(id)) => checked_identifier("event_id", id, MAX_EVENT_ID_CHARS)?,
        Some(_) => return Err(Rejection::new("event_id must be a string")),
    };
    let api_key_id = required_key_id(&object)?;
    let total = optional_count(&object, "tokens")?;
    let input = optional_count(&object, "input_tokens")?;
    let output = optional_count(&object, "output_tokens")?;
    let tokens = match (total, input, output) {
        (Some(total), _, _) => total,
        (None, None, None) => {
            return Err(Rejection::new(
                "tokens is required (or input_tokens and/or output_tokens)",
            ))
        }
        (None, input, output) => input.unwrap_or(0) + output.unwrap_or(0),
    };
    if tokens > MAX_EVENT_TOKENS {
        return Err(Rejection::new(format!(
            "token total {tokens} is above the limit of 10^12"
        )));
    }
    let occurred_at = match object.get("occurred_at") {
        None | Some(Value::Null) => received_at,
        Some(Value::String(text)) => {
            let instant = DateTime::parse_from_rfc3339(text)
                .map_err(|error| {
                    Rejection::new(format!("occurred_at is not an RFC 3339 instant: {error}"))
                })?
                .with_timezone(&Utc);
            // Windows and history rows are printed as RFC 3339, which has four-digit years only;
            // before 1970 no usage of this service can have occurred.
            if !(MIN_OCCURRED_YEAR..=MAX_OCCURRED_YEAR).contains(&instant.year()) {
                return Err(Rejection::new(format!(
                    "occurred_at must be in the years {MIN_OCCURRED_YEAR}-{MAX_OCCURRED_YEAR}, got {text}"
                )));
            }
            instant
        }
        Some(_) => return Err(Rejection::new("occurred_at must be an RFC 3339 string")),
    };
    let reservation_id = optional_reservation_id(&object)?;
    Ok(UsageEvent {
        event_id,
        api_key_id,
        tokens,
        occurred_at,
        reservation_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn decodes_the_spec_example() {
        let event = decode_usage_event(
            br#"{"event_id": "9b1c", "api_key_id": 42, "tokens": 1350, "occurred_at": "2026-11-23T10:15:00Z"}"#,
            now(),
        )
        .unwrap();
        assert_eq!(event.tokens, 1350);
        assert_eq!(event.api_key_id, 42);
        assert_eq!(event.occurred_at.to_rfc3339(), "2026-11-23T10:15:00+00:00");
    }

    #[test]
    fn sums_input_and_output_and_defaults_the_time() {
        let event = decode_usage_event(
            br#"{"event_id": "a", "api_key_id": 1, "input_tokens": 10, "output_tokens": 5}"#,
            now(),
        )
        .unwrap();
        assert_eq!(event.tokens, 15);
        assert_eq!(event.occurred_at, now());
        let only_output = decode_usage_event(
            br#"{"event_id": "a", "api_key_id": 1, "output_tokens": 5}"#,
            now(),
        );
        assert_eq!(only_output.unwrap().tokens, 5);
    }

    #[test]
    fn total_wins_over_parts() {
        let event = decode_usage_event(
            br#"{"event_id": "a", "api_key_id": 1, "tokens": 15, "input_tokens": 10, "output_tokens": 5}"#,
            now(),
        )
        .unwrap();
        assert_eq!(event.tokens, 15);
    }

    #[test]
    fn every_malformed_kind_has_a_reason() {
        let long_id = "x".repeat(129);
        let long_body = format!(r#"{{"event_id": "{long_id}", "api_key_id": 1, "tokens": 1}}"#);
        let cases: Vec<(&[u8], &str)> = vec![
            (b"not json", "not valid JSON"),
            (b"\xff\xfe", "not valid JSON"),
            (b"42", "JSON object"),
            (br#"{"api_key_id": 1, "tokens": 1}"#, "event_id is required"),
            (br#"{"event_id": 7, "api_key_id": 1, "tokens": 1}"#, "event_id must be a string"),
            (br#"{"event_id": "", "api_key_id": 1, "tokens": 1}"#, "event_id must be 1-128"),
            (long_body.as_bytes(), "event_id must be 1-128"),
            (br#"{"event_id": "a\u0000b", "api_key_id": 1, "tokens": 1}"#, "control characters"),
            (br#"{"event_id": "a", "tokens": 1}"#, "api_key_id is required"),
            (br#"{"event_id": "a", "api_key_id": "1", "tokens": 1}"#, "api_key_id must be"),
            (br#"{"event_id": "a", "api_key_id": -3, "tokens": 1}"#, "api_key_id must be"),
            (br#"{"event_id": "a", "api_key_id": 1}"#, "tokens is required"),
            (br#"{"event_id": "a", "api_key_id": 1, "tokens": -1}"#, "tokens must be >= 0"),
            (br#"{"event_id": "a", "api_key_id": 1, "tokens": 1.5}"#, "tokens must be an integer"),
            (br#"{"event_id": "a", "api_key_id": 1, "tokens": "1"}"#, "tokens must be an integer"),
            (br#"{"event_id": "a", "api_key_id": 1, "tokens": 1000000000001}"#, "10^12"),
            (br#"{"event_id": "a", "api_key_id": 1, "tokens": 18446744073709551615}"#, "10^12"),
            (
                br#"{"event_id": "a", "api_key_id": 1, "input_tokens": 600000000000, "output_tokens": 600000000000}"#,
                "10^12",
            ),
            (br#"{"event_id": "a", "api_key_id": 1, "tokens": 1, "occurred_at": "yesterday"}"#, "occurred_at"),
            (br#"{"event_id": "a", "api_key_id": 1, "tokens": 1, "occurred_at": 5}"#, "occurred_at"),
            (
                br#"{"event_id": "a", "api_key_id": 1, "tokens": 1, "occurred_at": "0000-01-01T00:00:00Z"}"#,
                "years 1970-9999",
            ),
            (
                br#"{"event_id": "a", "api_key_id": 1, "tokens": 1, "occurred_at": "1969-12-31T23:59:59Z"}"#,
                "years 1970-9999",
            ),
            (
                br#"{"event_id": "a", "api_key_id": 1, "tokens": 1, "occurred_at": "9999-12-31T23:00:00-05:00"}"#,
                "years 1970-9999",
            ),
        ];
        for (body, reason) in cases {
            let error = decode_usage_event(body, now()).unwrap_err().to_string();
            assert!(
                error.contains(reason),
                "{error:?} should mention {reason:?}"
            );
        }
    }

    #[test]
    fn a_settling_event_names_its_hold() {
        let event = decode_usage_event(
            br#"{"event_id": "s", "api_key_id": 1, "tokens": 60, "reservation_id": "r1"}"#,
            now(),
        )
        .unwrap();
        assert_eq!(event.reservation_id.as_deref(), Some("r1"));
        let bad = decode_usage_event(
            br#"{"event_id": "s", "api_key_id": 1, "tokens": 60, "reservation_id": ""}"#,
            now(),
        );
        assert!(bad.unwrap_err().to_string().contains("reservation_id"));
    }

    #[test]
    fn zero_tokens_is_valid() {
        let event =
            decode_usage_event(br#"{"event_id": "z", "api_key_id": 1, "tokens": 0}"#, now())
                .unwrap();
        assert_eq!(event.tokens, 0);
    }
}
