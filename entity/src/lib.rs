//! sea-orm entities for the quota-keeper schema (kept in step with `migration/`).

pub mod alert_outbox;
pub mod api_keys;
pub mod processed_events;
pub mod reservations;
pub mod usage_history;
