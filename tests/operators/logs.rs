//! Issue 14, item 2: a failing broker gives one warning per attempt (reason, next retry) and no
//! lines of the AMQP client library (lapin) at the default level.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::child::{free_port, ChildService};

/// Runs the service against `amqp_url` until it has logged `attempts` warnings; its log lines as JSON.
async fn log_of_failing_attempts(amqp_url: &str, attempts: usize) -> Vec<Value> {
    let service = ChildService::start(&[
        ("QUOTA__AMQP__URL", amqp_url),
        ("QUOTA__AMQP__RECONNECT_MAX_BACKOFF_MS", "200"),
        ("QUOTA__LOG__FORMAT", "json"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines: Vec<Value> = service
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        let broker_warnings = lines
            .iter()
            .filter(|line| line["target"] == "quota_keeper::amqp" && line["level"] == "WARN")
            .count();
        if broker_warnings >= attempts {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{attempts} warnings not logged within 30 s: {}",
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_one_warning_per_attempt(lines: &[Value], reason: &str) {
    for line in lines {
        let target = line["target"].as_str().unwrap_or_default();
        assert!(
            !target.starts_with("lapin"),
            "the client library logged at the default level: {line}"
        );
        assert_ne!(line["level"], "ERROR", "{line}");
        if target == "quota_keeper::amqp" && line["level"] == "WARN" {
            let logged_reason = line["reason"].as_str().unwrap_or_default();
            assert!(logged_reason.contains(reason), "{line} should say {reason}");
            assert!(
                line["retry_in_ms"].as_u64().is_some(),
                "{line}: no next retry"
            );
        }
    }
}

#[tokio::test]
async fn a_refused_connection_logs_one_warning_per_attempt() {
    // Nobody listens there: every attempt is refused at once.
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let lines = log_of_failing_attempts(&url, 3).await;
    assert_one_warning_per_attempt(&lines, "Connection refused");
}

#[tokio::test]
async fn a_connection_closed_by_the_broker_logs_no_client_errors() {
    // The broker accepts the socket, then closes the connection: lapin logs three ERROR lines
    // ("Connection closed", "Connection error", …) per attempt unless filtered.
    let missing_vhost = format!("qk_missing_{}", uuid::Uuid::new_v4().simple());
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{missing_vhost}");
    let lines = log_of_failing_attempts(&url, 3).await;
    assert_one_warning_per_attempt(&lines, "not found");
}
