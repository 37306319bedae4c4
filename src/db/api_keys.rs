//! Queries on `api_keys`: create (assigned or given id), read, list, change, delete.

use chrono::{DateTime, Utc};
use entity::api_keys::{self, ActiveModel, Column, Entity as ApiKeys, Model};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, SqlErr, SqliteTransactionMode, Statement, TransactionOptions,
    TransactionSession, TransactionTrait,
};

use super::alerts::{delete_key_alerts, rearm_window, record_alerts};
use super::usage::add_to_history;
use crate::domain::alerts::{CounterChange, Thresholds};
use crate::domain::quota::QuotaState;
use crate::domain::window::{next_window_start, window_ending_at};

/// What an operator asks for when creating a key.
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub id: Option<i64>,
    pub username: String,
    pub description: String,
    pub token_quota_monthly: Option<i64>,
}

/// A change to a key; `None` fields are left as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyChange {
    pub description: Option<String>,
    /// `Some(None)` clears the quota (unlimited).
    pub token_quota_monthly: Option<Option<i64>>,
    pub reset_usage: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateKeyError {
    #[error("API key {0} already exists")]
    IdTaken(i64),
    #[error(transparent)]
    Database(#[from] DbErr),
}

/// Most runs of ids taken by explicit creates that one assignment skips before giving up.
const MAX_ASSIGNMENT_SKIPS: usize = 64;

/// SQL moving the id sequence to the end of the run of taken ids that starts at `$1`, so its
/// next value is free (as far as this run goes).
const SKIP_TAKEN_IDS: &str = "SELECT setval(pg_get_serial_sequence('api_keys', 'id'), \
     (SELECT MIN(taken.id) FROM api_keys AS taken WHERE taken.id >= $1 \
      AND NOT EXISTS (SELECT 1 FROM api_keys AS next WHERE next.id = taken.id + 1)))";

/// Inserts a key whose first window is the one containing `now`.
pub async fn create_key(
    db: &impl ConnectionTrait,
    new_key: NewKey,
    now: DateTime<Utc>,
) -> Result<Model, CreateKeyError> {
    let mut row = ActiveModel {
        username: Set(new_key.username),
        description: Set(new_key.description),
        created_at: Set(now),
        token_quota_monthly: Set(new_key.token_quota_monthly),
        tokens_used_this_month: Set(0),
        quota_reset_at: Set(next_window_start(now)),
        ..Default::default()
    };
    let explicit_id = new_key.id;
    if let Some(id) = explicit_id {
        row.id = Set(id);
    }
    if explicit_id.is_none() && db.get_database_backend() == DbBackend::Postgres {
        return insert_with_assigned_id(db, row).await;
    }
    let created = match row.insert(db).await {
        Ok(model) => model,
        Err(error) => {
            return match (error.sql_err(), explicit_id) {
                (Some(SqlErr::UniqueConstraintViolation(_)), Some(id)) => {
                    Err(CreateKeyError::IdTaken(id))
                }
                _ => Err(error.into()),
            }
        }
    };
    Ok(created)
}

/// PostgreSQL: inserts `row` with the next id of the sequence. Explicit ids never move the
/// sequence (one near the top of the range would exhaust assignment for good); instead, an
/// assigned id that an explicit create already took makes the sequence skip that run of taken
/// ids, and the insert is tried again.
async fn insert_with_assigned_id(
    db: &impl ConnectionTrait,
    mut row: ActiveModel,
) -> Result<Model, CreateKeyError> {
    for _ in 0..MAX_ASSIGNMENT_SKIPS {
        let next = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT nextval(pg_get_serial_sequence('api_keys', 'id'))",
            ))
            .await?
            .ok_or_else(|| DbErr::Custom("nextval returned no row".into()))?
            .try_get_by_index::<i64>(0)?;
        row.id = Set(next);
        match row.clone().insert(db).await {
            Ok(created) => return Ok(created),
            Err(error) if matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                db.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    SKIP_TAKEN_IDS,
                    [next.into()],
                ))
                .await?;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(CreateKeyError::Database(DbErr::Custom(format!(
        "no free API key id after skipping {MAX_ASSIGNMENT_SKIPS} runs of taken ids"
    ))))
}

pub async fn find_key(db: &impl ConnectionTrait, id: i64) -> Result<Option<Model>, DbErr> {
    ApiKeys::find_by_id(id).one(db).await
}

/// The key with `id` if it belongs to `username`.
pub async fn find_user_key(
    db: &impl ConnectionTrait,
    username: &str,
    id: i64,
) -> Result<Option<Model>, DbErr> {
    Ok(find_key(db, id)
        .await?
        .filter(|key| key.username == username))
}

pub async fn list_user_keys(
    db: &impl ConnectionTrait,
    username: &str,
) -> Result<Vec<Model>, DbErr> {
    ApiKeys::find()
        .filter(Column::Username.eq(username))
        .order_by_asc(Column::Id)
        .all(db)
        .await
}

/// Applies `change` to key `id` of `username` at `now`; `None` when it is not that user's key.
///
/// In one transaction, with the row locked: a lapsed window is first rolled over (archived into
/// history), so neither the change nor `reset_usage` can lose a closed month's total. A quota
/// lowered below the usage records the `thresholds` it crosses; `reset_usage` re-arms them.
pub async fn update_key<C>(
    db: &C,
    id: i64,
    username: &str,
    change: KeyChange,
    now: DateTime<Utc>,
    thresholds: &Thresholds,
) -> Result<Option<Model>, DbErr>
where
    C: TransactionTrait + ConnectionTrait,
{
    // On SQLite a write lock from the start: a read that turns into a write fails at once
    // (SQLITE_BUSY_SNAPSHOT, no waiting) when another connection committed in between, such as
    // a batch or the alerts publisher. PostgreSQL ignores the option.
    let txn = db
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await?;
    let mut select = ApiKeys::find_by_id(id).filter(Column::Username.eq(username));
    if txn.get_database_backend() == DbBackend::Postgres {
        select = select.lock_exclusive();
    }
    let Some(current) = select.one(&txn).await? else {
        txn.commit().await?;
        return Ok(None);
    };
    let mut state = QuotaState {
        quota: current.token_quota_monthly,
        used: current.tokens_used_this_month,
        reset_at: current.quota_reset_at,
    };
    let closed = state.roll_over_if_lapsed(now);
    let mut version = current.counter_version;
    let quota_before = current.token_quota_monthly;
    let mut row: ActiveModel = current.into();
    if let Some(closed) = closed {
        let history = std::iter::once(((id, closed.window), closed.tokens)).collect();
        add_to_history(&txn, &history).await?;
        version += 1;
        row.tokens_used_this_month = Set(0);
        row.quota_reset_at = Set(state.reset_at);
        row.counter_version = Set(version);
    }
    if let Some(description) = change.description {
        row.description = Set(description);
    }
    if let Some(quota) = change.token_quota_monthly {
        row.token_quota_monthly = Set(quota);
    }
    if change.reset_usage {
        row.tokens_used_this_month = Set(0);
        row.quota_reset_at = Set(next_window_start(now));
        row.counter_version = Set(version + 1);
    }
    let updated = row.update(&txn).await?;
    if change.reset_usage {
        rearm_window(&txn, id, window_ending_at(updated.quota_reset_at).start).await?;
    }
    let counter_change = CounterChange {
        api_key_id: id,
        username: &updated.username,
        quota_before,
        used_before: state.used,
        quota: updated.token_quota_monthly,
        used: updated.tokens_used_this_month,
        reset_at: updated.quota_reset_at,
    };
    record_alerts(&txn, &counter_change.alerts(thresholds, now)).await?;
    txn.commit().await?;
    Ok(Some(updated))
}

/// Deletes key `id` of `username` and its history in one transaction; `false` when it is not
/// that user's key.
pub async fn delete_key<C>(db: &C, id: i64, username: &str) -> Result<bool, DbErr>
where
    C: TransactionTrait + ConnectionTrait,
{
    let txn = db.begin().await?;
    let deleted = ApiKeys::delete_many()
        .filter(api_keys::Column::Id.eq(id))
        .filter(api_keys::Column::Username.eq(username))
        .exec(&txn)
        .await?;
    if deleted.rows_affected > 0 {
        entity::usage_history::Entity::delete_many()
            .filter(entity::usage_history::Column::ApiKeyId.eq(id))
            .exec(&txn)
            .await?;
        delete_key_alerts(&txn, id).await?;
        entity::reservations::Entity::delete_many()
            .filter(entity::reservations::Column::ApiKeyId.eq(id))
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(deleted.rows_affected > 0)
}
