//! Leaves a fifth of every `api_keys` page free on PostgreSQL, so counter updates stay on their page.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Every committed batch rewrites its keys' counters. Neither counter column is indexed, so
        // with room on the page PostgreSQL makes a heap-only update: no new entries in the three
        // indexes. Pages written from now on keep the room; older ones gain it as rows move.
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared("ALTER TABLE api_keys SET (fillfactor = 80)")
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared("ALTER TABLE api_keys RESET (fillfactor)")
                .await?;
        }
        Ok(())
    }
}
