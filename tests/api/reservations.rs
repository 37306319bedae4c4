//! Reservations (SPEC §2.3): holds granted by checks, settled or voided by usage events, expired
//! by the settable clock, kept across a month boundary and a change of actor; bad requests.

use std::time::Duration;

use reqwest::Method;
use sea_orm::{EntityTrait, QueryOrder};
use serde_json::{json, Value};

use crate::common::broker::BrokerClient;
use crate::helpers::{at, eventually, json_body, spawn_app, spawn_app_with_broker, TestApp};

fn hold(key: i64, reserve: i64, id: &str) -> Value {
    json!({"api_key_id": key, "reserve": reserve, "reservation_id": id})
}

async fn settle(broker: &BrokerClient, key: i64, event_id: &str, tokens: i64, hold_id: &str) {
    broker
        .publish_usage(
            key,
            &json!({"event_id": event_id, "api_key_id": key, "tokens": tokens, "reservation_id": hold_id}),
        )
        .await;
}

/// The stored holds of `key`: (id, tokens), in id order.
async fn stored_holds(app: &TestApp, key: i64) -> Vec<(String, i64)> {
    entity::reservations::Entity::find()
        .order_by_asc(entity::reservations::Column::ReservationId)
        .all(&app.db)
        .await
        .expect("the database answers")
        .into_iter()
        .filter(|row| row.api_key_id == key)
        .map(|row| (row.reservation_id, row.tokens))
        .collect()
}

/// Waits until a check of `key` shows `used` tokens used and `reserved` held.
async fn wait_for_counts(broker: &mut BrokerClient, key: i64, used: i64, reserved: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = broker.check(key, None).await;
        if reply["tokens_used_this_month"] == used && reply["tokens_reserved"] == reserved {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected used {used} and reserved {reserved}, last reply {reply}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} is exported"))
}

#[actix_web::test]
async fn fifty_concurrent_holds_of_a_tenth_of_the_quota_grant_exactly_ten() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("r", json!({"id": 1, "token_quota_monthly": 1000}))
        .await;
    let granted_before = counter(
        &app.metrics_text().await,
        "quota_reservations_granted_total",
    );
    let mut broker = BrokerClient::connect(&app.settings.amqp.url).await;
    let bodies: Vec<Value> = (0..50).map(|i| hold(1, 100, &format!("req-{i}"))).collect();
    let replies = broker.check_pipelined(1, &bodies).await;
    let granted: Vec<String> = replies
        .iter()
        .filter(|reply| reply["allowed"] == true)
        .map(|reply| {
            assert_eq!(reply["reservation"]["tokens"], 100, "{reply}");
            reply["reservation"]["id"]
                .as_str()
                .expect("an id")
                .to_string()
        })
        .collect();
    assert_eq!(granted.len(), 10, "{replies:?}");
    for reply in replies.iter().filter(|reply| reply["allowed"] == false) {
        assert_eq!(reply["status"], 429, "{reply}");
        assert_eq!(reply["tokens_reserved"], 1000, "{reply}");
        assert_eq!(reply["remaining"], 0, "{reply}");
        assert!(
            reply.get("reservation").is_none(),
            "a denied check holds nothing: {reply}"
        );
        assert!(
            reply["detail"]
                .as_str()
                .is_some_and(|detail| detail.contains("(1000/1000)")),
            "{reply}"
        );
    }
    let granted_after = counter(
        &app.metrics_text().await,
        "quota_reservations_granted_total",
    );
    assert!(granted_after - granted_before >= 10.0);
    // Written with the next batch.
    eventually(Duration::from_secs(10), "ten stored holds", || async {
        (stored_holds(&app, 1).await.len() == 10).then_some(())
    })
    .await;
    for id in &granted {
        settle(&broker, 1, &format!("done-{id}"), 60, id).await;
    }
    wait_for_counts(&mut broker, 1, 600, 0).await;
    eventually(
        Duration::from_secs(10),
        "600 committed, no hold stored",
        || async {
            (app.stored_usage(1).await == 600 && stored_holds(&app, 1).await.is_empty())
                .then_some(())
        },
    )
    .await;
    let listed = app.admin_get_json("/keys/1/reservations").await;
    assert_eq!(listed, json!([]));
    let after = broker.check(1, Some(400)).await;
    assert_eq!(
        (after["remaining"].clone(), after["allowed"].clone()),
        (json!(400), json!(true))
    );
}

#[actix_web::test]
async fn retried_settled_twice_and_voided_holds() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("r", json!({"id": 7, "token_quota_monthly": 1000}))
        .await;
    let mut broker = BrokerClient::connect(&app.settings.amqp.url).await;
    let plain = broker.check(7, None).await;
    assert_eq!(
        plain["tokens_reserved"], 0,
        "every reply carries it: {plain}"
    );

    // Retried: the same hold, never twice.
    let first = broker
        .check_raw("7", hold(7, 300, "a").to_string().as_bytes())
        .await;
    assert_eq!(first["status"], 200);
    assert_eq!(first["tokens_reserved"], 300);
    assert_eq!(first["remaining"], 700);
    assert_eq!(first["reservation"]["expires_at"], "2026-11-23T10:15:00Z");
    let retried = broker
        .check_raw("7", hold(7, 300, "a").to_string().as_bytes())
        .await;
    assert_eq!(retried["reservation"], first["reservation"]);
    assert_eq!(retried["tokens_reserved"], 300);
    let listed = app.admin_get_json("/keys/7/reservations").await;
    assert_eq!(
        listed,
        json!([{"id": "a", "tokens": 300, "expires_at": "2026-11-23T10:15:00Z"}])
    );

    // Settled with more than held: the usage counts, the hold is gone.
    settle(&broker, 7, "e1", 350, "a").await;
    wait_for_counts(&mut broker, 7, 350, 0).await;
    // Settled again by another event: only that event's usage counts.
    settle(&broker, 7, "e2", 20, "a").await;
    wait_for_counts(&mut broker, 7, 370, 0).await;

    // Voided: released, nothing counted.
    let b = broker
        .check_raw("7", hold(7, 200, "b").to_string().as_bytes())
        .await;
    assert_eq!(b["tokens_reserved"], 200, "{b}");
    assert_eq!(b["remaining"], 430, "{b}");
    settle(&broker, 7, "void-b", 0, "b").await;
    wait_for_counts(&mut broker, 7, 370, 0).await;
    eventually(
        Duration::from_secs(10),
        "370 committed, nothing stored",
        || async {
            (app.stored_usage(7).await == 370 && stored_holds(&app, 7).await.is_empty())
                .then_some(())
        },
    )
    .await;
    // The first settling event redelivered, then a plain one behind it on the same queue: the
    // duplicate counts nothing (it is pending only until its batch finds the id committed).
    settle(&broker, 7, "e1", 350, "a").await;
    broker
        .publish_usage(7, &json!({"event_id": "e3", "api_key_id": 7, "tokens": 5}))
        .await;
    wait_for_counts(&mut broker, 7, 375, 0).await;

    // Bad requests over AMQP: 400 with a reason, nothing held.
    for body in [
        json!({"api_key_id": 7, "reserve": 10}),
        json!({"api_key_id": 7, "reserve": 0, "reservation_id": "c"}),
        json!({"api_key_id": 7, "reserve": 10, "reservation_id": ""}),
        json!({"api_key_id": 7, "reserve": 10, "reservation_id": "c", "ttl_secs": 0}),
        json!({"api_key_id": 7, "reserve": 10, "reservation_id": "c", "ttl_secs": 86401}),
    ] {
        let reply = broker.check_raw("7", body.to_string().as_bytes()).await;
        assert_eq!(reply["status"], 400, "{body}: {reply}");
        assert!(
            reply["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{reply}"
        );
    }
    wait_for_counts(&mut broker, 7, 375, 0).await;
}

#[actix_web::test]
async fn holds_expire_by_the_clock_and_outlive_a_month_boundary() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("r", json!({"id": 3, "token_quota_monthly": 1000}))
        .await;
    let mut broker = BrokerClient::connect(&app.settings.amqp.url).await;
    let short = json!({"api_key_id": 3, "reserve": 400, "reservation_id": "short", "ttl_secs": 60});
    let granted = broker.check_raw("3", short.to_string().as_bytes()).await;
    assert_eq!(granted["reservation"]["expires_at"], "2026-11-23T10:01:00Z");
    // A second before expiry it still counts; at expiry it is released.
    app.clock.set(at("2026-11-23T10:00:59Z"));
    assert_eq!(broker.check(3, Some(601)).await["status"], 429);
    app.clock.set(at("2026-11-23T10:01:00Z"));
    let after = broker.check(3, Some(601)).await;
    assert_eq!(
        (after["status"].clone(), after["tokens_reserved"].clone()),
        (json!(200), json!(0))
    );
    // Settling an expired hold just counts the usage.
    settle(&broker, 3, "late-settle", 100, "short").await;
    wait_for_counts(&mut broker, 3, 100, 0).await;

    // Granted on the last day of November, still held in December's window.
    app.clock.set(at("2026-11-30T23:59:00Z"));
    let long = json!({"api_key_id": 3, "reserve": 500, "reservation_id": "long", "ttl_secs": 3600});
    assert_eq!(
        broker.check_raw("3", long.to_string().as_bytes()).await["status"],
        200
    );
    app.clock.set(at("2026-12-01T00:30:00Z"));
    let december = broker.check(3, None).await;
    assert_eq!(december["quota_reset_at"], "2027-01-01T00:00:00Z");
    assert_eq!(december["tokens_used_this_month"], 0);
    assert_eq!(december["tokens_reserved"], 500);
    assert_eq!(december["remaining"], 500);
    // Settled in December: counts in December.
    settle(&broker, 3, "dec-settle", 450, "long").await;
    wait_for_counts(&mut broker, 3, 450, 0).await;
}

#[actix_web::test]
async fn holds_are_stored_and_a_fresh_actor_loads_them() {
    let app = spawn_app().await;
    app.create_key("r", json!({"id": 5, "token_quota_monthly": 1000}))
        .await;
    let check = |body: Value| json_body(app.admin(Method::POST, "/keys/5/check").json(&body));
    let granted = check(json!({"reserve": 250, "reservation_id": "h1"})).await;
    assert_eq!(granted["reservation"]["tokens"], 250, "{granted}");
    eventually(Duration::from_secs(10), "the hold stored", || async {
        (stored_holds(&app, 5).await == vec![("h1".to_string(), 250)]).then_some(())
    })
    .await;
    // A new owner (here: a fresh actor of this instance) loads the key with its holds.
    app.registry.invalidate(5);
    let reloaded = check(json!({"tokens": 751})).await;
    assert_eq!(reloaded["status"], 429, "{reloaded}");
    assert_eq!(reloaded["tokens_reserved"], 250);
    assert_eq!(
        app.admin_get_json("/keys/5/reservations").await,
        json!([{"id": "h1", "tokens": 250, "expires_at": "2026-11-23T10:15:00Z"}])
    );
    // An expired stored hold is not loaded.
    app.clock.set(at("2026-11-23T10:15:00Z"));
    app.registry.invalidate(5);
    assert_eq!(check(json!({})).await["tokens_reserved"], 0);

    // Bad requests over HTTP: 400 with a reason, nothing held.
    for body in [
        json!({"reserve": 10}),
        json!({"reservation_id": "x"}),
        json!({"reserve": 1_000_000_000_001i64, "reservation_id": "x"}),
        json!({"reserve": 10, "reservation_id": "x", "ttl_secs": 90000}),
        json!({"reserve": 10, "reservation_id": "y".repeat(129)}),
    ] {
        let response = app
            .admin(Method::POST, "/keys/5/check")
            .json(&body)
            .send()
            .await
            .expect("the app answers");
        assert_eq!(response.status(), 400, "{body}");
        let reply: Value = response.json().await.expect("JSON");
        assert!(
            reply["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{reply}"
        );
    }
    assert_eq!(app.admin_get_json("/keys/5/reservations").await, json!([]));
    let unknown = app
        .admin(Method::GET, "/keys/999/reservations")
        .send()
        .await
        .expect("the app answers");
    assert_eq!(unknown.status(), 404);
}

#[actix_web::test]
async fn an_actor_with_live_holds_stays_until_the_sweep_expires_them() {
    let app = crate::helpers::spawn_app_on(crate::helpers::Backend::Postgres, |settings| {
        // Ten minutes: only a clock moved past them, never the test's real time, idles a key out.
        settings.actors.idle_timeout_secs = 600;
    })
    .await;
    app.create_key("r", json!({"id": 1, "token_quota_monthly": 1000}))
        .await;
    app.create_key("r", json!({"id": 2, "token_quota_monthly": 1000}))
        .await;
    let check = |key: i64, body: Value| {
        json_body(
            app.admin(Method::POST, &format!("/keys/{key}/check"))
                .json(&body),
        )
    };
    let held = check(
        1,
        json!({"reserve": 10, "reservation_id": "r", "ttl_secs": 3600}),
    )
    .await;
    assert_eq!(held["status"], 200, "{held}");
    assert_eq!(check(2, json!({})).await["status"], 200);
    // Past the idle timeout on the service's clock: the plain key idles out, the holding one stays.
    app.clock.set(at("2026-11-23T10:10:01Z"));
    eventually(Duration::from_secs(10), "the idle key to stop", || async {
        (app.registry.resident_count() == 1).then_some(())
    })
    .await;
    // The sweep that stopped key 2 asked key 1 first (it goes through the keys by stripe, id
    // mod 64), so this question queues behind that request: a stopped actor would not answer.
    assert!(
        app.registry
            .describe_if_resident(1, |_| true)
            .await
            .is_some(),
        "the holding actor stays"
    );
    // Past its expiry, with no request at all: the sweep releases the hold, then the actor idles out.
    app.clock.set(at("2026-11-23T11:00:00Z"));
    eventually(
        Duration::from_secs(10),
        "the expired hold's actor to stop",
        || async { (app.registry.resident_count() == 0).then_some(()) },
    )
    .await;
}
