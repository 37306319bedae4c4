//! The AMQP topology of SPEC §2 and §4 and TOPOLOGY.md, declared idempotently at every (re)connect:
//! sharded when the broker has the consistent-hash exchange type, else one queue for every key.

use std::sync::atomic::{AtomicBool, Ordering};

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind};

/// Public exchange for usage events (fanout, bound into the shard exchange).
pub const USAGE_EXCHANGE: &str = "quota.usage";
/// Public exchange for check requests (fanout, bound into the shard exchange).
pub const CHECK_EXCHANGE: &str = "quota.check";
/// Public exchange the service publishes threshold alerts to (topic, `<percent>.<api_key_id>`).
pub const ALERTS_EXCHANGE: &str = "quota.alerts";
/// Internal consistent-hash exchange: the routing key (the key id) picks the shard queue.
pub const SHARD_EXCHANGE: &str = "quota.shard";
/// Durable queue of refused usage messages, each with an `x-quota-error` header.
pub const DEAD_LETTER_QUEUE: &str = "quota.usage.dead";
/// Header carrying the reason a usage message was dead-lettered.
pub const ERROR_HEADER: &str = "x-quota-error";

/// The one queue of every key when the broker lacks the consistent-hash exchange type.
pub const SINGLE_QUEUE: &str = "quota.shard.all";
/// The command that gives a stock RabbitMQ the consistent-hash exchange type.
pub const ENABLE_PLUGIN_COMMAND: &str = "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange";

/// The storage format of the owner queues: on the 16 shard queues, classic queue version 2
/// (RabbitMQ 3.10 and later) costs the broker about half the work of version 1 per persistent
/// message consumed soon after it was published, the broker's writing included (BENCHMARKS.md).
/// Older brokers ignore it.
const QUEUE_VERSION: i32 = 2;
/// The argument that sets `QUEUE_VERSION` at declaration.
const QUEUE_VERSION_ARGUMENT: &str = "x-queue-version";
/// The command that moves owner queues declared before `QUEUE_VERSION` to it, in place.
pub const QUEUE_VERSION_POLICY_COMMAND: &str = "rabbitmqctl set_policy quota-owner-queues \
    '^quota\\.shard\\.' '{\"queue-version\":2}' --apply-to queues";
/// Set once the warning about owner queues of an older format has been logged.
static WARNED_OLD_QUEUE_VERSION: AtomicBool = AtomicBool::new(false);

/// How usage and checks reach the instance that owns their key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Through the internal consistent-hash exchange, over this many shard queues.
    Sharded(u16),
    /// Both public exchanges bound straight to `SINGLE_QUEUE` (no plugin): one owner for every
    /// key, the other instances wait as hot standbys.
    Single,
}

impl Layout {
    pub fn shard_count(self) -> u16 {
        match self {
            Layout::Sharded(shards) => shards,
            Layout::Single => 1,
        }
    }

    /// The queue of shard `shard`.
    pub fn queue(self, shard: u16) -> String {
        match self {
            Layout::Sharded(_) => shard_queue_name(shard),
            Layout::Single => SINGLE_QUEUE.to_string(),
        }
    }
}

/// What `declare_layout` found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Declared {
    pub layout: Layout,
    /// Sharded now, but `SINGLE_QUEUE` exists from a time without the plugin: it is no longer
    /// bound and must be drained of what it still holds.
    pub single_queue_left: bool,
}

/// Declares everything on connections of its own: the sharded layout if the broker knows the
/// consistent-hash exchange type, else the single queue. (RabbitMQ answers an unknown exchange
/// type by closing the whole connection.)
pub async fn declare_layout(url: &str, shards: u16) -> lapin::Result<Declared> {
    let properties =
        || ConnectionProperties::default().with_connection_name("quota-keeper-setup".into());
    let connection = Connection::connect(url, properties()).await?;
    let channel = connection.create_channel().await?;
    declare_public(&channel).await?;
    let declared = match declare_shard_exchange(&channel).await {
        Ok(()) => {
            declare_shards(&connection, channel, shards).await?;
            let single_queue_left = retire_single_queue(&connection).await?;
            Declared {
                layout: Layout::Sharded(shards),
                single_queue_left,
            }
        }
        Err(error) if is_unknown_exchange_type(&error) => {
            let connection = Connection::connect(url, properties()).await?;
            let channel = connection.create_channel().await?;
            declare_single_queue(&connection, channel).await?;
            let _ = connection.close(200, "declared".into()).await;
            Declared {
                layout: Layout::Single,
                single_queue_left: false,
            }
        }
        Err(error) => return Err(error),
    };
    let _ = connection.close(200, "declared".into()).await;
    Ok(declared)
}

/// The broker's answer to a declaration of an exchange type it does not have (no plugin).
fn is_unknown_exchange_type(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Hard(AMQPHardError::COMMANDINVALID)
    )
}

/// Zero-padded so the hash ring, rebuilt from bindings sorted by name, survives a broker restart.
pub fn shard_queue_name(shard: u16) -> String {
    format!("quota.shard.{shard:03}")
}

/// Declares the sharded layout: exchanges, shard queues, bindings and the dead-letter queue.
pub async fn declare(connection: &Connection, shards: u16) -> lapin::Result<()> {
    let channel = connection.create_channel().await?;
    declare_public(&channel).await?;
    declare_shard_exchange(&channel).await?;
    declare_shards(connection, channel, shards).await
}

/// The public exchanges and the dead-letter queue, the same in both layouts. The alerts
/// publisher does not declare `quota.alerts` itself: it is declared here, at every connect.
async fn declare_public(channel: &Channel) -> lapin::Result<()> {
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
            ALERTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            DEAD_LETTER_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Arguments of every queue a key's messages wait in; `versioned`: in `QUEUE_VERSION`'s format.
fn owner_queue_arguments(versioned: bool) -> FieldTable {
    let mut arguments = FieldTable::default();
    // One consumer per queue at a time: the owner of a shard owns its keys.
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    // Checks (priority 1) overtake queued usage events.
    arguments.insert("x-max-priority".into(), AMQPValue::LongInt(1));
    if versioned {
        arguments.insert(
            QUEUE_VERSION_ARGUMENT.into(),
            AMQPValue::LongInt(QUEUE_VERSION),
        );
    }
    arguments
}

/// Declares an owner queue in `QUEUE_VERSION`'s format, or as it is if it was declared before
/// that format was asked for: RabbitMQ refuses a declaration whose arguments differ, and if the
/// declaration without the format is accepted the queue is of the older one. The service keeps
/// working on it, and the warning names the policy that converts it in place. Returns the
/// channel to go on with (a refused declaration closes its channel).
async fn declare_owner_queue(
    connection: &Connection,
    channel: Channel,
    queue: &str,
) -> lapin::Result<Channel> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(queue.into(), durable, owner_queue_arguments(true))
        .await;
    match declared {
        Ok(_) => Ok(channel),
        Err(error) if is_precondition_failed(&error) => {
            let channel = connection.create_channel().await?;
            channel
                .queue_declare(queue.into(), durable, owner_queue_arguments(false))
                .await?;
            if !WARNED_OLD_QUEUE_VERSION.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    queue,
                    "owner queues of an older storage format: the broker does about twice the \
                     work per usage event on them. Convert them in place with `{}`",
                    QUEUE_VERSION_POLICY_COMMAND
                );
            }
            Ok(channel)
        }
        Err(error) => Err(error),
    }
}

/// The broker's answer to a declaration whose arguments differ from the existing queue's.
fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

async fn declare_shard_exchange(channel: &Channel) -> lapin::Result<()> {
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
        .await
}

async fn declare_shards(
    connection: &Connection,
    channel: Channel,
    shards: u16,
) -> lapin::Result<()> {
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
    let queues: Vec<String> = (0..shards).map(shard_queue_name).collect();
    // Declared at once, each on a channel of its own (a refused declaration closes its channel):
    // a start or a reconnect waits for one round trip instead of one per queue.
    futures::future::try_join_all(queues.iter().map(|queue| async move {
        let channel = connection.create_channel().await?;
        let channel = declare_owner_queue(connection, channel, queue).await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok::<_, lapin::Error>(())
    }))
    .await?;
    // Bound one after the other in shard order: the ring is built in the order of its bindings
    // (TOPOLOGY.md). Binding key = weight on the ring; equal weights spread keys evenly.
    for queue in &queues {
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
    Ok(())
}

/// The single layout: `SINGLE_QUEUE` with both public exchanges bound straight to it.
async fn declare_single_queue(connection: &Connection, channel: Channel) -> lapin::Result<()> {
    // The public exchanges exist: `declare_layout` declared them before it tried the shard exchange.
    let channel = declare_owner_queue(connection, channel, SINGLE_QUEUE).await?;
    for public in [USAGE_EXCHANGE, CHECK_EXCHANGE] {
        channel
            .queue_bind(
                SINGLE_QUEUE.into(),
                public.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// After a move to the sharded layout: unbinds `SINGLE_QUEUE` if it exists, so nothing new
/// reaches it; returns whether it exists (and may hold messages to drain).
async fn retire_single_queue(connection: &Connection) -> lapin::Result<bool> {
    // A passive declare of a missing queue closes its channel: a channel of its own.
    let channel = connection.create_channel().await?;
    let exists = channel
        .queue_declare(
            SINGLE_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    if exists {
        for public in [USAGE_EXCHANGE, CHECK_EXCHANGE] {
            channel
                .queue_unbind(
                    SINGLE_QUEUE.into(),
                    public.into(),
                    "".into(),
                    FieldTable::default(),
                )
                .await?;
        }
        let _ = channel.close(200, "retired".into()).await;
    }
    Ok(exists)
}
