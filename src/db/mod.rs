//! Database access: connection with migrations, and query functions over any `ConnectionTrait`.

pub mod alerts;
pub mod api_keys;
pub mod rollover;
pub mod usage;

use std::time::Duration;

use entity::api_keys::Column as KeyColumn;
use migration::{Migrator, MigratorTrait};
use sea_orm::sea_query::extension::postgres::PgFunc;
use sea_orm::sea_query::{Expr, ExprTrait, SimpleExpr};
use sea_orm::{ColumnTrait, ConnectOptions, Database, DatabaseConnection, DbBackend, DbErr};

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

/// `api_keys.id` is one of `ids`: on PostgreSQL `= ANY($1)` with one array parameter, which plans
/// and runs in half the time of an `IN` list of a thousand parameters; elsewhere the `IN` list.
pub(crate) fn key_id_in(backend: DbBackend, ids: Vec<i64>) -> SimpleExpr {
    if backend == DbBackend::Postgres {
        Expr::col(KeyColumn::Id).eq(PgFunc::any(Expr::val(ids)))
    } else {
        KeyColumn::Id.is_in(ids)
    }
}
