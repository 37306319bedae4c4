//! Ordered list of the schema migrations shared by PostgreSQL and SQLite.

pub use sea_orm_migration::prelude::*;

mod m20261123_000001_create_api_keys;
mod m20261123_000002_create_usage_history;
mod m20261123_000003_create_processed_events;
mod m20261124_000004_api_keys_fillfactor;
mod m20261125_000005_create_alert_outbox;
mod m20261125_000006_create_reservations;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_create_api_keys::Migration),
            Box::new(m20261123_000002_create_usage_history::Migration),
            Box::new(m20261123_000003_create_processed_events::Migration),
            Box::new(m20261124_000004_api_keys_fillfactor::Migration),
            Box::new(m20261125_000005_create_alert_outbox::Migration),
            Box::new(m20261125_000006_create_reservations::Migration),
        ]
    }
}
