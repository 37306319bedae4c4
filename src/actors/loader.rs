//! `KeyLoader`: loads the rows of keys whose actors are starting, with their live holds, many keys
//! per query when many start at once.

use std::collections::HashMap;
use std::sync::Arc;

use entity::api_keys::{self, Model};
use entity::reservations;
use sea_orm::{DatabaseConnection, DbErr, EntityTrait, QueryFilter};
use tokio::sync::{mpsc, oneshot};

use crate::clock::SharedClock;

/// Keys loaded by one query at most.
const MAX_KEYS_PER_QUERY: usize = 1_000;

/// A key's row and its live holds (SPEC §2.3: a new owner takes them over).
#[derive(Debug)]
pub struct LoadedKey {
    pub key: Model,
    pub holds: Vec<reservations::Model>,
}

/// Why a key could not be loaded.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LoadError {
    /// The query of the key's batch failed; every key of the batch shares the error.
    #[error("database error while loading the key: {0}")]
    Database(Arc<DbErr>),
    /// The loader task is gone (the runtime is shutting down).
    #[error("the key loader has stopped")]
    LoaderStopped,
}

/// A loaded key, `None` if it does not exist.
pub type LoadResult = Result<Option<LoadedKey>, LoadError>;

type LoadRequest = (i64, oneshot::Sender<LoadResult>);

/// Cheap to clone; every clone feeds the same loader task.
#[derive(Clone)]
pub struct KeyLoader {
    requests: mpsc::UnboundedSender<LoadRequest>,
}

impl KeyLoader {
    /// Starts the loader task. Requests that arrive while a query runs go into the next one, so a
    /// burst of cold keys costs one query per batch, and a lone key waits for nothing extra.
    pub fn start(db: DatabaseConnection, clock: SharedClock) -> KeyLoader {
        let (requests, mut incoming) = mpsc::unbounded_channel::<LoadRequest>();
        tokio::spawn(async move {
            while let Some(first) = incoming.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_KEYS_PER_QUERY {
                    match incoming.try_recv() {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
                let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
                match load_keys(&db, ids, &clock).await {
                    Ok(mut loaded) => {
                        for (id, reply) in batch {
                            let _ = reply.send(Ok(loaded.remove(&id)));
                        }
                    }
                    Err(error) => {
                        let error = Arc::new(error);
                        for (_, reply) in batch {
                            let _ = reply.send(Err(LoadError::Database(Arc::clone(&error))));
                        }
                    }
                }
            }
        });
        KeyLoader { requests }
    }

    /// The row of key `id` and its live holds.
    pub async fn load(&self, id: i64) -> LoadResult {
        let (reply, answer) = oneshot::channel();
        if self.requests.send((id, reply)).is_err() {
            return Err(LoadError::LoaderStopped);
        }
        answer.await.unwrap_or(Err(LoadError::LoaderStopped))
    }
}

/// The rows of `ids` that exist, each with its live holds (a second query, only for keys found).
async fn load_keys(
    db: &DatabaseConnection,
    ids: Vec<i64>,
    clock: &SharedClock,
) -> Result<HashMap<i64, LoadedKey>, DbErr> {
    let rows = api_keys::Entity::find()
        .filter(crate::db::key_id_in(db.get_database_backend(), ids))
        .all(db)
        .await?;
    let found: Vec<i64> = rows.iter().map(|row| row.id).collect();
    let mut loaded: HashMap<i64, LoadedKey> = rows
        .into_iter()
        .map(|key| {
            (
                key.id,
                LoadedKey {
                    key,
                    holds: Vec::new(),
                },
            )
        })
        .collect();
    for hold in crate::db::usage::live_holds(db, found, clock.now()).await? {
        if let Some(key) = loaded.get_mut(&hold.api_key_id) {
            key.holds.push(hold);
        }
    }
    Ok(loaded)
}
