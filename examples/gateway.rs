//! What an LLM gateway does around one request: ask quota-keeper whether the key may spend about
//! `estimate` tokens, run the request, then report the tokens it used, with publisher confirms.
//!
//! `cargo run --example gateway -- 42 800 1350` (key, estimate, used); the broker is
//! `QUOTA__AMQP__URL` or the local default. Exit code 1 when the key is denied.

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{json, Value};
use std::time::Duration;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// RabbitMQ's direct reply-to: replies come straight back to the channel that consumes it.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// One gateway request: the check's reply, and the usage event it reported if it was allowed.
pub async fn gateway_request(
    amqp_url: &str,
    api_key_id: i64,
    estimate: i64,
    used: i64,
) -> Result<(Value, Option<Value>), Error> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let checks = connection.create_channel().await?;
    let mut replies = checks
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
    let usage = connection.create_channel().await?;
    usage
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let reply = check(&checks, &mut replies, api_key_id, estimate).await?;
    let mut reported = None;
    if reply["allowed"] == true {
        // ... the inference runs here, and costs `used` tokens ...
        let event = json!({
            "event_id": uuid::Uuid::new_v4().to_string(), // idempotency key: reuse it on retries
            "api_key_id": api_key_id,
            "tokens": used,
            "occurred_at": chrono::Utc::now().to_rfc3339(),
        });
        report_usage(&usage, &event).await?;
        reported = Some(event);
    }
    connection.close(200, "done".into()).await?;
    Ok((reply, reported))
}

/// Publishes a check to `quota.check` and waits up to 2 s for the reply with its correlation id.
async fn check(
    channel: &Channel,
    replies: &mut Consumer,
    api_key_id: i64,
    estimate: i64,
) -> Result<Value, Error> {
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let request = json!({"api_key_id": api_key_id, "tokens": estimate});
    channel
        .basic_publish(
            "quota.check".into(),
            api_key_id.to_string().as_str().into(), // the routing key is always the key id
            BasicPublishOptions::default(),
            &serde_json::to_vec(&request)?,
            BasicProperties::default()
                .with_reply_to(DIRECT_REPLY_TO.into())
                .with_correlation_id(correlation_id.as_str().into())
                .with_priority(1) // overtakes usage events queued for the key
                .with_expiration("2000".into()) // not answered once we stop waiting
                .with_content_type("application/json".into()),
        )
        .await?;
    let wait = async {
        while let Some(delivery) = replies.next().await {
            let delivery = delivery?;
            if delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|id| id.as_str())
                == Some(correlation_id.as_str())
            {
                return Ok(serde_json::from_slice(&delivery.data)?);
            }
        }
        Err("the reply consumer was closed".into())
    };
    tokio::time::timeout(Duration::from_secs(2), wait).await?
}

/// Publishes a usage event persistently to `quota.usage` and waits for the broker's confirm.
async fn report_usage(channel: &Channel, event: &Value) -> Result<(), Error> {
    let confirm = channel
        .basic_publish(
            "quota.usage".into(),
            event["api_key_id"].to_string().as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &serde_json::to_vec(event)?,
            BasicProperties::default()
                .with_delivery_mode(2) // persistent
                .with_content_type("application/json".into()),
        )
        .await?
        .await?;
    // Not acknowledged, or returned unroutable: publish again with the same event_id.
    if !confirm.is_ack() || confirm.take_message().is_some() {
        return Err("the broker did not take the usage event".into());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<std::process::ExitCode, Error> {
    let url = std::env::var("QUOTA__AMQP__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let numbers: Vec<i64> = std::env::args()
        .skip(1)
        .map(|arg| arg.parse())
        .collect::<Result<_, _>>()?;
    let [api_key_id, estimate, used] = numbers[..] else {
        return Err("usage: gateway KEY ESTIMATE USED".into());
    };
    let (reply, reported) = gateway_request(&url, api_key_id, estimate, used).await?;
    println!("check: {reply}");
    match reported {
        Some(event) => println!("usage: {event}"),
        None => return Ok(std::process::ExitCode::FAILURE),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
