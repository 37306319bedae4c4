//! Set-based monthly rollover of every lapsed key, in chunks, archiving each closed window into history.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use entity::{api_keys, processed_events};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionSession, TransactionTrait,
};

use super::usage::add_to_history;
use crate::domain::window::{next_window_start, window_ending_at};

/// Keys rolled over per transaction: short transactions, and within the bound-parameter limits
/// (four per key in the history insert: PostgreSQL allows 65,535, SQLite 32,766).
const POSTGRES_CHUNK_KEYS: u64 = 10_000;
const SQLITE_CHUNK_KEYS: u64 = 5_000;

/// One chunk of keys that moved from the window ending at `closed_reset_at` to the one ending at `new_reset_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolledChunk {
    pub key_ids: Vec<i64>,
    pub closed_reset_at: DateTime<Utc>,
    pub new_reset_at: DateTime<Utc>,
}

/// Rolls every key whose window ended at or before `now`; calls `on_chunk` after each committed chunk.
/// Months without traffic are skipped: every key lands in the window containing `now`.
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
    let chunk_keys = match db.get_database_backend() {
        DbBackend::Postgres => POSTGRES_CHUNK_KEYS,
        _ => SQLITE_CHUNK_KEYS,
    };
    let mut rolled = 0;
    loop {
        let txn = db.begin().await?;
        // The oldest lapsed window first; keys in id order so writers lock alike.
        let mut lapsed = api_keys::Entity::find()
            .select_only()
            .columns([
                api_keys::Column::Id,
                api_keys::Column::TokensUsedThisMonth,
                api_keys::Column::QuotaResetAt,
            ])
            .filter(api_keys::Column::QuotaResetAt.lte(now))
            .order_by_asc(api_keys::Column::QuotaResetAt)
            .order_by_asc(api_keys::Column::Id)
            .limit(chunk_keys);
        if txn.get_database_backend() == DbBackend::Postgres {
            lapsed = lapsed.lock_exclusive();
        }
        let rows: Vec<(i64, i64, DateTime<Utc>)> = lapsed.into_tuple().all(&txn).await?;
        let Some(&(_, _, closed_reset_at)) = rows.first() else {
            txn.commit().await?;
            return Ok(rolled);
        };
        let chunk: Vec<(i64, i64)> = rows
            .iter()
            .filter(|(_, _, reset_at)| *reset_at == closed_reset_at)
            .map(|(id, used, _)| (*id, *used))
            .collect();
        let window = window_ending_at(closed_reset_at);
        let history: BTreeMap<_, _> = chunk
            .iter()
            .map(|&(id, used)| ((id, window), used))
            .collect();
        add_to_history(&txn, &history).await?;
        let key_ids: Vec<i64> = chunk.iter().map(|(id, _)| *id).collect();
        api_keys::Entity::update_many()
            .col_expr(api_keys::Column::TokensUsedThisMonth, Expr::value(0i64))
            .col_expr(api_keys::Column::QuotaResetAt, Expr::value(new_reset_at))
            .filter(api_keys::Column::Id.is_in(key_ids.iter().copied()))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        rolled += key_ids.len();
        on_chunk(RolledChunk {
            key_ids,
            closed_reset_at,
            new_reset_at,
        });
    }
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
