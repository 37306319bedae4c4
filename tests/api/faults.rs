//! Hostile input and faults: counters at their ceiling, poison events the database refuses.

use std::time::Duration;

use sea_orm::{ActiveModelTrait, ConnectionTrait, Set};
use serde_json::json;

use crate::common::broker::BrokerClient;
use crate::helpers::{at, eventually, spawn_app_with_broker, TestApp};

const WAIT: Duration = Duration::from_secs(20);

async fn wait_for_stored_usage(app: &TestApp, id: i64, expected: i64) {
    eventually(WAIT, &format!("key {id} to reach {expected}"), || async {
        (app.stored_usage(id).await == expected).then_some(())
    })
    .await;
}

fn queued_messages(app: &TestApp) -> u64 {
    crate::common::queued_messages(&app.vhost.as_ref().expect("a broker test").name)
}

/// Collects dead letters until `count` have arrived: (body, reason).
async fn dead_letters(client: &BrokerClient, count: usize) -> Vec<(serde_json::Value, String)> {
    let deadline = std::time::Instant::now() + WAIT;
    let mut letters = Vec::new();
    while letters.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {count} dead letters, got {letters:?}"
        );
        for (body, reason) in client.drain_dead_letters().await {
            letters.push((serde_json::from_slice(&body).expect("JSON bodies"), reason));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    letters
}

/// The database refuses two events for good (a counter and a history row would pass
/// `i64::MAX`; the actor's stale view let them through): each is found by splitting the batch
/// and dead-lettered with the reason; every other event of the lane commits.
#[actix_web::test]
async fn events_the_database_refuses_are_dead_lettered_and_the_lane_keeps_committing() {
    let app = spawn_app_with_broker(|settings| {
        // One lane: the victim and the bystander share a writer, as in the report.
        settings.ingest.writers = 1;
    })
    .await;
    app.create_key("victim", json!({"id": 1})).await;
    app.create_key("bystander", json!({"id": 2})).await;
    let client = BrokerClient::connect(&app.settings.amqp.url).await;
    client
        .publish_usage(
            1,
            &json!({"event_id": "warm", "api_key_id": 1, "tokens": 1}),
        )
        .await;
    wait_for_stored_usage(&app, 1, 1).await;
    // Behind the resident actor's back, as an operator repairing with SQL would.
    app.db
        .execute_unprepared(&format!(
            "UPDATE api_keys SET tokens_used_this_month = {}, counter_version = counter_version + 1 WHERE id = 1",
            i64::MAX - 1
        ))
        .await
        .expect("the database answers");
    insert_october_near_the_ceiling(&app.db).await;

    for i in 0..50 {
        client
            .publish_usage(
                2,
                &json!({"event_id": format!("b{i}"), "api_key_id": 2, "tokens": 10}),
            )
            .await;
        match i {
            10 => {
                client
                    .publish_usage(
                        1,
                        &json!({"event_id": "over-now", "api_key_id": 1, "tokens": 10}),
                    )
                    .await
            }
            20 => {
                client
                    .publish_usage(
                        1,
                        &json!({"event_id": "over-late", "api_key_id": 1, "tokens": 10,
                                "occurred_at": "2026-10-15T00:00:00Z"}),
                    )
                    .await
            }
            30 => {
                client
                    .publish_usage(
                        1,
                        &json!({"event_id": "fits", "api_key_id": 1, "tokens": 1}),
                    )
                    .await
            }
            _ => {}
        }
    }
    wait_for_stored_usage(&app, 2, 500).await;
    wait_for_stored_usage(&app, 1, i64::MAX).await;
    let mut letters = dead_letters(&client, 2).await;
    letters.sort_by_key(|(body, _)| body["event_id"].as_str().unwrap_or_default().to_string());
    assert_eq!(letters[0].0["event_id"], "over-late");
    assert!(
        letters[0].1.contains("out of range"),
        "the database's reason: {}",
        letters[0].1
    );
    assert_eq!(letters[1].0["event_id"], "over-now");
    assert!(
        letters[1].1.contains("would pass 9223372036854775807"),
        "the reason names the ceiling: {}",
        letters[1].1
    );
    eventually(WAIT, "every message acknowledged", || async {
        (queued_messages(&app) == 0).then_some(())
    })
    .await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "a refusal is not an outage");
    let mut client = client;
    let reply = client.check(1, None).await;
    assert_eq!(
        reply["allowed"], false,
        "a key at its ceiling is denied: {reply}"
    );
    assert_eq!(reply["status"], 429);
    assert_eq!(reply["tokens_used_this_month"], i64::MAX);
}

/// A key the actor knows to be near the ceiling: the event that would pass it is dead-lettered
/// before it reaches the database, and the counter never wraps.
#[actix_web::test]
async fn an_event_that_would_pass_the_ceiling_is_dead_lettered_and_the_key_denied() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 7})).await;
    app.set_usage(7, i64::MAX - 1_500_000_000_000).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    for (event_id, tokens) in [
        ("a", 1_000_000_000_000_i64),
        ("b", 1_000_000_000_000),
        ("c", 500_000_000_000),
    ] {
        client
            .publish_usage(
                7,
                &json!({"event_id": event_id, "api_key_id": 7, "tokens": tokens}),
            )
            .await;
    }
    wait_for_stored_usage(&app, 7, i64::MAX).await;
    let letters = dead_letters(&client, 1).await;
    assert_eq!(letters[0].0["event_id"], "b");
    assert!(letters[0].1.contains("would pass"), "{}", letters[0].1);
    let reply = client.check(7, None).await;
    assert_eq!(reply["allowed"], false, "{reply}");
    assert_eq!(reply["tokens_used_this_month"], i64::MAX);
    assert!(reply["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("maximum"));
}

/// The service's connections to `vhost`, by broker process id: a session restart replaces them.
fn connection_pids(vhost: &str) -> Vec<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "vhost",
            "pid",
        ])
        .output()
        .expect("rabbitmqctl runs");
    let mut pids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (connection_vhost, pid) = line.split_once(char::is_whitespace)?;
            (connection_vhost == vhost).then(|| pid.trim().to_string())
        })
        .collect();
    pids.sort();
    pids
}

fn dropped_for_invalid_reply_to(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|line| {
            line.starts_with("quota_check_requests_dropped_total")
                && line.contains("reason=\"invalid_reply_to\"")
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Checks naming a direct reply-to the broker cannot decode are dropped and counted: nothing is
/// published to them, the session goes on, and the next honest check is answered.
#[actix_web::test]
async fn crafted_reply_to_names_are_dropped_without_ending_the_session() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 5})).await;
    let vhost = app.vhost.as_ref().expect("a broker test").name.clone();
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    // Answered once first, so the service's connections are settled before they are compared.
    assert_eq!(client.check(5, None).await["status"], 200);
    let connections_before = connection_pids(&vhost);
    assert!(!connections_before.is_empty());
    let dropped_before = dropped_for_invalid_reply_to(&app.metrics_text().await);

    let connection = lapin::Connection::connect(
        &app.settings.amqp.url,
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("the test vhost accepts guest");
    let attacker = connection.create_channel().await.expect("a channel");
    for i in 0..20 {
        attacker
            .basic_publish(
                "quota.check".into(),
                "5".into(),
                lapin::options::BasicPublishOptions::default(),
                br#"{"api_key_id": 5}"#,
                lapin::BasicProperties::default()
                    .with_reply_to("amq.rabbitmq.reply-to.g1h2AA==.zzz".into())
                    .with_correlation_id(format!("crafted-{i}").as_str().into())
                    .with_priority(1),
            )
            .await
            .expect("published");
    }
    eventually(WAIT, "20 crafted checks dropped", || async {
        let dropped = dropped_for_invalid_reply_to(&app.metrics_text().await);
        (dropped >= dropped_before + 20).then_some(())
    })
    .await;
    assert_eq!(client.check(5, Some(1)).await["status"], 200);
    let connections_after = connection_pids(&vhost);
    assert!(
        connections_before
            .iter()
            .all(|pid| connections_after.contains(pid)),
        "the service kept its broker connections: {connections_before:?} then {connections_after:?}"
    );
    assert_eq!(
        app.readiness.broker(),
        quota_keeper::readiness::BrokerState::Consuming
    );
}

/// SPEC §2: a usage event or check whose routing key is not its `api_key_id` is refused.
#[actix_web::test]
async fn a_routing_key_other_than_the_key_id_is_refused() {
    let app = spawn_app_with_broker(|_| {}).await;
    app.create_key("alice", json!({"id": 1})).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    for routing_key in ["999", "01", "+1", ""] {
        client
            .publish(
                "quota.usage",
                routing_key,
                format!(r#"{{"event_id": "r{routing_key}", "api_key_id": 1, "tokens": 7}}"#)
                    .as_bytes(),
            )
            .await;
    }
    client
        .publish_usage(
            1,
            &json!({"event_id": "right", "api_key_id": 1, "tokens": 5}),
        )
        .await;
    wait_for_stored_usage(&app, 1, 5).await;
    let letters = dead_letters(&client, 4).await;
    for (body, reason) in &letters {
        assert!(
            reason.contains("is not the api_key_id 1"),
            "{body}: {reason}"
        );
    }
    let reply = client.check_raw("999", br#"{"api_key_id": 1}"#).await;
    assert_eq!(reply["status"], 400, "{reply}");
    assert!(reply["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("routing key \"999\""));
    assert_eq!(client.check(1, None).await["tokens_used_this_month"], 5);
}

const JS_SAFE_MAX: i64 = 1 << 53;

async fn status_of(request: reqwest::RequestBuilder) -> u16 {
    request
        .send()
        .await
        .expect("the app answers")
        .status()
        .as_u16()
}

/// Ids beyond 2^53 are refused; an explicit id (even the largest) never exhausts assignment.
#[actix_web::test]
async fn key_ids_stay_in_range_and_explicit_ids_never_exhaust_assignment() {
    for backend in [
        crate::helpers::Backend::Postgres,
        crate::helpers::Backend::Sqlite,
    ] {
        let app = crate::helpers::spawn_app_on(backend, |_| {}).await;
        let create = |body: serde_json::Value| {
            app.admin(reqwest::Method::POST, "/users/z/apikeys")
                .json(&body)
        };
        assert_eq!(status_of(create(json!({"id": JS_SAFE_MAX + 1}))).await, 422);
        assert_eq!(status_of(create(json!({"id": i64::MAX}))).await, 422);
        assert_eq!(status_of(create(json!({"id": JS_SAFE_MAX}))).await, 201);
        let assigned = app.create_key("z", json!({})).await;
        let assigned_id = assigned["id"].as_i64().expect("an id");
        assert!(assigned_id >= 1, "{backend:?}: {assigned}");
        for path in [
            format!("/users/z/apikeys/{}", JS_SAFE_MAX + 1),
            "/users/z/apikeys/99999999999999999999".to_string(),
            format!("/keys/{}/usage", JS_SAFE_MAX + 1),
        ] {
            assert_eq!(
                status_of(app.admin(reqwest::Method::GET, &path)).await,
                422,
                "{path}"
            );
        }
        assert_eq!(
            status_of(app.admin(reqwest::Method::POST, &format!("/keys/{}/check", i64::MAX))).await,
            422
        );
        if matches!(backend, crate::helpers::Backend::Postgres) {
            // The sequence was not moved by the explicit id: assignment starts low and skips
            // ids taken explicitly on its way.
            assert_eq!(assigned_id, 1);
            app.create_key("z", json!({"id": 2})).await;
            app.create_key("z", json!({"id": 3})).await;
            assert_eq!(app.create_key("z", json!({})).await["id"], 4);
            assert_eq!(app.create_key("z", json!({})).await["id"], 5);
        }
    }
}

/// Usernames with NUL or bytes that are not UTF-8 are 422 on every admin route, never 503; the
/// Basic scheme name is case-insensitive.
#[actix_web::test]
async fn hostile_usernames_are_422_and_the_auth_scheme_is_case_insensitive() {
    let app = crate::helpers::spawn_app().await;
    app.create_key("alice", json!({"id": 1})).await;
    for username in ["bad%00name", "bad%FFname", "%C3%28"] {
        for (method, path) in [
            (reqwest::Method::GET, format!("/users/{username}/apikeys")),
            (reqwest::Method::POST, format!("/users/{username}/apikeys")),
            (reqwest::Method::GET, format!("/users/{username}/apikeys/1")),
            (
                reqwest::Method::DELETE,
                format!("/users/{username}/apikeys/1"),
            ),
        ] {
            let response = app.admin(method.clone(), &path).send().await.unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.expect("a JSON body");
            assert_eq!(status, 422, "{method} {path}: {body}");
        }
    }
    use base64_helper::encode;
    for scheme in ["basic", "BASIC", "Basic"] {
        let credentials = encode(&format!("admin:{}", crate::helpers::ADMIN_PASSWORD));
        let response = app
            .client
            .get(app.url("/users/alice/apikeys"))
            .header("Authorization", format!("{scheme} {credentials}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "scheme {scheme}");
    }
}

mod base64_helper {
    /// Standard base64 with padding, enough for a Basic header.
    pub fn encode(text: &str) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in text.as_bytes().chunks(3) {
            let bytes = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let group = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
            for index in 0..4 {
                if index <= chunk.len() {
                    out.push(ALPHABET[(group >> (18 - 6 * index) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// A request whose promised body never comes is answered 408 once the body-read timeout is
/// over, and its connection closed, instead of being held until the client gives up.
#[actix_web::test]
async fn a_body_that_never_comes_is_answered_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = crate::helpers::spawn_app().await;
    let address = app.address.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let credentials = base64_helper::encode(&format!("admin:{}", crate::helpers::ADMIN_PASSWORD));
    let head = format!(
        "POST /users/alice/apikeys HTTP/1.1\r\nHost: {address}\r\nAuthorization: Basic {credentials}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"desc"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let limit = quota_keeper::http::body::BODY_READ_TIMEOUT + Duration::from_secs(5);
    let mut response = Vec::new();
    // Reads until the service closes the connection; the deadline fails the test otherwise.
    tokio::time::timeout(limit, stream.read_to_end(&mut response))
        .await
        .expect("the service answers and closes within the body-read timeout")
        .expect("the connection reads");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        started.elapsed() >= quota_keeper::http::body::BODY_READ_TIMEOUT - Duration::from_secs(1)
    );
}

/// Straight against each database: a batch that would overflow a history row is refused (not
/// reported as an outage), and the refusal names the reason; the same event alone on a key
/// with room commits.
#[actix_web::test]
async fn the_database_refusing_a_batch_is_told_from_an_outage_on_both_backends() {
    use quota_keeper::db::usage::{commit_batch, BatchError};
    use quota_keeper::domain::usage::UsageEvent;
    for backend in [
        crate::helpers::Backend::Postgres,
        crate::helpers::Backend::Sqlite,
    ] {
        let app = crate::helpers::spawn_app_on(backend, |_| {}).await;
        app.create_key("z", json!({"id": 1})).await;
        app.create_key("z", json!({"id": 2})).await;
        insert_october_near_the_ceiling(&app.db).await;
        let late = |event_id: &str, api_key_id: i64| UsageEvent {
            event_id: event_id.into(),
            api_key_id,
            tokens: 10,
            occurred_at: at("2026-10-15T00:00:00Z"),
            reservation_id: None,
        };
        let poison = late("poison", 1);
        let fine = late("fine", 2);
        let refused = commit_batch(
            &app.db,
            &[&fine, &poison],
            crate::helpers::test_now(),
            &Default::default(),
        )
        .await;
        match refused {
            Err(BatchError::Refused(reason)) => {
                // PostgreSQL refuses it itself (SQLSTATE 22003); SQLite would store a float, so
                // the writer checks first.
                let expected = match backend {
                    crate::helpers::Backend::Postgres => "(22003): bigint out of range",
                    crate::helpers::Backend::Sqlite => "would pass 9223372036854775807",
                };
                assert!(reason.contains(expected), "{backend:?}: {reason}");
            }
            other => panic!("{backend:?}: expected a refusal, got {other:?}"),
        }
        let committed = commit_batch(
            &app.db,
            &[&fine],
            crate::helpers::test_now(),
            &Default::default(),
        )
        .await
        .expect("the event alone commits");
        assert_eq!(committed.late, 1, "{backend:?}");
    }
}

/// An error that passes (here a lock not granted in time, SQLSTATE 55P03) is an outage, not a
/// refusal: the writer retries the whole batch and acknowledges nothing.
#[actix_web::test]
async fn a_passing_database_error_is_an_outage_not_a_refusal() {
    use quota_keeper::db::usage::{commit_batch, BatchError};
    use quota_keeper::domain::usage::UsageEvent;
    use sea_orm::TransactionTrait;
    let app = crate::helpers::spawn_app().await;
    app.create_key("z", json!({"id": 1})).await;
    let database_name = app
        .settings
        .database
        .url
        .rsplit('/')
        .next()
        .expect("a database name")
        .to_string();
    app.db
        .execute_unprepared(&format!(
            "ALTER DATABASE {database_name} SET lock_timeout = '200ms'"
        ))
        .await
        .expect("the database answers");
    // Opened after the change, so its sessions carry the lock timeout.
    let writer = quota_keeper::db::connect(&quota_keeper::settings::DatabaseSettings {
        url: app.settings.database.url.clone(),
        max_connections: 1,
    })
    .await
    .expect("a pool");
    let holder = app.db.begin().await.expect("a transaction");
    holder
        .execute_unprepared("SELECT id FROM api_keys WHERE id = 1 FOR UPDATE")
        .await
        .expect("the row is locked");
    let event = UsageEvent {
        event_id: "e".into(),
        api_key_id: 1,
        tokens: 10,
        occurred_at: crate::helpers::test_now(),
        reservation_id: None,
    };
    let outcome = commit_batch(
        &writer,
        &[&event],
        crate::helpers::test_now(),
        &Default::default(),
    )
    .await;
    holder.rollback().await.expect("released");
    match outcome {
        Err(BatchError::Unavailable(error)) => {
            assert!(error.to_string().contains("lock"), "{error}")
        }
        other => panic!("expected an outage, got {other:?}"),
    }
    let committed = commit_batch(
        &writer,
        &[&event],
        crate::helpers::test_now(),
        &Default::default(),
    )
    .await
    .expect("commits once the lock is free");
    assert_eq!(committed.counted, 1);
}

/// A reply channel that was closed (the broker closes a channel on a channel error) is replaced
/// by the next reply, on the same connection.
#[actix_web::test]
async fn a_closed_reply_channel_is_reopened() {
    use quota_keeper::amqp::replies::ReplyChannel;
    let vhost = crate::helpers::TestVhost::create();
    let connection = std::sync::Arc::new(
        lapin::Connection::connect(&vhost.url(), lapin::ConnectionProperties::default())
            .await
            .expect("the test vhost accepts guest"),
    );
    let setup = connection.create_channel().await.expect("a channel");
    setup
        .queue_declare(
            "replies".into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("a queue");
    let first = connection.create_channel().await.expect("a channel");
    let replies = ReplyChannel::with_channel(std::sync::Arc::clone(&connection), first.clone());
    first.close(200, "gone".into()).await.expect("closed");
    assert!(!first.status().connected());
    replies
        .publish("replies", b"answer", lapin::BasicProperties::default())
        .await
        .expect("published through a new channel");
    let delivered = eventually(WAIT, "the reply in its queue", || async {
        setup
            .basic_get(
                "replies".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("the setup channel is open")
            .map(|message| message.delivery.data.clone())
    })
    .await;
    assert_eq!(delivered, b"answer");
}

/// A key rolled over by the batch with its closed window near the ceiling, plus a late event for
/// that window in the same batch: refused (never a wrapped or panicking sum), the rest commits.
#[actix_web::test]
async fn a_late_event_on_top_of_a_full_closed_window_is_refused() {
    use quota_keeper::db::usage::{commit_batch, BatchError};
    use quota_keeper::domain::usage::UsageEvent;
    for backend in [
        crate::helpers::Backend::Postgres,
        crate::helpers::Backend::Sqlite,
    ] {
        let app = crate::helpers::spawn_app_on(backend, |_| {}).await;
        app.create_key("z", json!({"id": 1})).await;
        app.set_usage(1, i64::MAX - 5).await;
        let event = |event_id: &str, occurred_at: &str| UsageEvent {
            event_id: event_id.into(),
            api_key_id: 1,
            tokens: 10,
            occurred_at: at(occurred_at),
            reservation_id: None,
        };
        let late = event("late", "2026-11-20T00:00:00Z");
        let current = event("current", "2026-12-02T00:00:00Z");
        // December: November (at MAX - 5) closes in this very batch.
        let december = at("2026-12-02T00:00:00Z");
        match commit_batch(&app.db, &[&current, &late], december, &Default::default()).await {
            Err(BatchError::Refused(reason)) => {
                assert!(reason.contains("would pass"), "{backend:?}: {reason}")
            }
            other => panic!("{backend:?}: expected a refusal, got {other:?}"),
        }
        let outcome = commit_batch(&app.db, &[&current], december, &Default::default())
            .await
            .expect("the current event alone commits");
        assert_eq!(outcome.counted, 1, "{backend:?}");
        assert_eq!(app.stored_usage(1).await, 10, "{backend:?}");
    }
}

/// Key 1's history of October 2026 a few tokens below the largest count.
async fn insert_october_near_the_ceiling(db: &sea_orm::DatabaseConnection) {
    entity::usage_history::ActiveModel {
        api_key_id: Set(1),
        period_start: Set(at("2026-10-01T00:00:00Z")),
        period_end: Set(at("2026-11-01T00:00:00Z")),
        tokens: Set(i64::MAX - 5),
        ..Default::default()
    }
    .insert(db)
    .await
    .expect("a history row");
}
