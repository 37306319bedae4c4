//! Creates `reservations`: the live holds of each key (SPEC §2.3), so they survive a restart and a change of owner.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Reservations::Table)
                    .if_not_exists()
                    .col(big_integer(Reservations::ApiKeyId))
                    .col(string_len(Reservations::ReservationId, 128))
                    .col(big_integer(Reservations::Tokens))
                    .col(timestamp_with_time_zone(Reservations::ExpiresAt))
                    // A key's holds are read together when its actor loads it.
                    .primary_key(
                        Index::create()
                            .col(Reservations::ApiKeyId)
                            .col(Reservations::ReservationId),
                    )
                    .to_owned(),
            )
            .await?;
        // The scheduler deletes expired holds by age.
        manager
            .create_index(
                Index::create()
                    .name("idx_reservations_expires_at")
                    .table(Reservations::Table)
                    .col(Reservations::ExpiresAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Reservations::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Reservations {
    Table,
    ApiKeyId,
    ReservationId,
    Tokens,
    ExpiresAt,
}
