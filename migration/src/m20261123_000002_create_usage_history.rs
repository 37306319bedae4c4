//! Creates `usage_history`: one row per key and closed monthly window with its total.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(UsageHistory::Table)
                    .if_not_exists()
                    .col(big_pk_auto(UsageHistory::Id))
                    .col(big_integer(UsageHistory::ApiKeyId))
                    .col(timestamp_with_time_zone(UsageHistory::PeriodStart))
                    .col(timestamp_with_time_zone(UsageHistory::PeriodEnd))
                    .col(big_integer(UsageHistory::Tokens).default(0))
                    // No foreign key: a row-level check per archived row would double the cost of
                    // a monthly rollover of a million keys. Deleting a key deletes its history.
                    .to_owned(),
            )
            .await?;
        // One row per key and window: rollover and late events upsert into it.
        manager
            .create_index(
                Index::create()
                    .name("uq_usage_history_key_period")
                    .table(UsageHistory::Table)
                    .col(UsageHistory::ApiKeyId)
                    .col(UsageHistory::PeriodStart)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(UsageHistory::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum UsageHistory {
    Table,
    Id,
    ApiKeyId,
    PeriodStart,
    PeriodEnd,
    Tokens,
}
