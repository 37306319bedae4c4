//! Creates `alert_outbox`: one row per key, window and threshold crossed (SPEC §2.4), recorded in
//! the transaction of the crossing and marked once the broker confirmed its publication.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AlertOutbox::Table)
                    .if_not_exists()
                    // Ascending with insertion: the publisher sends the oldest first.
                    .col(big_pk_auto(AlertOutbox::Id))
                    .col(big_integer(AlertOutbox::ApiKeyId))
                    .col(timestamp_with_time_zone(AlertOutbox::PeriodStart))
                    .col(integer(AlertOutbox::ThresholdPercent))
                    .col(string_len(AlertOutbox::Username, 255))
                    .col(big_integer(AlertOutbox::TokenQuotaMonthly))
                    .col(big_integer(AlertOutbox::TokensUsedThisMonth))
                    .col(timestamp_with_time_zone(AlertOutbox::QuotaResetAt))
                    .col(timestamp_with_time_zone(AlertOutbox::OccurredAt))
                    // NULL until the broker confirmed the alert.
                    .col(timestamp_with_time_zone_null(AlertOutbox::PublishedAt))
                    // Set by `reset_usage`: the next crossing of this threshold fires again.
                    .col(boolean(AlertOutbox::Rearmed).default(false))
                    // Bumped by every firing: the publisher marks only the firing it sent.
                    .col(big_integer(AlertOutbox::Revision).default(0))
                    .to_owned(),
            )
            .await?;
        // One alert per key, window and threshold, whichever instance commits the crossing:
        // the crossing's `INSERT … ON CONFLICT DO NOTHING` meets this index.
        manager
            .create_index(
                Index::create()
                    .name("uq_alert_outbox_key_period_threshold")
                    .table(AlertOutbox::Table)
                    .col(AlertOutbox::ApiKeyId)
                    .col(AlertOutbox::PeriodStart)
                    .col(AlertOutbox::ThresholdPercent)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // The publisher's question, every second on every instance: a partial index stays as
        // small as the backlog (both databases support `WHERE` on an index).
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS idx_alert_outbox_pending \
                 ON alert_outbox (id) WHERE published_at IS NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AlertOutbox::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum AlertOutbox {
    Table,
    Id,
    ApiKeyId,
    PeriodStart,
    ThresholdPercent,
    Username,
    TokenQuotaMonthly,
    TokensUsedThisMonth,
    QuotaResetAt,
    OccurredAt,
    PublishedAt,
    Rearmed,
    Revision,
}
