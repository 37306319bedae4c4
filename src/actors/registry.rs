//! `KeyRegistry`: finds the actor of a key or starts exactly one, spread over one arbiter per core.
//!
//! A registry handle can be *homed* on one arbiter: each broker connection runs on an arbiter and
//! starts the actors of the keys its shards bring there too, so a check from the broker is answered
//! without crossing threads (every message of a key comes through the same shard).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use entity::api_keys::Model;
use sea_orm::DatabaseConnection;

use super::key_actor::{
    CheckQuota, DeleteKey, DescribeKey, ExpireHolds, KeyActor, KeyError, ListHolds, RecordUsage,
    RefreshKey, StopIfIdle, StopKeyActor, UpdateKey, UsageCommitted, UsageRecorded, UsageToRecord,
    WindowRolled,
};
use super::loader::KeyLoader;
use crate::alerts::Alerts;
use crate::clock::SharedClock;
use crate::db::api_keys::KeyChange;
use crate::db::rollover::RolledChunk;
use crate::domain::check::{CheckAsk, CheckReply};
use crate::domain::outcome::CheckOutcome;
use crate::domain::quota::QuotaState;
use crate::domain::reservation::Reservation;
use crate::ingest::WeakBatchWriterHandle;
use crate::metrics::check_outcome_label;
use crate::settings::UnknownKeyPolicy;

/// Lock stripes of the id → actor map, so lookups from many threads rarely contend.
const MAP_STRIPES: usize = 64;
/// Shortest pause between idle sweeps.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// How often actors with live holds are told to release the expired ones (a check releases them
/// itself before deciding; this only frees the tokens and counts the metric for idle keys).
const HOLD_EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// A message that meets a stopping actor is sent again to a fresh one, this many times at most.
const MAX_SEND_ATTEMPTS: usize = 4;

/// What every key actor shares: dependencies, policy and the map it removes itself from.
pub struct RegistryShared {
    pub(crate) db: DatabaseConnection,
    pub(crate) loader: KeyLoader,
    pub(crate) clock: SharedClock,
    pub(crate) unknown_key: UnknownKeyPolicy,
    pub(crate) idle_timeout: Duration,
    /// Admin changes record the alerts a lowered quota crosses, and wake the publisher.
    pub(crate) alerts: Alerts,
    stripes: Vec<Mutex<HashMap<i64, Entry>>>,
    /// Actors with live holds, which the sweep tells to expire theirs: only these, so keys
    /// without holds cost the sweep nothing, and no hold has a timer of its own.
    holding: Mutex<HashMap<i64, Addr<KeyActor>>>,
    /// Where granted holds go to be stored; set once the batch writer runs.
    hold_writer: OnceLock<WeakBatchWriterHandle>,
    arbiters: Vec<ArbiterHandle>,
    /// Origin of `Entry::last_used_secs`, on `clock`.
    started: DateTime<Utc>,
}

/// A running key actor and when a request last went to it. The registry, not the actor, keeps
/// the time: one timer sweeps every key instead of one timer per actor (memory per key). Time
/// is the injected clock's, so tests move it instead of waiting for keys to idle out.
struct Entry {
    addr: Addr<KeyActor>,
    last_used_secs: u32,
    /// The shard queue whose delivery started or last reached the actor (`NO_SHARD` without a
    /// broker): losing that shard drops the actor.
    shard: u16,
}

/// The shard of an actor started without a broker (HTTP only); no shard loss ever drops it.
const NO_SHARD: u16 = u16::MAX;
/// The shard of actors started while draining the retired single queue: never owned, so never
/// used for answers, and never the tag of an actor a real shard's delivery reached.
pub const DRAINED_SHARD: u16 = u16::MAX - 1;

impl RegistryShared {
    /// The locked stripe of key `id`.
    fn stripe(&self, id: i64) -> MutexGuard<'_, HashMap<i64, Entry>> {
        lock(&self.stripes[id.rem_euclid(MAP_STRIPES as i64) as usize])
    }

    /// Where a new actor of `id` starts: on the caller's home arbiter if it has one, else by id.
    /// (`homed` keeps `home` below the arbiter count.)
    fn arbiter(&self, id: i64, home: Option<usize>) -> &ArbiterHandle {
        let index = home.unwrap_or(id.rem_euclid(self.arbiters.len() as i64) as usize);
        &self.arbiters[index]
    }

    /// Seconds from `started` to the clock's now (0 if the clock was set back before it).
    fn now_secs(&self) -> u32 {
        let elapsed = (self.clock.now() - self.started).num_seconds().max(0);
        u32::try_from(elapsed).unwrap_or(u32::MAX)
    }

    /// Removes `id` from the map if it still points at `addr` (a newer actor may have replaced it).
    pub(crate) fn forget(&self, id: i64, addr: &Addr<KeyActor>) {
        let mut map = self.stripe(id);
        if map.get(&id).is_some_and(|entry| entry.addr == *addr) {
            map.remove(&id);
        }
    }

    /// The locked map of actors with live holds.
    fn holding(&self) -> MutexGuard<'_, HashMap<i64, Addr<KeyActor>>> {
        self.holding
            .lock()
            .expect("the holding map is never held across a panic")
    }

    /// The actor of `id` now has live holds: the expiry sweep reaches it.
    pub(crate) fn note_holding(&self, id: i64, addr: Addr<KeyActor>) {
        self.holding().insert(id, addr);
    }

    /// The actor of `id` has no live holds any more (or stopped).
    pub(crate) fn forget_holding(&self, id: i64) {
        self.holding().remove(&id);
    }

    /// Where a granted hold is queued to be stored; `None` before the writer runs (tests, benches).
    pub(crate) fn hold_writer(&self) -> Option<&WeakBatchWriterHandle> {
        self.hold_writer.get()
    }

    /// Tells every actor with live holds to release the expired ones.
    fn sweep_expired_holds(&self) {
        let holding: Vec<Addr<KeyActor>> = self.holding().values().cloned().collect();
        for addr in holding {
            addr.do_send(ExpireHolds);
        }
    }

    /// Asks every actor without a request for the idle timeout to stop (it stays if tokens are pending).
    fn sweep_idle(&self) {
        let idle_secs = u32::try_from(self.idle_timeout.as_secs()).unwrap_or(u32::MAX);
        let now = self.now_secs();
        for stripe in &self.stripes {
            let idle: Vec<Addr<KeyActor>> = lock(stripe)
                .values()
                .filter(|entry| now.saturating_sub(entry.last_used_secs) >= idle_secs)
                .map(|entry| entry.addr.clone())
                .collect();
            for addr in idle {
                addr.do_send(StopIfIdle);
            }
        }
    }
}

/// Counts a check's outcome and its latency.
fn record_check(result: &Result<CheckReply, KeyError>, started: std::time::Instant) {
    let outcome = result
        .as_ref()
        .map_or(CheckOutcome::Unavailable, |reply| reply.outcome);
    metrics::counter!(crate::metrics::CHECKS_TOTAL, "outcome" => check_outcome_label(outcome))
        .increment(1);
    metrics::histogram!(crate::metrics::CHECK_DURATION_SECONDS)
        .record(started.elapsed().as_secs_f64());
}

/// Arbiters on a host of `cores` cores when `actors.arbiters` is 0: one per two cores, at least
/// one. Each arbiter consumes over a broker connection of its own, and lapin's I/O thread of that
/// connection is about as busy as the arbiter, so one per core ran twice as many busy threads as
/// cores (BENCHMARKS.md, session 7).
pub fn default_arbiters(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// Locks one stripe of the id → actor map.
fn lock(stripe: &Mutex<HashMap<i64, Entry>>) -> MutexGuard<'_, HashMap<i64, Entry>> {
    stripe
        .lock()
        .expect("registry stripes are never held across a panic")
}

/// Cheap to clone; every clone sees the same actors.
#[derive(Clone)]
pub struct KeyRegistry {
    shared: Arc<RegistryShared>,
    /// The arbiter this handle's caller runs on, where it starts the actors it needs.
    home: Option<usize>,
    /// The shard queue this handle's caller consumes; actors it reaches belong to that shard.
    shard: Option<u16>,
}

impl KeyRegistry {
    /// Starts `arbiters` threads (0: [`default_arbiters`]) to run key actors, and the idle sweeper.
    /// Must run inside an actix `System`.
    pub fn start(
        db: DatabaseConnection,
        clock: SharedClock,
        unknown_key: UnknownKeyPolicy,
        idle_timeout: Duration,
        arbiters: usize,
        alerts: Alerts,
    ) -> KeyRegistry {
        let count = if arbiters == 0 {
            default_arbiters(std::thread::available_parallelism().map_or(1, |n| n.get()))
        } else {
            arbiters
        };
        let arbiters = (0..count).map(|_| Arbiter::new().handle()).collect();
        let started = clock.now();
        let shared = Arc::new(RegistryShared {
            loader: KeyLoader::start(db.clone(), clock.clone()),
            db,
            clock,
            unknown_key,
            idle_timeout,
            alerts,
            stripes: (0..MAP_STRIPES)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            holding: Mutex::new(HashMap::new()),
            hold_writer: OnceLock::new(),
            arbiters,
            started,
        });
        let sweeper = Arc::downgrade(&shared);
        let idle_sweep_every = (idle_timeout / 2).max(MIN_SWEEP_INTERVAL);
        let tick = idle_sweep_every.min(HOLD_EXPIRY_SWEEP_INTERVAL);
        // One timer for every key: expired holds each tick, idle actors when their sweep is due
        // by the clock (a test's clock that stands still never idles a key out).
        tokio::spawn(async move {
            let mut last_idle_sweep = started;
            loop {
                tokio::time::sleep(tick).await;
                // The registry is gone: nothing left to sweep.
                let Some(shared) = sweeper.upgrade() else {
                    return;
                };
                shared.sweep_expired_holds();
                let now = shared.clock.now();
                match (now - last_idle_sweep).to_std() {
                    Ok(since_last) if since_last >= idle_sweep_every => {
                        last_idle_sweep = now;
                        shared.sweep_idle();
                    }
                    Ok(_) => {}
                    // The clock was set back (a test's): the interval runs from there.
                    Err(_) => last_idle_sweep = now,
                }
            }
        });
        KeyRegistry {
            shared,
            home: None,
            shard: None,
        }
    }

    /// The alert thresholds and the publisher's wake-up, for changes made outside the actors.
    pub fn alerts(&self) -> &Alerts {
        &self.shared.alerts
    }

    /// Granted holds are queued to `writer` from now on, to be stored with its next batch.
    pub fn attach_hold_writer(&self, writer: WeakBatchWriterHandle) {
        // Set once at start; a second writer (never made) would be ignored.
        let _ = self.shared.hold_writer.set(writer);
    }

    /// Number of arbiters running key actors.
    pub fn arbiter_count(&self) -> usize {
        self.shared.arbiters.len()
    }

    /// A handle for code running on arbiter `index` (modulo the count): actors it starts run there.
    pub fn homed(&self, index: usize) -> KeyRegistry {
        KeyRegistry {
            shared: Arc::clone(&self.shared),
            home: Some(index % self.shared.arbiters.len()),
            shard: self.shard,
        }
    }

    /// A handle for the consumer of shard queue `shard`: the actors it reaches are recorded as
    /// that shard's, and dropped when the shard is lost (`evict_shard`).
    pub fn on_shard(&self, shard: u16) -> KeyRegistry {
        KeyRegistry {
            shard: Some(shard),
            ..self.clone()
        }
    }

    /// Runs `future` on arbiter `index` (modulo the count); `false` if that arbiter has stopped.
    pub fn spawn_on_arbiter(
        &self,
        index: usize,
        future: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> bool {
        self.shared.arbiters[index % self.shared.arbiters.len()].spawn(future)
    }

    /// The running actor of `id`, started (on the home arbiter, or the one the id maps to) if there is none.
    fn actor_for(&self, id: i64) -> Addr<KeyActor> {
        let now = self.shared.now_secs();
        let mut map = self.shared.stripe(id);
        let shard = self.shard.unwrap_or(NO_SHARD);
        if let Some(entry) = map.get_mut(&id) {
            if entry.addr.connected() {
                entry.last_used_secs = now;
                if self.shard.is_some_and(|shard| shard != DRAINED_SHARD) {
                    entry.shard = shard;
                }
                return entry.addr.clone();
            }
        }
        let shared = Arc::clone(&self.shared);
        let addr = KeyActor::start_in_arbiter(self.shared.arbiter(id, self.home), move |_| {
            KeyActor::new(id, shared)
        });
        map.insert(
            id,
            Entry {
                addr: addr.clone(),
                last_used_secs: now,
                shard,
            },
        );
        addr
    }

    /// Starts actors for keys already read from the database (a bulk warm-up), replacing none that run.
    pub fn start_resident(&self, keys: impl IntoIterator<Item = Model>) {
        for key in keys {
            let id = key.id;
            let mut map = self.shared.stripe(id);
            if map.get(&id).is_some_and(|entry| entry.addr.connected()) {
                continue;
            }
            let shared = Arc::clone(&self.shared);
            let addr = KeyActor::start_in_arbiter(self.shared.arbiter(id, self.home), move |_| {
                KeyActor::resident(key, shared)
            });
            map.insert(
                id,
                Entry {
                    addr,
                    last_used_secs: self.shared.now_secs(),
                    shard: self.shard.unwrap_or(NO_SHARD),
                },
            );
        }
    }

    /// Sends `msg` to the actor of `id`, retrying on a fresh actor if it met one that was stopping.
    async fn send<M, T>(&self, id: i64, msg: M) -> Result<T, KeyError>
    where
        M: Message<Result = Result<T, KeyError>> + Clone + Send + 'static,
        T: Send + 'static,
        KeyActor: Handler<M>,
    {
        for _ in 0..MAX_SEND_ATTEMPTS {
            let addr = self.actor_for(id);
            match addr.send(msg.clone()).await {
                Ok(result) => return result,
                Err(_) => self.shared.forget(id, &addr),
            }
        }
        Err(KeyError::ActorStopped {
            id,
            attempts: MAX_SEND_ATTEMPTS,
        })
    }

    /// Answers a check of key `id` from its actor, counting the outcome and its latency.
    pub async fn check(&self, id: i64, ask: CheckAsk) -> Result<CheckReply, KeyError> {
        let started = std::time::Instant::now();
        let result = self.send(id, CheckQuota { ask }).await;
        record_check(&result, started);
        result
    }

    /// Changes key `id` of `username` through its actor; `None` if it is not that user's key.
    pub async fn update(
        &self,
        id: i64,
        username: &str,
        change: KeyChange,
    ) -> Result<Option<Model>, KeyError> {
        self.send(
            id,
            UpdateKey {
                username: username.to_string(),
                change,
            },
        )
        .await
    }

    /// Deletes key `id` of `username` through its actor; `false` if it is not that user's key.
    pub async fn delete(&self, id: i64, username: &str) -> Result<bool, KeyError> {
        self.send(
            id,
            DeleteKey {
                username: username.to_string(),
            },
        )
        .await
    }

    /// Counts usage events of key `id` in its memory at once ("read your usage"), in order; one
    /// answer per event. If the actor cannot be reached every event gets its error.
    pub async fn record_usage(
        &self,
        id: i64,
        events: Vec<UsageToRecord>,
    ) -> Vec<Result<UsageRecorded, KeyError>> {
        let count = events.len();
        match self.send(id, RecordUsage { events }).await {
            Ok(answers) => answers,
            Err(error) => vec![Err(error); count],
        }
    }

    /// The live holds of key `id` from its actor; `None` if the key does not exist.
    pub async fn reservations(&self, id: i64) -> Result<Option<Vec<Reservation>>, KeyError> {
        self.send(id, ListHolds).await
    }

    /// The live holds of `id` from its actor if one is running here; `None` otherwise.
    pub async fn reservations_if_resident(
        &self,
        id: i64,
        owns: impl Fn(u16) -> bool,
    ) -> Option<Result<Option<Vec<Reservation>>, KeyError>> {
        self.resident_owned(id, owns)?.send(ListHolds).await.ok()
    }

    /// Answers a check from the actor of `id` if one is running here (this instance owns the
    /// key); `None` if none runs, or it stopped before answering: ask the owner instead.
    pub async fn check_if_resident(
        &self,
        id: i64,
        ask: CheckAsk,
        owns: impl Fn(u16) -> bool,
    ) -> Option<Result<CheckReply, KeyError>> {
        let addr = self.resident_owned(id, owns)?;
        let started = std::time::Instant::now();
        let result = addr.send(CheckQuota { ask }).await.ok()?;
        record_check(&result, started);
        Some(result)
    }

    /// The current window of `id` from its actor if one is running here; `None` otherwise.
    pub async fn describe_if_resident(
        &self,
        id: i64,
        owns: impl Fn(u16) -> bool,
    ) -> Option<Result<Option<QuotaState>, KeyError>> {
        self.resident_owned(id, owns)?.send(DescribeKey).await.ok()
    }

    /// Changes key `id` through its actor if one is running here; `None` otherwise.
    pub async fn update_if_resident(
        &self,
        id: i64,
        username: &str,
        change: KeyChange,
        owns: impl Fn(u16) -> bool,
    ) -> Option<Result<Option<Model>, KeyError>> {
        let update = UpdateKey {
            username: username.to_string(),
            change,
        };
        self.resident_owned(id, owns)?.send(update).await.ok()
    }

    /// Deletes key `id` through its actor if one is running here; `None` otherwise.
    pub async fn delete_if_resident(
        &self,
        id: i64,
        username: &str,
        owns: impl Fn(u16) -> bool,
    ) -> Option<Result<bool, KeyError>> {
        let delete = DeleteKey {
            username: username.to_string(),
        };
        self.resident_owned(id, owns)?.send(delete).await.ok()
    }

    /// Makes the actor of `id`, if one runs here, reload its key (changed by another instance);
    /// returns once it has. A key without an actor here loads fresh when it is next needed.
    pub async fn refresh(&self, id: i64) -> Result<(), KeyError> {
        match self.resident(id) {
            Some(addr) => addr.send(RefreshKey).await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// Stops the actors of the keys of `shard` (handed over or lost: another instance owns them now).
    pub fn evict_shard(&self, shard: u16) {
        for stripe in &self.shared.stripes {
            let actors: Vec<_> = {
                let mut map = lock(stripe);
                let ids: Vec<i64> = map
                    .iter()
                    .filter(|(_, entry)| entry.shard == shard)
                    .map(|(id, _)| *id)
                    .collect();
                ids.into_iter()
                    .filter_map(|id| map.remove(&id))
                    .map(|entry| entry.addr)
                    .collect()
            };
            for addr in actors {
                addr.do_send(StopKeyActor);
            }
        }
    }

    /// The actor of `id` if one is running for a shard `owns` says this instance owns (an actor
    /// of a shard lost a moment ago, or met while draining, never answers).
    fn resident_owned(&self, id: i64, owns: impl Fn(u16) -> bool) -> Option<Addr<KeyActor>> {
        self.shared
            .stripe(id)
            .get(&id)
            .filter(|entry| owns(entry.shard))
            .map(|entry| entry.addr.clone())
    }

    /// The actor of `id` if one is running.
    fn resident(&self, id: i64) -> Option<Addr<KeyActor>> {
        self.resident_owned(id, |_| true)
    }

    /// Tells the actor of `id`, if resident, what its batch committed; a non-resident key loads fresh anyway.
    pub fn notify_committed(&self, id: i64, committed: UsageCommitted) {
        if let Some(addr) = self.resident(id) {
            addr.do_send(committed);
        }
    }

    /// Tells the resident actors of a rolled chunk that their window moved on.
    pub fn notify_rolled(&self, chunk: &RolledChunk) {
        let rolled = WindowRolled {
            closed_reset_at: chunk.closed_reset_at,
            new_reset_at: chunk.new_reset_at,
        };
        for &id in &chunk.key_ids {
            if let Some(addr) = self.resident(id) {
                addr.do_send(rolled);
            }
        }
    }

    /// The current window of key `id` as its actor sees it; `None` if the key does not exist.
    pub async fn describe(&self, id: i64) -> Result<Option<QuotaState>, KeyError> {
        self.send(id, DescribeKey).await
    }

    /// Drops the resident actor of `id`, if any, so the next request loads the key afresh.
    pub fn invalidate(&self, id: i64) {
        let addr = self.shared.stripe(id).remove(&id);
        if let Some(entry) = addr {
            entry.addr.do_send(StopKeyActor);
        }
    }

    /// Number of keys with a running actor.
    pub fn resident_count(&self) -> usize {
        self.shared
            .stripes
            .iter()
            .map(|stripe| lock(stripe).len())
            .sum()
    }

    /// Stops every key actor and the arbiters that run them.
    pub fn shutdown(&self) {
        self.evict_all();
        for arbiter in &self.shared.arbiters {
            arbiter.stop();
        }
    }

    /// Stops every key actor; the next request of each key loads it from the database.
    pub fn evict_all(&self) {
        for stripe in &self.shared.stripes {
            let actors: Vec<_> = lock(stripe).drain().map(|(_, entry)| entry.addr).collect();
            for addr in actors {
                addr.do_send(StopKeyActor);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::default_arbiters;

    #[test]
    fn one_arbiter_per_two_cores_and_never_none() {
        assert_eq!(default_arbiters(0), 1);
        assert_eq!(default_arbiters(1), 1);
        assert_eq!(default_arbiters(2), 1);
        assert_eq!(default_arbiters(3), 1);
        assert_eq!(default_arbiters(4), 2);
        assert_eq!(default_arbiters(16), 8);
    }
}
