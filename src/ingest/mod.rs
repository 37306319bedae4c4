//! Usage events after decoding: the batch writer that commits them, the storage it commits
//! through, and the completion through which it tells the source what became of each event.
//!
//! The flow: a source (the AMQP consumer) takes an event in, its key actor counts it as pending,
//! the source submits it with a [`Completion`]; the writer batches it by size or time, commits the
//! batch through a [`BatchStore`] (dedupe → `domain::batch_plan` → one write), tells the key
//! actors what committed through a [`CommitListener`], then completes each event. Nothing here
//! knows the broker: the source maps a completion to ack, abandon or dead letter.

mod completion;
mod store;
mod writer;

pub use completion::Completion;
pub use store::{BatchStore, CommitListener, DatabaseStore};
pub use writer::{BatchWriter, BatchWriterHandle, ConsumedEvent, WeakBatchWriterHandle};
