//! Threshold alerts across crashes and instances (SPEC §2.4): an alert committed before a SIGKILL
//! is sent after the restart, and two instances send each alert once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use entity::alert_outbox;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use serde_json::json;

use crate::common::alerts::{allow_alert_publishing, refuse_alert_publishing, AlertListener};
use crate::common::broker::BrokerClient;
use crate::common::eventually;
use crate::harness::{Scenario, Service, SERIAL};

const WAIT: Duration = Duration::from_secs(30);

async fn database(scenario: &Scenario) -> DatabaseConnection {
    sea_orm::Database::connect(&scenario.database.url)
        .await
        .expect("PostgreSQL is up")
}

/// Waits until the outbox holds `count` alerts, none of them published.
async fn wait_for_unpublished(db: &DatabaseConnection, count: usize) {
    eventually(WAIT, "the crossings to be recorded", || async {
        let rows = alert_outbox::Entity::find().all(db).await.ok()?;
        (rows.len() == count && rows.iter().all(|row| row.published_at.is_none())).then_some(())
    })
    .await;
}

async fn use_tokens(broker: &BrokerClient, key: i64, tokens: i64) {
    broker
        .publish_usage(
            key,
            &json!({"event_id": uuid::Uuid::new_v4().to_string(), "api_key_id": key, "tokens": tokens}),
        )
        .await;
}

#[tokio::test]
async fn an_alert_committed_before_a_sigkill_is_sent_after_the_restart() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[]).await;
    let url = scenario.vhost.url();
    let mut service = scenario.start_with_keys(&[1], Some(1000)).await;
    let listener = AlertListener::bind(&url).await;
    // Refused by the broker, the publisher cannot send: the crossing stays in the outbox.
    refuse_alert_publishing(&scenario.vhost.name);
    let broker = scenario.broker().await;
    use_tokens(&broker, 1, 900).await;
    let db = database(&scenario).await;
    wait_for_unpublished(&db, 1).await;
    service.kill();
    let left = alert_outbox::Entity::find().all(&db).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].published_at, None, "killed before it was sent");
    allow_alert_publishing(&scenario.vhost.name);
    let mut listener = listener;
    let service = scenario.start();
    service.wait_ready().await;
    let after_restart = listener.next(WAIT, "the alert after the restart").await;
    assert_eq!(after_restart.routing_key, "80.1");
    assert_eq!(after_restart.body["tokens_used_this_month"], 900);
    use_tokens(&broker, 1, 100).await;
    assert_eq!(
        listener.next(WAIT, "100 %").await.routing_key,
        "100.1",
        "the 80 % alert was sent once: the next message is the next crossing"
    );
    drop(service);
}

#[tokio::test]
async fn two_instances_send_each_alert_once() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[]).await;
    let url = scenario.vhost.url();
    let keys: Vec<i64> = (1..=20).collect();
    let first = scenario.start_with_keys(&keys, Some(100)).await;
    let second = scenario.start_instance("-second");
    second.wait_ready().await;
    // Both commit crossings: each owns some of the keys.
    eventually(WAIT, "both instances to own shards", || async {
        let first_owns = !first.owned_shards().await.is_empty();
        let second_owns = !second.owned_shards().await.is_empty();
        (first_owns && second_owns).then_some(())
    })
    .await;
    let mut listener = AlertListener::bind(&url).await;
    // Every crossing waits in the outbox until publishing is allowed again, so both publishers
    // find all of them pending and retry at once.
    refuse_alert_publishing(&scenario.vhost.name);
    let broker = scenario.broker().await;
    for tokens in [50, 35, 20] {
        for &key in &keys {
            use_tokens(&broker, key, tokens).await;
        }
    }
    // Half the keys also get a PATCH through the instance that does not own them, or does.
    for &key in keys.iter().step_by(2) {
        patch_quota(if key % 4 == 1 { &first } else { &second }, key, 90).await;
    }
    let db = database(&scenario).await;
    wait_for_unpublished(&db, 2 * keys.len()).await;
    // Both publishers have tried to send the pending alerts (and failed): both will race for them.
    eventually(
        WAIT,
        "both publishers to meet the pending alerts",
        || async {
            let tried =
                |service: &Service| service.log().contains("threshold alerts not published");
            (tried(&first) && tried(&second)).then_some(())
        },
    )
    .await;
    let allowed = std::time::Instant::now();
    allow_alert_publishing(&scenario.vhost.name);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut order: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    for _ in 0..2 * keys.len() {
        let alert = listener.next(WAIT, "one alert per key and threshold").await;
        *seen.entry(alert.alert_id().to_string()).or_default() += 1;
        order
            .entry(alert.body["api_key_id"].as_i64().unwrap_or_default())
            .or_default()
            .push(alert.body["threshold_percent"].as_u64().unwrap_or_default());
    }
    println!(
        "{} alerts pending on two instances sent {:?} after publishing was allowed again",
        2 * keys.len(),
        allowed.elapsed()
    );
    assert!(seen.values().all(|&copies| copies == 1), "{seen:?}");
    let keys_alerted: BTreeSet<i64> = order.keys().copied().collect();
    assert_eq!(keys_alerted, keys.iter().copied().collect());
    for (key, thresholds) in &order {
        assert_eq!(thresholds, &vec![80, 100], "key {key}: in order");
    }
    // A later crossing is the next message: no copy of the first 40 was sent before it.
    first.create_key(99, Some(10)).await;
    use_tokens(&broker, 99, 10).await;
    assert_eq!(listener.next_keys(2, WAIT).await, vec!["80.99", "100.99"]);
    let published = alert_outbox::Entity::find()
        .filter(alert_outbox::Column::PublishedAt.is_not_null())
        .all(&db)
        .await
        .unwrap();
    assert!(published.len() >= 2 * keys.len());
}

async fn patch_quota(service: &Service, key: i64, quota: i64) {
    let response = service
        .http
        .patch(service.url(&format!("/users/process/apikeys/{key}")))
        .basic_auth("admin", Some(crate::harness::ADMIN_PASSWORD))
        .json(&json!({"token_quota_monthly": quota}))
        .send()
        .await
        .expect("the service answers HTTP");
    assert_eq!(response.status(), 200);
}

#[test]
fn a_threshold_out_of_range_stops_the_start_with_exit_code_2_naming_the_key() {
    for thresholds in ["80,1001", "0", "80,-5"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_quota-keeper"))
            .arg("serve")
            .current_dir(std::env::temp_dir())
            .env("QUOTA__HTTP__BIND", "127.0.0.1:0")
            .env("QUOTA__AMQP__ENABLED", "false")
            .env("QUOTA__DATABASE__URL", "sqlite::memory:")
            .env("QUOTA__ALERTS__THRESHOLDS_PERCENT", thresholds)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting on the child works") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{thresholds}: the service started instead of refusing the setting");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr is piped"), &mut stderr)
            .expect("stderr is readable");
        assert_eq!(status.code(), Some(2), "{thresholds}: {stderr}");
        assert!(
            stderr.contains("alerts.thresholds_percent"),
            "{thresholds}: {stderr}"
        );
    }
}
