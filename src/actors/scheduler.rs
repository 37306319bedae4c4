//! `Scheduler`: every `scheduler.interval_ms` rolls lapsed keys over in bulk; hourly prunes old
//! event ids and expired holds.

use std::time::Duration;

use actix::prelude::*;
use sea_orm::{DatabaseConnection, DbErr};

use super::registry::KeyRegistry;
use crate::clock::SharedClock;
use crate::db::rollover::{prune_processed_events, roll_over_lapsed_keys};

/// How often processed event ids past their retention are deleted.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

pub struct Scheduler {
    pub db: DatabaseConnection,
    pub clock: SharedClock,
    pub registry: KeyRegistry,
    pub interval: Duration,
    pub event_retention: chrono::Duration,
}

/// Why a scheduled job failed; it is tried again at its next tick.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("database error while rolling lapsed keys over: {0}")]
    RollOver(#[source] DbErr),
    #[error("database error while pruning processed event ids: {0}")]
    Prune(#[source] DbErr),
}

/// Roll over every lapsed key now (also sent by the timer).
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "Result<usize, SchedulerError>")]
pub struct RollOverLapsedKeys;

/// Delete processed event ids older than the retention period, and stored holds that expired
/// (the key actors released them in memory; a loading actor skips them meanwhile).
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "Result<u64, SchedulerError>")]
pub struct PruneProcessedEvents;

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Right away too: keys that lapsed while the service was down roll over at start.
        ctx.notify(RollOverLapsedKeys);
        ctx.run_interval(self.interval, |_, ctx| ctx.notify(RollOverLapsedKeys));
        ctx.run_interval(PRUNE_INTERVAL, |_, ctx| ctx.notify(PruneProcessedEvents));
    }
}

impl Handler<RollOverLapsedKeys> for Scheduler {
    // Atomic: one rollover at a time, however long it takes.
    type Result = AtomicResponse<Self, Result<usize, SchedulerError>>;

    fn handle(&mut self, _: RollOverLapsedKeys, _: &mut Self::Context) -> Self::Result {
        let db = self.db.clone();
        let registry = self.registry.clone();
        let now = self.clock.now();
        AtomicResponse::new(Box::pin(
            async move {
                let started = std::time::Instant::now();
                let result =
                    roll_over_lapsed_keys(&db, now, |chunk| registry.notify_rolled(&chunk)).await;
                match &result {
                    Ok(0) => {}
                    Ok(rolled) => {
                        metrics::counter!(crate::metrics::ROLLOVERS_TOTAL)
                            .increment(*rolled as u64);
                        tracing::info!(
                            keys = rolled,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "monthly rollover"
                        );
                    }
                    Err(error) => {
                        tracing::warn!(%error, "rollover failed; retrying at the next tick")
                    }
                }
                result.map_err(SchedulerError::RollOver)
            }
            .into_actor(self),
        ))
    }
}

impl Handler<PruneProcessedEvents> for Scheduler {
    type Result = AtomicResponse<Self, Result<u64, SchedulerError>>;

    fn handle(&mut self, _: PruneProcessedEvents, _: &mut Self::Context) -> Self::Result {
        let db = self.db.clone();
        let now = self.clock.now();
        let older_than = now - self.event_retention;
        AtomicResponse::new(Box::pin(
            async move {
                match crate::db::usage::delete_expired_holds(&db, now).await {
                    Ok(deleted) => tracing::debug!(deleted, "expired holds deleted"),
                    Err(error) => tracing::warn!(%error, "deleting expired holds failed"),
                }
                let result = prune_processed_events(&db, older_than).await;
                match &result {
                    Ok(pruned) => tracing::debug!(pruned, "processed event ids pruned"),
                    Err(error) => tracing::warn!(%error, "pruning processed event ids failed"),
                }
                result.map_err(SchedulerError::Prune)
            }
            .into_actor(self),
        ))
    }
}
