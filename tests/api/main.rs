//! Integration tests against the real PostgreSQL, SQLite and RabbitMQ of this machine.

mod admin;
mod broker;
mod checks;
mod helpers;
mod ingest;
mod ops;
mod rollover;
mod storage;
