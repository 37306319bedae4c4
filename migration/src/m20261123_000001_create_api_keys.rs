//! Creates `api_keys`: one row per API key with its quota, current counter and window end.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ApiKeys::Table)
                    .if_not_exists()
                    .col(big_pk_auto(ApiKeys::Id))
                    .col(string_len(ApiKeys::Username, 255))
                    .col(text(ApiKeys::Description).default(""))
                    .col(timestamp_with_time_zone(ApiKeys::CreatedAt))
                    // NULL means unlimited, as in RESTai, so operators can repair quotas with SQL.
                    .col(big_integer_null(ApiKeys::TokenQuotaMonthly))
                    .col(big_integer(ApiKeys::TokensUsedThisMonth).default(0))
                    .col(timestamp_with_time_zone(ApiKeys::QuotaResetAt))
                    // Bumped by every write of the counter, so a stale copy can be told from a newer one.
                    .col(big_integer(ApiKeys::CounterVersion).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_api_keys_username")
                    .table(ApiKeys::Table)
                    .col(ApiKeys::Username)
                    .to_owned(),
            )
            .await?;
        // The scheduler takes lapsed keys in (quota_reset_at, id) order, a chunk at a time.
        manager
            .create_index(
                Index::create()
                    .name("idx_api_keys_quota_reset_at_id")
                    .table(ApiKeys::Table)
                    .col(ApiKeys::QuotaResetAt)
                    .col(ApiKeys::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ApiKeys::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
pub enum ApiKeys {
    Table,
    Id,
    Username,
    Description,
    CreatedAt,
    TokenQuotaMonthly,
    TokensUsedThisMonth,
    QuotaResetAt,
    CounterVersion,
}
