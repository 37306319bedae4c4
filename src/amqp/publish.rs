//! Publishing one usage event with publisher confirms, for the `publish` command and for tools.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Serialize;

use super::topology::USAGE_EXCHANGE;

/// A usage event as clients send it (SPEC §2.1).
#[derive(Clone, Debug, Serialize)]
pub struct UsageMessage {
    pub event_id: String,
    pub api_key_id: i64,
    pub tokens: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Refused,
}

/// Publishes `message` persistently to `quota.usage` and waits for the broker's confirm.
pub async fn publish_usage(amqp_url: &str, message: &UsageMessage) -> Result<(), PublishError> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = serde_json::to_vec(message).expect("a UsageMessage always serializes");
    let confirmation = channel
        .basic_publish(
            USAGE_EXCHANGE.into(),
            message.api_key_id.to_string().as_str().into(),
            // Mandatory: an exchange without the service's bindings returns the message instead of dropping it.
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            BasicProperties::default()
                .with_delivery_mode(super::PERSISTENT)
                .with_content_type("application/json".into()),
        )
        .await?
        .await?;
    let _ = connection.close(200, "published".into()).await;
    if confirmation.is_ack() && confirmation.take_message().is_none() {
        Ok(())
    } else {
        Err(PublishError::Refused)
    }
}
