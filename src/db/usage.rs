//! One batch of usage events in one transaction: dedupe event ids, lock the keys' rows, write what
//! `domain::batch_plan` decides from them (increments, rollovers, late history, threshold alerts),
//! and the batch's hold changes (holds granted, holds settled or voided by its events).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use entity::{api_keys, processed_events, reservations, usage_history};
use sea_orm::sea_query::{
    Alias, Condition, Expr, ExprTrait, InsertStatement, OnConflict, Query, UpdateStatement,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, RuntimeErr, Statement, TransactionSession, TransactionTrait,
};

use crate::domain::alerts::Thresholds;
use crate::domain::batch_plan::{plan_batch, CommittedCounter, PlanRefusal, StoredKey};
use crate::domain::reservation::{instant_of_secs, net_hold_changes, HoldChange, NetHoldChanges};
use crate::domain::usage::UsageEvent;
use crate::domain::window::Window;

/// What a committed batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events counted for the first time.
    pub counted: usize,
    /// Events whose id was already counted (or appeared twice in the batch).
    pub duplicates: usize,
    /// Events of keys that do not exist; acknowledged, not counted.
    pub unknown_key: usize,
    /// Events added to a closed window's history.
    pub late: usize,
    /// Counters of every existing key the batch touched.
    pub counters: Vec<CommittedCounter>,
    /// Threshold alerts the batch recorded in the outbox (crossings not alerted before).
    pub alerts_recorded: u64,
}

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The database answered and will refuse these events however often they are retried (a
    /// value out of range, a constraint): some event of the batch is poison.
    #[error("{0}")]
    Refused(String),
    /// The database could not be reached or gave up for a passing reason: retry as it is.
    #[error(transparent)]
    Unavailable(DbErr),
}

impl From<DbErr> for BatchError {
    fn from(error: DbErr) -> Self {
        match refusal_reason(&error) {
            Some(reason) => BatchError::Refused(reason),
            None => BatchError::Unavailable(error),
        }
    }
}

/// The database's own message when `error` is a refusal of the data rather than an outage:
/// on PostgreSQL SQLSTATE classes 22 (data exception, e.g. `bigint out of range`) and 23
/// (integrity constraint); on SQLite a constraint, a value too big or a type mismatch. Anything
/// else (I/O, pool timeouts, shutdown, serialization failures, deadlocks) is retried.
fn refusal_reason(error: &DbErr) -> Option<String> {
    let (DbErr::Exec(RuntimeErr::SqlxError(driver)) | DbErr::Query(RuntimeErr::SqlxError(driver))) =
        error
    else {
        return None;
    };
    let sea_orm::sqlx::Error::Database(database) = driver.as_ref() else {
        return None;
    };
    let code = database.code()?;
    let refused = if database
        .try_downcast_ref::<sea_orm::sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        code.starts_with("22") || code.starts_with("23")
    } else if database
        .try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // Extended result codes carry the primary code in their low byte.
        const SQLITE_TOOBIG: i64 = 18;
        const SQLITE_CONSTRAINT: i64 = 19;
        const SQLITE_MISMATCH: i64 = 20;
        code.parse::<i64>().is_ok_and(|extended| {
            matches!(
                extended & 0xff,
                SQLITE_TOOBIG | SQLITE_CONSTRAINT | SQLITE_MISMATCH
            )
        })
    } else {
        false
    };
    refused.then(|| {
        format!(
            "database refused the batch ({code}): {}",
            database.message()
        )
    })
}

/// Commits `events` at `now` in one transaction; see the module doc for the steps. A key whose
/// counter crosses one of `thresholds` gets its alert recorded in the same transaction.
pub async fn commit_batch<C>(
    db: &C,
    events: &[&UsageEvent],
    now: DateTime<Utc>,
    thresholds: &Thresholds,
) -> Result<BatchOutcome, BatchError>
where
    C: TransactionTrait,
{
    commit_batch_with_holds(db, events, &[], now, thresholds).await
}

/// Commits `events` and the hold changes `holds` (in the order their key actors made them) at
/// `now` in one transaction: a hold settled by an event leaves the table when the event counts.
pub async fn commit_batch_with_holds<C>(
    db: &C,
    events: &[&UsageEvent],
    holds: &[HoldChange],
    now: DateTime<Utc>,
    thresholds: &Thresholds,
) -> Result<BatchOutcome, BatchError>
where
    C: TransactionTrait,
{
    let txn = db.begin().await?;
    let outcome = if events.is_empty() {
        BatchOutcome::default()
    } else {
        apply_batch(&txn, events, now, thresholds).await?
    };
    write_hold_changes(&txn, holds).await?;
    txn.commit().await?;
    Ok(outcome)
}

/// Rows per statement of hold writes, well below both databases' bound-parameter limits.
const HOLD_ROWS_PER_STATEMENT: usize = 1_000;

/// Applies the net effect of `changes` to `reservations`: released holds deleted, granted ones
/// inserted (replacing a row of the same key and id).
async fn write_hold_changes(
    txn: &impl ConnectionTrait,
    changes: &[HoldChange],
) -> Result<(), DbErr> {
    if changes.is_empty() {
        return Ok(());
    }
    let NetHoldChanges { granted, released } = net_hold_changes(changes);
    for chunk in released.chunks(HOLD_ROWS_PER_STATEMENT) {
        let mut any = Condition::any();
        for &(api_key_id, id) in chunk {
            any = any.add(
                Condition::all()
                    .add(reservations::Column::ApiKeyId.eq(api_key_id))
                    .add(reservations::Column::ReservationId.eq(id)),
            );
        }
        reservations::Entity::delete_many()
            .filter(any)
            .exec(txn)
            .await?;
    }
    for chunk in granted.chunks(HOLD_ROWS_PER_STATEMENT) {
        let mut insert = Query::insert();
        insert
            .into_table(reservations::Entity)
            .columns([
                reservations::Column::ApiKeyId,
                reservations::Column::ReservationId,
                reservations::Column::Tokens,
                reservations::Column::ExpiresAt,
            ])
            .on_conflict(
                OnConflict::columns([
                    reservations::Column::ApiKeyId,
                    reservations::Column::ReservationId,
                ])
                .update_columns([
                    reservations::Column::Tokens,
                    reservations::Column::ExpiresAt,
                ])
                .to_owned(),
            );
        for &(api_key_id, id, hold) in chunk {
            insert.values_panic([
                api_key_id.into(),
                id.into(),
                hold.tokens.into(),
                instant_of_secs(hold.expires_at).into(),
            ]);
        }
        txn.execute(&insert).await?;
    }
    Ok(())
}

/// The stored holds of `key_ids` that have not expired at `now`.
pub async fn live_holds(
    db: &impl ConnectionTrait,
    key_ids: Vec<i64>,
    now: DateTime<Utc>,
) -> Result<Vec<reservations::Model>, DbErr> {
    if key_ids.is_empty() {
        return Ok(Vec::new());
    }
    reservations::Entity::find()
        .filter(reservations::Column::ApiKeyId.is_in(key_ids))
        .filter(reservations::Column::ExpiresAt.gt(now))
        .all(db)
        .await
}

/// Deletes every stored hold expired at `now` (the key actors released them already, or will as
/// they load); returns how many.
pub async fn delete_expired_holds(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let deleted = reservations::Entity::delete_many()
        .filter(reservations::Column::ExpiresAt.lte(now))
        .exec(db)
        .await?;
    Ok(deleted.rows_affected)
}

/// Dedupe, then plan from the locked rows, then write the plan.
async fn apply_batch(
    txn: &impl ConnectionTrait,
    events: &[&UsageEvent],
    now: DateTime<Utc>,
    thresholds: &Thresholds,
) -> Result<BatchOutcome, BatchError> {
    // 1. Dedupe inside the batch, then against every id ever committed: only newly inserted ids count.
    let mut seen = HashSet::with_capacity(events.len());
    let unique: Vec<&UsageEvent> = events
        .iter()
        .copied()
        .filter(|event| seen.insert(event.event_id.as_str()))
        .collect();
    // Every key of the batch, duplicates included: their actors get the committed counter too
    // (after an ambiguous commit, the retry sees only duplicates yet must still inform them).
    let batch_keys: BTreeSet<i64> = unique.iter().map(|event| event.api_key_id).collect();
    let new_ids = insert_new_event_ids(txn, &unique, now).await?;
    let fresh: Vec<&UsageEvent> = unique
        .into_iter()
        .filter(|event| new_ids.contains(event.event_id.as_str()))
        .collect();

    // 2. The keys' rows, locked in ascending id order so concurrent writers lock alike.
    let backend = txn.get_database_backend();
    let mut rows = api_keys::Entity::find()
        .filter(super::key_id_in(
            backend,
            batch_keys.iter().copied().collect(),
        ))
        .order_by_asc(api_keys::Column::Id);
    if backend == DbBackend::Postgres {
        rows = rows.lock_exclusive();
    }
    let rows = rows.all(txn).await?;
    let stored: HashMap<i64, StoredKey<'_>> =
        rows.iter().map(|row| (row.id, stored_key(row))).collect();

    // 3. Decide, from those rows alone.
    let plan = plan_batch(&stored, &fresh, now, thresholds)
        .map_err(|refusal| BatchError::Refused(refusal.to_string()))?;

    // 4. Write: rolled keys get their new window, the others one set-based increment.
    for counter in &plan.rolled {
        api_keys::Entity::update_many()
            .col_expr(
                api_keys::Column::TokensUsedThisMonth,
                Expr::value(counter.used),
            )
            .col_expr(
                api_keys::Column::QuotaResetAt,
                Expr::value(counter.reset_at),
            )
            .col_expr(
                api_keys::Column::CounterVersion,
                Expr::value(counter.version),
            )
            .filter(api_keys::Column::Id.eq(counter.api_key_id))
            .exec(txn)
            .await?;
    }
    let mut counters = plan.unchanged;
    counters.extend(plan.rolled);
    if !plan.increments.is_empty() {
        counters.extend(add_to_counters(txn, &plan.increments).await?);
    }
    if backend == DbBackend::Sqlite {
        history_fits_on_sqlite(txn, &plan.history).await?;
    }
    add_to_history(txn, &plan.history).await?;
    let alerts_recorded = super::alerts::record_alerts(txn, &plan.alerts).await?;
    Ok(BatchOutcome {
        counted: plan.counted,
        duplicates: events.len() - fresh.len(),
        unknown_key: plan.unknown_key,
        late: plan.late,
        counters,
        alerts_recorded,
    })
}

/// What the plan reads of a key's row.
fn stored_key(row: &api_keys::Model) -> StoredKey<'_> {
    StoredKey {
        username: &row.username,
        quota: row.token_quota_monthly,
        counter: counter_of(row),
    }
}

/// SQLite turns an integer sum that overflows into a float instead of failing, so a history row
/// would silently stop being an integer; refuse like PostgreSQL's `bigint out of range` instead.
async fn history_fits_on_sqlite(
    txn: &impl ConnectionTrait,
    history: &BTreeMap<(i64, Window), i64>,
) -> Result<(), BatchError> {
    if history.is_empty() {
        return Ok(());
    }
    let keys: BTreeSet<i64> = history.keys().map(|(key_id, _)| *key_id).collect();
    let stored = usage_history::Entity::find()
        .filter(usage_history::Column::ApiKeyId.is_in(keys))
        .all(txn)
        .await?;
    for row in stored {
        let window = Window {
            start: row.period_start,
            end: row.period_end,
        };
        if let Some(tokens) = history.get(&(row.api_key_id, window)) {
            if row.tokens.checked_add(*tokens).is_none() {
                return Err(BatchError::Refused(
                    PlanRefusal::HistoryOverflow {
                        api_key_id: row.api_key_id,
                        window,
                        stored: row.tokens,
                        tokens: *tokens,
                    }
                    .to_string(),
                ));
            }
        }
    }
    Ok(())
}

fn counter_of(row: &api_keys::Model) -> CommittedCounter {
    CommittedCounter {
        api_key_id: row.id,
        used: row.tokens_used_this_month,
        reset_at: row.quota_reset_at,
        version: row.counter_version,
    }
}

/// Inserts the ids, skipping those already present; returns the ids actually inserted.
async fn insert_new_event_ids(
    txn: &impl ConnectionTrait,
    events: &[&UsageEvent],
    now: DateTime<Utc>,
) -> Result<HashSet<String>, DbErr> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = if txn.get_database_backend() == DbBackend::Postgres {
        // Three array parameters instead of three per event: one statement text, so one cached
        // plan, whatever the batch size.
        // In id order, so two writers meeting the same ids (reused across keys) wait, not deadlock.
        let mut in_id_order = events.to_vec();
        in_id_order.sort_unstable_by(|a, b| a.event_id.cmp(&b.event_id));
        let ids: Vec<String> = in_id_order
            .iter()
            .map(|event| event.event_id.clone())
            .collect();
        let keys: Vec<i64> = in_id_order.iter().map(|event| event.api_key_id).collect();
        txn.query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO processed_events (event_id, api_key_id, processed_at) \
             SELECT event_id, api_key_id, $3 FROM UNNEST($1::varchar[], $2::bigint[]) \
             AS batch(event_id, api_key_id) \
             ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            [ids.into(), keys.into(), now.into()],
        ))
        .await?
    } else {
        txn.query_all(&insert_event_ids_statement(events, now))
            .await?
    };
    rows.iter()
        .map(|row| row.try_get_by_index::<String>(0))
        .collect::<Result<HashSet<_>, DbErr>>()
}

/// The portable form: one row of bound values per event.
fn insert_event_ids_statement(events: &[&UsageEvent], now: DateTime<Utc>) -> InsertStatement {
    let mut insert = Query::insert();
    insert
        .into_table(processed_events::Entity)
        .columns([
            processed_events::Column::EventId,
            processed_events::Column::ApiKeyId,
            processed_events::Column::ProcessedAt,
        ])
        .on_conflict(
            OnConflict::column(processed_events::Column::EventId)
                .do_nothing()
                .to_owned(),
        )
        .returning_col(processed_events::Column::EventId);
    for event in events {
        insert.values_panic([
            event.event_id.clone().into(),
            event.api_key_id.into(),
            now.into(),
        ]);
    }
    insert
}

/// `used = used + delta` for every key in one statement; returns the new counters.
async fn add_to_counters(
    txn: &impl ConnectionTrait,
    increments: &[(i64, i64)],
) -> Result<Vec<CommittedCounter>, DbErr> {
    let rows = if txn.get_database_backend() == DbBackend::Postgres {
        // A join against two array parameters: linear, where the portable `CASE` compares every
        // row with every key (BENCHMARKS.md, "What moved it").
        let (keys, deltas): (Vec<i64>, Vec<i64>) = increments.iter().copied().unzip();
        txn.query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE api_keys SET \
             tokens_used_this_month = api_keys.tokens_used_this_month + batch.delta, \
             counter_version = api_keys.counter_version + 1 \
             FROM UNNEST($1::bigint[], $2::bigint[]) AS batch(id, delta) \
             WHERE api_keys.id = batch.id \
             RETURNING api_keys.id, api_keys.tokens_used_this_month, api_keys.quota_reset_at, \
             api_keys.counter_version",
            [keys.into(), deltas.into()],
        ))
        .await?
    } else {
        txn.query_all(&increment_case_statement(increments)).await?
    };
    rows.iter()
        .map(|row| {
            Ok(CommittedCounter {
                api_key_id: row.try_get_by_index(0)?,
                used: row.try_get_by_index(1)?,
                reset_at: row.try_get_by_index(2)?,
                version: row.try_get_by_index(3)?,
            })
        })
        .collect::<Result<Vec<_>, sea_orm::TryGetError>>()
        .map_err(DbErr::from)
}

/// The portable form of the increment: one `CASE` branch per key.
fn increment_case_statement(increments: &[(i64, i64)]) -> UpdateStatement {
    let mut delta = Expr::case(api_keys::Column::Id.eq(increments[0].0), increments[0].1);
    for &(key_id, tokens) in &increments[1..] {
        delta = delta.case(api_keys::Column::Id.eq(key_id), tokens);
    }
    let delta = delta.finally(0i64);
    let mut update = Query::update();
    update
        .table(api_keys::Entity)
        .value(
            api_keys::Column::TokensUsedThisMonth,
            Expr::col(api_keys::Column::TokensUsedThisMonth).add(delta),
        )
        .value(
            api_keys::Column::CounterVersion,
            Expr::col(api_keys::Column::CounterVersion).add(1i64),
        )
        .and_where(api_keys::Column::Id.is_in(increments.iter().map(|(key_id, _)| *key_id)))
        .returning(Query::returning().columns([
            api_keys::Column::Id,
            api_keys::Column::TokensUsedThisMonth,
            api_keys::Column::QuotaResetAt,
            api_keys::Column::CounterVersion,
        ]));
    update
}

/// An insert into `usage_history` (key, window start and end, tokens) that, on a second row for
/// the same key and window, adds its tokens to the first. Callers give the rows.
pub(crate) fn history_upsert() -> InsertStatement {
    Query::insert()
        .into_table(usage_history::Entity)
        .columns([
            usage_history::Column::ApiKeyId,
            usage_history::Column::PeriodStart,
            usage_history::Column::PeriodEnd,
            usage_history::Column::Tokens,
        ])
        .on_conflict(
            OnConflict::columns([
                usage_history::Column::ApiKeyId,
                usage_history::Column::PeriodStart,
            ])
            .value(
                usage_history::Column::Tokens,
                Expr::col((usage_history::Entity, usage_history::Column::Tokens)).add(Expr::col((
                    Alias::new("excluded"),
                    usage_history::Column::Tokens,
                ))),
            )
            .to_owned(),
        )
        .to_owned()
}

/// Adds tokens to closed windows' history rows, creating them if missing.
pub(crate) async fn add_to_history(
    txn: &impl ConnectionTrait,
    history: &BTreeMap<(i64, Window), i64>,
) -> Result<(), DbErr> {
    if history.is_empty() {
        return Ok(());
    }
    let mut insert = history_upsert();
    for ((key_id, window), tokens) in history {
        insert.values_panic([
            (*key_id).into(),
            window.start.into(),
            window.end.into(),
            (*tokens).into(),
        ]);
    }
    txn.execute(&insert).await?;
    Ok(())
}
