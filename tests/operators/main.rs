//! Operators' tools against the real PostgreSQL and RabbitMQ: metrics from the start, quiet logs,
//! the `check` command, the gateway example, the OpenAPI document, dashboards and alerts.
//!
//! A separate binary from `tests/api`: the metrics recorder is process-wide, and these tests need
//! a `/metrics` page that no other test of the process has already filled in (so the fresh
//! service runs as a child process anyway).

#[path = "../common/mod.rs"]
mod common;
// Only part of the API tests' helpers is used here.
#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;

mod check_command;
mod child;
mod gateway;
mod logs;
mod metrics_at_start;
mod openapi;
mod ops_files;
