//! What the batch writer commits through and whom it tells: the traits, and their production
//! forms (the database, the key registry).

use std::future::Future;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, DbBackend};

use crate::actors::key_actor::UsageCommitted;
use crate::actors::registry::KeyRegistry;
use crate::alerts::Alerts;
use crate::db::usage::{commit_batch_with_holds, BatchError, BatchOutcome};
use crate::domain::reservation::HoldChange;
use crate::domain::usage::UsageEvent;

/// Commits a batch of usage events and hold changes at once, or not at all.
pub trait BatchStore: Send + Sync + 'static {
    /// Commits `events` and `holds` (in the order their key actors made them) at `now`.
    fn commit(
        &self,
        events: &[&UsageEvent],
        holds: &[HoldChange],
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<BatchOutcome, BatchError>> + Send;

    /// How many writer lanes may commit at once, given the configured number.
    fn concurrent_writers(&self, configured: usize) -> usize {
        configured
    }
}

/// Learns what each batch committed, per key.
pub trait CommitListener: Send + Sync + 'static {
    /// Key `api_key_id`'s pending tokens to release and its counter as committed.
    fn usage_committed(&self, api_key_id: i64, committed: UsageCommitted);
}

/// The database, recording the threshold alerts a batch crosses and waking their publisher.
pub struct DatabaseStore {
    pub db: DatabaseConnection,
    pub alerts: Alerts,
}

impl BatchStore for DatabaseStore {
    async fn commit(
        &self,
        events: &[&UsageEvent],
        holds: &[HoldChange],
        now: DateTime<Utc>,
    ) -> Result<BatchOutcome, BatchError> {
        let outcome =
            commit_batch_with_holds(&self.db, events, holds, now, self.alerts.thresholds()).await?;
        if outcome.alerts_recorded > 0 {
            self.alerts.wake_publisher();
        }
        Ok(outcome)
    }

    /// SQLite has a single writer: more lanes would only wait for its lock.
    fn concurrent_writers(&self, configured: usize) -> usize {
        if self.db.get_database_backend() == DbBackend::Sqlite {
            1
        } else {
            configured
        }
    }
}

impl CommitListener for KeyRegistry {
    fn usage_committed(&self, api_key_id: i64, committed: UsageCommitted) {
        self.notify_committed(api_key_id, committed);
    }
}
