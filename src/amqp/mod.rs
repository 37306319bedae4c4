//! RabbitMQ: a supervisor that connects (one connection per key-actor arbiter, one for control), declares the topology, consumes every shard, hands shards over and reconnects with backoff.

pub mod acks;
pub mod balance;
pub mod consumer;
pub mod control;
pub mod ownership;
pub mod publish;
pub mod replies;
pub mod topology;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, Consumer};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actors::registry::{KeyRegistry, DRAINED_SHARD};
use crate::clock::SharedClock;
use crate::ingest::BatchWriterHandle;
use crate::readiness::{BrokerState, Readiness};
use crate::settings::AmqpSettings;
use acks::AckSequencer;
use consumer::{Burst, DeliveryContext};
use control::{ControlLink, Forwarder};
use ownership::Ownership;
use topology::Layout;

/// AMQP delivery mode of persistent messages (dead letters, usage published by the CLI).
pub const PERSISTENT: u8 = 2;
/// First pause after a lost or refused connection; doubles up to `amqp.reconnect_max_backoff_ms`.
const FIRST_RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// On shutdown, deliveries already received get this long to be handled before the final flush.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(3);
/// A connection that does not close in this time (the broker is gone) is left to drop.
const CONNECTION_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// After handing a shard over, this long before consuming it again (as a waiting consumer).
const REJOIN_PAUSE: Duration = Duration::from_millis(100);
/// Deliveries a shard loop takes in as one burst at most: large enough that a run of usage
/// events costs one task and one writer command for hundreds of events, small enough that the
/// loop soon looks at its stop and hand-over signals again.
const MAX_BURST: usize = 256;
/// How often the drain of the retired single queue looks whether it is done.
const DRAIN_ROUND: Duration = Duration::from_secs(1);
/// The missing-plugin warning is logged once per process, not at every reconnect.
static WARNED_NO_PLUGIN: AtomicBool = AtomicBool::new(false);

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
    #[error(transparent)]
    Control(#[from] control::ControlEnded),
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
                    let reason = format!("broker: {error}");
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
        let url = with_heartbeat(&self.settings.url, self.settings.heartbeat_secs);
        let declared = topology::declare_layout(&url, self.settings.shards).await?;
        let layout = declared.layout;
        if layout == Layout::Single && !WARNED_NO_PLUGIN.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                queue = topology::SINGLE_QUEUE,
                "the broker has no consistent-hash exchange type: running with one queue for every key \
                 (every feature works; several instances are hot standbys, not a split of the load). \
                 Enable it with `{}`; the service moves to {} shard queues at its next connect",
                topology::ENABLE_PLUGIN_COMMAND,
                self.settings.shards
            );
        }
        self.ownership.set_layout_shards(layout.shard_count());
        let lane_count = self
            .registry
            .arbiter_count()
            .min(usize::from(layout.shard_count()))
            .max(1);
        // Cancelled when this session ends, however it ends: every shard loop stops with it.
        let session_over = self.shutdown.child_token();
        let _stop_shard_loops = session_over.clone().drop_guard();
        let (ended, mut shard_ended) = mpsc::unbounded_channel();
        let shard_loops = TaskTracker::new();
        // Every lane opens at once, each on its arbiter: a start or a reconnect waits for the
        // slowest lane, not for all of them one after the other.
        let mut opening = Vec::with_capacity(lane_count);
        for index in 0..lane_count {
            let plan = LanePlan {
                index,
                url: url.clone(),
                layout,
                shards: (0..layout.shard_count())
                    .filter(|shard| usize::from(*shard) % lane_count == index)
                    .collect(),
                // Messages left in the single queue of a time without the plugin: the first
                // lane drains them alongside the shards.
                drain_single_queue: index == 0 && declared.single_queue_left,
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
            let spawned = self
                .registry
                .spawn_on_arbiter(index, open_lane(plan, opened));
            opening.push(spawned.then_some(lane));
        }
        // All awaited even after a failure: the lanes that did open are closed with the rest.
        let mut lanes = Vec::with_capacity(lane_count);
        let mut failure = None;
        for lane in opening {
            let lane = match lane {
                Some(lane) => lane.await.unwrap_or(Err(SessionError::ArbitersStopped)),
                None => Err(SessionError::ArbitersStopped),
            };
            match lane {
                Ok(lane) => lanes.push(lane),
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failure {
            close_lanes(&lanes).await;
            return Err(error);
        }
        // Heard by the others only now that this instance waits on every shard queue.
        let opened =
            ControlLink::open(&url, self.ownership.instance(), self.forwarder.clone()).await;
        let control = match opened {
            Ok(control) => control,
            Err(error) => {
                close_lanes(&lanes).await;
                return Err(error.into());
            }
        };
        let control_stop = CancellationToken::new();
        let mut control_task = tokio::spawn(control.run(
            Arc::clone(&self.ownership),
            layout,
            Arc::clone(&self.readiness),
            control_stop.clone(),
        ));
        drop(ended);
        self.readiness.set_broker(BrokerState::Consuming);
        tracing::info!(
            shards = layout.shard_count(),
            connections = lane_count,
            instance = self.ownership.instance(),
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
        // Ended before the next session starts, so it never touches that session's link.
        if !control_task.is_finished() {
            let _ = tokio::time::timeout(CONNECTION_CLOSE_TIMEOUT, &mut control_task).await;
            control_task.abort();
        }
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
    layout: Layout,
    shards: Vec<u16>,
    drain_single_queue: bool,
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

/// Opens the lane's connection and starts its shard loops; a lane that fails half-way is closed.
async fn connect_lane(plan: LanePlan) -> Result<Lane, lapin::Error> {
    let connection = Arc::new(
        Connection::connect(
            &plan.url,
            ConnectionProperties::default()
                .with_connection_name(format!("quota-keeper-{}", plan.index).as_str().into()),
        )
        .await?,
    );
    match start_shard_loops(&connection, plan).await {
        Ok(()) => Ok(Lane { connection }),
        Err(error) => {
            let close = connection.close(200, "lane not opened".into());
            let _ = tokio::time::timeout(CONNECTION_CLOSE_TIMEOUT, close).await;
            Err(error)
        }
    }
}

/// Opens the channels the lane's shards share and consumes every shard queue of the lane.
async fn start_shard_loops(connection: &Arc<Connection>, plan: LanePlan) -> lapin::Result<()> {
    let settings = &plan.settings;
    let replies = Arc::new(replies::ReplyChannel::open(Arc::clone(connection)).await?);
    let dead_letters = Arc::new(connection.create_channel().await?);
    dead_letters
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let shard_loop = |shard: u16, queue: String| ShardLoop {
        shard,
        queue,
        connection: Arc::clone(connection),
        prefetch: settings.prefetch,
        context: Arc::new(DeliveryContext {
            registry: plan.registry.on_shard(shard),
            writer: plan.writer.clone(),
            replies: Arc::clone(&replies),
            dead_letters: Arc::clone(&dead_letters),
            clock: plan.clock.clone(),
        }),
        ownership: Arc::clone(&plan.ownership),
        stop: plan.stop.clone(),
        ended: plan.ended.clone(),
    };
    // Waiting on every shard queue before the lane counts as open, so the session's consumers
    // are all in place when it reports ready; the queues are asked for at once, not in turn.
    let shard_loops: Vec<ShardLoop> = plan
        .shards
        .iter()
        .map(|&shard| shard_loop(shard, plan.layout.queue(shard)))
        .collect();
    let consumers = futures::future::try_join_all(
        shard_loops
            .iter()
            .map(|shard_loop| consume(connection, &shard_loop.queue, settings.prefetch)),
    )
    .await?;
    for (shard_loop, consumer) in shard_loops.into_iter().zip(consumers) {
        plan.shard_loops.spawn(shard_loop.run(consumer));
    }
    if plan.drain_single_queue {
        let drain = shard_loop(DRAINED_SHARD, topology::SINGLE_QUEUE.to_string());
        let consumer = consume(connection, &drain.queue, settings.prefetch).await?;
        plan.shard_loops.spawn(drain.drain(consumer));
    }
    Ok(())
}

/// Opens a channel and consumes `queue` on it (as a waiting consumer until the broker makes it
/// the active one).
async fn consume(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
) -> Result<(lapin::Channel, Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("quota-keeper-{}-{queue}", std::process::id());
    let consumer = channel
        .basic_consume(
            queue.into(),
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
    queue: String,
    connection: Arc<Connection>,
    prefetch: u16,
    context: Arc<DeliveryContext>,
    ownership: Arc<Ownership>,
    stop: CancellationToken,
    ended: mpsc::UnboundedSender<SessionError>,
}

impl ShardLoop {
    /// The first consumption (opened with the lane), or a new one on the lane's connection.
    async fn next_consumption(
        &self,
        first: &mut Option<(lapin::Channel, Consumer)>,
    ) -> Result<(lapin::Channel, Consumer), lapin::Error> {
        match first.take() {
            Some(consumption) => Ok(consumption),
            None => consume(&self.connection, &self.queue, self.prefetch).await,
        }
    }

    async fn run(self, first: (lapin::Channel, Consumer)) {
        let mut first = Some(first);
        loop {
            let (channel, mut consumer) = match self.next_consumption(&mut first).await {
                Ok(consumption) => consumption,
                Err(error) => {
                    let _ = self.ended.send(error.into());
                    return;
                }
            };
            // A request made while the shard was being handed over is not for this consumption.
            self.ownership.forget_hand_over_request(self.shard);
            let acks = AckSequencer::start();
            let in_flight = TaskTracker::new();
            // The consumer lives until its channel closes: dropping it would send basic.cancel,
            // which stalls the queue until the channel closes (TOPOLOGY.md).
            let end = self.deliver(&mut consumer, &acks, &in_flight).await;
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
                // Closed here, not left to the connection's close: the broker's close-ok comes
                // after it has taken every acknowledgement sent on the channel before it.
                let _ = tokio::time::timeout(
                    CONNECTION_CLOSE_TIMEOUT,
                    channel.close(200, "stopping".into()),
                )
                .await;
                drop(consumer);
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
            drop(consumer);
            // A handler still running past the grace may have started an actor since.
            self.context.registry.evict_shard(self.shard);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(REJOIN_PAUSE) => {}
            }
        }
    }

    /// Drains the single queue retired by a move to the sharded layout (nothing is routed to it
    /// any more): its deliveries are handled like any shard's, and once it is empty the instance
    /// that consumes it actively deletes it, which ends every instance's drain. Keys met here
    /// may briefly have an actor at their shard's owner too (never used for answers: this
    /// instance does not own them); totals stay exact (increments, deduplicated event ids).
    async fn drain(self, first: (lapin::Channel, Consumer)) {
        let mut first = Some(first);
        loop {
            let Ok((channel, mut consumer)) = self.next_consumption(&mut first).await else {
                break;
            };
            let acks = AckSequencer::start();
            let in_flight = TaskTracker::new();
            let finished = self
                .drain_deliveries(&channel, &mut consumer, &acks, &in_flight)
                .await;
            // Everything received is committed and acknowledged, then the channel closes, which
            // hands back whatever lapin had received but was not handled: only then may an
            // empty queue be deleted, or buffered deliveries would go with it.
            in_flight.close();
            let _ = tokio::time::timeout(IN_FLIGHT_GRACE, in_flight.wait()).await;
            self.context.writer.flush().await;
            acks.sent().await;
            let _ = channel.close(200, "drained".into()).await;
            drop(consumer);
            if finished || self.stop.is_cancelled() || self.delete_if_empty().await {
                break;
            }
        }
        self.context.registry.evict_shard(self.shard);
    }

    /// Handles the drained queue's deliveries until the session stops or the queue is gone
    /// (`true`), or until this instance, its active consumer, has nothing in flight (`false`:
    /// time to look whether the queue is empty).
    async fn drain_deliveries(
        &self,
        channel: &lapin::Channel,
        consumer: &mut Consumer,
        acks: &AckSequencer,
        in_flight: &TaskTracker,
    ) -> bool {
        let mut active = false;
        let mut rounds = tokio::time::interval(DRAIN_ROUND);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return true,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        active = true;
                        // One at a time: the drain is rare and short, the shard loops are not.
                        Burst::new(&self.context, acks, in_flight).take(delivery);
                    }
                    // Deleted by the instance that drained it, or the session is ending.
                    Some(Err(_)) | None => return true,
                },
                _ = rounds.tick() => {
                    if active && in_flight.is_empty() {
                        return false;
                    }
                    if !active {
                        // Only the active consumer gets it: whoever that is may delete the queue.
                        let _ = control::probe(channel, &self.queue, "drain").await;
                    }
                }
            }
        }
    }

    /// Deletes the drained queue if nothing is left in it; `true` if it is gone.
    async fn delete_if_empty(&self) -> bool {
        let Ok(channel) = self.connection.create_channel().await else {
            return false;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let gone = match channel
            .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(queue) if queue.message_count() == 0 => {
                let if_empty = QueueDeleteOptions {
                    if_empty: true,
                    ..Default::default()
                };
                let deleted = channel
                    .queue_delete(self.queue.as_str().into(), if_empty)
                    .await
                    .is_ok();
                if deleted {
                    tracing::info!(queue = %self.queue, "drained and deleted the single queue of the layout without the plugin");
                }
                deleted
            }
            Ok(_) => false,
            // Already deleted by another instance (the passive declare closed this channel).
            Err(_) => true,
        };
        let _ = channel.close(200, "checked".into()).await;
        gone
    }

    /// Hands deliveries to their handlers until the session stops, a hand-off is asked for, or
    /// the consumer fails.
    async fn deliver(
        &self,
        consumer: &mut Consumer,
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
            // With it, whatever lapin has already received: taken in as one burst.
            let mut burst = Burst::new(&self.context, acks, in_flight);
            let mut next = Some(next);
            while let Some(received) = next.take() {
                match received {
                    Some(Ok(delivery)) => {
                        // Only the active consumer of a queue receives anything.
                        if self.ownership.delivered(self.shard) {
                            // Just gained: an actor a late handler started while the shard was
                            // elsewhere may hold an old state; the keys load afresh.
                            self.context.registry.evict_shard(self.shard);
                        }
                        burst.take(delivery);
                    }
                    Some(Err(error)) => return ShardLoopEnd::Failed(error.into()),
                    None => return ShardLoopEnd::Failed(SessionError::ConsumersEnded),
                }
                if burst.taken() < MAX_BURST {
                    next = consumer.next().now_or_never();
                }
            }
        }
    }
}

/// Adds `heartbeat=N` to the URL unless it sets one.
pub(crate) fn with_heartbeat(url: &str, heartbeat_secs: u16) -> String {
    if url.contains("heartbeat=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&heartbeat={heartbeat_secs}")
    } else {
        format!("{url}?heartbeat={heartbeat_secs}")
    }
}
