//! A consumer of `quota.alerts` for tests: a durable queue of its own bound with `#`, read in order.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde_json::Value;

pub const ALERTS_EXCHANGE: &str = "quota.alerts";

/// One alert as it arrived: its routing key and JSON body.
#[derive(Clone, Debug)]
pub struct Received {
    pub routing_key: String,
    pub body: Value,
}

impl Received {
    pub fn alert_id(&self) -> &str {
        self.body["alert_id"].as_str().unwrap_or_default()
    }
}

/// Reads the alerts of a vhost from a durable queue, so alerts published while the listener is
/// disconnected wait for it.
pub struct AlertListener {
    url: String,
    queue: String,
    _connection: Connection,
    consumer: Consumer,
}

impl AlertListener {
    /// Declares `quota.alerts` as the service does (it may not have started yet), a queue, the
    /// `#` binding, and consumes.
    pub async fn bind(url: &str) -> AlertListener {
        let queue = format!("test.alerts.{}", uuid::Uuid::new_v4().simple());
        Self::consume(url, queue, true).await
    }

    /// Reconnects to the same queue (after the broker closed the connection).
    pub async fn reconnect(self) -> AlertListener {
        let AlertListener { url, queue, .. } = self;
        Self::consume(&url, queue, false).await
    }

    async fn consume(url: &str, queue: String, declare: bool) -> AlertListener {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("the test vhost accepts guest");
        let channel = connection.create_channel().await.expect("a channel");
        if declare {
            declare_alerts_exchange(&channel).await;
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("the test queue is declared");
            channel
                .queue_bind(
                    queue.as_str().into(),
                    ALERTS_EXCHANGE.into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("the test queue is bound");
        }
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("the test queue is consumed");
        AlertListener {
            url: url.to_string(),
            queue,
            _connection: connection,
            consumer,
        }
    }

    /// The next alert, within `within`; panics naming `what` otherwise.
    pub async fn next(&mut self, within: Duration, what: &str) -> Received {
        let delivery = tokio::time::timeout(within, self.consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no alert within {within:?}: expected {what}"))
            .expect("the alert consumer is open")
            .expect("an alert delivery");
        delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("the alert is acknowledged");
        assert_eq!(
            delivery.properties.delivery_mode(),
            &Some(2),
            "alerts are persistent"
        );
        Received {
            routing_key: delivery.routing_key.to_string(),
            body: serde_json::from_slice(&delivery.data).expect("alerts are JSON"),
        }
    }

    /// The next `count` alerts' routing keys, in arrival order.
    pub async fn next_keys(&mut self, count: usize, within: Duration) -> Vec<String> {
        let mut keys = Vec::with_capacity(count);
        for index in 0..count {
            keys.push(
                self.next(within, &format!("alert {} of {count}", index + 1))
                    .await
                    .routing_key,
            );
        }
        keys
    }
}

/// Declares `quota.alerts` exactly as the service does.
pub async fn declare_alerts_exchange(channel: &lapin::Channel) {
    channel
        .exchange_declare(
            ALERTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("quota.alerts is declared");
}

/// The write permission of `guest` in a test vhost: everything but `quota.alerts`.
const WRITE_ALL_BUT_ALERTS: &str = r"^(?!quota\.alerts$).*";

/// Refuses `guest` the right to publish to `quota.alerts` in `vhost`: the service's publisher
/// cannot send, while the exchange and its bindings stay, so what it sends once allowed again
/// is routed at once. (Deleting the exchange instead left a gap between declaring it again and
/// binding a queue to it, where an alert published by a retry went nowhere.) RabbitMQ remembers a
/// channel's granted checks, so this stops only channels that have not published there yet; the
/// publisher opens a new one after each failure.
pub fn refuse_alert_publishing(vhost: &str) {
    super::rabbitmqctl(&[
        "set_permissions",
        "-p",
        vhost,
        "guest",
        ".*",
        WRITE_ALL_BUT_ALERTS,
        ".*",
    ]);
}

/// Undoes [`refuse_alert_publishing`]: the permissions every test vhost starts with.
pub fn allow_alert_publishing(vhost: &str) {
    super::grant_guest_everything(vhost);
}
