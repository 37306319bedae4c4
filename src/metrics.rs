//! Prometheus recorder, installed once per process, the names of the service's metrics and their
//! labels, and their registration at 0 so every family is exported from the start.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::outcome::CheckOutcome;

pub const CHECKS_TOTAL: &str = "quota_checks_total";
pub const CHECK_DURATION_SECONDS: &str = "quota_check_duration_seconds";
pub const RESIDENT_KEY_ACTORS: &str = "quota_resident_key_actors";
pub const CHECK_REQUESTS_DROPPED_TOTAL: &str = "quota_check_requests_dropped_total";
pub const USAGE_UNKNOWN_KEY_TOTAL: &str = "quota_usage_unknown_key_total";
pub const USAGE_EVENTS_TOTAL: &str = "quota_usage_events_total";
pub const USAGE_DEAD_LETTERED_TOTAL: &str = "quota_usage_dead_lettered_total";
pub const BATCH_COMMIT_SECONDS: &str = "quota_batch_commit_seconds";
pub const ROLLOVERS_TOTAL: &str = "quota_rollovers_total";
/// Shard queues this instance consumes actively (it owns their keys).
pub const OWNED_SHARDS: &str = "quota_owned_shards";
/// Requests sent to the owner of a key through the broker, by kind and outcome.
pub const FORWARDED_REQUESTS_TOTAL: &str = "quota_forwarded_requests_total";
/// Threshold alerts confirmed by the broker, by `threshold` (each configured percent).
pub const ALERTS_PUBLISHED_TOTAL: &str = "quota_alerts_published_total";
/// Threshold alerts recorded and not yet confirmed by the broker (every instance's, from the database).
pub const ALERTS_PENDING: &str = "quota_alerts_pending";
/// Live holds in this instance's key actors (SPEC §2.3).
pub const RESERVATIONS_ACTIVE: &str = "quota_reservations_active";
/// Holds granted by checks.
pub const RESERVATIONS_GRANTED_TOTAL: &str = "quota_reservations_granted_total";
/// Holds released by a usage event with tokens.
pub const RESERVATIONS_SETTLED_TOTAL: &str = "quota_reservations_settled_total";
/// Holds released by a usage event with 0 tokens.
pub const RESERVATIONS_VOIDED_TOTAL: &str = "quota_reservations_voided_total";
/// Holds released because their `ttl_secs` passed.
pub const RESERVATIONS_EXPIRED_TOTAL: &str = "quota_reservations_expired_total";
/// 1 while the broker is consumed (or not configured) and the last batch committed, else 0.
pub const READY: &str = "quota_ready";

/// Every `outcome` of `quota_checks_total` (set in `KeyRegistry::check` and the AMQP consumer).
/// `other` is no longer recorded (every outcome has its own label) but stays exported, at 0, for
/// dashboards that sum it.
pub const CHECK_OUTCOMES: &[&str] = &[
    "allowed",
    "denied",
    "unknown_allowed",
    "unknown_denied",
    "malformed",
    "unavailable",
    "other",
];
/// The `outcome` label of `quota_checks_total` for a check decided so.
pub fn check_outcome_label(outcome: CheckOutcome) -> &'static str {
    match outcome {
        CheckOutcome::Allowed => "allowed",
        CheckOutcome::QuotaReached => "denied",
        CheckOutcome::UnknownKey { allowed: true } => "unknown_allowed",
        CheckOutcome::UnknownKey { allowed: false } => "unknown_denied",
        CheckOutcome::Malformed => "malformed",
        CheckOutcome::Unavailable => "unavailable",
    }
}

/// Every `outcome` of `quota_usage_events_total` (set by the batch writer and the AMQP consumer).
pub const USAGE_EVENT_OUTCOMES: &[&str] = &["counted", "duplicate", "late", "zero"];
/// Every `reason` of `quota_check_requests_dropped_total`.
pub const CHECK_DROP_REASONS: &[&str] = &["no_reply_to", "invalid_reply_to"];
/// Every `kind` of `quota_forwarded_requests_total` (set in `Owners`).
pub const FORWARDED_KINDS: &[&str] = &["check", "refresh", "reservations"];
/// Every `outcome` of `quota_forwarded_requests_total`.
pub const FORWARDED_OUTCOMES: &[&str] = &["answered", "timeout", "not_connected", "broker_error"];

/// Latency buckets in seconds, from 50 µs to 1 s: checks are answered from memory.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes `/metrics`.
/// Samples wait in memory until then (about 20 bytes each), so under heavy check load the
/// interval bounds how far RSS wanders (BENCHMARKS.md, memory per check).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder; several applications in one test process share it.
pub fn prometheus_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
                .expect("the bucket list is a non-empty constant")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may exist only if a library installed one first; ours then stays unused.
            let _ = metrics::set_global_recorder(recorder);
            // A built (not installed) recorder keeps every histogram sample until a scrape drains
            // it: 20 bytes per check, forever, without one. This thread drains them for the process.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                });
            if let Err(error) = spawned {
                tracing::warn!(%error, "no metrics upkeep thread: histograms drain only when scraped");
            }
            register_every_family();
            handle
        })
        .clone()
}

/// Describes every family and creates each of its known series at 0.
///
/// The exporter renders a series only once it exists; without this a fresh service exported
/// nothing until the first event of each kind, which breaks dashboards and absence alerts.
/// Increments by 0 (never `absolute(0)`) so a series another application of the same process
/// already moved keeps its value.
fn register_every_family() {
    use metrics::{
        counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
    };

    describe_counter!(CHECKS_TOTAL, "Checks answered (AMQP and HTTP), by outcome.");
    for outcome in CHECK_OUTCOMES {
        counter!(CHECKS_TOTAL, "outcome" => *outcome).increment(0);
    }
    describe_histogram!(
        CHECK_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to answer a check from its key actor."
    );
    // Registering is enough: an empty histogram renders with zero counts.
    let _ = histogram!(CHECK_DURATION_SECONDS);
    describe_gauge!(RESIDENT_KEY_ACTORS, "Key actors in memory.");
    gauge!(RESIDENT_KEY_ACTORS).increment(0.0);
    describe_counter!(
        CHECK_REQUESTS_DROPPED_TOTAL,
        "AMQP check requests dropped unanswered, by reason."
    );
    for reason in CHECK_DROP_REASONS {
        counter!(CHECK_REQUESTS_DROPPED_TOTAL, "reason" => *reason).increment(0);
    }
    describe_counter!(
        USAGE_UNKNOWN_KEY_TOTAL,
        "Usage events for a key the database does not know (acknowledged, not counted)."
    );
    counter!(USAGE_UNKNOWN_KEY_TOTAL).increment(0);
    describe_counter!(USAGE_EVENTS_TOTAL, "Usage events settled, by outcome.");
    for outcome in USAGE_EVENT_OUTCOMES {
        counter!(USAGE_EVENTS_TOTAL, "outcome" => *outcome).increment(0);
    }
    describe_counter!(
        USAGE_DEAD_LETTERED_TOTAL,
        "Usage messages refused and moved to quota.usage.dead."
    );
    counter!(USAGE_DEAD_LETTERED_TOTAL).increment(0);
    describe_histogram!(
        BATCH_COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "Time to commit one batch of usage events."
    );
    let _ = histogram!(BATCH_COMMIT_SECONDS);
    describe_counter!(
        ROLLOVERS_TOTAL,
        "Keys rolled over to a new monthly window by the scheduler."
    );
    counter!(ROLLOVERS_TOTAL).increment(0);
    describe_gauge!(
        RESERVATIONS_ACTIVE,
        "Live holds (reservations) in this instance's key actors."
    );
    gauge!(RESERVATIONS_ACTIVE).increment(0.0);
    for (name, help) in [
        (RESERVATIONS_GRANTED_TOTAL, "Holds granted by checks."),
        (
            RESERVATIONS_SETTLED_TOTAL,
            "Holds released by the usage event of their request.",
        ),
        (
            RESERVATIONS_VOIDED_TOTAL,
            "Holds released by a usage event with 0 tokens.",
        ),
        (
            RESERVATIONS_EXPIRED_TOTAL,
            "Holds released because their ttl_secs passed.",
        ),
    ] {
        describe_counter!(name, help);
        counter!(name).increment(0);
    }
    describe_gauge!(
        READY,
        "1 while the broker is consumed (or not configured) and the last usage batch committed, else 0."
    );
    gauge!(READY).increment(0.0);
    describe_gauge!(
        OWNED_SHARDS,
        "Shard queues this instance consumes actively: it owns their keys."
    );
    gauge!(OWNED_SHARDS).increment(0.0);
    describe_counter!(
        FORWARDED_REQUESTS_TOTAL,
        "Requests sent to the owner of a key through the broker (checks, usage reads, admin changes), by kind and outcome."
    );
    describe_counter!(
        ALERTS_PUBLISHED_TOTAL,
        "Threshold alerts published to quota.alerts and confirmed by the broker, by threshold percent."
    );
    // Its series, one per configured threshold, are created by `Alerts::register_metrics`.
    describe_gauge!(
        ALERTS_PENDING,
        "Threshold alerts recorded and not yet confirmed by the broker (all instances)."
    );
    gauge!(ALERTS_PENDING).increment(0.0);
    for kind in FORWARDED_KINDS {
        for outcome in FORWARDED_OUTCOMES {
            counter!(FORWARDED_REQUESTS_TOTAL, "kind" => *kind, "outcome" => *outcome).increment(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_outcome_has_a_registered_label_of_its_own() {
        let labels: Vec<&str> = CheckOutcome::ALL.map(check_outcome_label).to_vec();
        for label in &labels {
            assert!(CHECK_OUTCOMES.contains(label), "{label} is not registered");
        }
        let distinct: std::collections::BTreeSet<&str> = labels.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            labels.len(),
            "two outcomes share a label: {labels:?}"
        );
    }
}
