//! `KeyLoader`: loads the rows of keys whose actors are starting, many per query when many start at once.

use std::collections::HashMap;

use entity::api_keys::{self, Model};
use sea_orm::{DatabaseConnection, EntityTrait, QueryFilter};
use tokio::sync::{mpsc, oneshot};

/// Keys loaded by one query at most.
const MAX_KEYS_PER_QUERY: usize = 1_000;

/// A key's row, `None` if it does not exist; `Err` carries why the database could not say.
pub type LoadResult = Result<Option<Model>, String>;

type LoadRequest = (i64, oneshot::Sender<LoadResult>);

/// Cheap to clone; every clone feeds the same loader task.
#[derive(Clone)]
pub struct KeyLoader {
    requests: mpsc::UnboundedSender<LoadRequest>,
}

impl KeyLoader {
    /// Starts the loader task. Requests that arrive while a query runs go into the next one, so a
    /// burst of cold keys costs one query per batch, and a lone key waits for nothing extra.
    pub fn start(db: DatabaseConnection) -> KeyLoader {
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
                let loaded = api_keys::Entity::find()
                    .filter(crate::db::key_id_in(db.get_database_backend(), ids))
                    .all(&db)
                    .await;
                match loaded {
                    Ok(rows) => {
                        let mut rows: HashMap<i64, Model> =
                            rows.into_iter().map(|row| (row.id, row)).collect();
                        for (id, reply) in batch {
                            let _ = reply.send(Ok(rows.remove(&id)));
                        }
                    }
                    Err(error) => {
                        let reason = error.to_string();
                        for (_, reply) in batch {
                            let _ = reply.send(Err(reason.clone()));
                        }
                    }
                }
            }
        });
        KeyLoader { requests }
    }

    /// The row of key `id`.
    pub async fn load(&self, id: i64) -> LoadResult {
        let (reply, answer) = oneshot::channel();
        if self.requests.send((id, reply)).is_err() {
            return Err("the key loader has stopped".into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err("the key loader has stopped".into()))
    }
}
