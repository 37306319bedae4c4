//! quota-keeper: a monthly token quota per API key, enforced from memory by one actor per key.

pub mod actors;
pub mod alerts;
pub mod amqp;
pub mod clock;
pub mod db;
pub mod domain;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod owners;
pub mod readiness;
pub mod remote_check;
pub mod settings;
pub mod startup;
pub mod telemetry;
