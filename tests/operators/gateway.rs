//! `examples/gateway.rs` run against the service: check with `tokens`, then usage with confirms;
//! and the README's client snippet is that file, to the byte.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{eventually, spawn_app_with_broker};

// The example itself, compiled into this test: its `main` is not called here.
#[allow(dead_code)]
#[path = "../../examples/gateway.rs"]
mod gateway_example;

#[actix_web::test]
async fn the_gateway_example_checks_then_reports_usage_that_counts() {
    let app = spawn_app_with_broker(|_| {}).await;
    let url = app.vhost.as_ref().expect("a broker app has a vhost").url();
    app.create_key("alice", json!({"id": 42, "token_quota_monthly": 1000}))
        .await;

    let (reply, reported) = gateway_example::gateway_request(&url, 42, 800, 700)
        .await
        .expect("the gateway request goes through");
    assert_eq!(reply["allowed"], true, "{reply}");
    let event = reported.expect("an allowed request reports its usage");
    assert_eq!(event["tokens"], 700);
    eventually(
        Duration::from_secs(10),
        "the usage to be committed",
        || async { (app.stored_usage(42).await == 700).then_some(()) },
    )
    .await;

    // 700 used + 800 estimated > 1000: denied, and nothing is reported.
    let (reply, reported) = gateway_example::gateway_request(&url, 42, 800, 700)
        .await
        .expect("the gateway request goes through");
    assert_eq!(reply["allowed"], false, "{reply}");
    assert_eq!(reply["status"], 429);
    assert!(reported.is_none());
    assert_eq!(app.stored_usage(42).await, 700);
}

#[test]
fn the_readme_client_snippet_is_the_gateway_example() {
    let readme = include_str!("../../README.md");
    let example = include_str!("../../examples/gateway.rs");
    let snippet = format!("```rust\n{example}```\n");
    assert!(
        readme.contains(&snippet),
        "README.md must include examples/gateway.rs verbatim in a ```rust block (copy the file)"
    );
}
