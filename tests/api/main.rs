//! Integration tests against the real PostgreSQL, SQLite and RabbitMQ of this machine.

#[path = "../common/mod.rs"]
mod common;

mod acks;
mod admin;
mod alerts;
mod checks;
mod faults;
mod helpers;
mod ingest;
mod ops;
mod reservations;
mod rollover;
mod storage;
mod topology;
