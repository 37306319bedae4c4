//! Broker and database outages while events flow: the process stays up, reports not-ready, recovers exactly.

use std::process::Command;
use std::time::Duration;

use crate::common::eventually;
use crate::harness::{add_totals, assert_totals_become, publish_events, Scenario, SERIAL};

const KEYS: [i64; 3] = [1, 2, 3];
const WAIT: Duration = Duration::from_secs(60);
/// How long the database outage test watches that nothing is acknowledged: many flush intervals
/// and commit retries.
const NO_ACK_WITHOUT_COMMIT_WATCH: Duration = Duration::from_secs(1);

/// Stops the RabbitMQ application; starts it again when dropped, even if the test fails.
struct BrokerStopped;

impl BrokerStopped {
    fn stop() -> BrokerStopped {
        let status = Command::new("rabbitmqctl")
            .args(["-q", "stop_app"])
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success());
        BrokerStopped
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status();
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "await_startup"])
            .status();
    }
}

fn pg_ctlcluster(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("PostgreSQL is installed")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .next()
        .expect("one PostgreSQL version");
    let mut command = Command::new("pg_ctlcluster");
    command.args(["--skip-systemctl-redirect", &version, "main", action]);
    if action == "stop" {
        command.args(["-m", "fast"]);
    }
    let status = command.status().expect("pg_ctlcluster runs");
    assert!(status.success(), "pg_ctlcluster {action}");
}

/// Stops the PostgreSQL cluster; starts it again when dropped, even if the test fails.
struct DatabaseStopped;

impl DatabaseStopped {
    fn stop() -> DatabaseStopped {
        pg_ctlcluster("stop");
        DatabaseStopped
    }
}

impl Drop for DatabaseStopped {
    fn drop(&mut self) {
        pg_ctlcluster("start");
        for _ in 0..100 {
            let ready = Command::new("pg_isready")
                .args(["-h", "127.0.0.1", "-q"])
                .status();
            if ready.is_ok_and(|status| status.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[tokio::test]
async fn a_broker_restart_while_events_flow_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[]).await;
    let mut service = scenario.start_with_keys(&KEYS, Some(1_000_000_000)).await;
    assert_eq!(service.http_check(1).await.0, 200);
    let client = scenario.broker().await;
    let mut expected = publish_events(&client, "before", &KEYS, 1000).await;
    drop(client);

    let stopped = BrokerStopped::stop();
    let (status, body) = eventually(WAIT, "readyz to report the broker", || async {
        let (status, body) = service.readyz().await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!(status, 503);
    assert!(
        body["failing"]
            .as_array()
            .unwrap()
            .iter()
            .any(|name| name == "broker"),
        "{body}"
    );
    assert!(service.is_running(), "the process stays up");
    // Without the broker no instance can ask a key's owner, and none answers from a copy it
    // does not own (SPEC §5): 503 naming why, never a stale 200.
    let (status, body) = service.http_check(1).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("broker")),
        "{body}"
    );
    drop(stopped);

    service.wait_ready().await;
    let mut client = scenario.broker().await;
    add_totals(
        &mut expected,
        &publish_events(&client, "after", &KEYS, 500).await,
    );
    assert_totals_become(&scenario, &expected).await;
    let reply = client.check(1, None).await;
    assert_eq!(
        reply["tokens_used_this_month"], expected[&1],
        "checks over AMQP resume"
    );
}

#[tokio::test]
async fn a_database_outage_keeps_checks_answered_and_acknowledges_only_after_commit() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[]).await;
    let mut service = scenario.start_with_keys(&KEYS, Some(1_000_000_000)).await;
    for key in KEYS {
        assert_eq!(service.http_check(key).await.0, 200, "key {key} resident");
    }
    let mut client = scenario.broker().await;
    let mut expected = publish_events(&client, "before", &KEYS, 300).await;
    assert_totals_become(&scenario, &expected).await;

    let stopped = DatabaseStopped::stop();
    let during = publish_events(&client, "during", &KEYS, 300).await;
    add_totals(&mut expected, &during);
    let body = eventually(WAIT, "readyz to report the database", || async {
        let (status, body) = service.readyz().await;
        (status == 503
            && body["failing"]
                .as_array()
                .unwrap()
                .iter()
                .any(|name| name == "database"))
        .then_some(body)
    })
    .await;
    assert_ne!(body["database"], "ok");
    // Resident keys answer from memory, including what was consumed but not committed.
    let deadline = std::time::Instant::now() + WAIT;
    let reply = loop {
        let reply = client.check(1, None).await;
        if reply["tokens_used_this_month"] == expected[&1] {
            break reply;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the check never saw the usage: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply["status"], 200);
    // An ack is the absence of a commit here: no signal says "not acknowledged", only time does.
    tokio::time::sleep(NO_ACK_WITHOUT_COMMIT_WATCH).await;
    assert_eq!(
        scenario.queued_messages(),
        300,
        "nothing acknowledged before it is committed"
    );
    assert!(service.is_running());
    drop(stopped);

    service.wait_ready().await;
    assert_totals_become(&scenario, &expected).await;
}
