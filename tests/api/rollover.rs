//! Monthly rollover: by the scheduler alone, lazily on checks, across the year boundary, with late events.

use std::time::Duration;

use entity::{processed_events, usage_history};
use quota_keeper::actors::scheduler::{PruneProcessedEvents, RollOverLapsedKeys};
use reqwest::Method;
use sea_orm::{ActiveModelTrait, EntityTrait, QueryOrder, Set};
use serde_json::{json, Value};

use crate::common::broker::BrokerClient;
use crate::helpers::{
    at, eventually, json_body, spawn_app_on, spawn_app_with_broker, Backend, TestApp,
};

const WAIT: Duration = Duration::from_secs(20);

async fn history_of(app: &TestApp, id: i64) -> Vec<(String, String, i64)> {
    usage_history::Entity::find()
        .order_by_asc(usage_history::Column::PeriodStart)
        .all(&app.db)
        .await
        .unwrap()
        .into_iter()
        .filter(|row| row.api_key_id == id)
        .map(|row| {
            (
                row.period_start.to_rfc3339(),
                row.period_end.to_rfc3339(),
                row.tokens,
            )
        })
        .collect()
}

/// An app whose scheduler ticks once at start and then not for an hour, so only what the test
/// does rolls keys over.
async fn spawn_app_without_scheduler_ticks(backend: Backend) -> TestApp {
    spawn_app_on(backend, |settings| {
        settings.scheduler.interval_ms = 3_600_000
    })
    .await
}

#[actix_web::test]
async fn the_scheduler_alone_rolls_an_idle_key_into_january() {
    let app = spawn_app_on(Backend::Postgres, |settings| {
        settings.scheduler.interval_ms = 50
    })
    .await;
    app.clock.set(at("2026-12-31T23:59:59Z"));
    app.create_key("alice", json!({"id": 1, "token_quota_monthly": 100}))
        .await;
    app.set_usage(1, 70).await;
    app.clock.set(at("2027-01-01T00:00:01Z"));
    let key = eventually(WAIT, "the scheduler to roll the key over", || async {
        let key = entity::api_keys::Entity::find_by_id(1i64)
            .one(&app.db)
            .await
            .unwrap()
            .unwrap();
        (key.quota_reset_at == at("2027-02-01T00:00:00Z")).then_some(key)
    })
    .await;
    assert_eq!(key.tokens_used_this_month, 0);
    assert_eq!(
        history_of(&app, 1).await,
        vec![(
            "2026-12-01T00:00:00+00:00".into(),
            "2027-01-01T00:00:00+00:00".into(),
            70
        )]
    );
}

#[actix_web::test]
async fn a_check_rolls_a_lapsed_window_over_before_answering() {
    let app = spawn_app_without_scheduler_ticks(Backend::Postgres).await;
    app.create_key("alice", json!({"id": 2, "token_quota_monthly": 100}))
        .await;
    app.set_usage(2, 100).await;
    let check = || async {
        app.admin(Method::POST, "/keys/2/check")
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert_eq!(check().await["status"], 429);
    app.clock.set(at("2026-12-01T00:00:00Z"));
    let reply = check().await;
    assert_eq!(reply["status"], 200);
    assert_eq!(reply["tokens_used_this_month"], 0);
    assert_eq!(reply["quota_reset_at"], "2027-01-01T00:00:00Z");
}

#[actix_web::test]
async fn months_without_the_service_are_skipped_not_replayed_on_sqlite() {
    months_without_the_service_are_skipped_not_replayed(Backend::Sqlite).await;
}

/// The scheduler on PostgreSQL (rows locked as they are archived) must archive the same as on SQLite.
#[actix_web::test]
async fn months_without_the_service_are_skipped_not_replayed_on_postgres() {
    months_without_the_service_are_skipped_not_replayed(Backend::Postgres).await;
}

async fn months_without_the_service_are_skipped_not_replayed(backend: Backend) {
    let app = spawn_app_without_scheduler_ticks(backend).await;
    app.create_key("alice", json!({"id": 3})).await;
    app.set_usage(3, 30).await;
    app.clock.set(at("2027-03-10T12:00:00Z"));
    let rolled = app
        .scheduler
        .send(RollOverLapsedKeys)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rolled, 1);
    let key = entity::api_keys::Entity::find_by_id(3i64)
        .one(&app.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key.quota_reset_at, at("2027-04-01T00:00:00Z"));
    assert_eq!(key.tokens_used_this_month, 0);
    assert_eq!(
        history_of(&app, 3).await,
        vec![(
            "2026-11-01T00:00:00+00:00".into(),
            "2026-12-01T00:00:00+00:00".into(),
            30
        )]
    );
    assert_eq!(
        app.scheduler
            .send(RollOverLapsedKeys)
            .await
            .unwrap()
            .unwrap(),
        0,
        "nothing twice"
    );
}

#[actix_web::test]
async fn a_late_event_across_the_year_boundary_lands_in_december() {
    let app = spawn_app_with_broker(|settings| settings.scheduler.interval_ms = 50).await;
    app.clock.set(at("2026-12-31T23:59:50Z"));
    app.create_key("alice", json!({"id": 4, "token_quota_monthly": 1000}))
        .await;
    app.set_usage(4, 50).await;
    let mut client = BrokerClient::connect(&app.settings.amqp.url).await;
    assert_eq!(client.check(4, None).await["tokens_used_this_month"], 50);
    app.clock.set(at("2027-01-01T00:00:05Z"));
    eventually(WAIT, "December archived", || async {
        (!history_of(&app, 4).await.is_empty()).then_some(())
    })
    .await;
    client
        .publish_usage(4, &json!({"event_id": "late-dec", "api_key_id": 4, "tokens": 10, "occurred_at": "2026-12-31T23:59:58Z"}))
        .await;
    client
        .publish_usage(4, &json!({"event_id": "jan", "api_key_id": 4, "tokens": 7, "occurred_at": "2027-01-01T00:00:03Z"}))
        .await;
    eventually(WAIT, "the late event in December", || async {
        (history_of(&app, 4).await.first().map(|row| row.2) == Some(60)).then_some(())
    })
    .await;
    eventually(WAIT, "January's event committed", || async {
        (app.stored_usage(4).await == 7).then_some(())
    })
    .await;
    let reply = client.check(4, None).await;
    assert_eq!(reply["tokens_used_this_month"], 7);
    assert_eq!(reply["quota_reset_at"], "2027-02-01T00:00:00Z");
    // The same late event again changes nothing: once it is acknowledged (after its batch
    // committed; the publish was confirmed, so it is queued until then), it was a duplicate.
    client
        .publish_usage(4, &json!({"event_id": "late-dec", "api_key_id": 4, "tokens": 10, "occurred_at": "2026-12-31T23:59:58Z"}))
        .await;
    let vhost = &app.vhost.as_ref().expect("a broker test").name;
    eventually(WAIT, "the repeated late event acknowledged", || async {
        (crate::common::queued_messages(vhost) == 0).then_some(())
    })
    .await;
    assert_eq!(history_of(&app, 4).await.first().map(|row| row.2), Some(60));

    let usage: Value = app.admin_get_json("/keys/4/usage").await;
    assert_eq!(
        usage,
        json!({
            "api_key_id": 4,
            "current": {"period_start": "2027-01-01T00:00:00Z", "period_end": "2027-02-01T00:00:00Z",
                        "tokens": 7, "token_quota_monthly": 1000, "remaining": 993},
            "history": [{"period_start": "2026-12-01T00:00:00Z", "period_end": "2027-01-01T00:00:00Z", "tokens": 60}]
        })
    );
}

#[actix_web::test]
async fn usage_lists_history_newest_first() {
    let app = spawn_app_without_scheduler_ticks(Backend::Postgres).await;
    app.create_key("alice", json!({"id": 5})).await;
    for (month, tokens) in [("2026-09", 9), ("2026-10", 10)] {
        let start = at(&format!("{month}-01T00:00:00Z"));
        usage_history::ActiveModel {
            api_key_id: Set(5),
            period_start: Set(start),
            period_end: Set(quota_keeper::domain::window::next_window_start(start)),
            tokens: Set(tokens),
            ..Default::default()
        }
        .insert(&app.db)
        .await
        .unwrap();
    }
    let usage: Value = app.admin_get_json("/keys/5/usage").await;
    let months: Vec<&str> = usage["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["period_start"].as_str().unwrap())
        .collect();
    assert_eq!(months, vec!["2026-10-01T00:00:00Z", "2026-09-01T00:00:00Z"]);
    assert_eq!(usage["current"]["period_start"], "2026-11-01T00:00:00Z");
    assert_eq!(
        app.admin(Method::GET, "/keys/6/usage")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        app.client
            .get(app.url("/keys/5/usage"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

#[actix_web::test]
async fn processed_event_ids_are_pruned_after_the_retention_period() {
    let app = spawn_app_on(Backend::Postgres, |settings| {
        settings.ingest.event_retention_days = 8
    })
    .await;
    for (id, processed_at) in [
        ("old", "2026-11-10T00:00:00Z"),
        ("recent", "2026-11-20T00:00:00Z"),
    ] {
        processed_events::ActiveModel {
            event_id: Set(id.into()),
            api_key_id: Set(1),
            processed_at: Set(at(processed_at)),
        }
        .insert(&app.db)
        .await
        .unwrap();
    }
    assert_eq!(
        app.scheduler
            .send(PruneProcessedEvents)
            .await
            .unwrap()
            .unwrap(),
        1
    );
    let left: Vec<String> = processed_events::Entity::find()
        .all(&app.db)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(left, vec!["recent".to_string()]);
}

#[actix_web::test]
async fn a_patch_of_a_lapsed_key_archives_the_closed_month_first() {
    let app = spawn_app_without_scheduler_ticks(Backend::Postgres).await;
    app.create_key("alice", json!({"id": 7, "token_quota_monthly": 1000}))
        .await;
    app.set_usage(7, 900).await;
    app.clock.set(at("2026-12-01T00:00:10Z"));
    let key = json_body(
        app.admin(Method::PATCH, "/users/alice/apikeys/7")
            .json(&json!({"reset_usage": true})),
    )
    .await;
    assert_eq!(key["tokens_used_this_month"], 0);
    assert_eq!(key["quota_reset_at"], "2027-01-01T00:00:00Z");
    assert_eq!(
        history_of(&app, 7).await,
        vec![(
            "2026-11-01T00:00:00+00:00".into(),
            "2026-12-01T00:00:00+00:00".into(),
            900
        )],
        "November is kept, not forgiven"
    );
    let check = json_body(app.admin(Method::POST, "/keys/7/check")).await;
    assert_eq!(check["tokens_used_this_month"], 0);
    assert_eq!(check["quota_reset_at"], "2027-01-01T00:00:00Z");
}
