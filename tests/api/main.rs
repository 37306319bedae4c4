//! Integration tests against the real PostgreSQL, SQLite and RabbitMQ of this machine.

mod admin;
mod helpers;
mod ops;
mod storage;
