//! Set-based monthly rollover of every lapsed key, in chunks, archiving each closed window into history.

use chrono::{DateTime, Utc};
use entity::{api_keys, processed_events, usage_history};
use sea_orm::sea_query::{Condition, Expr, ExprTrait, LockType, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionSession, TransactionTrait,
};

use super::usage::add_to_existing_history;
use crate::domain::window::{next_window_start, window_ending_at};

/// Keys rolled over per transaction: short transactions, so checks' key loads and the batch
/// writer are never held up for long.
const CHUNK_KEYS: u64 = 20_000;

/// One chunk of keys that moved from the window ending at `closed_reset_at` to the one ending at `new_reset_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolledChunk {
    pub key_ids: Vec<i64>,
    pub closed_reset_at: DateTime<Utc>,
    pub new_reset_at: DateTime<Utc>,
}

/// Rolls every key whose window ended at or before `now`; calls `on_chunk` after each committed chunk.
/// Months without traffic are skipped: every key lands in the window containing `now`.
///
/// Each chunk is two set-based statements in one transaction, the oldest lapsed window first and
/// keys in id order: archive `tokens_used_this_month` into `usage_history` (rows locked as they are
/// read on PostgreSQL, so a concurrent batch commit cannot slip in between), then reset the counters.
pub async fn roll_over_lapsed_keys<C, F>(
    db: &C,
    now: DateTime<Utc>,
    mut on_chunk: F,
) -> Result<usize, DbErr>
where
    C: TransactionTrait + ConnectionTrait,
    F: FnMut(RolledChunk),
{
    let new_reset_at = next_window_start(now);
    let mut rolled = 0;
    // Each lapsed window once, oldest first; within it, keyset pages by id, so no query has to
    // step over the index entries that earlier chunks left behind.
    let lapsed_windows: Vec<DateTime<Utc>> = api_keys::Entity::find()
        .select_only()
        .column(api_keys::Column::QuotaResetAt)
        .distinct()
        .filter(api_keys::Column::QuotaResetAt.lte(now))
        .order_by_asc(api_keys::Column::QuotaResetAt)
        .into_tuple()
        .all(db)
        .await?;
    for closed_reset_at in lapsed_windows {
        let window = window_ending_at(closed_reset_at);
        let mut after_id: Option<i64> = None;
        loop {
            let txn = db.begin().await?;
            let in_window = || {
                let mut condition =
                    Condition::all().add(api_keys::Column::QuotaResetAt.eq(closed_reset_at));
                if let Some(after_id) = after_id {
                    condition = condition.add(api_keys::Column::Id.gt(after_id));
                }
                condition
            };
            // The last id of this chunk; none when fewer than a chunk are left in the window.
            let last_id: Option<i64> = api_keys::Entity::find()
                .select_only()
                .column(api_keys::Column::Id)
                .filter(in_window())
                .order_by_asc(api_keys::Column::Id)
                .offset(CHUNK_KEYS - 1)
                .limit(1)
                .into_tuple()
                .one(&txn)
                .await?;
            let in_chunk = || match last_id {
                Some(last_id) => in_window().add(api_keys::Column::Id.lte(last_id)),
                None => in_window(),
            };
            let mut closing = Query::select();
            closing
                .column(api_keys::Column::Id)
                .expr(Expr::value(window.start))
                .expr(Expr::value(window.end))
                .column(api_keys::Column::TokensUsedThisMonth)
                .from(api_keys::Entity)
                .cond_where(in_chunk());
            if txn.get_database_backend() == DbBackend::Postgres {
                closing.lock(LockType::Update);
            }
            let mut archive = Query::insert();
            archive
                .into_table(usage_history::Entity)
                .columns([
                    usage_history::Column::ApiKeyId,
                    usage_history::Column::PeriodStart,
                    usage_history::Column::PeriodEnd,
                    usage_history::Column::Tokens,
                ])
                .select_from(closing)
                .map_err(|error| DbErr::Custom(error.to_string()))?
                .on_conflict(add_to_existing_history());
            txn.execute(&archive).await?;
            let mut reset = Query::update();
            reset
                .table(api_keys::Entity)
                .value(api_keys::Column::TokensUsedThisMonth, 0i64)
                .value(api_keys::Column::QuotaResetAt, new_reset_at)
                .value(
                    api_keys::Column::CounterVersion,
                    Expr::col(api_keys::Column::CounterVersion).add(1i64),
                )
                .cond_where(in_chunk())
                .returning_col(api_keys::Column::Id);
            let key_ids = txn
                .query_all(&reset)
                .await?
                .iter()
                .map(|row| row.try_get_by_index::<i64>(0))
                .collect::<Result<Vec<_>, DbErr>>()?;
            txn.commit().await?;
            rolled += key_ids.len();
            on_chunk(RolledChunk {
                key_ids,
                closed_reset_at,
                new_reset_at,
            });
            match last_id {
                Some(last_id) => after_id = Some(last_id),
                None => break,
            }
        }
    }
    Ok(rolled)
}

/// Forgets processed event ids recorded before `older_than`; returns how many.
pub async fn prune_processed_events(
    db: &impl ConnectionTrait,
    older_than: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let result = processed_events::Entity::delete_many()
        .filter(processed_events::Column::ProcessedAt.lt(older_than))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// The closed windows of a key, newest first.
pub async fn usage_history(
    db: &impl ConnectionTrait,
    api_key_id: i64,
) -> Result<Vec<entity::usage_history::Model>, DbErr> {
    entity::usage_history::Entity::find()
        .filter(entity::usage_history::Column::ApiKeyId.eq(api_key_id))
        .order_by_desc(entity::usage_history::Column::PeriodStart)
        .all(db)
        .await
}
