//! Prometheus recorder, installed once per process, and the names of the service's metrics.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CHECKS_TOTAL: &str = "quota_checks_total";
pub const CHECK_DURATION_SECONDS: &str = "quota_check_duration_seconds";
pub const RESIDENT_KEY_ACTORS: &str = "quota_resident_key_actors";
pub const CHECK_REQUESTS_DROPPED_TOTAL: &str = "quota_check_requests_dropped_total";
pub const USAGE_UNKNOWN_KEY_TOTAL: &str = "quota_usage_unknown_key_total";
pub const USAGE_EVENTS_TOTAL: &str = "quota_usage_events_total";
pub const USAGE_DEAD_LETTERED_TOTAL: &str = "quota_usage_dead_lettered_total";
pub const BATCH_COMMIT_SECONDS: &str = "quota_batch_commit_seconds";
pub const ROLLOVERS_TOTAL: &str = "quota_rollovers_total";
pub const OWNED_SHARDS: &str = "quota_owned_shards";
pub const FORWARDED_REQUESTS_TOTAL: &str = "quota_forwarded_requests_total";

/// Latency buckets in seconds, from 50 µs to 1 s: checks are answered from memory.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes `/metrics`.
/// Samples wait in memory until then (about 20 bytes each): at 800k in-process checks/s, 5 s let
/// RSS wander up by 50 MiB, 1 s by 11 MiB and then no further (BENCHMARKS.md).
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
            handle
        })
        .clone()
}
