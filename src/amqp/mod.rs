//! RabbitMQ: a supervisor that connects (one connection per key-actor arbiter, one for control), declares the topology, consumes every shard, hands shards over and reconnects with backoff.

pub mod acks;
pub mod balance;
pub mod consumer;
pub mod control;
pub mod ownership;
pub mod publish;
pub mod topology;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, Consumer};
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
use control::{ControlLink, Forwarder};
use ownership::Ownership;

/// First pause after a lost or refused connection; doubles up to `amqp.reconnect_max_backoff_ms`.
const FIRST_RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// On shutdown, deliveries already received get this long to be handled before the final flush.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(3);
/// A connection that does not close in this time (the broker is gone) is left to drop.
const CONNECTION_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// After handing a shard over, this long before consuming it again (as a waiting consumer).
const REJOIN_PAUSE: Duration = Duration::from_millis(100);

/// The broker side of the service.
pub struct AmqpService {
    pub settings: AmqpSettings,
    pub registry: KeyRegistry,
    pub writer: BatchWriterHandle,
    pub readiness: Arc<Readiness>,
    pub clock: SharedClock,
    pub shutdown: CancellationToken,
    /// The shards this instance consumes actively, learned by the shard loops.
    pub ownership: Arc<Ownership>,
    /// Requests to the owners of keys, connected while a session runs.
    pub forwarder: Forwarder,
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
            let ended = self.run_session(&mut backoff).await;
            // Whatever ended the session, its shards may have another owner now: forget them.
            self.forwarder.disconnect();
            self.ownership.lose_all();
            self.registry.evict_all();
            match ended {
                Ok(SessionEnd::ShutdownRequested) => break,
                Err(error) => {
                    let mut reason = format!("broker: {error}");
                    if reason.contains("x-consistent-hash") || reason.contains("exchange type") {
                        reason.push_str(" (enable it: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)");
                    }
                    tracing::warn!(reason = %reason, retry_in_ms = backoff.as_millis() as u64, "AMQP session ended");
                    self.readiness.set_broker(BrokerState::Down(reason));
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
        let shard_loops = TaskTracker::new();
        let mut lanes = Vec::with_capacity(lane_count);
        let url = with_heartbeat(&self.settings.url, self.settings.heartbeat_secs);
        for index in 0..lane_count {
            let plan = LanePlan {
                index,
                url: url.clone(),
                shards: (0..self.settings.shards)
                    .filter(|shard| usize::from(*shard) % lane_count == index)
                    .collect(),
                // The first lane declares the topology before any lane consumes.
                declare_topology: index == 0,
                settings: self.settings.clone(),
                registry: self.registry.homed(index),
                writer: self.writer.clone(),
                clock: self.clock.clone(),
                ownership: Arc::clone(&self.ownership),
                shard_loops: shard_loops.clone(),
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
        // Heard by the others only now that this instance waits on every shard queue.
        let control = match ControlLink::open(&url, self.ownership.instance()).await {
            Ok(control) => control,
            Err(error) => {
                close_lanes(&lanes).await;
                return Err(error.into());
            }
        };
        let control_stop = CancellationToken::new();
        let mut control_task = tokio::spawn(control.run(
            Arc::clone(&self.ownership),
            self.forwarder.clone(),
            control_stop.clone(),
        ));
        drop(ended);
        self.readiness.set_broker(BrokerState::Consuming);
        tracing::info!(
            shards = self.settings.shards,
            connections = lane_count,
            instance = self.ownership.instance(),
            "consuming from RabbitMQ"
        );
        *backoff = FIRST_RECONNECT_BACKOFF;

        let end = tokio::select! {
            _ = self.shutdown.cancelled() => {
                // Say goodbye, stop taking deliveries, let received ones reach the writer, commit,
                // acknowledge (each shard loop), then close: the shards pass to the next instance.
                control_stop.cancel();
                shard_loops.close();
                shard_loops.wait().await;
                let _ = tokio::time::timeout(CONNECTION_CLOSE_TIMEOUT, &mut control_task).await;
                Ok(SessionEnd::ShutdownRequested)
            }
            error = shard_ended.recv() => Err(error.unwrap_or(SessionError::ConsumersEnded)),
            control = &mut control_task => Err(match control {
                Ok(Err(error)) => error.into(),
                _ => SessionError::ConsumersEnded,
            }),
        };
        control_stop.cancel();
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
}

/// Everything a lane needs to open and run on its arbiter.
struct LanePlan {
    index: usize,
    url: String,
    shards: Vec<u16>,
    declare_topology: bool,
    settings: AmqpSettings,
    /// Homed on the lane's arbiter.
    registry: KeyRegistry,
    writer: BatchWriterHandle,
    clock: SharedClock,
    ownership: Arc<Ownership>,
    shard_loops: TaskTracker,
    stop: CancellationToken,
    ended: mpsc::UnboundedSender<SessionError>,
}

/// Runs on the lane's arbiter: connects, starts a loop per shard there and reports the lane.
async fn open_lane(plan: LanePlan, opened: oneshot::Sender<Result<Lane, SessionError>>) {
    let _ = opened.send(connect_lane(plan).await.map_err(SessionError::from));
}

/// Opens the lane's connection and the channels its shards share, and starts the shard loops.
async fn connect_lane(plan: LanePlan) -> Result<Lane, lapin::Error> {
    let settings = &plan.settings;
    let connection = Arc::new(
        Connection::connect(
            &plan.url,
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
    let replies = connection.create_channel().await?;
    let dead_letters = connection.create_channel().await?;
    dead_letters
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for shard in plan.shards {
        let context = Arc::new(DeliveryContext {
            registry: plan.registry.on_shard(shard),
            writer: plan.writer.clone(),
            replies: replies.clone(),
            dead_letters: dead_letters.clone(),
            clock: plan.clock.clone(),
        });
        // Waiting on every shard queue before the lane counts as open, so the session's
        // consumers are all in place when it reports ready.
        let consumer = consume(&connection, shard, settings.prefetch).await?;
        let shard_loop = ShardLoop {
            shard,
            connection: Arc::clone(&connection),
            prefetch: settings.prefetch,
            context,
            ownership: Arc::clone(&plan.ownership),
            stop: plan.stop.clone(),
            ended: plan.ended.clone(),
        };
        plan.shard_loops.spawn(shard_loop.run(consumer));
    }
    Ok(Lane { connection })
}

/// Opens a channel and consumes shard queue `shard` on it (as a waiting consumer until the
/// broker makes it the active one).
async fn consume(
    connection: &Connection,
    shard: u16,
    prefetch: u16,
) -> Result<(lapin::Channel, Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
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
    Ok((channel, consumer))
}

/// Closes the lanes' connections; the broker hands their unacknowledged deliveries out again.
async fn close_lanes(lanes: &[Lane]) {
    let closing = lanes.iter().map(|lane| async {
        let close = lane.connection.close(200, "session over".into());
        let _ = tokio::time::timeout(CONNECTION_CLOSE_TIMEOUT, close).await;
    });
    futures::future::join_all(closing).await;
}

/// How one consumption of a shard queue ended.
enum ShardLoopEnd {
    /// The session is stopping.
    Stop,
    /// The balancer asked for the shard to go to another instance.
    HandOver,
    /// The consumer failed: the session ends.
    Failed(SessionError),
}

/// Consumes one shard queue for a session: hands its deliveries, in order, to their handlers;
/// hands the shard over when asked; settles everything received before it stops.
struct ShardLoop {
    shard: u16,
    connection: Arc<Connection>,
    prefetch: u16,
    context: Arc<DeliveryContext>,
    ownership: Arc<Ownership>,
    stop: CancellationToken,
    ended: mpsc::UnboundedSender<SessionError>,
}

impl ShardLoop {
    async fn run(self, first: (lapin::Channel, Consumer)) {
        let mut consumption = Some(first);
        loop {
            let (channel, consumer) = match consumption.take() {
                Some(consumption) => consumption,
                None => match consume(&self.connection, self.shard, self.prefetch).await {
                    Ok(consumption) => consumption,
                    Err(error) => {
                        let _ = self.ended.send(error.into());
                        return;
                    }
                },
            };
            let acks = AckSequencer::start();
            let in_flight = TaskTracker::new();
            let end = self.deliver(consumer, &acks, &in_flight).await;
            if let ShardLoopEnd::Failed(error) = end {
                let _ = self.ended.send(error);
                return;
            }
            // Whatever was received goes through the writer and is acknowledged before the
            // channel closes: the next owner gets only what was never handled.
            in_flight.close();
            let _ = tokio::time::timeout(IN_FLIGHT_GRACE, in_flight.wait()).await;
            self.context.writer.flush().await;
            acks.sent().await;
            if let ShardLoopEnd::Stop = end {
                return;
            }
            // Hand-off: the keys' actors go first, so no answer comes from here once another
            // instance can be the owner; closing the channel makes the next waiting one active.
            self.context.registry.evict_shard(self.shard);
            self.ownership.lost(self.shard);
            if let Err(error) = channel.close(200, "handed over".into()).await {
                let _ = self.ended.send(error.into());
                return;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(REJOIN_PAUSE) => {}
            }
        }
    }

    /// Hands deliveries to their handlers until the session stops, a hand-off is asked for, or
    /// the consumer fails.
    async fn deliver(
        &self,
        mut consumer: Consumer,
        acks: &AckSequencer,
        in_flight: &TaskTracker,
    ) -> ShardLoopEnd {
        loop {
            let next = tokio::select! {
                _ = self.stop.cancelled() => return ShardLoopEnd::Stop,
                _ = self.ownership.hand_over_requested(self.shard) => {
                    if self.ownership.owns(self.shard) {
                        return ShardLoopEnd::HandOver;
                    }
                    continue;
                }
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    // Only the active consumer of a queue receives anything.
                    self.ownership.delivered(self.shard);
                    in_flight.spawn(consumer::handle_delivery(
                        delivery,
                        Arc::clone(&self.context),
                        acks,
                    ));
                }
                Some(Err(error)) => return ShardLoopEnd::Failed(error.into()),
                None => return ShardLoopEnd::Failed(SessionError::ConsumersEnded),
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
