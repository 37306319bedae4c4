//! Property tests (fuzzing) of the wire decoders: arbitrary bytes and arbitrary JSON never panic,
//! and every rejection carries a reason.

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use quota_keeper::domain::check::{decode_check_body, decode_check_request};
use quota_keeper::domain::usage::{decode_usage_event, MAX_EVENT_TOKENS};
use serde_json::{json, Map, Value};

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Objects shaped like usage events, with every field drawn from the arbitrary values.
fn event_like_object() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        arbitrary_json(),
        (-5i64..2_000_000_000_000).prop_map(|n| json!(n)),
        "[a-z0-9-]{0,140}".prop_map(Value::String),
        Just(json!("2026-11-23T10:15:00Z")),
    ];
    (
        prop::option::of(field.clone()),
        prop::option::of(field.clone()),
        prop::option::of(field.clone()),
        prop::option::of(field.clone()),
        prop::option::of(field.clone()),
        prop::option::of(field),
    )
        .prop_map(|(event_id, key, tokens, input, output, occurred_at)| {
            let mut object = Map::new();
            for (name, value) in [
                ("event_id", event_id),
                ("api_key_id", key),
                ("tokens", tokens),
                ("input_tokens", input),
                ("output_tokens", output),
                ("occurred_at", occurred_at),
            ] {
                if let Some(value) = value {
                    object.insert(name.to_string(), value);
                }
            }
            Value::Object(object)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn usage_decoder_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap();
        if let Err(rejection) = decode_usage_event(&bytes, now) {
            prop_assert!(!rejection.to_string().is_empty());
        }
    }

    #[test]
    fn usage_decoder_accepts_only_valid_events(value in prop_oneof![arbitrary_json(), event_like_object()]) {
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap();
        let bytes = serde_json::to_vec(&value).unwrap();
        match decode_usage_event(&bytes, now) {
            Ok(event) => {
                let chars = event.event_id.chars().count();
                prop_assert!((1..=128).contains(&chars));
                prop_assert!(event.api_key_id >= 1);
                prop_assert!((0..=MAX_EVENT_TOKENS).contains(&event.tokens));
            }
            Err(rejection) => prop_assert!(!rejection.to_string().is_empty()),
        }
    }

    #[test]
    fn check_decoders_survive_arbitrary_input(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        value in arbitrary_json(),
    ) {
        for body in [bytes.clone(), serde_json::to_vec(&value).unwrap()] {
            match decode_check_request(&body) {
                Ok(request) => {
                    prop_assert!(request.api_key_id >= 1);
                    prop_assert!(request.ask.tokens.is_none_or(|tokens| tokens >= 0));
                }
                Err(rejection) => prop_assert!(!rejection.to_string().is_empty()),
            }
            if let Err(rejection) = decode_check_body(&body) {
                prop_assert!(!rejection.to_string().is_empty());
            }
        }
    }
}

#[test]
fn deeply_nested_json_is_rejected_not_overflowed() {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let now = Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).unwrap();
    assert!(decode_usage_event(nested.as_bytes(), now).is_err());
    assert!(decode_check_request(nested.as_bytes()).is_err());
}
