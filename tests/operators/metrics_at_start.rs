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
    // One series per configured threshold (the default 80 and 100), and the backlog.
    for series in [
        "quota_alerts_published_total{threshold=\"80\"} 0",
        "quota_alerts_published_total{threshold=\"100\"} 0",
        "quota_alerts_pending 0",
    ] {
        assert!(page.contains(series), "{series} missing:\n{page}");
    }
    // HTTP only: nothing to consume, so the service is ready.

    assert!(page.contains("quota_ready 1"), "{page}");
    assert!(
        page.contains("quota_batch_commit_seconds_count 0"),
        "{page}"
    );
}

/// Every literal label value the code records (`"outcome" => "zero"`), in any file of `src/`, is
/// among the registered ones. (A check's outcome label is picked in `check_outcome_label`, whose
/// unit test checks its values against `CHECK_OUTCOMES`.)
#[test]
fn label_values_recorded_in_the_code_are_registered() {
    let registered: Vec<&str> = quota_keeper::metrics::CHECK_OUTCOMES
        .iter()
        .chain(quota_keeper::metrics::USAGE_EVENT_OUTCOMES)
        .chain(quota_keeper::metrics::CHECK_DROP_REASONS)
        .copied()
        .collect();
    let mut found = 0;
    for source in rust_sources(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")) {
        for label in ["\"outcome\" => \"", "\"reason\" => \""] {
            for (at, _) in source.match_indices(label) {
                let value = source[at + label.len()..]
                    .split('"')
                    .next()
                    .unwrap_or_default();
                assert!(
                    registered.contains(&value),
                    "label value {value:?} is recorded but not registered in src/metrics.rs"
                );
                found += 1;
            }
        }
    }
    // The batch writer's three usage outcomes and the consumer's "zero", at least.
    assert!(
        found >= 4,
        "found only {found} labelled metrics in the sources"
    );
}

/// The text of every `.rs` file under `dir`.
fn rust_sources(dir: &std::path::Path) -> Vec<String> {
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources.extend(rust_sources(&path));
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            sources.push(std::fs::read_to_string(&path).expect("a readable source file"));
        }
    }
    sources
}
