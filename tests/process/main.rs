//! The built binary as a child process against the real PostgreSQL and RabbitMQ: signals, crashes, outages.
//!
//! These tests stop shared services, so they run one at a time (`SERIAL`); cargo runs this binary
//! after the others, never beside them.

#[path = "../common/mod.rs"]
mod common;

mod alerts;
mod crashes;
mod harness;
mod instances;
mod outages;
mod reservations;
mod shutdown;
mod soak;
mod startup;
mod stock_broker;
