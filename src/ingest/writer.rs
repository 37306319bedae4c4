//! The batch writer: collects consumed usage events and granted holds per lane, commits them in
//! batches (by size or time, retried while storage is down, split to isolate a refused event),
//! then tells the key actors and completes each event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{BatchStore, CommitListener, Completion};
use crate::actors::key_actor::{PendingTicket, UsageCommitted};
use crate::clock::SharedClock;
use crate::db::usage::{BatchError, BatchOutcome};
use crate::domain::reservation::HoldChange;
use crate::domain::usage::UsageEvent;
use crate::metrics as names;
use crate::readiness::Readiness;
use crate::settings::IngestSettings;

/// First pause after a failed commit; doubles up to `MAX_RETRY_BACKOFF`.
const FIRST_RETRY_BACKOFF: Duration = Duration::from_millis(50);
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// A consumed, valid usage event and how to tell its source what became of it.
pub struct ConsumedEvent {
    pub event: UsageEvent,
    /// Tokens the key actor holds as pending for it, released after the commit.
    pub ticket: Option<PendingTicket>,
    /// Completed only after the commit (or the storage's refusal).
    pub completion: Box<dyn Completion>,
}

/// What a batch is made of, in the order it reached the lane: a key's hold changes must reach
/// the table in the order its actor made them.
enum LaneItem {
    Event(ConsumedEvent),
    /// A hold granted by a key actor: written with the next batch (SPEC §2.3).
    Hold(HoldChange),
}

enum Command {
    /// A hold granted by a key actor.
    Hold(HoldChange),
    /// Usage events consumed together, in delivery order.
    Events(Vec<ConsumedEvent>),
    Flush(oneshot::Sender<()>),
}

/// Sends events to the batch writer lane that owns their key. Unbounded: the broker's prefetch
/// bounds what is in flight.
#[derive(Clone)]
pub struct BatchWriterHandle {
    lanes: Vec<mpsc::UnboundedSender<Command>>,
}

impl BatchWriterHandle {
    /// Hands events consumed together to their lanes, one command per lane, keeping their order.
    pub fn submit_all(&self, events: Vec<ConsumedEvent>) {
        // The writer outlives every consumer; if it is gone the process is stopping and the
        // unacknowledged deliveries come again.
        if let [lane] = self.lanes.as_slice() {
            let _ = lane.send(Command::Events(events));
            return;
        }
        let mut per_lane: Vec<Vec<ConsumedEvent>> = self.lanes.iter().map(|_| Vec::new()).collect();
        for event in events {
            per_lane[lane_of(event.event.api_key_id, self.lanes.len())].push(event);
        }
        for (lane, events) in self.lanes.iter().zip(per_lane) {
            if !events.is_empty() {
                let _ = lane.send(Command::Events(events));
            }
        }
    }

    /// A handle that does not keep the writer running: the writer ends once the consumers'
    /// handles are gone, whoever else still holds one of these (the key actors).
    pub fn downgrade(&self) -> WeakBatchWriterHandle {
        WeakBatchWriterHandle {
            lanes: self.lanes.iter().map(|lane| lane.downgrade()).collect(),
        }
    }

    /// Commits everything submitted so far; returns once it is committed and every event is
    /// completed.
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
            .is_some_and(|sender| sender.send(Command::Hold(change)).is_ok())
    }
}

/// The lane that commits the events of key `api_key_id`: always the same one, so a key's batches
/// commit one after another and its actor learns their counters in commit order.
fn lane_of(api_key_id: i64, lanes: usize) -> usize {
    api_key_id.rem_euclid(lanes as i64) as usize
}

/// Everything the writer needs: where it commits, whom it tells, and when.
pub struct BatchWriter<S, L> {
    pub store: S,
    pub listener: L,
    pub clock: SharedClock,
    pub readiness: Arc<Readiness>,
    pub settings: IngestSettings,
}

impl<S: BatchStore, L: CommitListener> BatchWriter<S, L> {
    /// Starts one task per lane (`ingest.writers`, or fewer if the store allows fewer); the
    /// returned task ends when every handle is dropped and each lane has made a last flush.
    pub fn spawn(self) -> (BatchWriterHandle, tokio::task::JoinHandle<()>) {
        let lane_count = self.store.concurrent_writers(self.settings.writers).max(1);
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
                Some(Command::Hold(change)) => {
                    self.add(&mut batch, &mut deadline, LaneItem::Hold(change))
                        .await
                }
                Some(Command::Events(events)) => {
                    for event in events {
                        self.add(&mut batch, &mut deadline, LaneItem::Event(event))
                            .await;
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

    /// Adds `item` to the batch, committing the batch once it holds `ingest.batch_size` items;
    /// the first item of a batch sets when it is committed at the latest.
    async fn add(&self, batch: &mut Vec<LaneItem>, deadline: &mut Option<Instant>, item: LaneItem) {
        if batch.is_empty() {
            *deadline =
                Some(Instant::now() + Duration::from_millis(self.settings.flush_interval_ms));
        }
        batch.push(item);
        if batch.len() >= self.settings.batch_size {
            self.commit(std::mem::take(batch)).await;
            *deadline = None;
        }
    }

    /// Commits one batch (retrying while the storage is unavailable), informs the actors, then
    /// completes its events. A batch the storage refuses for good is split in halves until the
    /// refused events are alone; those are completed as refused with the storage's reason and
    /// the rest commit, so one poison event never stalls its lane.
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
                    // Only now may the source forget these events. If it cannot (say a broker's
                    // channel was lost), the event comes again and its committed id makes it a
                    // duplicate.
                    for completion in self.inform_actors(part, &outcome) {
                        completion.committed();
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

    /// Commits one part, retrying with backoff while the storage is unavailable; `Err` with
    /// the storage's reason when it refuses the part.
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
            match self.store.commit(&events, &holds, self.clock.now()).await {
                Ok(outcome) => {
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

    /// Completes one event the storage refuses as refused, releasing the tokens its actor holds
    /// for it.
    async fn refuse(&self, refused: ConsumedEvent, reason: String) {
        tracing::warn!(%reason, event_id = %refused.event.event_id, api_key_id = refused.event.api_key_id, "usage event refused by storage; completing it as refused");
        if let Some(ticket) = refused.ticket {
            self.listener.usage_committed(
                refused.event.api_key_id,
                UsageCommitted {
                    released: vec![ticket],
                    counter: None,
                },
            );
        }
        refused.completion.refused(reason).await;
    }

    /// Sends each key's actor its committed counter and releases its pending tickets; returns
    /// the events' completions.
    fn inform_actors(
        &self,
        batch: Vec<LaneItem>,
        outcome: &BatchOutcome,
    ) -> Vec<Box<dyn Completion>> {
        let mut per_key: HashMap<i64, UsageCommitted> = HashMap::new();
        let mut completions = Vec::with_capacity(batch.len());
        let consumed_events = batch.into_iter().filter_map(|item| match item {
            LaneItem::Event(consumed) => Some(consumed),
            LaneItem::Hold(_) => None,
        });
        for consumed in consumed_events {
            completions.push(consumed.completion);
            if let Some(ticket) = consumed.ticket {
                per_key
                    .entry(consumed.event.api_key_id)
                    .or_default()
                    .released
                    .push(ticket);
            }
        }
        for counter in &outcome.counters {
            per_key.entry(counter.api_key_id).or_default().counter = Some(*counter);
        }
        for (key_id, committed) in per_key {
            self.listener.usage_committed(key_id, committed);
        }
        completions
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

#[cfg(test)]
mod tests {
    //! The writer alone: a fake store, a recording listener and completions that report what
    //! they were told; no broker, no database. Waits end on the completions themselves, each
    //! within a deadline.

    use std::collections::{BTreeMap, HashMap};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use chrono::{DateTime, Utc};
    use futures::future::BoxFuture;
    use sea_orm::DbErr;

    use super::*;
    use crate::clock::ManualClock;
    use crate::domain::batch_plan::CommittedCounter;
    use crate::domain::reservation::Hold;
    use crate::readiness::BrokerState;

    /// Longest wait for a completion before the test fails.
    const DEADLINE: Duration = Duration::from_secs(5);
    /// A flush interval no test waits for.
    const NEVER_MS: u64 = 3_600_000;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .expect("a valid instant")
            .with_timezone(&Utc)
    }

    /// Commits every batch (recording it) unless told to fail first, or the batch holds the
    /// poison event id. Each key's counter is the sum of its events' tokens it committed.
    #[derive(Default)]
    struct FakeStore {
        commits: Mutex<Vec<(Vec<String>, Vec<HoldChange>)>>,
        attempts: AtomicUsize,
        outages_left: AtomicUsize,
        poison: Option<&'static str>,
        used: Mutex<HashMap<i64, i64>>,
    }

    impl FakeStore {
        fn committed_ids(&self) -> Vec<Vec<String>> {
            let commits = self.commits.lock().expect("no test panics holding it");
            commits.iter().map(|(ids, _)| ids.clone()).collect()
        }
    }

    impl BatchStore for Arc<FakeStore> {
        async fn commit(
            &self,
            events: &[&UsageEvent],
            holds: &[HoldChange],
            now: DateTime<Utc>,
        ) -> Result<BatchOutcome, BatchError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let outage =
                self.outages_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                        left.checked_sub(1)
                    });
            if outage.is_ok() {
                return Err(BatchError::Unavailable(DbErr::Custom("down".into())));
            }
            if let Some(poison) = self.poison {
                if events.iter().any(|event| event.event_id == poison) {
                    return Err(BatchError::Refused(format!("{poison} is poison")));
                }
            }
            let mut used = self.used.lock().expect("no test panics holding it");
            let mut counters = BTreeMap::new();
            for event in events {
                let total = used.entry(event.api_key_id).or_default();
                *total += event.tokens;
                counters.insert(
                    event.api_key_id,
                    CommittedCounter {
                        api_key_id: event.api_key_id,
                        used: *total,
                        reset_at: now,
                        version: 1,
                    },
                );
            }
            self.commits
                .lock()
                .expect("no test panics holding it")
                .push((
                    events.iter().map(|event| event.event_id.clone()).collect(),
                    holds.to_vec(),
                ));
            Ok(BatchOutcome {
                counted: events.len(),
                counters: counters.into_values().collect(),
                ..BatchOutcome::default()
            })
        }
    }

    #[derive(Default)]
    struct RecordingListener {
        told: Mutex<Vec<(i64, UsageCommitted)>>,
    }

    impl CommitListener for Arc<RecordingListener> {
        fn usage_committed(&self, api_key_id: i64, committed: UsageCommitted) {
            let mut told = self.told.lock().expect("no test panics holding it");
            told.push((api_key_id, committed));
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Said {
        Committed,
        Refused(String),
        Abandoned,
    }

    /// Reports, once, what the writer said of event `id`.
    struct Recorder {
        id: String,
        said: Option<mpsc::UnboundedSender<(String, Said)>>,
    }

    impl Recorder {
        fn say(&mut self, what: Said) {
            if let Some(said) = self.said.take() {
                let _ = said.send((self.id.clone(), what));
            }
        }
    }

    impl Completion for Recorder {
        fn committed(mut self: Box<Self>) {
            self.say(Said::Committed);
        }

        fn refused(mut self: Box<Self>, reason: String) -> BoxFuture<'static, ()> {
            self.say(Said::Refused(reason));
            Box::pin(async {})
        }
    }

    impl Drop for Recorder {
        fn drop(&mut self) {
            self.say(Said::Abandoned);
        }
    }

    struct Harness {
        store: Arc<FakeStore>,
        listener: Arc<RecordingListener>,
        readiness: Arc<Readiness>,
        handle: BatchWriterHandle,
        stopped: tokio::task::JoinHandle<()>,
        said_tx: mpsc::UnboundedSender<(String, Said)>,
        said: mpsc::UnboundedReceiver<(String, Said)>,
    }

    fn start(
        store: FakeStore,
        batch_size: usize,
        flush_interval_ms: u64,
        writers: usize,
    ) -> Harness {
        let store = Arc::new(store);
        let listener = Arc::new(RecordingListener::default());
        let readiness = Arc::new(Readiness::new(BrokerState::NotConfigured));
        let (handle, stopped) = BatchWriter {
            store: Arc::clone(&store),
            listener: Arc::clone(&listener),
            clock: ManualClock::new(now()),
            readiness: Arc::clone(&readiness),
            settings: IngestSettings {
                batch_size,
                flush_interval_ms,
                writers,
                ..IngestSettings::default()
            },
        }
        .spawn();
        let (said_tx, said) = mpsc::unbounded_channel();
        Harness {
            store,
            listener,
            readiness,
            handle,
            stopped,
            said_tx,
            said,
        }
    }

    impl Harness {
        fn submit(&self, id: &str, api_key_id: i64, tokens: i64) {
            self.submit_event(usage_event(id, api_key_id, tokens), None);
        }

        fn submit_event(&self, event: UsageEvent, ticket: Option<PendingTicket>) {
            self.handle.submit_all(vec![self.consumed(event, ticket)]);
        }

        /// Events `(id, api_key_id)` of one token each, submitted together as a consumer's run.
        fn submit_run(&self, events: &[(String, i64)]) {
            let run = events
                .iter()
                .map(|(id, api_key_id)| self.consumed(usage_event(id, *api_key_id, 1), None))
                .collect();
            self.handle.submit_all(run);
        }

        fn consumed(&self, event: UsageEvent, ticket: Option<PendingTicket>) -> ConsumedEvent {
            let completion = Box::new(Recorder {
                id: event.event_id.clone(),
                said: Some(self.said_tx.clone()),
            });
            ConsumedEvent {
                event,
                ticket,
                completion,
            }
        }

        /// The next `count` completions, in the order they were given.
        async fn completions(&mut self, count: usize) -> Vec<(String, Said)> {
            let mut got = Vec::with_capacity(count);
            while got.len() < count {
                match tokio::time::timeout(DEADLINE, self.said.recv()).await {
                    Ok(Some(said)) => got.push(said),
                    _ => panic!("only {} of {count} completions: {got:?}", got.len()),
                }
            }
            got
        }
    }

    /// An event of `tokens` for key `api_key_id`, occurring now, naming no hold.
    fn usage_event(id: &str, api_key_id: i64, tokens: i64) -> UsageEvent {
        UsageEvent {
            event_id: id.to_string(),
            api_key_id,
            tokens,
            occurred_at: now(),
            reservation_id: None,
        }
    }

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[tokio::test]
    async fn a_full_batch_commits_without_waiting_for_the_interval() {
        let mut writer = start(FakeStore::default(), 3, NEVER_MS, 1);
        for id in ["a", "b", "c"] {
            writer.submit(id, 1, 5);
        }
        let said = writer.completions(3).await;
        assert!(
            said.iter().all(|(_, what)| *what == Said::Committed),
            "{said:?}"
        );
        assert_eq!(writer.store.committed_ids(), vec![ids(&["a", "b", "c"])]);
    }

    #[tokio::test]
    async fn a_run_is_split_between_lanes_and_into_batches_of_at_most_the_batch_size() {
        let mut writer = start(FakeStore::default(), 4, NEVER_MS, 2);
        let run: Vec<(String, i64)> = (0..11).map(|i| (format!("{i}"), i % 3 + 1)).collect();
        writer.submit_run(&run);
        writer.handle.flush().await;
        let said = writer.completions(11).await;
        assert!(said.iter().all(|(_, what)| *what == Said::Committed));
        let batches = writer.store.committed_ids();
        let key_of = |id: &String| run[id.parse::<usize>().expect("ids are indexes")].1;
        for batch in &batches {
            assert!(
                batch.len() <= 4,
                "a batch above the batch size: {batches:?}"
            );
            assert!(
                batch
                    .iter()
                    .all(|id| key_of(id) % 2 == key_of(&batch[0]) % 2),
                "one batch mixes lanes: {batches:?}"
            );
        }
        // Each lane commits its share of the run in the run's order.
        for lane in 0..2 {
            let committed: Vec<&String> = batches
                .iter()
                .flatten()
                .filter(|id| key_of(id) % 2 == lane)
                .collect();
            let submitted: Vec<&String> = run
                .iter()
                .filter(|(_, key)| key % 2 == lane)
                .map(|(id, _)| id)
                .collect();
            assert_eq!(committed, submitted);
        }
    }

    #[tokio::test]
    async fn a_partial_batch_commits_once_the_interval_ends() {
        let flush_interval = Duration::from_millis(100);
        let flush_interval_ms = flush_interval.as_millis() as u64;
        let mut writer = start(FakeStore::default(), 1_000, flush_interval_ms, 1);
        let submitted = std::time::Instant::now();
        writer.submit("a", 1, 5);
        let said = writer.completions(1).await;
        assert_eq!(said, vec![("a".to_string(), Said::Committed)]);
        assert!(
            submitted.elapsed() >= flush_interval,
            "committed after {:?}, before the interval",
            submitted.elapsed()
        );
    }

    #[tokio::test]
    async fn flush_returns_once_everything_submitted_is_completed() {
        let mut writer = start(FakeStore::default(), 1_000, NEVER_MS, 2);
        writer.submit("a", 1, 5);
        writer.submit("b", 2, 5);
        tokio::time::timeout(DEADLINE, writer.handle.flush())
            .await
            .expect("flush within the deadline");
        let mut said = Vec::new();
        while let Ok(one) = writer.said.try_recv() {
            said.push(one);
        }
        said.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            said,
            vec![
                ("a".to_string(), Said::Committed),
                ("b".to_string(), Said::Committed)
            ]
        );
    }

    #[tokio::test]
    async fn an_outage_is_retried_until_the_batch_commits() {
        let store = FakeStore {
            outages_left: AtomicUsize::new(2),
            ..FakeStore::default()
        };
        let mut writer = start(store, 1, NEVER_MS, 1);
        writer.submit("a", 1, 5);
        assert_eq!(
            writer.completions(1).await,
            vec![("a".to_string(), Said::Committed)]
        );
        assert_eq!(writer.store.attempts.load(Ordering::SeqCst), 3);
        assert_eq!(writer.readiness.database_error(), None, "ready again");
    }

    #[tokio::test]
    async fn a_refused_event_is_isolated_and_the_rest_commit() {
        let store = FakeStore {
            poison: Some("p"),
            ..FakeStore::default()
        };
        let mut writer = start(store, 8, NEVER_MS, 1);
        let ticket = PendingTicket {
            generation: 1,
            window_end: now(),
            tokens: 9,
        };
        for id in ["a", "b", "c", "d", "e"] {
            writer.submit(id, 1, 1);
        }
        writer.submit_event(
            UsageEvent {
                event_id: "p".into(),
                api_key_id: 2,
                tokens: 9,
                occurred_at: now(),
                reservation_id: None,
            },
            Some(ticket),
        );
        writer.submit("f", 1, 1);
        writer.submit("g", 1, 1);
        let said = writer.completions(8).await;
        let refused: Vec<&(String, Said)> = said
            .iter()
            .filter(|(_, what)| *what != Said::Committed)
            .collect();
        assert_eq!(
            refused,
            vec![&("p".to_string(), Said::Refused("p is poison".into()))]
        );
        let mut committed: Vec<String> = writer.store.committed_ids().concat();
        committed.sort();
        assert_eq!(committed, ids(&["a", "b", "c", "d", "e", "f", "g"]));
        // The refused event's pending tokens are released, with no counter to adopt.
        let told = writer
            .listener
            .told
            .lock()
            .expect("no test panics holding it");
        let released: Vec<&UsageCommitted> = told
            .iter()
            .filter(|(key, _)| *key == 2)
            .map(|(_, committed)| committed)
            .collect();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].released, vec![ticket]);
        assert_eq!(released[0].counter, None);
    }

    #[tokio::test]
    async fn each_key_commits_in_one_lane_in_submission_order() {
        let mut writer = start(FakeStore::default(), 3, NEVER_MS, 2);
        for round in 0..6 {
            for key in 1..=4 {
                writer.submit(&format!("{key}-{round}"), key, 1);
            }
        }
        writer.handle.flush().await;
        writer.completions(24).await;
        let mut per_key: HashMap<i64, Vec<String>> = HashMap::new();
        for batch in writer.store.committed_ids() {
            let keys: Vec<i64> = batch
                .iter()
                .map(|id| id[..1].parse().expect("ids start with the key"))
                .collect();
            assert!(
                keys.iter().all(|key| key % 2 == keys[0] % 2),
                "one batch mixes lanes: {batch:?}"
            );
            for (key, id) in keys.into_iter().zip(batch) {
                per_key.entry(key).or_default().push(id);
            }
        }
        for key in 1..=4 {
            let expected: Vec<String> = (0..6).map(|round| format!("{key}-{round}")).collect();
            assert_eq!(per_key[&key], expected);
        }
    }

    #[tokio::test]
    async fn actors_learn_their_counter_and_released_tickets() {
        let mut writer = start(FakeStore::default(), 2, NEVER_MS, 1);
        let ticket = |tokens| PendingTicket {
            generation: 3,
            window_end: now(),
            tokens,
        };
        for (id, tokens) in [("a", 4), ("b", 6)] {
            writer.submit_event(
                UsageEvent {
                    event_id: id.into(),
                    api_key_id: 7,
                    tokens,
                    occurred_at: now(),
                    reservation_id: None,
                },
                Some(ticket(tokens)),
            );
        }
        writer.completions(2).await;
        let told = writer
            .listener
            .told
            .lock()
            .expect("no test panics holding it");
        assert_eq!(told.len(), 1, "one message per key and batch");
        let (key, committed) = &told[0];
        assert_eq!(*key, 7);
        assert_eq!(committed.released, vec![ticket(4), ticket(6)]);
        assert_eq!(committed.counter.map(|counter| counter.used), Some(10));
    }

    #[tokio::test]
    async fn holds_reach_the_store_in_order_with_the_events_that_settle_them() {
        let mut writer = start(FakeStore::default(), 1_000, NEVER_MS, 1);
        let granted = HoldChange::Granted {
            api_key_id: 1,
            id: "r".into(),
            hold: Hold {
                tokens: 50,
                expires_at: 1_800_000_000,
            },
        };
        assert!(writer.handle.downgrade().submit_hold(1, granted.clone()));
        writer.submit_event(
            UsageEvent {
                event_id: "settle".into(),
                api_key_id: 1,
                tokens: 40,
                occurred_at: now(),
                reservation_id: Some("r".into()),
            },
            None,
        );
        writer.handle.flush().await;
        writer.completions(1).await;
        let commits = writer
            .store
            .commits
            .lock()
            .expect("no test panics holding it");
        let released = HoldChange::Released {
            api_key_id: 1,
            id: "r".into(),
        };
        assert_eq!(commits.len(), 1);
        assert_eq!(commits[0].1, vec![granted, released]);
    }

    #[tokio::test]
    async fn the_last_handle_gone_commits_what_is_left_and_stops() {
        let Harness {
            handle,
            stopped,
            said_tx,
            mut said,
            store,
            ..
        } = start(FakeStore::default(), 1_000, NEVER_MS, 2);
        let weak = handle.downgrade();
        handle.submit_all(vec![ConsumedEvent {
            event: UsageEvent {
                event_id: "a".into(),
                api_key_id: 1,
                tokens: 5,
                occurred_at: now(),
                reservation_id: None,
            },
            ticket: None,
            completion: Box::new(Recorder {
                id: "a".into(),
                said: Some(said_tx),
            }),
        }]);
        drop(handle);
        tokio::time::timeout(DEADLINE, stopped)
            .await
            .expect("the writer stops once its handles are gone")
            .expect("no lane panicked");
        assert_eq!(
            said.try_recv().ok(),
            Some(("a".to_string(), Said::Committed))
        );
        assert_eq!(store.committed_ids(), vec![ids(&["a"])]);
        let hold = HoldChange::Released {
            api_key_id: 1,
            id: "r".into(),
        };
        assert!(
            !weak.submit_hold(1, hold),
            "a stopped writer takes no holds"
        );
    }
}
