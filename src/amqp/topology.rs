//! The AMQP topology of SPEC §2 and TOPOLOGY.md, declared idempotently at every (re)connect.

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// Public exchange for usage events (fanout, bound into the shard exchange).
pub const USAGE_EXCHANGE: &str = "quota.usage";
/// Public exchange for check requests (fanout, bound into the shard exchange).
pub const CHECK_EXCHANGE: &str = "quota.check";
/// Internal consistent-hash exchange: the routing key (the key id) picks the shard queue.
pub const SHARD_EXCHANGE: &str = "quota.shard";
/// Durable queue of refused usage messages, each with an `x-quota-error` header.
pub const DEAD_LETTER_QUEUE: &str = "quota.usage.dead";
/// Header carrying the reason a usage message was dead-lettered.
pub const ERROR_HEADER: &str = "x-quota-error";

/// Zero-padded so the hash ring, rebuilt from bindings sorted by name, survives a broker restart.
pub fn shard_queue_name(shard: u16) -> String {
    format!("quota.shard.{shard:03}")
}

/// Declares exchanges, shard queues, bindings and the dead-letter queue.
pub async fn declare(channel: &Channel, shards: u16) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for public in [USAGE_EXCHANGE, CHECK_EXCHANGE] {
        channel
            .exchange_declare(
                public.into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .exchange_declare(
            SHARD_EXCHANGE.into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            ExchangeDeclareOptions {
                durable: true,
                internal: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    for public in [USAGE_EXCHANGE, CHECK_EXCHANGE] {
        // Exchange-to-exchange bindings keep the routing key, so usage and checks of a key meet in one queue.
        channel
            .exchange_bind(
                SHARD_EXCHANGE.into(),
                public.into(),
                "".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let mut shard_arguments = FieldTable::default();
    // One consumer per queue at a time: the owner of a shard owns its keys.
    shard_arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    // Checks (priority 1) overtake queued usage events.
    shard_arguments.insert("x-max-priority".into(), AMQPValue::LongInt(1));
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for shard in 0..shards {
        let queue = shard_queue_name(shard);
        channel
            .queue_declare(
                queue.as_str().into(),
                durable_queue,
                shard_arguments.clone(),
            )
            .await?;
        // Binding key = weight on the consistent-hash ring; equal weights spread keys evenly.
        channel
            .queue_bind(
                queue.as_str().into(),
                SHARD_EXCHANGE.into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .queue_declare(
            DEAD_LETTER_QUEUE.into(),
            durable_queue,
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
