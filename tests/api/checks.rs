//! Checks answered by key actors over RabbitMQ direct reply-to and over HTTP.

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::broker::BrokerClient;
use crate::common::{shard_consumers, vhost_connections};
use crate::helpers::{json_body, spawn_app_with_broker};
use quota_keeper::settings::UnknownKeyPolicy;

#[actix_web::test]
async fn a_check_over_direct_reply_to_is_answered_from_the_key() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 42, "token_quota_monthly": 1000}))
        .await;
    app.set_usage(42, 999).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    let reply = client.check(42, None).await;
    assert_eq!(
        reply,
        json!({
            "api_key_id": 42, "known": true, "allowed": true, "status": 200,
            "token_quota_monthly": 1000, "tokens_used_this_month": 999, "remaining": 1,
            "quota_reset_at": "2026-12-01T00:00:00Z", "detail": null, "tokens_reserved": 0
        })
    );
}

#[actix_web::test]
async fn denial_starts_exactly_at_the_quota_with_the_spec_text() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 42, "token_quota_monthly": 1000}))
        .await;
    app.set_usage(42, 1000).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    let reply = client.check(42, None).await;
    assert_eq!(reply["allowed"], false);
    assert_eq!(reply["status"], 429);
    assert_eq!(reply["remaining"], 0);
    assert_eq!(
        reply["detail"],
        "API key monthly token quota reached (1000/1000). Resets at 2026-12-01T00:00:00Z."
    );
}

#[actix_web::test]
async fn the_estimate_must_fit_and_unlimited_keys_always_pass() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 1, "token_quota_monthly": 1000}))
        .await;
    app.create_key("alice", json!({"id": 2})).await;
    app.set_usage(1, 200).await;
    app.set_usage(2, 1_000_000_000).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    assert_eq!(client.check(1, Some(800)).await["status"], 200);
    let over = client.check(1, Some(801)).await;
    assert_eq!(over["status"], 429);
    assert_eq!(over["remaining"], 800);
    let unlimited = client.check(2, Some(1_000_000_000_000)).await;
    assert_eq!(unlimited["allowed"], true);
    assert_eq!(unlimited["remaining"], Value::Null);
}

#[actix_web::test]
async fn unknown_keys_are_allowed_by_default() {
    let app = spawn_app_with_broker(|_| {}).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    let reply = client.check(777, None).await;
    assert_eq!(reply["known"], false);
    assert_eq!(reply["allowed"], true);
    assert_eq!(reply["status"], 200);
    // A key created afterwards is known at once.
    app.create_key("alice", json!({"id": 777, "token_quota_monthly": 5}))
        .await;
    assert_eq!(client.check(777, None).await["known"], true);
}

#[actix_web::test]
async fn unknown_keys_are_404_under_deny() {
    let app =
        spawn_app_with_broker(|settings| settings.check.unknown_key = UnknownKeyPolicy::Deny).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    let reply = client.check(777, None).await;
    assert_eq!(reply["known"], false);
    assert_eq!(reply["allowed"], false);
    assert_eq!(reply["status"], 404);
    let http = app
        .admin(Method::POST, "/keys/777/check")
        .send()
        .await
        .unwrap();
    assert_eq!(http.status(), 404);
}

#[actix_web::test]
async fn malformed_requests_get_400_and_the_consumer_keeps_answering() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 5, "token_quota_monthly": 10}))
        .await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    for (body, reason) in [
        (&b"{not json"[..], "JSON"),
        (br#"{"api_key_id": "5"}"#, "api_key_id"),
        (br#"{"api_key_id": 5, "tokens": -3}"#, "tokens"),
        (br#"[5]"#, "object"),
    ] {
        let reply = client.check_raw("5", body).await;
        assert_eq!(reply["status"], 400, "{reply}");
        assert!(
            reply["detail"].as_str().unwrap().contains(reason),
            "{reply}"
        );
    }
    client.check_without_reply_to(5).await;
    let reply = client.check(5, None).await;
    assert_eq!(reply["status"], 200);
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("quota_check_requests_dropped_total"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn a_patch_takes_effect_for_the_very_next_check() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 9, "token_quota_monthly": 1000}))
        .await;
    app.set_usage(9, 999).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    assert_eq!(client.check(9, None).await["status"], 200);
    let patched = app
        .admin(Method::PATCH, "/users/alice/apikeys/9")
        .json(&json!({"token_quota_monthly": 999}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    assert_eq!(client.check(9, None).await["status"], 429);
    app.admin(Method::PATCH, "/users/alice/apikeys/9")
        .json(&json!({"token_quota_monthly": 0}))
        .send()
        .await
        .unwrap();
    let unlimited = client.check(9, None).await;
    assert_eq!(unlimited["status"], 200);
    assert_eq!(unlimited["remaining"], Value::Null);
    app.admin(Method::PATCH, "/users/alice/apikeys/9")
        .json(&json!({"token_quota_monthly": 5, "reset_usage": true}))
        .send()
        .await
        .unwrap();
    let reset = client.check(9, None).await;
    assert_eq!(reset["tokens_used_this_month"], 0);
    assert_eq!(reset["remaining"], 5);
    app.admin(Method::DELETE, "/users/alice/apikeys/9")
        .send()
        .await
        .unwrap();
    assert_eq!(
        client.check(9, None).await["known"],
        false,
        "a deleted key is unknown at once"
    );
}

#[actix_web::test]
async fn the_http_check_answers_like_amqp() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 3, "token_quota_monthly": 100}))
        .await;
    app.set_usage(3, 60).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    let ok = app
        .admin(Method::POST, "/keys/3/check")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let http_body: Value = ok.json().await.unwrap();
    assert_eq!(http_body, client.check(3, None).await);
    let denied = app
        .admin(Method::POST, "/keys/3/check")
        .json(&json!({"tokens": 41}))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 429);
    let body: Value = denied.json().await.unwrap();
    assert_eq!(
        body["detail"],
        "API key monthly token quota reached (60/100). Resets at 2026-12-01T00:00:00Z."
    );
    let malformed = app
        .admin(Method::POST, "/keys/3/check")
        .body(r#"{"tokens": "x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let anonymous = app
        .client
        .post(app.url("/keys/3/check"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("quota_checks_total{outcome=\"denied\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("quota_check_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("quota_resident_key_actors"), "{metrics}");
}

#[actix_web::test]
async fn readyz_includes_the_broker() {
    let app = spawn_app_with_broker(|_| {}).await;
    let body = json_body(app.client.get(app.url("/readyz"))).await;
    assert_eq!(body["broker"], "ok");
    assert_eq!(body["status"], "ready");
}

#[actix_web::test]
async fn each_arbiter_consumes_its_share_of_the_shards_on_a_connection_of_its_own() {
    let app = spawn_app_with_broker(|settings| settings.actors.arbiters = 3).await;
    let vhost = &app.vhost.as_ref().expect("a broker app has a vhost").name;
    assert_eq!(
        vhost_connections(vhost),
        4,
        "one connection per arbiter, one for control (heartbeats, forwarded requests)"
    );
    let consumers = shard_consumers(vhost);
    assert_eq!(consumers.len(), usize::from(app.settings.amqp.shards));
    for (queue, count) in &consumers {
        assert_eq!(*count, 1, "{queue} has exactly one consumer");
    }
    // Keys spread over every shard are all answered, each from its own actor.
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    for id in 1..=64 {
        app.create_key("alice", json!({"id": id, "token_quota_monthly": 100 + id}))
            .await;
        let reply = client.check(id, None).await;
        assert_eq!(reply["api_key_id"], id);
        assert_eq!(reply["token_quota_monthly"], 100 + id);
        assert_eq!(reply["status"], 200);
    }
}
