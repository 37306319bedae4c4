//! Usage ingestion: exact totals, duplicates, dead letters, unknown keys, read-your-usage, late events.

use std::time::Duration;

use entity::usage_history;
use sea_orm::EntityTrait;
use serde_json::{json, Value};

use crate::common::broker::BrokerClient;
use crate::helpers::{at, eventually, spawn_app_with_broker, TestApp};

const WAIT: Duration = Duration::from_secs(20);

async fn wait_for_stored_usage(app: &TestApp, id: i64, expected: i64) {
    eventually(WAIT, &format!("key {id} to reach {expected}"), || async {
        (app.stored_usage(id).await == expected).then_some(())
    })
    .await;
}

/// Messages still in (or unacknowledged from) the test's shard queues.
fn queued_messages(app: &TestApp) -> u64 {
    crate::common::queued_messages(&app.vhost.as_ref().expect("a broker test").name)
}

#[actix_web::test]
async fn duplicate_event_ids_count_once() {
    let app = spawn_app_with_broker(|settings| settings.ingest.batch_size = 10).await;
    app.create_key("alice", json!({"id": 1})).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    for i in 0..100 {
        client
            .publish_usage(
                1,
                &json!({"event_id": format!("e{i}"), "api_key_id": 1, "tokens": i + 1}),
            )
            .await;
    }
    // Redeliveries of the first 20, both right away and after they were committed.
    for i in 0..20 {
        client
            .publish_usage(
                1,
                &json!({"event_id": format!("e{i}"), "api_key_id": 1, "tokens": i + 1}),
            )
            .await;
    }
    wait_for_stored_usage(&app, 1, 5050).await;
    for i in 0..20 {
        client
            .publish_usage(
                1,
                &json!({"event_id": format!("e{i}"), "api_key_id": 1, "tokens": 1000}),
            )
            .await;
    }
    // Every publish was confirmed, so all are queued; an event is acknowledged only after its
    // batch committed and its key's actor was told: once none is left, the totals are final.
    eventually(WAIT, "every message acknowledged", || async {
        (queued_messages(&app) == 0).then_some(())
    })
    .await;
    assert_eq!(app.stored_usage(1).await, 5050);
    let reply = client.check(1, None).await;
    assert_eq!(
        reply["tokens_used_this_month"], 5050,
        "the actor converges to what is committed"
    );
}

#[actix_web::test]
async fn malformed_events_are_dead_lettered_with_a_reason_and_good_ones_count() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 1})).await;
    let client = BrokerClient::connect(&app.settings.amqp.url).await;
    let malformed: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "not valid JSON"),
        (
            br#"{"api_key_id": 1, "tokens": 5}"#.to_vec(),
            "event_id is required",
        ),
        (
            br#"{"event_id": "", "api_key_id": 1, "tokens": 5}"#.to_vec(),
            "event_id must be 1-128",
        ),
        (
            format!(
                r#"{{"event_id": "{}", "api_key_id": 1, "tokens": 5}}"#,
                "x".repeat(129)
            )
            .into_bytes(),
            "event_id must be 1-128",
        ),
        (
            br#"{"event_id": "m1", "api_key_id": "1", "tokens": 5}"#.to_vec(),
            "api_key_id must be",
        ),
        (
            br#"{"event_id": "m2", "tokens": 5}"#.to_vec(),
            "api_key_id is required",
        ),
        (
            br#"{"event_id": "m3", "api_key_id": 1, "tokens": -5}"#.to_vec(),
            "tokens must be >= 0",
        ),
        (
            br#"{"event_id": "m4", "api_key_id": 1, "tokens": 2.5}"#.to_vec(),
            "tokens must be an integer",
        ),
        (
            br#"{"event_id": "m5", "api_key_id": 1, "tokens": 1000000000001}"#.to_vec(),
            "10^12",
        ),
        (
            br#"{"event_id": "m6", "api_key_id": 1}"#.to_vec(),
            "tokens is required",
        ),
        (
            br#"{"event_id": "m7", "api_key_id": 1, "tokens": 5, "occurred_at": "noon"}"#.to_vec(),
            "occurred_at",
        ),
    ];
    for (i, (body, _)) in malformed.iter().enumerate() {
        client
            .publish_usage(
                1,
                &json!({"event_id": format!("good-{i}"), "api_key_id": 1, "tokens": 5}),
            )
            .await;
        client.publish("quota.usage", "1", body).await;
    }
    client
        .publish_usage(
            1,
            &json!({"event_id": "zero", "api_key_id": 1, "tokens": 0}),
        )
        .await;
    client
        .publish_usage(
            1,
            &json!({"event_id": "parts", "api_key_id": 1, "input_tokens": 3, "output_tokens": 4}),
        )
        .await;
    wait_for_stored_usage(&app, 1, 5 * malformed.len() as i64 + 7).await;

    // Drained as they come, within the deadline: a lost dead letter fails the test, never hangs it.
    let letters = std::sync::Mutex::new(Vec::new());
    eventually(WAIT, "every dead letter", || async {
        let drained = client.drain_dead_letters().await;
        let mut letters = letters.lock().expect("the test never panics holding it");
        letters.extend(drained);
        (letters.len() >= malformed.len()).then_some(())
    })
    .await;
    let letters = letters
        .into_inner()
        .expect("the test never panics holding it");
    assert_eq!(letters.len(), malformed.len());
    for (body, reason) in &malformed {
        let letter = letters
            .iter()
            .find(|(dead_body, _)| dead_body == body)
            .expect("each malformed message is dead-lettered");
        assert!(
            letter.1.contains(reason),
            "{:?} should say {reason:?}",
            letter.1
        );
    }
    eventually(WAIT, "nothing left unacknowledged", || async {
        (queued_messages(&app) == 0).then_some(())
    })
    .await;
}

#[actix_web::test]
async fn usage_of_unknown_keys_is_acknowledged_and_not_counted() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 1})).await;
    let client = BrokerClient::connect(&app.settings.amqp.url).await;
    client
        .publish_usage(
            999,
            &json!({"event_id": "u1", "api_key_id": 999, "tokens": 50}),
        )
        .await;
    client
        .publish_usage(1, &json!({"event_id": "k1", "api_key_id": 1, "tokens": 7}))
        .await;
    wait_for_stored_usage(&app, 1, 7).await;
    eventually(WAIT, "the unknown-key event acknowledged", || async {
        (queued_messages(&app) == 0).then_some(())
    })
    .await;
    let metrics = app.metrics_text().await;
    let unknown: f64 = metrics
        .lines()
        .find(|line| line.starts_with("quota_usage_unknown_key_total"))
        .and_then(|line| line.split_whitespace().last()?.parse().ok())
        .expect("the unknown-key counter is exported");
    assert!(unknown >= 1.0);
    assert!(
        client.drain_dead_letters().await.is_empty(),
        "unknown keys are not malformed"
    );
}

#[actix_web::test]
async fn checks_see_usage_before_it_is_committed() {
    let app = spawn_app_with_broker(|settings| {
        settings.ingest.flush_interval_ms = 600_000;
        settings.ingest.batch_size = 1_000;
    })
    .await;
    app.create_key("alice", json!({"id": 4, "token_quota_monthly": 250}))
        .await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    assert_eq!(client.check(4, None).await["status"], 200);
    for i in 0..3 {
        client
            .publish_usage(
                4,
                &json!({"event_id": format!("r{i}"), "api_key_id": 4, "tokens": 100}),
            )
            .await;
    }
    let deadline = std::time::Instant::now() + WAIT;
    let reply: Value = loop {
        let reply = client.check(4, None).await;
        if reply["tokens_used_this_month"] == 300 {
            break reply;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the check never saw the usage: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(reply["status"], 429);
    assert_eq!(app.stored_usage(4).await, 0, "nothing committed yet");
}

#[actix_web::test]
async fn concurrent_publishers_to_one_key_add_up_exactly() {
    let app = spawn_app_with_broker(|settings| settings.ingest.batch_size = 50).await;
    app.create_key("alice", json!({"id": 8})).await;
    let url = app.settings.amqp.url.clone();
    let publishers = (0..4).map(|publisher| {
        let url = url.clone();
        actix_web::rt::spawn(async move {
            let client = BrokerClient::connect(&url).await;
            for i in 0..250 {
                client
                    .publish_usage(8, &json!({"event_id": format!("p{publisher}-{i}"), "api_key_id": 8, "tokens": 3}))
                    .await;
            }
        })
    });
    for publisher in futures::future::join_all(publishers).await {
        publisher.unwrap();
    }
    wait_for_stored_usage(&app, 8, 3000).await;
    let mut client = BrokerClient::connect(&url).await;
    assert_eq!(client.check(8, None).await["tokens_used_this_month"], 3000);
}

#[actix_web::test]
async fn late_events_go_to_their_window_and_future_ones_count_now() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 2, "token_quota_monthly": 100}))
        .await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    client
        .publish_usage(2, &json!({"event_id": "late", "api_key_id": 2, "tokens": 40, "occurred_at": "2026-10-31T23:59:59Z"}))
        .await;
    client
        .publish_usage(2, &json!({"event_id": "future", "api_key_id": 2, "tokens": 15, "occurred_at": "2027-01-05T00:00:00Z"}))
        .await;
    wait_for_stored_usage(&app, 2, 15).await;
    let history = eventually(WAIT, "the late event in history", || async {
        let rows = usage_history::Entity::find().all(&app.db).await.unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].period_start, at("2026-10-01T00:00:00Z"));
    assert_eq!(history[0].period_end, at("2026-11-01T00:00:00Z"));
    assert_eq!(history[0].tokens, 40);
    assert_eq!(client.check(2, None).await["tokens_used_this_month"], 15);
}

#[actix_web::test]
async fn idle_actors_stop_unless_tokens_are_pending() {
    let app = spawn_app_with_broker(|settings| {
        // Ten minutes: only a clock moved past them, never the test's real time, idles a key out.
        settings.actors.idle_timeout_secs = 600;
        settings.ingest.flush_interval_ms = 600_000;
    })
    .await;
    app.create_key("alice", json!({"id": 1})).await;
    app.create_key("alice", json!({"id": 2})).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    client
        .publish_usage(
            1,
            &json!({"event_id": "held", "api_key_id": 1, "tokens": 5}),
        )
        .await;
    client.check(2, None).await;
    // Each check is a round trip to the actor: the poll paces itself.
    let deadline = std::time::Instant::now() + WAIT;
    while client.check(1, None).await["tokens_used_this_month"] != 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the usage did not reach the actor of key 1 within {WAIT:?}"
        );
    }
    assert_eq!(app.registry.resident_count(), 2);
    // Idleness is judged on the service's clock: past the idle timeout, both keys are idle.
    app.clock.set(at("2026-11-23T10:10:01Z"));
    eventually(WAIT, "the idle actor of key 2 to stop", || async {
        (app.registry.resident_count() == 1).then_some(())
    })
    .await;
    // The sweep that stopped key 2 asked key 1 first (it goes through the keys by stripe,
    // id mod 64), so this question queues behind that request: an actor that had stopped
    // would not answer it.
    let state = app
        .registry
        .describe_if_resident(1, |_| true)
        .await
        .expect("key 1 holds pending tokens and stays")
        .expect("its state is in memory")
        .expect("key 1 exists");
    assert_eq!(state.used, 5, "nothing pending was lost");
}
