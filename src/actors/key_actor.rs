//! `KeyActor`: the single writer of one key's quota state and holds, answering checks from memory.

use std::num::NonZeroI64;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use entity::api_keys::Model;

use super::loader::{LoadError, LoadedKey};
use super::registry::RegistryShared;
use crate::db::api_keys::{self, KeyChange};
use crate::domain::batch_plan::CommittedCounter;
use crate::domain::check::{CheckAsk, CheckReply};
use crate::domain::quota::QuotaState;
use crate::domain::reservation::{expiry_of, Hold, HoldChange, Holds, Reservation};
use crate::metrics as names;
use crate::settings::UnknownKeyPolicy;

/// How long an actor that found no key (or could not load it) lives, absorbing repeated requests.
const NEGATIVE_ENTRY_LIFETIME: Duration = Duration::from_secs(5);
/// How long an actor whose load failed lives before a new load is tried.
const FAILED_LOAD_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a key actor could not answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum KeyError {
    /// The key is not resident and could not be loaded; the actor stops after
    /// `FAILED_LOAD_RETRY_AFTER`, so a later request tries again.
    #[error("quota state unavailable: {0}")]
    Load(#[from] LoadError),
    /// Reading or writing the key's row for an admin change or a reload failed.
    #[error("quota state unavailable: database error: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// Every actor of the key the message reached was stopping (evicted, deleted, reloaded).
    #[error("quota state unavailable: the actor of key {id} stopped {attempts} times in a row")]
    ActorStopped { id: i64, attempts: usize },
}

/// Answer a check from memory (rolling a lapsed window over first), granting the hold it asks
/// for if it is allowed.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<CheckReply, KeyError>")]
pub struct CheckQuota {
    pub ask: CheckAsk,
}

/// Apply an admin change to the key if it belongs to `username`; `None` when it does not.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Option<Model>, KeyError>")]
pub struct UpdateKey {
    pub username: String,
    pub change: KeyChange,
}

/// Delete the key if it belongs to `username`; `false` when it does not. The actor stops.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<bool, KeyError>")]
pub struct DeleteKey {
    pub username: String,
}

/// Count validated usage events of the key in memory at once, in order, until the batch writer
/// commits them, and release the holds they name (settled, or voided with 0 tokens). One
/// message for all the key's events of a consumer's run; one answer per event, in their order.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Vec<Result<UsageRecorded, KeyError>>, KeyError>")]
pub struct RecordUsage {
    pub events: Vec<UsageToRecord>,
}

/// What the key actor needs of one usage event.
#[derive(Clone, Debug)]
pub struct UsageToRecord {
    pub tokens: i64,
    pub occurred_at: DateTime<Utc>,
    pub reservation_id: Option<String>,
}

/// Tokens an actor holds as pending for one event; released when its batch commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingTicket {
    /// Which incarnation of the actor holds them: a newer actor never had them.
    pub generation: u32,
    /// The window they were counted in.
    pub window_end: DateTime<Utc>,
    pub tokens: i64,
}

/// How a usage event was taken in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageRecorded {
    /// Counted as pending in the current window.
    Pending(PendingTicket),
    /// A late event (or zero tokens): nothing pending, the batch writer files it.
    NotPending,
    /// The key does not exist.
    UnknownKey,
    /// Counting it would take the key's counter past `i64::MAX`: refuse the event.
    WouldOverflow { used: i64 },
}

/// A batch committed: release its pending tokens and adopt the committed counter.
#[derive(Clone, Debug, Default, Message)]
#[rtype(result = "()")]
pub struct UsageCommitted {
    pub released: Vec<PendingTicket>,
    pub counter: Option<CommittedCounter>,
}

/// The scheduler moved the key from the window ending at `closed_reset_at` to the next in the database.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "()")]
pub struct WindowRolled {
    pub closed_reset_at: DateTime<Utc>,
    pub new_reset_at: DateTime<Utc>,
}

/// The key's current window as the actor sees it (rolled over first); `None` for an unknown key.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "Result<Option<QuotaState>, KeyError>")]
pub struct DescribeKey;

/// Another instance changed the key in the database: reload it before answering anything else.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "Result<(), KeyError>")]
pub struct RefreshKey;

/// The key's live holds (expired ones released first); `None` for an unknown key.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "Result<Option<Vec<Reservation>>, KeyError>")]
pub struct ListHolds;

/// The registry's sweep: release the holds that have expired.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "()")]
pub struct ExpireHolds;

/// The registry saw no request for this key for the idle timeout: stop unless tokens are pending.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "()")]
pub struct StopIfIdle;

/// Stop now (the key was created or changed behind the actor's back).
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "()")]
pub struct StopKeyActor;

/// The instant of a window end kept as Unix seconds.
fn instant_of(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0)
        .expect("window ends come from valid instants, so their seconds convert back")
}

/// A stored quota as a resident keeps it (see `Resident::quota`).
fn compact_quota(quota: Option<i64>) -> Option<NonZeroI64> {
    quota.and_then(NonZeroI64::new)
}

/// Source of actor generations, unique for the life of the process.
/// (Wraps after 2^32 actors: a ticket cannot stay in flight that long.)
static NEXT_GENERATION: AtomicU32 = AtomicU32::new(1);

/// A resident key: the committed counter plus what is consumed but not yet committed.
struct Resident {
    /// `None` is unlimited. A stored 0 reads as unlimited too (SPEC §3: 0 clears the quota; the
    /// service stores it as NULL). `NonZeroI64` makes the option 8 bytes instead of 16.
    quota: Option<NonZeroI64>,
    committed: i64,
    pending: i64,
    /// End of the current window in Unix seconds (window ends are whole seconds); eight bytes
    /// instead of twelve keep the actor within a smaller allocation class (BENCHMARKS.md).
    reset_at: i64,
    /// `counter_version` of the stored row this view is based on.
    version: i64,
    /// Live holds; `None` (one pointer) for the many keys without any.
    holds: Option<Box<Holds>>,
    /// Which incarnation of the actor counted the pending tokens: a newer actor never had them.
    generation: u32,
    /// Gives `KeyState` a place for its variant tag inside the padding after `generation`.
    _tag_room: TagRoom,
}

/// A one-value byte: its 255 impossible values let `KeyState` store which variant it is without
/// a tag word of its own. With the holds pointer, that keeps the key actor as large as it was
/// without holds (72 bytes): 8 more bytes move every actor into the next allocation class
/// (BENCHMARKS.md has the figures).
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
enum TagRoom {
    Zero = 0,
}

impl Resident {
    fn view(&self) -> QuotaState {
        QuotaState {
            quota: self.quota.map(NonZeroI64::get),
            // Never wraps: `record` keeps the sum in range, and a committed counter adopted from
            // the database is at most `i64::MAX` itself.
            used: self.committed.saturating_add(self.pending),
            reset_at: instant_of(self.reset_at),
        }
    }

    fn reserved(&self) -> i64 {
        self.holds.as_ref().map_or(0, |holds| holds.reserved())
    }

    fn hold_count(&self) -> usize {
        self.holds.as_ref().map_or(0, |holds| holds.len())
    }

    /// Releases the holds expired at `now`; returns how many. An empty set is freed.
    fn expire_holds(&mut self, now: DateTime<Utc>) -> usize {
        let Some(holds) = &mut self.holds else {
            return 0;
        };
        let expired = holds.expire(now.timestamp());
        if holds.is_empty() {
            self.holds = None;
        }
        expired
    }

    /// Releases the hold `id` if it lives; returns it. An empty set is freed.
    fn release_hold(&mut self, id: &str) -> Option<Hold> {
        let holds = self.holds.as_mut()?;
        let released = holds.release(id);
        if holds.is_empty() {
            self.holds = None;
        }
        released
    }

    /// Adds tokens consumed but not yet committed, unless the counter would pass `i64::MAX`.
    fn record(&mut self, tokens: i64) -> Result<(), UsageRecorded> {
        let used = self.committed.saturating_add(self.pending);
        if used.checked_add(tokens).is_none() {
            return Err(UsageRecorded::WouldOverflow { used });
        }
        self.pending += tokens;
        Ok(())
    }

    /// Lazy rollover: a lapsed window starts afresh (pending tokens belong to the closed one).
    fn roll_over_if_lapsed(&mut self, now: DateTime<Utc>) {
        let mut view = self.view();
        if view.roll_over_if_lapsed(now).is_some() {
            self.committed = 0;
            self.pending = 0;
            self.reset_at = view.reset_at.timestamp();
        }
    }
}

/// What the actor knows about its key.
enum KeyState {
    Loading,
    Resident(Resident),
    Unknown,
    LoadFailed(LoadError),
}

pub struct KeyActor {
    id: i64,
    state: KeyState,
    shared: Arc<RegistryShared>,
}

impl KeyActor {
    pub(crate) fn new(id: i64, shared: Arc<RegistryShared>) -> Self {
        KeyActor {
            id,
            state: KeyState::Loading,
            shared,
        }
    }

    /// An actor for a key already read from the database (bulk warm-up): no load of its own.
    pub(crate) fn resident(key: Model, shared: Arc<RegistryShared>) -> Self {
        let mut actor = KeyActor::new(key.id, shared);
        actor.become_resident(key);
        actor
    }

    /// Adopts the stored key, keeping tokens still pending in the same window. A row older than
    /// what the actor already knows only brings its quota.
    fn become_resident(&mut self, key: Model) {
        if let KeyState::Resident(resident) = &mut self.state {
            if key.counter_version < resident.version {
                resident.quota = compact_quota(key.token_quota_monthly);
                return;
            }
        }
        let pending = match &self.state {
            KeyState::Resident(resident) if resident.reset_at == key.quota_reset_at.timestamp() => {
                resident.pending
            }
            _ => 0,
        };
        // Holds are not tied to a window, and this actor is their authority: they stay.
        let (holds, generation) = match &mut self.state {
            KeyState::Resident(resident) => (resident.holds.take(), resident.generation),
            _ => (None, NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)),
        };
        self.state = KeyState::Resident(Resident {
            quota: compact_quota(key.token_quota_monthly),
            committed: key.tokens_used_this_month,
            pending,
            reset_at: key.quota_reset_at.timestamp(),
            version: key.counter_version,
            holds,
            generation,
            _tag_room: TagRoom::Zero,
        });
    }

    /// Adopts a loaded key and its stored holds (granted by an earlier owner or incarnation).
    fn become_resident_with_holds(&mut self, loaded: LoadedKey, ctx: &mut Context<Self>) {
        self.become_resident(loaded.key);
        let KeyState::Resident(resident) = &mut self.state else {
            return;
        };
        if loaded.holds.is_empty() {
            return;
        }
        let holds = resident.holds.get_or_insert_with(Box::default);
        let before = holds.len();
        for stored in loaded.holds {
            let hold = Hold {
                tokens: stored.tokens,
                expires_at: stored.expires_at.timestamp(),
            };
            holds.grant(&stored.reservation_id, hold);
        }
        let added = holds.len() - before;
        metrics::gauge!(names::RESERVATIONS_ACTIVE).increment(added as f64);
        self.shared.note_holding(self.id, ctx.address());
    }

    /// After holds were released: counts them, and leaves the registry's expiry sweep when none is left.
    fn holds_released(&mut self, count: usize, counter: &'static str) {
        if count == 0 {
            return;
        }
        metrics::counter!(counter).increment(count as u64);
        metrics::gauge!(names::RESERVATIONS_ACTIVE).decrement(count as f64);
        if let KeyState::Resident(resident) = &self.state {
            if resident.holds.is_none() {
                self.shared.forget_holding(self.id);
            }
        }
    }

    /// Releases the holds expired by now, counting them.
    fn expire_due_holds(&mut self) {
        let now = self.shared.clock.now();
        if let KeyState::Resident(resident) = &mut self.state {
            let expired = resident.expire_holds(now);
            self.holds_released(expired, names::RESERVATIONS_EXPIRED_TOTAL);
        }
    }

    /// Whether an admin change can go ahead: `false` for an unknown key, `Err` if it did not load.
    fn ready_for_admin(&self) -> Result<bool, KeyError> {
        match &self.state {
            KeyState::LoadFailed(error) => Err(KeyError::Load(error.clone())),
            state => Ok(matches!(state, KeyState::Resident(_))),
        }
    }

    /// Pending tokens or live holds: the actor must stay (holds are answered from memory only).
    fn has_pending(&self) -> bool {
        matches!(&self.state, KeyState::Resident(resident) if resident.pending != 0 || resident.holds.is_some())
    }

    /// The resident state as of now, a lapsed window rolled over first; `None` for an unknown
    /// key, `Err` if the key could not be loaded.
    fn resident_now(&mut self) -> Result<Option<&mut Resident>, KeyError> {
        let now = self.shared.clock.now();
        match &mut self.state {
            KeyState::LoadFailed(error) => Err(KeyError::Load(error.clone())),
            KeyState::Resident(resident) => {
                resident.roll_over_if_lapsed(now);
                Ok(Some(resident))
            }
            _ => Ok(None),
        }
    }
}

impl Actor for KeyActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        metrics::gauge!(crate::metrics::RESIDENT_KEY_ACTORS).increment(1.0);
        let loader = self.shared.loader.clone();
        let id = self.id;
        let loading = matches!(self.state, KeyState::Loading);
        // `wait` holds every message until the key is loaded, so none sees a half-built state.
        if loading {
            ctx.wait(async move { loader.load(id).await }.into_actor(self).map(
                move |loaded, actor, ctx| match loaded {
                    Ok(Some(loaded)) => actor.become_resident_with_holds(loaded, ctx),
                    Ok(None) => {
                        actor.state = KeyState::Unknown;
                        ctx.run_later(NEGATIVE_ENTRY_LIFETIME, |_, ctx| ctx.stop());
                    }
                    Err(error) => {
                        tracing::warn!(api_key_id = id, %error, "could not load API key");
                        actor.state = KeyState::LoadFailed(error);
                        ctx.run_later(FAILED_LOAD_RETRY_AFTER, |_, ctx| ctx.stop());
                    }
                },
            ));
        }
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        metrics::gauge!(crate::metrics::RESIDENT_KEY_ACTORS).decrement(1.0);
        if let KeyState::Resident(resident) = &self.state {
            // Stored (or queued for the writer): the next owner of the key loads them.
            let held = resident.hold_count();
            if held > 0 {
                metrics::gauge!(names::RESERVATIONS_ACTIVE).decrement(held as f64);
                self.shared.forget_holding(self.id);
            }
        }
        self.shared.forget(self.id, &ctx.address());
    }
}

impl Handler<CheckQuota> for KeyActor {
    type Result = Result<CheckReply, KeyError>;

    fn handle(&mut self, msg: CheckQuota, ctx: &mut Self::Context) -> Self::Result {
        let id = self.id;
        let allow_unknown = self.shared.unknown_key == UnknownKeyPolicy::Allow;
        let now = self.shared.clock.now();
        if self.resident_now()?.is_some() {
            self.expire_due_holds();
        }
        let Some(resident) = self.resident_now()? else {
            return Ok(CheckReply::for_unknown_key(id, allow_unknown));
        };
        let view = resident.view();
        let reserved = resident.reserved();
        let Some(reserve) = msg.ask.reserve.as_ref() else {
            return Ok(CheckReply::for_known_key(
                id,
                &view,
                reserved,
                msg.ask.estimate(),
            ));
        };
        // Idempotent by reservation_id: a retried hold returns the hold, never holds twice.
        if let Some(hold) = resident.holds.as_ref().and_then(|h| h.get(&reserve.id)) {
            return Ok(CheckReply::for_known_key(id, &view, reserved, None)
                .with_existing_hold(hold.view(&reserve.id)));
        }
        let mut reply = CheckReply::for_known_key(id, &view, reserved, Some(reserve.tokens));
        if !reply.allowed() {
            return Ok(reply);
        }
        let hold = Hold {
            tokens: reserve.tokens,
            expires_at: expiry_of(now, reserve.ttl_secs),
        };
        let first = resident.holds.is_none();
        resident
            .holds
            .get_or_insert_with(Box::default)
            .grant(&reserve.id, hold);
        reply.tokens_reserved = resident.reserved();
        reply.remaining = reply
            .remaining
            .map(|remaining| remaining.saturating_sub(reserve.tokens).max(0));
        reply.reservation = Some(hold.view(&reserve.id));
        metrics::counter!(names::RESERVATIONS_GRANTED_TOTAL).increment(1);
        metrics::gauge!(names::RESERVATIONS_ACTIVE).increment(1.0);
        if first {
            self.shared.note_holding(id, ctx.address());
        }
        // Durable with the lane's next batch; the reply does not wait for it (SPEC §2.3: only
        // holds granted within the last flush interval before a crash may be lost).
        if let Some(writer) = self.shared.hold_writer() {
            writer.submit_hold(
                id,
                HoldChange::Granted {
                    api_key_id: id,
                    id: reserve.id.clone(),
                    hold,
                },
            );
        }
        Ok(reply)
    }
}

impl Handler<UpdateKey> for KeyActor {
    type Result = AtomicResponse<Self, Result<Option<Model>, KeyError>>;

    fn handle(&mut self, msg: UpdateKey, _: &mut Self::Context) -> Self::Result {
        let ready = self.ready_for_admin();
        let db = self.shared.db.clone();
        let alerts = self.shared.alerts.clone();
        let now = self.shared.clock.now();
        let id = self.id;
        // Atomic: no check runs between the write and the new state, so the next check sees the change.
        AtomicResponse::new(Box::pin(
            async move {
                if !ready? {
                    return Ok(None);
                }
                // The owner is checked in the database: actors keep no usernames, to stay small.
                let updated = api_keys::update_key(
                    &db,
                    id,
                    &msg.username,
                    msg.change,
                    now,
                    alerts.thresholds(),
                )
                .await
                .map_err(KeyError::Database)?;
                // A lowered quota may have recorded alerts (a quick look at nothing otherwise).
                alerts.wake_publisher();
                Ok(updated)
            }
            .into_actor(self)
            .map(|result, actor, _| {
                if let Ok(Some(key)) = &result {
                    // Pending tokens stay: their batch commits after the change and the stored counter includes them.
                    actor.become_resident(key.clone());
                }
                result
            }),
        ))
    }
}

impl Handler<DeleteKey> for KeyActor {
    type Result = AtomicResponse<Self, Result<bool, KeyError>>;

    fn handle(&mut self, msg: DeleteKey, _: &mut Self::Context) -> Self::Result {
        let ready = self.ready_for_admin();
        let db = self.shared.db.clone();
        let id = self.id;
        AtomicResponse::new(Box::pin(
            async move {
                if !ready? {
                    return Ok(false);
                }
                api_keys::delete_key(&db, id, &msg.username)
                    .await
                    .map_err(KeyError::Database)
            }
            .into_actor(self)
            .map(|result, actor, ctx| {
                if let Ok(true) = result {
                    actor.state = KeyState::Unknown;
                    ctx.stop();
                }
                result
            }),
        ))
    }
}

impl Handler<RecordUsage> for KeyActor {
    type Result = Result<Vec<Result<UsageRecorded, KeyError>>, KeyError>;

    /// Each event is answered for itself: one the actor cannot count leaves the others counted.
    fn handle(&mut self, msg: RecordUsage, _: &mut Self::Context) -> Self::Result {
        Ok(msg
            .events
            .into_iter()
            .map(|event| self.record_usage(event))
            .collect())
    }
}

impl KeyActor {
    /// Takes one usage event in; see [`RecordUsage`].
    fn record_usage(&mut self, msg: UsageToRecord) -> Result<UsageRecorded, KeyError> {
        if self.resident_now()?.is_none() {
            return Ok(UsageRecorded::UnknownKey);
        }
        self.expire_due_holds();
        if let Some(reservation_id) = &msg.reservation_id {
            // Whatever the amount, late or not: the request is over. An expired, voided or
            // unknown hold releases nothing; the usage counts all the same.
            let released = match &mut self.state {
                KeyState::Resident(resident) => resident.release_hold(reservation_id).is_some(),
                _ => false,
            };
            let counter = if msg.tokens == 0 {
                names::RESERVATIONS_VOIDED_TOTAL
            } else {
                names::RESERVATIONS_SETTLED_TOTAL
            };
            self.holds_released(usize::from(released), counter);
        }
        let Some(resident) = self.resident_now()? else {
            return Ok(UsageRecorded::UnknownKey);
        };
        let generation = resident.generation;
        // Late events (window already closed) never touch the current counter.
        let late = crate::domain::window::is_late(msg.occurred_at, instant_of(resident.reset_at));
        if msg.tokens == 0 || late {
            return Ok(UsageRecorded::NotPending);
        }
        if let Err(refused) = resident.record(msg.tokens) {
            return Ok(refused);
        }
        Ok(UsageRecorded::Pending(PendingTicket {
            generation,
            window_end: instant_of(resident.reset_at),
            tokens: msg.tokens,
        }))
    }
}

impl Handler<UsageCommitted> for KeyActor {
    type Result = ();

    fn handle(&mut self, msg: UsageCommitted, _: &mut Self::Context) {
        let KeyState::Resident(resident) = &mut self.state else {
            return;
        };
        for ticket in msg.released {
            if ticket.generation == resident.generation
                && ticket.window_end.timestamp() == resident.reset_at
            {
                resident.pending -= ticket.tokens;
            }
        }
        // Only a newer row counts: a counter queued before an admin reset must not undo it.
        if let Some(counter) = msg.counter {
            if counter.version > resident.version {
                resident.version = counter.version;
                if counter.reset_at.timestamp() == resident.reset_at {
                    resident.committed = counter.used;
                } else if counter.reset_at.timestamp() > resident.reset_at {
                    // The database is in a newer window than this actor: adopt it.
                    resident.committed = counter.used;
                    resident.pending = 0;
                    resident.reset_at = counter.reset_at.timestamp();
                }
            }
        }
    }
}

impl Handler<WindowRolled> for KeyActor {
    type Result = ();

    fn handle(&mut self, msg: WindowRolled, _: &mut Self::Context) {
        if let KeyState::Resident(resident) = &mut self.state {
            // An actor that already rolled over lazily is in the new window and keeps what it counted since.
            if resident.reset_at == msg.closed_reset_at.timestamp() {
                resident.committed = 0;
                resident.pending = 0;
                resident.reset_at = msg.new_reset_at.timestamp();
            }
        }
    }
}

impl Handler<DescribeKey> for KeyActor {
    type Result = Result<Option<QuotaState>, KeyError>;

    fn handle(&mut self, _: DescribeKey, _: &mut Self::Context) -> Self::Result {
        Ok(self.resident_now()?.map(|resident| resident.view()))
    }
}

impl Handler<ListHolds> for KeyActor {
    type Result = Result<Option<Vec<Reservation>>, KeyError>;

    fn handle(&mut self, _: ListHolds, _: &mut Self::Context) -> Self::Result {
        if self.resident_now()?.is_none() {
            return Ok(None);
        }
        self.expire_due_holds();
        Ok(self.resident_now()?.map(|resident| {
            resident
                .holds
                .as_ref()
                .map_or_else(Vec::new, |holds| holds.list())
        }))
    }
}

impl Handler<ExpireHolds> for KeyActor {
    type Result = ();

    fn handle(&mut self, _: ExpireHolds, _: &mut Self::Context) {
        self.expire_due_holds();
    }
}

impl Handler<RefreshKey> for KeyActor {
    type Result = AtomicResponse<Self, Result<(), KeyError>>;

    fn handle(&mut self, _: RefreshKey, _: &mut Self::Context) -> Self::Result {
        let db = self.shared.db.clone();
        let id = self.id;
        // Atomic: no check is answered from the old state once the reload has begun.
        AtomicResponse::new(Box::pin(
            async move {
                api_keys::find_key(&db, id)
                    .await
                    .map_err(KeyError::Database)
            }
            .into_actor(self)
            .map(|loaded, actor, ctx| match loaded {
                Ok(Some(key)) => {
                    // Pending tokens stay: their batch commits after the change.
                    actor.become_resident(key);
                    Ok(())
                }
                Ok(None) => {
                    // Deleted: unknown from now on; the next request starts a fresh actor.
                    actor.state = KeyState::Unknown;
                    ctx.stop();
                    Ok(())
                }
                Err(error) => {
                    // The old state must not answer on: stop, so the next request loads afresh.
                    ctx.stop();
                    Err(error)
                }
            }),
        ))
    }
}

impl Handler<StopIfIdle> for KeyActor {
    type Result = ();

    fn handle(&mut self, _: StopIfIdle, ctx: &mut Self::Context) {
        self.expire_due_holds();
        // Pending tokens would be forgotten with the actor: stay until they are committed; live
        // holds are answered from memory only: stay until they are released.
        if !self.has_pending() {
            ctx.stop();
        }
    }
}

impl Handler<StopKeyActor> for KeyActor {
    type Result = ();

    fn handle(&mut self, _: StopKeyActor, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn holds_cost_a_key_actor_no_bytes() {
        // 72 bytes before holds existed; see `TagRoom`.
        assert_eq!(std::mem::size_of::<KeyActor>(), 72);
    }

    /// A usage event taken in, or the oldest pending one committed (the database adding it).
    #[derive(Clone, Debug)]
    enum Step {
        Record(i64),
        CommitOldest,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..=crate::domain::usage::MAX_EVENT_TOKENS).prop_map(Step::Record),
            (0..=i64::MAX).prop_map(Step::Record),
            Just(Step::CommitOldest),
        ]
    }

    proptest! {
        #[test]
        fn no_sequence_of_events_lowers_or_wraps_a_counter(
            start in prop_oneof![0..=i64::MAX, (i64::MAX - 4_000_000_000_000)..=i64::MAX],
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let mut resident = Resident {
                quota: None,
                committed: start,
                pending: 0,
                reset_at: 1_796_083_200,
                version: 1,
                holds: None,
                generation: 1,
                _tag_room: TagRoom::Zero,
            };
            let mut pending_events = std::collections::VecDeque::new();
            let mut before = resident.view().used;
            for step in steps {
                match step {
                    Step::Record(tokens) => match resident.record(tokens) {
                        Ok(()) => pending_events.push_back(tokens),
                        Err(refused) => prop_assert!(
                            matches!(refused, UsageRecorded::WouldOverflow { .. }),
                            "only an overflow is refused"
                        ),
                    },
                    Step::CommitOldest => {
                        if let Some(tokens) = pending_events.pop_front() {
                            resident.pending -= tokens;
                            resident.committed += tokens;
                        }
                    }
                }
                let used = resident.view().used;
                prop_assert!(used >= 0, "counter went negative: {used}");
                prop_assert!(used >= before, "counter went down from {before} to {used}");
                before = used;
            }
        }
    }
}
