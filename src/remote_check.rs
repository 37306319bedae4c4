//! A check over RabbitMQ as a gateway asks it (SPEC §2.2), for the `check` command: direct
//! reply-to, priority 1, a correlation id and a timeout.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::amqp::topology::CHECK_EXCHANGE;
use crate::domain::check::CheckReply;
use crate::domain::outcome::CheckOutcome;

/// RabbitMQ's pseudo-queue for replies straight to the consuming channel, nothing declared.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The reply to a check, as received and as decoded.
#[derive(Debug)]
pub struct RemoteCheckReply {
    /// The reply body as the service sent it (JSON).
    pub body: String,
    pub reply: CheckReply,
}

/// What the command makes of a reply: its exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckVerdict {
    /// 200: the key may make the request.
    Allowed,
    /// 429 (quota reached) or 404 (unknown key under `check.unknown_key = "deny"`).
    Denied,
    /// 400 or 503: the service could not decide.
    Undecided,
}

impl RemoteCheckReply {
    pub fn verdict(&self) -> CheckVerdict {
        match self.reply.outcome {
            CheckOutcome::Allowed | CheckOutcome::UnknownKey { allowed: true } => {
                CheckVerdict::Allowed
            }
            CheckOutcome::QuotaReached | CheckOutcome::UnknownKey { allowed: false } => {
                CheckVerdict::Denied
            }
            CheckOutcome::Malformed | CheckOutcome::Unavailable => CheckVerdict::Undecided,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteCheckError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("no reply within {} ms (is quota-keeper running and consuming?)", .0.as_millis())]
    TimedOut(Duration),
    #[error("the reply consumer was closed by the broker")]
    RepliesClosed,
    #[error("the reply is not a check reply: {0}")]
    UnreadableReply(#[from] serde_json::Error),
}

/// Publishes a check of `api_key_id` (with the estimate `tokens`, if any) to `quota.check` and
/// waits for the reply with its correlation id; `timeout` bounds everything, the connection included.
pub async fn check_over_amqp(
    amqp_url: &str,
    api_key_id: i64,
    tokens: Option<i64>,
    timeout: Duration,
) -> Result<RemoteCheckReply, RemoteCheckError> {
    let exchange = async {
        let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
        let result = ask(&connection, api_key_id, tokens, timeout).await;
        let _ = connection.close(200, "checked".into()).await;
        result
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(RemoteCheckError::TimedOut(timeout)))
}

async fn ask(
    connection: &Connection,
    api_key_id: i64,
    tokens: Option<i64>,
    timeout: Duration,
) -> Result<RemoteCheckReply, RemoteCheckError> {
    let channel = connection.create_channel().await?;
    // Direct reply-to delivers only to the channel that consumes it, and only without acks.
    let mut replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut request = serde_json::json!({ "api_key_id": api_key_id });
    if let Some(tokens) = tokens {
        request["tokens"] = tokens.into();
    }
    let correlation_id = uuid::Uuid::new_v4().to_string();
    channel
        .basic_publish(
            CHECK_EXCHANGE.into(),
            api_key_id.to_string().as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&request)?,
            BasicProperties::default()
                .with_reply_to(DIRECT_REPLY_TO.into())
                .with_correlation_id(correlation_id.as_str().into())
                // Overtakes usage events queued for the same key.
                .with_priority(1)
                // Not answered once we have stopped waiting.
                .with_expiration(timeout.as_millis().to_string().as_str().into())
                .with_content_type("application/json".into()),
        )
        .await?;
    while let Some(delivery) = replies.next().await {
        let delivery = delivery?;
        let echoed = delivery.properties.correlation_id().as_ref();
        if echoed.map(|id| id.as_str()) != Some(correlation_id.as_str()) {
            continue;
        }
        let reply: CheckReply = serde_json::from_slice(&delivery.data)?;
        return Ok(RemoteCheckReply {
            body: String::from_utf8_lossy(&delivery.data).into_owned(),
            reply,
        });
    }
    Err(RemoteCheckError::RepliesClosed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdict on a reply as received, `status` and `known` as the service sends them.
    fn verdict_on(status: u16, known: bool) -> CheckVerdict {
        let body = format!(
            r#"{{"api_key_id": 42, "known": {known}, "allowed": false, "status": {status},
                "token_quota_monthly": null, "tokens_used_this_month": 0, "remaining": null,
                "quota_reset_at": null, "detail": null}}"#
        );
        RemoteCheckReply {
            body: String::new(),
            reply: serde_json::from_str(&body).expect("the test builds a valid reply"),
        }
        .verdict()
    }

    #[test]
    fn the_status_decides_the_verdict() {
        assert_eq!(verdict_on(200, true), CheckVerdict::Allowed);
        assert_eq!(verdict_on(200, false), CheckVerdict::Allowed);
        assert_eq!(verdict_on(429, true), CheckVerdict::Denied);
        assert_eq!(verdict_on(404, false), CheckVerdict::Denied);
        assert_eq!(verdict_on(400, false), CheckVerdict::Undecided);
        assert_eq!(verdict_on(503, false), CheckVerdict::Undecided);
    }
}
