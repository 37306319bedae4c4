//! Actors: one per API key (`key_actor`) and the registry that finds or starts them.

pub mod key_actor;
pub mod loader;
pub mod registry;
pub mod scheduler;
