//! The batch writers: collect consumed usage events and granted holds, commit them in batches,
//! then settle their deliveries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{DatabaseConnection, DbBackend};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::actors::key_actor::{PendingTicket, UsageCommitted};
use crate::actors::registry::KeyRegistry;
use crate::alerts::Alerts;
use crate::amqp::acks::{PendingAck, Settlement};
use crate::clock::SharedClock;
use crate::db::usage::{commit_batch_with_holds, BatchError, BatchOutcome};
use crate::domain::reservation::HoldChange;
use crate::domain::usage::UsageEvent;
use crate::metrics as names;
use crate::readiness::Readiness;
use crate::settings::IngestSettings;

/// First pause after a failed commit; doubles up to `MAX_RETRY_BACKOFF`.
const FIRST_RETRY_BACKOFF: Duration = Duration::from_millis(50);
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// A consumed, valid usage event and the delivery it came from.
pub struct ConsumedEvent {
    pub event: UsageEvent,
    /// Tokens the key actor holds as pending for it, released after the commit.
    pub ticket: Option<PendingTicket>,
    /// Acknowledges the delivery; settled only after the commit.
    pub ack: PendingAck,
}

/// What a batch is made of, in the order it reached the lane: a key's hold changes must reach
/// the table in the order its actor made them.
enum LaneItem {
    Event(ConsumedEvent),
    /// A hold granted by a key actor: written with the next batch (SPEC §2.3).
    Hold(HoldChange),
}

enum Command {
    Item(LaneItem),
    Flush(oneshot::Sender<()>),
}

/// Sends events to the batch writer lane that owns their key. Unbounded: the broker's prefetch
/// bounds what is in flight.
#[derive(Clone)]
pub struct BatchWriterHandle {
    lanes: Vec<mpsc::UnboundedSender<Command>>,
}

impl BatchWriterHandle {
    pub fn submit(&self, event: ConsumedEvent) {
        let lane = lane_of(event.event.api_key_id, self.lanes.len());
        // The writer outlives every consumer; if it is gone the process is stopping and the
        // unacknowledged delivery comes again.
        let _ = self.lanes[lane].send(Command::Item(LaneItem::Event(event)));
    }

    /// A handle that does not keep the writer running: the writer ends once the consumers'
    /// handles are gone, whoever else still holds one of these (the key actors).
    pub fn downgrade(&self) -> WeakBatchWriterHandle {
        WeakBatchWriterHandle {
            lanes: self.lanes.iter().map(|lane| lane.downgrade()).collect(),
        }
    }

    /// Commits everything submitted so far; returns once it is committed and every delivery is
    /// settled with its channel's sequencer.
    pub async fn flush(&self) {
        let flushed = self.lanes.iter().map(|lane| async move {
            let (done, committed) = oneshot::channel();
            if lane.send(Command::Flush(done)).is_ok() {
                let _ = committed.await;
            }
        });
        futures::future::join_all(flushed).await;
    }
}

/// How key actors hand granted holds to the writer; see [`BatchWriterHandle::downgrade`].
#[derive(Clone)]
pub struct WeakBatchWriterHandle {
    lanes: Vec<mpsc::WeakUnboundedSender<Command>>,
}

impl WeakBatchWriterHandle {
    /// Queues a hold change of key `api_key_id` for its lane's next batch; `false` if the writer
    /// has stopped (the process is stopping: the hold lives in memory only).
    pub fn submit_hold(&self, api_key_id: i64, change: HoldChange) -> bool {
        let lane = lane_of(api_key_id, self.lanes.len());
        self.lanes[lane]
            .upgrade()
            .is_some_and(|sender| sender.send(Command::Item(LaneItem::Hold(change))).is_ok())
    }
}

/// The lane that commits the events of key `api_key_id`: always the same one, so a key's batches
/// commit one after another and its actor learns their counters in commit order.
fn lane_of(api_key_id: i64, lanes: usize) -> usize {
    api_key_id.rem_euclid(lanes as i64) as usize
}

/// Everything the writer needs.
pub struct BatchWriter {
    pub db: DatabaseConnection,
    pub clock: SharedClock,
    pub registry: KeyRegistry,
    pub readiness: Arc<Readiness>,
    pub settings: IngestSettings,
    /// Thresholds whose crossings a commit records, and the publisher to wake after one.
    pub alerts: Alerts,
}

impl BatchWriter {
    /// Starts one task per lane (`ingest.writers`; one on SQLite, which has a single writer);
    /// the returned task ends when every handle is dropped and each lane has made a last flush.
    pub fn spawn(self) -> (BatchWriterHandle, tokio::task::JoinHandle<()>) {
        let lane_count = if self.db.get_database_backend() == DbBackend::Sqlite {
            1
        } else {
            self.settings.writers
        };
        let writer = Arc::new(self);
        let mut lanes = Vec::with_capacity(lane_count);
        let mut tasks = Vec::with_capacity(lane_count);
        for _ in 0..lane_count {
            let (commands, receiver) = mpsc::unbounded_channel();
            lanes.push(commands);
            tasks.push(tokio::spawn(Arc::clone(&writer).run(receiver)));
        }
        let all_stopped = tokio::spawn(async move {
            futures::future::join_all(tasks).await;
        });
        (BatchWriterHandle { lanes }, all_stopped)
    }

    async fn run(self: Arc<Self>, mut commands: mpsc::UnboundedReceiver<Command>) {
        let flush_interval = Duration::from_millis(self.settings.flush_interval_ms);
        let mut batch: Vec<LaneItem> = Vec::with_capacity(self.settings.batch_size);
        let mut deadline: Option<Instant> = None;
        loop {
            let command = match deadline {
                Some(at) => tokio::select! {
                    command = commands.recv() => command,
                    _ = tokio::time::sleep_until(at) => {
                        self.commit(std::mem::take(&mut batch)).await;
                        deadline = None;
                        continue;
                    }
                },
                None => commands.recv().await,
            };
            match command {
                Some(Command::Item(event)) => {
                    if batch.is_empty() {
                        deadline = Some(Instant::now() + flush_interval);
                    }
                    batch.push(event);
                    if batch.len() >= self.settings.batch_size {
                        self.commit(std::mem::take(&mut batch)).await;
                        deadline = None;
                    }
                }
                Some(Command::Flush(done)) => {
                    self.commit(std::mem::take(&mut batch)).await;
                    deadline = None;
                    let _ = done.send(());
                }
                None => {
                    self.commit(std::mem::take(&mut batch)).await;
                    return;
                }
            }
        }
    }

    /// Commits one batch (retrying while the database is unavailable), informs the actors, then
    /// settles its deliveries. A batch the database refuses for good is split in halves until
    /// the refused events are alone; those are dead-lettered with the database's reason and the
    /// rest commit, so one poison event never stalls its lane.
    async fn commit(&self, batch: Vec<LaneItem>) {
        // Parts still to commit, the next one on top; in delivery order.
        let mut parts = vec![batch];
        while let Some(mut part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            match self.commit_part(&part).await {
                Ok(outcome) => {
                    record_outcome(&outcome);
                    // Only now may the broker forget these deliveries. An ack that fails (channel
                    // lost) means a redelivery, which the event ids already committed turn into
                    // a duplicate.
                    for ack in self.inform_actors(part, &outcome) {
                        ack.settle(Settlement::Ack);
                    }
                }
                Err(reason) if part.len() == 1 => match part.remove(0) {
                    LaneItem::Event(refused) => self.refuse(refused, reason).await,
                    // Not expected (a hold is validated before it is granted); it stays in the
                    // key's memory and expires there.
                    LaneItem::Hold(change) => {
                        tracing::warn!(%reason, ?change, "hold not stored: the database refused it")
                    }
                },
                Err(reason) => {
                    tracing::info!(%reason, events = part.len(), "usage batch refused; splitting it to find the refused events");
                    let second_half = part.split_off(part.len() / 2);
                    parts.push(second_half);
                    parts.push(part);
                }
            }
        }
    }

    /// Commits one part, retrying with backoff while the database is unavailable; `Err` with
    /// the database's reason when it refuses the part.
    async fn commit_part(&self, part: &[LaneItem]) -> Result<BatchOutcome, String> {
        let mut events: Vec<&UsageEvent> = Vec::with_capacity(part.len());
        let mut holds: Vec<HoldChange> = Vec::new();
        for item in part {
            match item {
                LaneItem::Event(consumed) => {
                    events.push(&consumed.event);
                    // Settled or voided: the hold leaves the table with the event's commit.
                    if let Some(id) = &consumed.event.reservation_id {
                        holds.push(HoldChange::Released {
                            api_key_id: consumed.event.api_key_id,
                            id: id.clone(),
                        });
                    }
                }
                LaneItem::Hold(change) => holds.push(change.clone()),
            }
        }
        let mut backoff = FIRST_RETRY_BACKOFF;
        loop {
            let started = std::time::Instant::now();
            match commit_batch_with_holds(
                &self.db,
                &events,
                &holds,
                self.clock.now(),
                self.alerts.thresholds(),
            )
            .await
            {
                Ok(outcome) => {
                    if outcome.alerts_recorded > 0 {
                        self.alerts.wake_publisher();
                    }
                    metrics::histogram!(names::BATCH_COMMIT_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    self.readiness.set_database_error(None);
                    return Ok(outcome);
                }
                // The database answered: it is up, whatever it thinks of these events.
                Err(BatchError::Refused(reason)) => {
                    self.readiness.set_database_error(None);
                    return Err(reason);
                }
                Err(BatchError::Unavailable(error)) => {
                    tracing::warn!(%error, events = events.len(), retry_in_ms = backoff.as_millis() as u64, "usage batch not committed; retrying");
                    self.readiness.set_database_error(Some(error.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                }
            }
        }
    }

    /// Dead-letters one event the database refuses, releasing the tokens its actor holds for it.
    async fn refuse(&self, refused: ConsumedEvent, reason: String) {
        tracing::warn!(%reason, event_id = %refused.event.event_id, api_key_id = refused.event.api_key_id, "usage event refused by the database; dead-lettering it");
        if let Some(ticket) = refused.ticket {
            self.registry.notify_committed(
                refused.event.api_key_id,
                UsageCommitted {
                    released: vec![ticket],
                    counter: None,
                },
            );
        }
        refused.ack.dead_letter(reason).await;
    }

    /// Sends each key's actor its committed counter and releases its pending tickets; returns
    /// the deliveries to settle.
    fn inform_actors(&self, batch: Vec<LaneItem>, outcome: &BatchOutcome) -> Vec<PendingAck> {
        let mut per_key: HashMap<i64, UsageCommitted> = HashMap::new();
        let mut acks = Vec::with_capacity(batch.len());
        let consumed_events = batch.into_iter().filter_map(|item| match item {
            LaneItem::Event(consumed) => Some(consumed),
            LaneItem::Hold(_) => None,
        });
        for consumed in consumed_events {
            acks.push(consumed.ack);
            if let Some(ticket) = consumed.ticket {
                per_key
                    .entry(consumed.event.api_key_id)
                    .or_insert_with(|| UsageCommitted {
                        released: Vec::new(),
                        counter: None,
                    })
                    .released
                    .push(ticket);
            }
        }
        for counter in &outcome.counters {
            per_key
                .entry(counter.api_key_id)
                .or_insert_with(|| UsageCommitted {
                    released: Vec::new(),
                    counter: None,
                })
                .counter = Some(*counter);
        }
        for (key_id, committed) in per_key {
            self.registry.notify_committed(key_id, committed);
        }
        acks
    }
}

fn record_outcome(outcome: &BatchOutcome) {
    metrics::counter!(names::USAGE_EVENTS_TOTAL, "outcome" => "counted")
        .increment(outcome.counted as u64);
    metrics::counter!(names::USAGE_EVENTS_TOTAL, "outcome" => "duplicate")
        .increment(outcome.duplicates as u64);
    metrics::counter!(names::USAGE_EVENTS_TOTAL, "outcome" => "late")
        .increment(outcome.late as u64);
    metrics::counter!(names::USAGE_UNKNOWN_KEY_TOTAL).increment(outcome.unknown_key as u64);
}
