//! A test client of the broker: publishes usage with confirms, asks checks over direct reply-to.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::Value;

pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Consumes RabbitMQ's direct reply-to pseudo-queue: without acks, on the channel that will
/// publish the requests (replies only reach that channel).
pub async fn consume_direct_replies(channel: &Channel) -> Consumer {
    channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("direct reply-to can be consumed")
}

pub struct BrokerClient {
    _connection: Connection,
    publisher: Channel,
    rpc: Channel,
    replies: Consumer,
}

impl BrokerClient {
    pub async fn connect(url: &str) -> BrokerClient {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("the test vhost accepts guest");
        let publisher = connection.create_channel().await.unwrap();
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let rpc = connection.create_channel().await.unwrap();
        let replies = consume_direct_replies(&rpc).await;
        BrokerClient {
            _connection: connection,
            publisher,
            rpc,
            replies,
        }
    }

    /// Publishes a persistent message to `exchange` with routing key `routing_key` and waits for the confirm.
    pub async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8]) {
        let confirm = self
            .publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker confirms the publish");
    }

    /// Publishes a usage event for `key` with the given JSON.
    pub async fn publish_usage(&self, key: i64, event: &Value) {
        self.publish(
            "quota.usage",
            &key.to_string(),
            &serde_json::to_vec(event).unwrap(),
        )
        .await;
    }

    /// Sends a check request body for `key` and waits for the reply with the same correlation id.
    pub async fn check_raw(&mut self, key: &str, body: &[u8]) -> Value {
        self.ask(key, body, Duration::from_secs(10), None)
            .await
            .expect("a reply within 10 s")
    }

    /// A check that gives up after `within` (`None`): published with that expiration, so an
    /// unanswered request is not answered later.
    pub async fn try_check(&mut self, key: i64, within: Duration) -> Option<Value> {
        let body = serde_json::json!({ "api_key_id": key }).to_string();
        self.ask(&key.to_string(), body.as_bytes(), within, Some(within))
            .await
    }

    /// Publishes a check to `quota.check` and waits up to `within` for its reply, skipping
    /// replies to earlier requests.
    async fn ask(
        &mut self,
        key: &str,
        body: &[u8],
        within: Duration,
        expiration: Option<Duration>,
    ) -> Option<Value> {
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let mut properties = BasicProperties::default()
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(correlation_id.as_str().into())
            .with_priority(1)
            .with_content_type("application/json".into());
        if let Some(expiration) = expiration {
            properties =
                properties.with_expiration(expiration.as_millis().to_string().as_str().into());
        }
        self.rpc
            .basic_publish(
                "quota.check".into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .ok()?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let delivery = tokio::time::timeout_at(deadline, self.replies.next())
                .await
                .ok()??
                .ok()?;
            if delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|id| id.as_str())
                == Some(correlation_id.as_str())
            {
                return serde_json::from_slice(&delivery.data).ok();
            }
        }
    }

    /// Publishes every body in `bodies` as a check of `key` before reading any reply (pipelined,
    /// as concurrent gateway requests arrive), then returns the replies in request order.
    pub async fn check_pipelined(&mut self, key: i64, bodies: &[Value]) -> Vec<Value> {
        let mut order = std::collections::HashMap::new();
        for (index, body) in bodies.iter().enumerate() {
            let correlation_id = uuid::Uuid::new_v4().to_string();
            order.insert(correlation_id.clone(), index);
            self.rpc
                .basic_publish(
                    "quota.check".into(),
                    key.to_string().as_str().into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(body).unwrap(),
                    BasicProperties::default()
                        .with_reply_to(DIRECT_REPLY_TO.into())
                        .with_correlation_id(correlation_id.as_str().into())
                        .with_priority(1)
                        .with_content_type("application/json".into()),
                )
                .await
                .unwrap();
        }
        let mut replies = vec![Value::Null; bodies.len()];
        let mut received = 0;
        while received < bodies.len() {
            let delivery = tokio::time::timeout(Duration::from_secs(10), self.replies.next())
                .await
                .expect("every reply within 10 s")
                .expect("the reply consumer is open")
                .expect("a reply delivery");
            let echoed = delivery.properties.correlation_id().as_ref();
            if let Some(&index) = echoed.and_then(|id| order.get(id.as_str())) {
                replies[index] = serde_json::from_slice(&delivery.data).expect("replies are JSON");
                received += 1;
            }
        }
        replies
    }

    pub async fn check(&mut self, key: i64, tokens: Option<i64>) -> Value {
        let body = match tokens {
            Some(tokens) => serde_json::json!({"api_key_id": key, "tokens": tokens}),
            None => serde_json::json!({"api_key_id": key}),
        };
        self.check_raw(&key.to_string(), &serde_json::to_vec(&body).unwrap())
            .await
    }

    /// Publishes a check without `reply_to`.
    pub async fn check_without_reply_to(&self, key: i64) {
        self.rpc
            .basic_publish(
                "quota.check".into(),
                key.to_string().as_str().into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&serde_json::json!({"api_key_id": key})).unwrap(),
                BasicProperties::default().with_priority(1),
            )
            .await
            .unwrap();
    }

    /// Takes every message now in `quota.usage.dead`: (body, x-quota-error).
    pub async fn drain_dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        let mut letters = Vec::new();
        while let Some(message) = self
            .publisher
            .basic_get("quota.usage.dead".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let reason = message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|headers| {
                    headers
                        .inner()
                        .get(&lapin::types::ShortString::from("x-quota-error"))
                        .cloned()
                })
                .map(|value| match value {
                    lapin::types::AMQPValue::LongString(text) => text.to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            letters.push((message.delivery.data.clone(), reason));
        }
        letters
    }
}
