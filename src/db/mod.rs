//! Database access: connection with migrations, and query functions over any `ConnectionTrait`.

pub mod api_keys;
pub mod rollover;
pub mod usage;

use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};

use crate::settings::DatabaseSettings;

/// Opens the pool and applies every pending migration.
pub async fn connect_and_migrate(settings: &DatabaseSettings) -> Result<DatabaseConnection, DbErr> {
    let db = connect(settings).await?;
    Migrator::up(&db, None).await?;
    Ok(db)
}

/// Opens the pool without touching the schema.
pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(settings.url.clone());
    options
        .max_connections(settings.max_connections)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    Database::connect(options).await
}
