//! The alert outbox: crossings recorded in the transaction that commits them, taken by the
//! publisher oldest first, marked once the broker confirmed them, re-armed by `reset_usage`.
//! Published rows stay until their window is over: they are what makes a threshold fire once.

use chrono::{DateTime, Utc};
use entity::alert_outbox::{self, Column, Entity as AlertOutbox};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

use crate::domain::alerts::Alert;

/// Records `alerts`, skipping any whose key, window and threshold already fired and was not
/// re-armed since; returns how many fire. Run it in the transaction that commits the crossing.
///
/// A re-armed row (after `reset_usage`) is reused: it takes the new firing's values, becomes
/// unpublished again and gets the next revision.
pub async fn record_alerts(db: &impl ConnectionTrait, alerts: &[Alert]) -> Result<u64, DbErr> {
    if alerts.is_empty() {
        return Ok(0);
    }
    let fired_again = [
        Column::Username,
        Column::TokenQuotaMonthly,
        Column::TokensUsedThisMonth,
        Column::QuotaResetAt,
        Column::OccurredAt,
    ];
    let mut on_conflict = OnConflict::columns([
        Column::ApiKeyId,
        Column::PeriodStart,
        Column::ThresholdPercent,
    ]);
    on_conflict
        .update_columns(fired_again)
        .value(
            Column::PublishedAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .value(Column::Rearmed, Expr::value(false))
        .value(
            Column::Revision,
            Expr::col((AlertOutbox, Column::Revision)).add(1i64),
        )
        // Not re-armed: it fired already in this window, nothing happens.
        .action_and_where(Expr::col((AlertOutbox, Column::Rearmed)).eq(true));
    let mut insert = Query::insert();
    insert
        .into_table(AlertOutbox)
        .columns([
            Column::ApiKeyId,
            Column::PeriodStart,
            Column::ThresholdPercent,
            Column::Username,
            Column::TokenQuotaMonthly,
            Column::TokensUsedThisMonth,
            Column::QuotaResetAt,
            Column::OccurredAt,
        ])
        .on_conflict(on_conflict);
    for alert in alerts {
        let percent = i32::try_from(alert.threshold_percent).map_err(|_| {
            DbErr::Custom(format!(
                "threshold {} % does not fit the outbox",
                alert.threshold_percent
            ))
        })?;
        insert.values_panic([
            alert.api_key_id.into(),
            alert.period_start.into(),
            percent.into(),
            alert.username.clone().into(),
            alert.token_quota_monthly.into(),
            alert.tokens_used_this_month.into(),
            alert.quota_reset_at.into(),
            alert.occurred_at.into(),
        ]);
    }
    Ok(db.execute(&insert).await?.rows_affected())
}

/// `reset_usage`: the key's thresholds of the window starting at `period_start` may fire again.
///
/// Rows are flagged rather than deleted: an alert still waiting for the broker reports a
/// crossing that happened and is still sent (a new crossing before then refreshes it, same
/// `alert_id`); and an alert being published right now is marked by its revision, so the
/// publisher's late mark cannot swallow a firing that comes after the reset.
pub async fn rearm_window(
    db: &impl ConnectionTrait,
    api_key_id: i64,
    period_start: DateTime<Utc>,
) -> Result<(), DbErr> {
    AlertOutbox::update_many()
        .col_expr(Column::Rearmed, Expr::value(true))
        .filter(Column::ApiKeyId.eq(api_key_id))
        .filter(Column::PeriodStart.eq(period_start))
        .exec(db)
        .await?;
    Ok(())
}

/// A deleted key's alerts go with it (an id created again starts unalerted).
pub async fn delete_key_alerts(db: &impl ConnectionTrait, api_key_id: i64) -> Result<(), DbErr> {
    AlertOutbox::delete_many()
        .filter(Column::ApiKeyId.eq(api_key_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Alerts recorded and not yet confirmed by the broker, over every instance.
pub async fn pending_count(db: &impl ConnectionTrait) -> Result<u64, DbErr> {
    AlertOutbox::find()
        .filter(Column::PublishedAt.is_null())
        .count(db)
        .await
}

/// Up to `limit` unpublished alerts, oldest first. On PostgreSQL inside the caller's
/// transaction, locked, skipping those another instance is publishing; alerts whose key has an
/// older unpublished alert outside this set are left for later, so a key's alerts go out in order.
pub async fn take_pending(
    txn: &impl ConnectionTrait,
    limit: u64,
) -> Result<Vec<alert_outbox::Model>, DbErr> {
    let postgres = txn.get_database_backend() == DbBackend::Postgres;
    let mut select = AlertOutbox::find()
        .filter(Column::PublishedAt.is_null())
        .order_by_asc(Column::Id)
        .limit(limit);
    if postgres {
        select = select.lock_with_behavior(
            sea_orm::sea_query::LockType::Update,
            sea_orm::sea_query::LockBehavior::SkipLocked,
        );
    }
    let mut taken = select.all(txn).await?;
    if !postgres || taken.is_empty() {
        return Ok(taken);
    }
    let keys: Vec<i64> = taken.iter().map(|row| row.api_key_id).collect();
    let newest = taken.iter().map(|row| row.id).max().unwrap_or(i64::MIN);
    let taken_ids: std::collections::HashSet<i64> = taken.iter().map(|row| row.id).collect();
    // Unpublished alerts of the same keys, older than some taken one, that another instance holds.
    let held_elsewhere: Vec<(i64, i64)> = AlertOutbox::find()
        .select_only()
        .column(Column::ApiKeyId)
        .column(Column::Id)
        .filter(Column::PublishedAt.is_null())
        .filter(Column::ApiKeyId.is_in(keys))
        .filter(Column::Id.lt(newest))
        .into_tuple()
        .all(txn)
        .await?;
    let mut oldest_held: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    for (key, id) in held_elsewhere {
        if !taken_ids.contains(&id) {
            let oldest = oldest_held.entry(key).or_insert(id);
            *oldest = Ord::min(*oldest, id);
        }
    }
    taken.retain(|row| {
        oldest_held
            .get(&row.api_key_id)
            .is_none_or(|&held| row.id < held)
    });
    Ok(taken)
}

/// Marks the firings `sent` (id and revision) as confirmed by the broker at `now`; a row fired
/// again since it was taken (a newer revision) stays unpublished.
pub async fn mark_published(
    db: &impl ConnectionTrait,
    sent: &[(i64, i64)],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    // One statement per alert: alerts are few (one per key and threshold and month).
    for &(id, revision) in sent {
        AlertOutbox::update_many()
            .col_expr(Column::PublishedAt, Expr::value(Some(now)))
            .filter(Column::Id.eq(id))
            .filter(Column::Revision.eq(revision))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Forgets published alerts of windows that started before `before` (closed windows: usage can
/// no longer reach their thresholds); returns how many.
pub async fn prune_published(
    db: &impl ConnectionTrait,
    before: DateTime<Utc>,
) -> Result<u64, DbErr> {
    Ok(AlertOutbox::delete_many()
        .filter(Column::PeriodStart.lt(before))
        .filter(Column::PublishedAt.is_not_null())
        .exec(db)
        .await?
        .rows_affected)
}
