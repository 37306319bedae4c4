//! `Owners`: answers about a key from the instance that owns it — this one's actor when it holds
//! the key, else the owner asked through the broker — and makes admin changes reach the owner.
//!
//! Only the owner of a key's shard answers from an actor (SPEC §5): a resident actor here answers
//! only while its shard is owned here. Anything else goes to `quota.check` with the key as routing
//! key, which the broker delivers to the owner, whichever instance that is (this one included).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::api_keys::Model;
use sea_orm::{DatabaseConnection, DbErr};

use crate::actors::key_actor::KeyError;
use crate::actors::registry::KeyRegistry;
use crate::amqp::control::{ForwardError, Forwarder};
use crate::amqp::ownership::Ownership;
use crate::db::api_keys::{self, KeyChange};
use crate::domain::check::{CheckAsk, CheckReply};
use crate::domain::outcome::CheckOutcome;
use crate::domain::quota::QuotaState;
use crate::domain::reservation::{Reservation, ReservationsReply};
use crate::metrics as names;

/// How long a request waits for the owner's answer. A live owner answers in milliseconds; only
/// a hung owner (until the broker notices, ~2.5 heartbeats) or a lost broker take longer.
pub const OWNER_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the owner's answer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Database(#[from] DbErr),
    #[error("the owner of key {0} sent a reply that is not a check reply")]
    BadReply(i64),
    #[error("the owner of key {0} could not answer: {1}")]
    OwnerUnavailable(i64, String),
}

/// See the module doc. Without a broker (`amqp.enabled = false`) this instance owns every key.
#[derive(Clone)]
pub struct Owners {
    registry: KeyRegistry,
    /// With a broker: the way to the owner, and what this instance owns.
    broker: Option<(Forwarder, Arc<Ownership>)>,
}

impl Owners {
    pub fn new(registry: KeyRegistry, broker: Option<(Forwarder, Arc<Ownership>)>) -> Owners {
        Owners { registry, broker }
    }

    /// Whether a resident actor of `shard` may answer: its shard is owned here right now.
    fn owns(&self) -> impl Fn(u16) -> bool + '_ {
        move |shard| {
            self.broker
                .as_ref()
                .is_some_and(|(_, ownership)| ownership.owns(shard))
        }
    }

    /// The owner's answer to a check of key `id` (granting the hold it asks for, if allowed).
    pub async fn check(&self, id: i64, ask: CheckAsk) -> Result<CheckReply, OwnerError> {
        let Some((forwarder, _)) = &self.broker else {
            return Ok(self.registry.check(id, ask).await?);
        };
        if let Some(answer) = self
            .registry
            .check_if_resident(id, ask.clone(), self.owns())
            .await
        {
            return Ok(answer?);
        }
        let request = ask.to_body(id);
        let reply = forwarder
            .check(id, request.to_string().into_bytes(), OWNER_ANSWER_TIMEOUT)
            .await;
        count_forwarded("check", &reply);
        serde_json::from_slice(&reply?).map_err(|_| OwnerError::BadReply(id))
    }

    /// The current window of key `id` as its owner sees it; `None` if the key does not exist.
    pub async fn describe(&self, id: i64) -> Result<Option<QuotaState>, OwnerError> {
        if self.broker.is_none() {
            return Ok(self.registry.describe(id).await?);
        }
        if let Some(answer) = self.registry.describe_if_resident(id, self.owns()).await {
            return Ok(answer?);
        }
        let reply = self.check(id, CheckAsk::default()).await?;
        if reply.outcome == CheckOutcome::Unavailable {
            let detail = reply.detail.unwrap_or_default();
            return Err(OwnerError::OwnerUnavailable(id, detail));
        }
        if !reply.outcome.known() {
            return Ok(None);
        }
        let reset_at = reply
            .quota_reset_at
            .as_deref()
            .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
            .map(|at| at.with_timezone(&Utc))
            .ok_or(OwnerError::BadReply(id))?;
        Ok(Some(QuotaState {
            quota: reply.token_quota_monthly,
            used: reply.tokens_used_this_month,
            reset_at,
        }))
    }

    /// The live holds of key `id` as its owner holds them in memory; `None` if the key does not
    /// exist. Forwarded rather than read from the table: the owner may hold holds granted since
    /// its last batch, and has released settled and expired ones the table still lists.
    pub async fn reservations(&self, id: i64) -> Result<Option<Vec<Reservation>>, OwnerError> {
        let Some((forwarder, _)) = &self.broker else {
            return Ok(self.registry.reservations(id).await?);
        };
        if let Some(answer) = self
            .registry
            .reservations_if_resident(id, self.owns())
            .await
        {
            return Ok(answer?);
        }
        let reply = forwarder.reservations(id, OWNER_ANSWER_TIMEOUT).await;
        count_forwarded("reservations", &reply);
        match serde_json::from_slice(&reply?).map_err(|_| OwnerError::BadReply(id))? {
            ReservationsReply::Listed { reservations } => Ok(Some(reservations)),
            ReservationsReply::UnknownKey => Ok(None),
            ReservationsReply::Unavailable { detail } => {
                Err(OwnerError::OwnerUnavailable(id, detail))
            }
        }
    }

    /// Applies an admin change to key `id` of `username`; returns once the owner has it.
    /// `None` if it is not that user's key.
    pub async fn update(
        &self,
        db: &DatabaseConnection,
        id: i64,
        username: &str,
        change: KeyChange,
        now: DateTime<Utc>,
    ) -> Result<Option<Model>, OwnerError> {
        if self.broker.is_none() {
            return Ok(self.registry.update(id, username, change).await?);
        }
        // Owned here: through the actor, the single writer of the key's state.
        if let Some(answer) = self
            .registry
            .update_if_resident(id, username, change.clone(), self.owns())
            .await
        {
            return Ok(answer?);
        }
        let alerts = self.registry.alerts();
        let updated =
            api_keys::update_key(db, id, username, change, now, alerts.thresholds()).await?;
        alerts.wake_publisher();
        if updated.is_some() {
            self.tell_owner(id).await;
        }
        Ok(updated)
    }

    /// Deletes key `id` of `username`; returns once the owner forgot it. `false` if it is not that user's key.
    pub async fn delete(
        &self,
        db: &DatabaseConnection,
        id: i64,
        username: &str,
    ) -> Result<bool, OwnerError> {
        if self.broker.is_none() {
            return Ok(self.registry.delete(id, username).await?);
        }
        if let Some(answer) = self
            .registry
            .delete_if_resident(id, username, self.owns())
            .await
        {
            return Ok(answer?);
        }
        let deleted = api_keys::delete_key(db, id, username).await?;
        if deleted {
            self.tell_owner(id).await;
        }
        Ok(deleted)
    }

    /// Key `id` was just created: whoever answered "unknown" for it must look again.
    pub async fn created(&self, id: i64) {
        self.registry.invalidate(id);
        if self.broker.is_some() {
            self.tell_owner(id).await;
        }
    }

    /// Makes the owner of `id` reload it, waiting for its confirmation. Without one in time (the
    /// broker is down or the owner hung) the change is still committed: the owner loses its
    /// shards when the broker notices it is gone, and whoever owns them next loads the key fresh.
    async fn tell_owner(&self, id: i64) {
        let Some((forwarder, _)) = &self.broker else {
            return;
        };
        let refreshed = forwarder.refresh(id, OWNER_ANSWER_TIMEOUT).await;
        count_forwarded("refresh", &refreshed);
        if let Err(error) = refreshed {
            tracing::warn!(api_key_id = id, %error, "the key's owner did not confirm an admin change; it is committed and loads with the next owner");
        }
    }
}

fn count_forwarded<T>(kind: &'static str, result: &Result<T, ForwardError>) {
    let outcome = match result {
        Ok(_) => "answered",
        Err(ForwardError::Timeout(..)) => "timeout",
        Err(ForwardError::NotConnected(_)) => "not_connected",
        Err(ForwardError::Broker(..)) => "broker_error",
    };
    metrics::counter!(names::FORWARDED_REQUESTS_TOTAL, "kind" => kind, "outcome" => outcome)
        .increment(1);
}
