//! The batch writer: collects consumed usage events, commits them in batches, then acknowledges them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicAckOptions;
use lapin::Acker;
use sea_orm::DatabaseConnection;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::actors::key_actor::{PendingTicket, UsageCommitted};
use crate::actors::registry::KeyRegistry;
use crate::clock::SharedClock;
use crate::db::usage::{commit_batch, BatchOutcome};
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
    /// Acknowledges the delivery; fired only after the commit.
    pub acker: Acker,
}

enum Command {
    Event(ConsumedEvent),
    Flush(oneshot::Sender<()>),
}

/// Sends events to the batch writer task. Unbounded: the broker's prefetch bounds what is in flight.
#[derive(Clone)]
pub struct BatchWriterHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl BatchWriterHandle {
    pub fn submit(&self, event: ConsumedEvent) {
        // The writer outlives every consumer; if it is gone the process is stopping and the
        // unacknowledged delivery comes again.
        let _ = self.commands.send(Command::Event(event));
    }

    /// Commits everything submitted so far; returns once it is committed and acknowledged.
    pub async fn flush(&self) {
        let (done, committed) = oneshot::channel();
        if self.commands.send(Command::Flush(done)).is_ok() {
            let _ = committed.await;
        }
    }
}

/// Everything the writer needs.
pub struct BatchWriter {
    pub db: DatabaseConnection,
    pub clock: SharedClock,
    pub registry: KeyRegistry,
    pub readiness: Arc<Readiness>,
    pub settings: IngestSettings,
}

impl BatchWriter {
    /// Starts the writer task; it ends when every handle is dropped, after a last flush.
    pub fn spawn(self) -> (BatchWriterHandle, tokio::task::JoinHandle<()>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(self.run(receiver));
        (BatchWriterHandle { commands }, task)
    }

    async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let flush_interval = Duration::from_millis(self.settings.flush_interval_ms);
        let mut batch: Vec<ConsumedEvent> = Vec::with_capacity(self.settings.batch_size);
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
                Some(Command::Event(event)) => {
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

    /// Commits one batch (retrying until the database takes it), then acknowledges and informs the actors.
    async fn commit(&self, batch: Vec<ConsumedEvent>) {
        if batch.is_empty() {
            return;
        }
        let events: Vec<&UsageEvent> = batch.iter().map(|consumed| &consumed.event).collect();
        let mut backoff = FIRST_RETRY_BACKOFF;
        let outcome = loop {
            let started = std::time::Instant::now();
            match commit_batch(&self.db, &events, self.clock.now()).await {
                Ok(outcome) => {
                    metrics::histogram!(names::BATCH_COMMIT_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    self.readiness.set_database_error(None);
                    break outcome;
                }
                Err(error) => {
                    tracing::warn!(%error, events = events.len(), retry_in_ms = backoff.as_millis() as u64, "usage batch not committed; retrying");
                    self.readiness.set_database_error(Some(error.to_string()));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                }
            }
        };
        record_outcome(&outcome);
        // Only now may the broker forget these deliveries. A failed ack (channel lost) means a
        // redelivery, which the event ids already committed turn into a duplicate.
        let acks = batch
            .iter()
            .map(|consumed| consumed.acker.ack(BasicAckOptions::default()));
        for result in futures::future::join_all(acks).await {
            if let Err(error) = result {
                tracing::debug!(%error, "ack after commit failed; the delivery will come again as a duplicate");
            }
        }
        self.inform_actors(batch, &outcome);
    }

    fn inform_actors(&self, batch: Vec<ConsumedEvent>, outcome: &BatchOutcome) {
        let mut per_key: HashMap<i64, UsageCommitted> = HashMap::new();
        for consumed in batch {
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
