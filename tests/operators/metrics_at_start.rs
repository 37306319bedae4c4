//! SPEC §3: every metric family the service exports is on `/metrics` (at 0) from the start.

use crate::child::{declared_families, exported_families, fresh_metrics_page};

#[tokio::test]
async fn a_fresh_service_exports_every_family_and_known_label_at_zero() {
    let page = fresh_metrics_page().await;
    let exported = exported_families(&page);
    for family in declared_families() {
        assert!(
            exported.contains(&family),
            "{family} (declared in src/metrics.rs) is missing from a fresh /metrics:\n{page}"
        );
    }
    for (family, label, values) in [
        (
            quota_keeper::metrics::CHECKS_TOTAL,
            "outcome",
            quota_keeper::metrics::CHECK_OUTCOMES,
        ),
        (
            quota_keeper::metrics::USAGE_EVENTS_TOTAL,
            "outcome",
            quota_keeper::metrics::USAGE_EVENT_OUTCOMES,
        ),
        (
            quota_keeper::metrics::CHECK_REQUESTS_DROPPED_TOTAL,
            "reason",
            quota_keeper::metrics::CHECK_DROP_REASONS,
        ),
    ] {
        for value in values {
            let series = format!("{family}{{{label}=\"{value}\"}} 0");
            assert!(page.contains(&series), "{series} missing:\n{page}");
        }
    }
    // HTTP only: nothing to consume, so the service is ready.
    assert!(page.contains("quota_ready 1"), "{page}");
    assert!(
        page.contains("quota_batch_commit_seconds_count 0"),
        "{page}"
    );
}

/// Every literal label value the code records (`"outcome" => "zero"`) is among the registered ones.
#[test]
fn label_values_recorded_in_the_code_are_registered() {
    let registered: Vec<&str> = quota_keeper::metrics::CHECK_OUTCOMES
        .iter()
        .chain(quota_keeper::metrics::USAGE_EVENT_OUTCOMES)
        .chain(quota_keeper::metrics::CHECK_DROP_REASONS)
        .copied()
        .collect();
    let sources = [
        include_str!("../../src/actors/registry.rs"),
        include_str!("../../src/amqp/consumer.rs"),
        include_str!("../../src/ingest.rs"),
    ];
    let mut found = 0;
    for source in sources {
        for label in ["\"outcome\" => \"", "\"reason\" => \""] {
            for (_, rest) in source
                .match_indices(label)
                .map(|(at, _)| source.split_at(at + label.len()))
            {
                let value = rest.split('"').next().unwrap_or_default();
                assert!(
                    registered.contains(&value),
                    "label value {value:?} is recorded but not registered in src/metrics.rs"
                );
                found += 1;
            }
        }
    }
    assert!(
        found >= 5,
        "found only {found} labelled metrics in the sources"
    );
}
