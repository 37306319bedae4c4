//! Holds (SPEC §2.3) outlive the process: a SIGTERM stores them with the last batch, a SIGKILL
//! once a grant is stored (within a flush interval) finds it stored, and another instance lists them
//! from their owner.

use std::time::Duration;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{json, Value};

use crate::common::eventually;
use crate::harness::{Scenario, Service, ADMIN_PASSWORD, SERIAL};

const KEY: i64 = 1;

async fn reserve(service: &Service, reserve: i64, id: &str) -> Value {
    service
        .http
        .post(service.url(&format!("/keys/{KEY}/check")))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .json(&json!({"reserve": reserve, "reservation_id": id, "ttl_secs": 3600}))
        .send()
        .await
        .expect("the service answers HTTP")
        .json()
        .await
        .expect("a check reply")
}

async fn reservations(service: &Service) -> Value {
    service
        .http
        .get(service.url(&format!("/keys/{KEY}/reservations")))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .send()
        .await
        .expect("the service answers HTTP")
        .json()
        .await
        .expect("a list")
}

/// Whether the hold `id` of `KEY` is in the database.
async fn hold_stored(scenario: &Scenario, id: &str) -> bool {
    let db = sea_orm::Database::connect(&scenario.database.url)
        .await
        .expect("PostgreSQL is up");
    let stored = entity::reservations::Entity::find()
        .filter(entity::reservations::Column::ApiKeyId.eq(KEY))
        .filter(entity::reservations::Column::ReservationId.eq(id))
        .one(&db)
        .await
        .expect("the database answers")
        .is_some();
    let _ = db.close().await;
    stored
}

fn ids_and_tokens(list: &Value) -> Vec<(String, i64)> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|hold| {
            (
                hold["id"].as_str().expect("an id").to_string(),
                hold["tokens"].as_i64().expect("tokens"),
            )
        })
        .collect()
}

#[tokio::test]
async fn sigterm_stores_holds_and_the_next_owners_answer_with_them() {
    let _serial = SERIAL.lock().await;
    // Nothing would be stored on its own for a minute: only the shutdown flush can store the holds.
    let scenario = Scenario::new(&[("QUOTA__INGEST__FLUSH_INTERVAL_MS", "60000")]).await;
    let mut service = scenario.start_with_keys(&[KEY], Some(1000)).await;
    assert_eq!(reserve(&service, 300, "a").await["status"], 200);
    assert_eq!(reserve(&service, 200, "b").await["status"], 200);
    let (status, _) = service.terminate();
    assert!(status.success(), "log: {}", service.log());

    let restarted = scenario.start();
    restarted.wait_ready().await;
    let second = scenario.start_instance("-second");
    second.wait_ready().await;
    let expected = vec![("a".to_string(), 300), ("b".to_string(), 200)];
    // Whichever instance owns the key, both answer with its holds (one of them asks the other).
    for instance in [&restarted, &second] {
        assert_eq!(ids_and_tokens(&reservations(instance).await), expected);
        let (_, reply) = instance.http_check(KEY).await;
        assert_eq!(reply["tokens_reserved"], 500, "{reply}");
        assert_eq!(reply["remaining"], 500, "{reply}");
    }
    // Denied on the held tokens, from either instance.
    let denied = reserve(&second, 501, "c").await;
    assert_eq!(denied["status"], 429, "{denied}");
}

#[tokio::test]
async fn sigkill_a_flush_interval_after_a_grant_keeps_the_hold() {
    let _serial = SERIAL.lock().await;
    let flush_interval = Duration::from_millis(100);
    let scenario = Scenario::new(&[("QUOTA__INGEST__FLUSH_INTERVAL_MS", "100")]).await;
    let mut service = scenario.start_with_keys(&[KEY], Some(1000)).await;
    let granted = reserve(&service, 400, "kept").await;
    assert_eq!(granted["status"], 200, "{granted}");
    // Stored within a flush interval (the guarantee), with room for a slow commit.
    eventually(flush_interval * 10, "the hold stored", || async {
        hold_stored(&scenario, "kept").await.then_some(())
    })
    .await;
    service.kill();

    let restarted = scenario.start();
    restarted.wait_ready().await;
    assert_eq!(
        ids_and_tokens(&reservations(&restarted).await),
        vec![("kept".to_string(), 400)]
    );
    assert_eq!(restarted.http_check(KEY).await.1["tokens_reserved"], 400);
    // The same reservation_id returns the stored hold, never a second one.
    let retried = reserve(&restarted, 400, "kept").await;
    assert_eq!(retried["reservation"], granted["reservation"]);
    assert_eq!(retried["tokens_reserved"], 400);
}
