//! The owner queues' storage format: version 2 when the service declares them, and queues of an
//! older format (declared by an earlier release) kept and consumed as they are.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use quota_keeper::amqp::topology::shard_queue_name;
use serde_json::json;

use crate::common::broker::BrokerClient;
use crate::common::{queue_arguments, TestVhost};
use crate::helpers::{eventually, spawn_app_on_vhost, spawn_app_with_broker};

const WAIT: std::time::Duration = std::time::Duration::from_secs(20);
const VERSION_2: &str = r#"{"x-queue-version",2}"#;

#[actix_web::test]
async fn shard_queues_are_declared_in_classic_queue_version_2() {
    let app = spawn_app_with_broker(|_| {}).await;
    let vhost = &app.vhost.as_ref().expect("a broker test").name;
    for shard in 0..app.settings.amqp.shards {
        let arguments = queue_arguments(vhost, &shard_queue_name(shard));
        assert!(arguments.contains(VERSION_2), "shard {shard}: {arguments}");
        assert!(arguments.contains(r#"{"x-max-priority",1}"#), "{arguments}");
        assert!(
            arguments.contains(r#"{"x-single-active-consumer",true}"#),
            "{arguments}"
        );
    }
}

#[actix_web::test]
async fn shard_queues_of_an_older_format_are_kept_and_consumed() {
    let vhost = TestVhost::create();
    let shards = quota_keeper::settings::Settings::default().amqp.shards;
    // The shard queues as a release before the version-2 format declared them.
    let connection = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .expect("the test vhost accepts guest");
    let channel = connection.create_channel().await.expect("a channel");
    let mut legacy = FieldTable::default();
    legacy.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    legacy.insert("x-max-priority".into(), AMQPValue::LongInt(1));
    for shard in 0..shards {
        channel
            .queue_declare(
                shard_queue_name(shard).as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                legacy.clone(),
            )
            .await
            .expect("a legacy shard queue");
    }
    let _ = connection.close(200, "declared".into()).await;
    let vhost_name = vhost.name.clone();

    let app = spawn_app_on_vhost(vhost, |_| {}).await;
    for id in 1..=20 {
        app.create_key("alice", json!({"id": id})).await;
    }
    let client = BrokerClient::connect(&app.settings.amqp.url).await;
    for id in 1..=20 {
        client
            .publish_usage(
                id,
                &json!({"event_id": format!("e{id}"), "api_key_id": id, "tokens": id}),
            )
            .await;
    }
    for id in 1..=20 {
        eventually(WAIT, &format!("key {id} counted"), || async {
            (app.stored_usage(id).await == id).then_some(())
        })
        .await;
    }
    for shard in 0..shards {
        let arguments = queue_arguments(&vhost_name, &shard_queue_name(shard));
        assert!(!arguments.contains("x-queue-version"), "{arguments}");
    }
}
