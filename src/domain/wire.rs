//! What every wire decoder (usage events, checks, holds) shares: the rejection type, the JSON
//! object a body must be, and the fields and bounds common to several messages.

use serde_json::{Map, Value};

/// Largest token count any message may carry (an event's total, a check's estimate, a hold).
pub const MAX_TOKEN_COUNT: i64 = 1_000_000_000_000;

/// Why a message was refused; becomes the `x-quota-error` header or the `detail` of a 400.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(String);

impl Rejection {
    pub fn new(reason: impl Into<String>) -> Self {
        Rejection(reason.into())
    }
}

/// The body as a JSON object, or why it is not one.
pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Rejection> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Rejection::new("body must be a JSON object")),
        Err(error) => Err(Rejection::new(format!("body is not valid JSON: {error}"))),
    }
}

/// `api_key_id`: required integer ≥ 1.
pub(crate) fn required_key_id(object: &Map<String, Value>) -> Result<i64, Rejection> {
    match object.get("api_key_id") {
        None | Some(Value::Null) => Err(Rejection::new("api_key_id is required")),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(id) if id >= 1 => Ok(id),
            _ => Err(Rejection::new("api_key_id must be an integer >= 1")),
        },
        Some(_) => Err(Rejection::new("api_key_id must be an integer >= 1")),
    }
}

/// An optional token count: absent or null → `None`; else an integer in `0..=10^12`.
pub(crate) fn optional_count(
    object: &Map<String, Value>,
    field: &str,
) -> Result<Option<i64>, Rejection> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(value) = n.as_i64() {
                if value < 0 {
                    Err(Rejection::new(format!("{field} must be >= 0, got {value}")))
                } else if value > MAX_TOKEN_COUNT {
                    Err(Rejection::new(format!(
                        "{field} is above the limit of 10^12"
                    )))
                } else {
                    Ok(Some(value))
                }
            } else if n.is_u64() {
                Err(Rejection::new(format!(
                    "{field} is above the limit of 10^12"
                )))
            } else {
                Err(Rejection::new(format!(
                    "{field} must be an integer, got {n}"
                )))
            }
        }
        Some(_) => Err(Rejection::new(format!("{field} must be an integer"))),
    }
}

/// A client-chosen identifier (`event_id`, `reservation_id`): 1 to `max_chars` characters without
/// control characters (PostgreSQL cannot store NUL, and logs would print them raw).
pub(crate) fn checked_identifier(
    field: &str,
    id: &str,
    max_chars: usize,
) -> Result<String, Rejection> {
    let chars = id.chars().count();
    if chars == 0 || chars > max_chars {
        return Err(Rejection::new(format!(
            "{field} must be 1-{max_chars} characters, got {chars}"
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(Rejection::new(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identifier_is_bounded_and_printable() {
        assert_eq!(checked_identifier("event_id", "a", 2).unwrap(), "a");
        for (id, reason) in [
            ("", "event_id must be 1-2 characters, got 0"),
            ("abc", "event_id must be 1-2 characters, got 3"),
            ("a\n", "event_id must not contain control characters"),
        ] {
            let error = checked_identifier("event_id", id, 2).unwrap_err();
            assert_eq!(error.to_string(), reason);
        }
    }
}
