//! RabbitMQ: a supervisor that connects (one connection per key-actor arbiter), declares the topology, consumes every shard and reconnects with backoff.

pub mod acks;
pub mod consumer;
pub mod publish;
pub mod replies;
pub mod topology;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::{mpsc, oneshot};
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
/// A connection that does not close in this time (the broker is gone) is left to drop.
const CONNECTION_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

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
    #[error("the key actors' arbiters have stopped")]
    ArbitersStopped,
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
        let lane_count = self
            .registry
            .arbiter_count()
            .min(usize::from(self.settings.shards))
            .max(1);
        // Cancelled when this session ends, however it ends: every shard loop stops with it.
        let session_over = self.shutdown.child_token();
        let _stop_shard_loops = session_over.clone().drop_guard();
        let (ended, mut shard_ended) = mpsc::unbounded_channel();
        let in_flight = TaskTracker::new();
        let mut lanes = Vec::with_capacity(lane_count);
        for index in 0..lane_count {
            let plan = LanePlan {
                index,
                shards: (0..self.settings.shards)
                    .filter(|shard| usize::from(*shard) % lane_count == index)
                    .collect(),
                // The first lane declares the topology before any lane consumes.
                declare_topology: index == 0,
                settings: self.settings.clone(),
                registry: self.registry.homed(index),
                writer: self.writer.clone(),
                clock: self.clock.clone(),
                in_flight: in_flight.clone(),
                stop: session_over.clone(),
                ended: ended.clone(),
            };
            let (opened, lane) = oneshot::channel();
            let lane = if self
                .registry
                .spawn_on_arbiter(index, open_lane(plan, opened))
            {
                lane.await.unwrap_or(Err(SessionError::ArbitersStopped))
            } else {
                Err(SessionError::ArbitersStopped)
            };
            match lane {
                Ok(lane) => lanes.push(lane),
                Err(error) => {
                    close_lanes(&lanes).await;
                    return Err(error);
                }
            }
        }
        drop(ended);
        self.readiness.set_broker(BrokerState::Consuming);
        tracing::info!(
            shards = self.settings.shards,
            connections = lane_count,
            "consuming from RabbitMQ"
        );
        *backoff = FIRST_RECONNECT_BACKOFF;

        let end = tokio::select! {
            // Shutdown first: it also stops every shard loop, and when the last one has dropped
            // its sender `shard_ended` yields `None` too; left to chance, the select then took
            // that for lost consumers and skipped the flush, leaving committed events
            // unacknowledged (1 stop in 20 under load).
            biased;
            _ = self.shutdown.cancelled() => {
                // Stop new deliveries, let received ones reach the writer, commit, acknowledge, close.
                for (channel, tag) in lanes.iter().flat_map(|lane| &lane.consumers) {
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                }
                in_flight.close();
                let _ = tokio::time::timeout(IN_FLIGHT_GRACE, in_flight.wait()).await;
                self.writer.flush().await;
                let sequencers = lanes.iter().flat_map(|lane| &lane.sequencers);
                futures::future::join_all(sequencers.map(AckSequencer::sent)).await;
                Ok(SessionEnd::ShutdownRequested)
            }
            error = shard_ended.recv() => Err(error.unwrap_or(SessionError::ConsumersEnded)),
        };
        close_lanes(&lanes).await;
        end
    }
}

/// One broker connection of a session and the shards it consumes, run on one key-actor arbiter.
///
/// lapin drives a connection's socket readiness and its acknowledgements on the runtime that
/// opened it. Opening each connection on an arbiter, consuming its shards there and starting the
/// actors of their keys there keeps a check on two threads, that arbiter and lapin's I/O thread,
/// as in a bare echo server; one connection for all shards on the main thread put every check
/// through three or four (BENCHMARKS.md). One lane per arbiter spreads the shards over the cores.
struct Lane {
    connection: Arc<Connection>,
    /// Each shard channel with its consumer tag, to cancel on shutdown.
    consumers: Vec<(Channel, String)>,
    /// One per shard channel: its acknowledgements in delivery order.
    sequencers: Vec<AckSequencer>,
}

/// Everything a lane needs to open and run on its arbiter.
struct LanePlan {
    index: usize,
    shards: Vec<u16>,
    declare_topology: bool,
    settings: AmqpSettings,
    /// Homed on the lane's arbiter.
    registry: KeyRegistry,
    writer: BatchWriterHandle,
    clock: SharedClock,
    in_flight: TaskTracker,
    stop: CancellationToken,
    ended: mpsc::UnboundedSender<SessionError>,
}

/// Runs on the lane's arbiter: connects, starts a loop per shard there and reports the lane.
async fn open_lane(plan: LanePlan, opened: oneshot::Sender<Result<Lane, SessionError>>) {
    let result = connect_lane(plan).await.map(|(lane, shard_loops)| {
        for shard_loop in shard_loops {
            tokio::spawn(shard_loop);
        }
        lane
    });
    let _ = opened.send(result.map_err(SessionError::from));
}

/// Opens the lane's connection and channels and consumes its shards; returns the shard loops to run.
async fn connect_lane(
    plan: LanePlan,
) -> Result<(Lane, Vec<impl std::future::Future<Output = ()> + Send>), lapin::Error> {
    let settings = &plan.settings;
    let connection = Arc::new(
        Connection::connect(
            &with_heartbeat(&settings.url, settings.heartbeat_secs),
            ConnectionProperties::default()
                .with_connection_name(format!("quota-keeper-{}", plan.index).as_str().into()),
        )
        .await?,
    );
    if plan.declare_topology {
        let setup = connection.create_channel().await?;
        topology::declare(&setup, settings.shards).await?;
        let _ = setup.close(200, "declared".into()).await;
    }
    let replies = replies::ReplyChannel::open(Arc::clone(&connection)).await?;
    let dead_letters = connection.create_channel().await?;
    dead_letters
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let context = Arc::new(DeliveryContext {
        registry: plan.registry,
        writer: plan.writer,
        replies,
        dead_letters,
        clock: plan.clock,
    });
    let mut lane = Lane {
        connection,
        consumers: Vec::with_capacity(plan.shards.len()),
        sequencers: Vec::with_capacity(plan.shards.len()),
    };
    let mut shard_loops = Vec::with_capacity(plan.shards.len());
    for shard in plan.shards {
        let channel = lane.connection.create_channel().await?;
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
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
        let acks = AckSequencer::start();
        lane.consumers.push((channel, tag));
        lane.sequencers.push(acks.clone());
        shard_loops.push(consume_shard(
            consumer,
            Arc::clone(&context),
            acks,
            plan.in_flight.clone(),
            plan.stop.clone(),
            plan.ended.clone(),
        ));
    }
    Ok((lane, shard_loops))
}

/// Closes the lanes' connections; the broker hands their unacknowledged deliveries out again.
async fn close_lanes(lanes: &[Lane]) {
    let closing = lanes.iter().map(|lane| async {
        let close = lane.connection.close(200, "session over".into());
        let _ = tokio::time::timeout(CONNECTION_CLOSE_TIMEOUT, close).await;
    });
    futures::future::join_all(closing).await;
}

/// Hands one shard's deliveries, in order, to their handlers until the consumer ends or `stop`.
async fn consume_shard(
    mut consumer: Consumer,
    context: Arc<DeliveryContext>,
    acks: AckSequencer,
    in_flight: TaskTracker,
    stop: CancellationToken,
    ended: mpsc::UnboundedSender<SessionError>,
) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                in_flight.spawn(consumer::handle_delivery(
                    delivery,
                    Arc::clone(&context),
                    &acks,
                ));
            }
            Some(Err(error)) => {
                let _ = ended.send(error.into());
                return;
            }
            None => {
                let _ = ended.send(SessionError::ConsumersEnded);
                return;
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
