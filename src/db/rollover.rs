//! Set-based monthly rollover of every lapsed key, in chunks, archiving each closed window into history.

use chrono::{DateTime, Utc};
use entity::{api_keys, processed_events};
use sea_orm::sea_query::{Condition, Expr, ExprTrait, LockType, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Statement, TransactionSession, TransactionTrait,
};

use super::usage::history_upsert;
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
/// Each chunk is a range of key ids in one lapsed window, rolled over in one transaction of two
/// set-based statements: archive `tokens_used_this_month` into `usage_history` (rows locked as
/// they are read on PostgreSQL, so a concurrent batch commit cannot slip in between), then reset
/// the counters. Chunk boundaries are computed once per window, so no query steps over the index
/// entries earlier chunks left behind.
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
    let lapsed_windows: Vec<DateTime<Utc>> = api_keys::Entity::find()
        .select_only()
        .column(api_keys::Column::QuotaResetAt)
        .distinct()
        .filter(api_keys::Column::QuotaResetAt.lte(now))
        .order_by_asc(api_keys::Column::QuotaResetAt)
        .into_tuple()
        .all(db)
        .await?;
    let mut rolled = 0;
    for closed_reset_at in lapsed_windows {
        let boundaries = chunk_boundaries(db, closed_reset_at).await?;
        // Ranges (after, up_to]: the last one is open-ended, for keys beyond the last boundary.
        let mut ranges = Vec::with_capacity(boundaries.len() + 1);
        let mut after = None;
        for boundary in boundaries {
            ranges.push((after, Some(boundary)));
            after = Some(boundary);
        }
        ranges.push((after, None));
        // One chunk at a time: concurrent chunks gained little and cost checks latency
        // (BENCHMARKS.md, rollover).
        for (after, up_to) in ranges {
            let chunk = roll_chunk(db, closed_reset_at, new_reset_at, after, up_to).await?;
            rolled += chunk.key_ids.len();
            on_chunk(chunk);
        }
    }
    Ok(rolled)
}

/// Every `CHUNK_KEYS`-th key id of the window ending at `reset_at`, ascending.
async fn chunk_boundaries<C: ConnectionTrait>(
    db: &C,
    reset_at: DateTime<Utc>,
) -> Result<Vec<i64>, DbErr> {
    let backend = db.get_database_backend();
    let placeholder = if backend == DbBackend::Postgres {
        "$1"
    } else {
        "?"
    };
    let sql = format!(
        "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS position \
         FROM api_keys WHERE quota_reset_at = {placeholder}) AS numbered \
         WHERE position % {CHUNK_KEYS} = 0 ORDER BY id"
    );
    db.query_all_raw(Statement::from_sql_and_values(
        backend,
        sql,
        [reset_at.into()],
    ))
    .await?
    .iter()
    .map(|row| row.try_get_by_index::<i64>(0))
    .collect()
}

/// Rolls the keys of one window with ids in `(after, up_to]` over, in one transaction.
async fn roll_chunk<C>(
    db: &C,
    closed_reset_at: DateTime<Utc>,
    new_reset_at: DateTime<Utc>,
    after: Option<i64>,
    up_to: Option<i64>,
) -> Result<RolledChunk, DbErr>
where
    C: TransactionTrait + ConnectionTrait,
{
    let in_chunk = || {
        let mut condition =
            Condition::all().add(api_keys::Column::QuotaResetAt.eq(closed_reset_at));
        if let Some(after) = after {
            condition = condition.add(api_keys::Column::Id.gt(after));
        }
        if let Some(up_to) = up_to {
            condition = condition.add(api_keys::Column::Id.lte(up_to));
        }
        condition
    };
    let window = window_ending_at(closed_reset_at);
    let txn = db.begin().await?;
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
    let mut archive = history_upsert();
    archive
        .select_from(closing)
        .map_err(|error| DbErr::Custom(error.to_string()))?;
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
    Ok(RolledChunk {
        key_ids,
        closed_reset_at,
        new_reset_at,
    })
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
