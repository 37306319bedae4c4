//! RabbitMQ: a supervisor that connects, declares the topology, consumes every shard and reconnects with backoff.

pub mod acks;
pub mod consumer;
pub mod publish;
pub mod topology;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actors::registry::KeyRegistry;
use crate::clock::SharedClock;
use crate::ingest::BatchWriterHandle;
use crate::readiness::{BrokerState, Readiness};
use crate::settings::AmqpSettings;
use acks::AckSequencer;
use consumer::DeliveryContext;

/// First pause after a lost or refused connection; doubles up to `amqp.reconnect_max_backoff_ms`.
const FIRST_RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// On shutdown, deliveries already received get this long to be handled before the final flush.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(3);

/// The broker side of the service.
pub struct AmqpService {
    pub settings: AmqpSettings,
    pub registry: KeyRegistry,
    pub writer: BatchWriterHandle,
    pub readiness: Arc<Readiness>,
    pub clock: SharedClock,
    pub shutdown: CancellationToken,
}

/// Why a session ended without an error.
enum SessionEnd {
    ShutdownRequested,
}

/// Why a session ended with one.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("the broker cancelled our consumers")]
    ConsumersEnded,
}

impl AmqpService {
    /// Runs sessions until shutdown, reconnecting with backoff after each failure.
    pub async fn run(self) {
        let mut backoff = FIRST_RECONNECT_BACKOFF;
        let max_backoff = Duration::from_millis(self.settings.reconnect_max_backoff_ms);
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            match self.run_session(&mut backoff).await {
                Ok(SessionEnd::ShutdownRequested) => break,
                Err(error) => {
                    let mut reason = format!("broker: {error}");
                    if reason.contains("x-consistent-hash") || reason.contains("exchange type") {
                        reason.push_str(" (enable it: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)");
                    }
                    tracing::warn!(reason = %reason, retry_in_ms = backoff.as_millis() as u64, "AMQP session ended");
                    self.readiness.set_broker(BrokerState::Down(reason));
                    // Another instance may own these keys now; reload them when they come back.
                    self.registry.evict_all();
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
        self.readiness
            .set_broker(BrokerState::Down("stopped".into()));
    }

    async fn run_session(&self, backoff: &mut Duration) -> Result<SessionEnd, SessionError> {
        self.readiness
            .set_broker(BrokerState::Down("connecting".into()));
        let connection = Connection::connect(
            &with_heartbeat(&self.settings.url, self.settings.heartbeat_secs),
            ConnectionProperties::default().with_connection_name("quota-keeper".into()),
        )
        .await?;
        let setup = connection.create_channel().await?;
        topology::declare(&setup, self.settings.shards).await?;
        let replies = connection.create_channel().await?;
        let dead_letters = connection.create_channel().await?;
        dead_letters
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let context = Arc::new(DeliveryContext {
            registry: self.registry.clone(),
            writer: self.writer.clone(),
            replies,
            dead_letters,
            clock: self.clock.clone(),
        });

        let mut consumers = Vec::with_capacity(usize::from(self.settings.shards));
        let mut shard_channels = Vec::with_capacity(usize::from(self.settings.shards));
        for shard in 0..self.settings.shards {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(self.settings.prefetch, BasicQosOptions::default())
                .await?;
            let tag = format!("quota-keeper-{}-{shard:03}", std::process::id());
            let consumer = channel
                .basic_consume(
                    topology::shard_queue_name(shard).as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push(consumer);
            shard_channels.push((channel, tag));
        }
        self.readiness.set_broker(BrokerState::Consuming);
        tracing::info!(shards = self.settings.shards, "consuming from RabbitMQ");
        *backoff = FIRST_RECONNECT_BACKOFF;

        let in_flight = TaskTracker::new();
        // One sequencer per shard channel; each delivery is tagged with its channel's index.
        let sequencers: Vec<AckSequencer> =
            consumers.iter().map(|_| AckSequencer::start()).collect();
        let mut deliveries = futures::stream::select_all(
            consumers
                .into_iter()
                .enumerate()
                .map(|(shard, consumer)| consumer.map(move |delivery| (shard, delivery))),
        );
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    // Stop new deliveries, let received ones reach the writer, commit, acknowledge, close.
                    for (channel, tag) in &shard_channels {
                        let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    }
                    in_flight.close();
                    let _ = tokio::time::timeout(IN_FLIGHT_GRACE, in_flight.wait()).await;
                    self.writer.flush().await;
                    futures::future::join_all(sequencers.iter().map(AckSequencer::sent)).await;
                    let _ = connection.close(200, "shutting down".into()).await;
                    return Ok(SessionEnd::ShutdownRequested);
                }
                next = deliveries.next() => match next {
                    Some((shard, Ok(delivery))) => {
                        let handled = consumer::handle_delivery(
                            delivery,
                            Arc::clone(&context),
                            &sequencers[shard],
                        );
                        in_flight.spawn(handled);
                    }
                    Some((_, Err(error))) => return Err(error.into()),
                    None => return Err(SessionError::ConsumersEnded),
                }
            }
        }
    }
}

/// Adds `heartbeat=N` to the URL unless it sets one.
fn with_heartbeat(url: &str, heartbeat_secs: u16) -> String {
    if url.contains("heartbeat=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&heartbeat={heartbeat_secs}")
    } else {
        format!("{url}?heartbeat={heartbeat_secs}")
    }
}
