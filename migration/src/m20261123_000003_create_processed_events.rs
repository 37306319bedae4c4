//! Creates `processed_events`: the event ids already counted, for exactly-once ingestion.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ProcessedEvents::Table)
                    .if_not_exists()
                    .col(string_len(ProcessedEvents::EventId, 128).primary_key())
                    .col(big_integer(ProcessedEvents::ApiKeyId))
                    .col(timestamp_with_time_zone(ProcessedEvents::ProcessedAt))
                    .to_owned(),
            )
            .await?;
        // Retention pruning deletes by age.
        manager
            .create_index(
                Index::create()
                    .name("idx_processed_events_processed_at")
                    .table(ProcessedEvents::Table)
                    .col(ProcessedEvents::ProcessedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ProcessedEvents::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ProcessedEvents {
    Table,
    EventId,
    ApiKeyId,
    ProcessedAt,
}
