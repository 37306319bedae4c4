//! Threshold alerts (SPEC §2.4): crossings by usage and by PATCH, once per key, window and
//! threshold, re-armed by reset and rollover, never for unlimited keys, sent after an outage.

use std::time::Duration;

use entity::alert_outbox;
use reqwest::Method;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{json, Value};

use crate::common::alerts::AlertListener;
use crate::common::broker::BrokerClient;
use crate::common::rabbitmqctl;
use crate::helpers::{
    at, eventually, spawn_app_on, spawn_app_with_broker, Backend, TestApp, TestVhost,
};

const WAIT: Duration = Duration::from_secs(20);

/// The app with the broker, its usage publisher, and a listener bound to `quota.alerts` with `#`.
async fn alerting_app() -> (TestApp, BrokerClient, AlertListener) {
    let app = spawn_app_with_broker(|_| {}).await;
    connect(app).await
}

async fn connect(app: TestApp) -> (TestApp, BrokerClient, AlertListener) {
    let url = app.vhost.as_ref().expect("the app has a vhost").url();
    let broker = BrokerClient::connect(&url).await;
    let listener = AlertListener::bind(&url).await;
    (app, broker, listener)
}

/// Publishes `tokens` of usage for `key` (dated `occurred_at`, else now) and waits until the
/// committed counter is `committed`.
async fn use_tokens(app: &TestApp, broker: &BrokerClient, key: i64, tokens: i64, committed: i64) {
    let event = json!({"event_id": uuid::Uuid::new_v4().to_string(), "api_key_id": key,
        "tokens": tokens, "occurred_at": app.clock.now_rfc3339()});
    broker.publish_usage(key, &event).await;
    eventually(WAIT, "the usage to commit", || async {
        (app.stored_usage(key).await == committed).then_some(())
    })
    .await;
}

async fn patch(app: &TestApp, key: i64, body: Value) -> Value {
    let response = app
        .admin(Method::PATCH, &format!("/users/alice/apikeys/{key}"))
        .json(&body)
        .send()
        .await
        .expect("the app answers");
    assert_eq!(response.status(), 200, "PATCH {body}");
    response.json().await.expect("a key is JSON")
}

/// A key that crosses both thresholds at once: its two alerts mark "everything before arrived".
async fn sentinel(app: &TestApp, broker: &BrokerClient, listener: &mut AlertListener, key: i64) {
    app.create_key("alice", json!({"id": key, "token_quota_monthly": 10}))
        .await;
    use_tokens(app, broker, key, 10, 10).await;
    assert_eq!(
        listener.next_keys(2, WAIT).await,
        vec![format!("80.{key}"), format!("100.{key}")],
        "the sentinel's alerts come next: nothing else was sent before them"
    );
}

trait ClockExt {
    fn now_rfc3339(&self) -> String;
}

impl ClockExt for std::sync::Arc<quota_keeper::clock::ManualClock> {
    fn now_rfc3339(&self) -> String {
        quota_keeper::clock::Clock::now(self.as_ref()).to_rfc3339()
    }
}

#[actix_web::test]
async fn usage_crosses_80_then_100_once_each_in_order_and_nothing_after() {
    let (app, broker, mut listener) = alerting_app().await;
    app.create_key("alice", json!({"id": 1, "token_quota_monthly": 1000}))
        .await;
    use_tokens(&app, &broker, 1, 500, 500).await;
    use_tokens(&app, &broker, 1, 300, 800).await;
    let first = listener.next(WAIT, "the 80 % alert").await;
    assert_eq!(first.routing_key, "80.1");
    assert_eq!(
        first.body,
        json!({"alert_id": "1:2026-11-01T00:00:00Z:80", "api_key_id": 1, "username": "alice",
            "threshold_percent": 80, "token_quota_monthly": 1000, "tokens_used_this_month": 800,
            "period_start": "2026-11-01T00:00:00Z", "quota_reset_at": "2026-12-01T00:00:00Z",
            "occurred_at": "2026-11-23T10:00:00Z"})
    );
    use_tokens(&app, &broker, 1, 150, 950).await;
    use_tokens(&app, &broker, 1, 60, 1010).await;
    let second = listener.next(WAIT, "the 100 % alert").await;
    assert_eq!(second.routing_key, "100.1");
    assert_eq!(second.body["tokens_used_this_month"], 1010);
    // Past 100 %: more usage, more batches, nothing more.
    use_tokens(&app, &broker, 1, 500, 1510).await;
    use_tokens(&app, &broker, 1, 5000, 6510).await;
    sentinel(&app, &broker, &mut listener, 99).await;
    let recorded = alert_outbox::Entity::find().all(&app.db).await.unwrap();
    assert_eq!(recorded.len(), 4, "one row per key and threshold");
    eventually(WAIT, "every alert to be marked published", || async {
        let pending = alert_outbox::Entity::find()
            .filter(alert_outbox::Column::PublishedAt.is_null())
            .all(&app.db)
            .await
            .unwrap();
        pending.is_empty().then_some(())
    })
    .await;
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("quota_alerts_published_total{threshold=\"80\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("quota_alerts_pending"), "{metrics}");
}

#[actix_web::test]
async fn one_event_from_0_to_120_percent_fires_80_then_100() {
    let (app, broker, mut listener) = alerting_app().await;
    app.create_key("alice", json!({"id": 2, "token_quota_monthly": 100}))
        .await;
    let published = std::time::Instant::now();
    use_tokens(&app, &broker, 2, 120, 120).await;
    let eighty = listener.next(WAIT, "80 %").await;
    println!(
        "usage event published to its alert received: {:?} (flush interval 50 ms)",
        published.elapsed()
    );
    let hundred = listener.next(WAIT, "100 %").await;
    assert_eq!(
        (eighty.routing_key.as_str(), hundred.routing_key.as_str()),
        ("80.2", "100.2")
    );
    assert_eq!(eighty.body["tokens_used_this_month"], 120);
    assert_eq!(hundred.alert_id(), "2:2026-11-01T00:00:00Z:100");
}

#[actix_web::test]
async fn unlimited_keys_never_alert() {
    let (app, broker, mut listener) = alerting_app().await;
    app.create_key("alice", json!({"id": 3})).await;
    use_tokens(&app, &broker, 3, 1_000_000_000, 1_000_000_000).await;
    // A quota set above the usage and cleared again crosses nothing either.
    patch(&app, 3, json!({"token_quota_monthly": 5_000_000_000i64})).await;
    patch(&app, 3, json!({"token_quota_monthly": 0})).await;
    use_tokens(&app, &broker, 3, 1, 1_000_000_001).await;
    sentinel(&app, &broker, &mut listener, 98).await;
}

#[actix_web::test]
async fn lowering_the_quota_below_the_usage_fires_the_thresholds_it_crosses() {
    let (app, broker, mut listener) = alerting_app().await;
    app.create_key("alice", json!({"id": 4, "token_quota_monthly": 5000}))
        .await;
    use_tokens(&app, &broker, 4, 900, 900).await;
    patch(&app, 4, json!({"token_quota_monthly": 1000})).await;
    let eighty = listener.next(WAIT, "80 % after the PATCH").await;
    assert_eq!(eighty.routing_key, "80.4");
    assert_eq!(eighty.body["token_quota_monthly"], 1000);
    assert_eq!(eighty.body["tokens_used_this_month"], 900);
    patch(&app, 4, json!({"token_quota_monthly": 900})).await;
    assert_eq!(
        listener
            .next(WAIT, "100 % after the PATCH")
            .await
            .routing_key,
        "100.4"
    );
    // Raised and lowered again in the same window: already alerted.
    patch(&app, 4, json!({"token_quota_monthly": 5000})).await;
    patch(&app, 4, json!({"token_quota_monthly": 500})).await;
    sentinel(&app, &broker, &mut listener, 97).await;
}

#[actix_web::test]
async fn reset_usage_rearms_the_thresholds_of_the_window() {
    let (app, broker, mut listener) = alerting_app().await;
    app.create_key("alice", json!({"id": 5, "token_quota_monthly": 100}))
        .await;
    use_tokens(&app, &broker, 5, 120, 120).await;
    assert_eq!(listener.next_keys(2, WAIT).await, vec!["80.5", "100.5"]);
    eventually(WAIT, "both alerts to be marked published", || async {
        let published = alert_outbox::Entity::find()
            .filter(alert_outbox::Column::ApiKeyId.eq(5))
            .filter(alert_outbox::Column::PublishedAt.is_not_null())
            .all(&app.db)
            .await
            .unwrap();
        (published.len() == 2).then_some(())
    })
    .await;
    patch(&app, 5, json!({"reset_usage": true})).await;
    use_tokens(&app, &broker, 5, 85, 85).await;
    let again = listener.next(WAIT, "80 % again after the reset").await;
    assert_eq!(again.routing_key, "80.5");
    assert_eq!(again.body["tokens_used_this_month"], 85);
    use_tokens(&app, &broker, 5, 15, 100).await;
    assert_eq!(
        listener.next(WAIT, "100 % again").await.routing_key,
        "100.5"
    );
}

#[actix_web::test]
async fn a_new_window_starts_unalerted() {
    let (app, broker, mut listener) = alerting_app().await;
    app.clock.set(at("2026-11-30T23:00:00Z"));
    app.create_key("alice", json!({"id": 6, "token_quota_monthly": 100}))
        .await;
    use_tokens(&app, &broker, 6, 90, 90).await;
    let november = listener.next(WAIT, "80 % in November").await;
    assert_eq!(november.alert_id(), "6:2026-11-01T00:00:00Z:80");
    // December: the batch rolls the key over, then counts the event in the new window.
    app.clock.set(at("2026-12-01T00:00:05Z"));
    use_tokens(&app, &broker, 6, 85, 85).await;
    let december = listener.next(WAIT, "80 % in December").await;
    assert_eq!(december.alert_id(), "6:2026-12-01T00:00:00Z:80");
    assert_eq!(december.body["period_start"], "2026-12-01T00:00:00Z");
    assert_eq!(december.body["quota_reset_at"], "2027-01-01T00:00:00Z");
    assert_eq!(december.body["occurred_at"], "2026-12-01T00:00:05Z");
}

/// Names of the connections of `vhost` as `rabbitmqctl` lists them: (pid, vhost) rows.
fn close_connections_of(vhost: &str) {
    let output = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "vhost",
        ])
        .output()
        .expect("rabbitmqctl runs");
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut columns = line.split_whitespace();
        if let (Some(pid), Some(of_vhost)) = (columns.next(), columns.next()) {
            if of_vhost == vhost {
                // Gone already is fine: only this vhost's connections are ever named.
                let _ = std::process::Command::new("rabbitmqctl")
                    .args(["-q", "close_connection", pid, "test: broker unreachable"])
                    .output();
            }
        }
    }
}

#[actix_web::test]
async fn an_alert_committed_while_the_broker_is_unreachable_arrives_when_it_is_back() {
    let (app, broker, listener) = alerting_app().await;
    let vhost = app
        .vhost
        .as_ref()
        .expect("the app has a vhost")
        .name
        .clone();
    app.create_key("alice", json!({"id": 7, "token_quota_monthly": 1000}))
        .await;
    use_tokens(&app, &broker, 7, 100, 100).await;
    drop(broker);
    // For this vhost only, the broker is gone: every connection closed, none accepted.
    rabbitmqctl(&["clear_permissions", "-p", &vhost, "guest"]);
    close_connections_of(&vhost);
    eventually(WAIT, "the app to notice the broker is gone", || async {
        (app.readiness.broker() != quota_keeper::readiness::BrokerState::Consuming).then_some(())
    })
    .await;
    // The crossing commits in the database meanwhile (an admin change needs no broker).
    patch(&app, 7, json!({"token_quota_monthly": 120})).await;
    let pending = alert_outbox::Entity::find()
        .filter(alert_outbox::Column::ApiKeyId.eq(7))
        .all(&app.db)
        .await
        .unwrap();
    assert_eq!(
        pending.len(),
        1,
        "the 80 % crossing is recorded: {pending:?}"
    );
    assert_eq!(pending[0].published_at, None, "and cannot have been sent");
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let mut listener = listener.reconnect().await;
    let late = listener.next(WAIT, "the alert after the outage").await;
    assert_eq!(late.routing_key, "80.7");
    assert_eq!(late.body["token_quota_monthly"], 120);
    app.wait_until_consuming().await;
    let broker = BrokerClient::connect(&app.vhost.as_ref().unwrap().url()).await;
    // The next crossing is the next message: the first was sent once.
    use_tokens(&app, &broker, 7, 20, 120).await;
    assert_eq!(listener.next(WAIT, "100 %").await.routing_key, "100.7");
}

#[actix_web::test]
async fn alerts_work_on_sqlite() {
    let vhost = TestVhost::create();
    let url = vhost.url();
    let mut app = spawn_app_on(Backend::Sqlite, |settings| {
        settings.amqp.enabled = true;
        settings.amqp.url = url;
        settings.alerts.thresholds_percent = vec![50, 100, 150];
    })
    .await;
    app.vhost = Some(vhost);
    app.wait_until_consuming().await;
    let (app, broker, mut listener) = connect(app).await;
    app.create_key("alice", json!({"id": 8, "token_quota_monthly": 100}))
        .await;
    use_tokens(&app, &broker, 8, 60, 60).await;
    assert_eq!(listener.next(WAIT, "50 %").await.routing_key, "50.8");
    use_tokens(&app, &broker, 8, 100, 160).await;
    assert_eq!(listener.next_keys(2, WAIT).await, vec!["100.8", "150.8"]);
    patch(&app, 8, json!({"reset_usage": true})).await;
    use_tokens(&app, &broker, 8, 50, 50).await;
    assert_eq!(
        listener
            .next(WAIT, "50 % after the reset")
            .await
            .routing_key,
        "50.8"
    );
}

/// What a second instance's publisher takes while the first holds a key's older alert: the
/// other keys' alerts, not that key's later one (a key's alerts go out in order).
#[actix_web::test]
async fn a_later_alert_of_a_key_waits_while_another_publisher_holds_an_earlier_one() {
    use quota_keeper::db::alerts::{record_alerts, take_pending};
    use quota_keeper::domain::alerts::Alert;
    use sea_orm::TransactionTrait;

    let app = spawn_app_on(Backend::Postgres, |_| {}).await;
    let alert = |api_key_id: i64, threshold_percent: u32| Alert {
        api_key_id,
        username: "alice".into(),
        threshold_percent,
        token_quota_monthly: 100,
        tokens_used_this_month: 100,
        period_start: at("2026-11-01T00:00:00Z"),
        quota_reset_at: at("2026-12-01T00:00:00Z"),
        occurred_at: at("2026-11-23T10:00:00Z"),
    };
    let recorded = record_alerts(&app.db, &[alert(1, 80), alert(1, 100), alert(2, 80)])
        .await
        .unwrap();
    assert_eq!(recorded, 3);
    assert_eq!(
        record_alerts(&app.db, &[alert(1, 80)]).await.unwrap(),
        0,
        "one alert per key, window and threshold"
    );
    let first = app.db.begin().await.unwrap();
    let held = take_pending(&first, 1).await.unwrap();
    assert_eq!((held[0].api_key_id, held[0].threshold_percent), (1, 80));
    let second = app.db.begin().await.unwrap();
    let taken: Vec<(i64, i32)> = take_pending(&second, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.api_key_id, row.threshold_percent))
        .collect();
    assert_eq!(taken, vec![(2, 80)]);
    second.rollback().await.unwrap();
    first.rollback().await.unwrap();
}
