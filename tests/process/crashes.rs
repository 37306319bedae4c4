//! SIGTERM flushes and exits 0; SIGKILL at any moment loses and doubles nothing.

use std::time::Duration;

use rand::Rng;

use crate::harness::{add_totals, assert_totals_become, publish_events, Scenario, SERIAL};

const KEYS: [i64; 5] = [1, 2, 3, 4, 5];

#[tokio::test]
async fn sigterm_commits_and_acknowledges_everything_then_exits_0() {
    let _serial = SERIAL.lock().await;
    // Nothing would commit on its own for a minute: only the shutdown flush can.
    let scenario = Scenario::new(&[
        ("QUOTA__INGEST__FLUSH_INTERVAL_MS", "60000"),
        ("QUOTA__INGEST__BATCH_SIZE", "8000"),
        ("QUOTA__AMQP__PREFETCH", "20000"),
    ])
    .await;
    let mut service = scenario.start_with_keys(&KEYS, None).await;
    let client = scenario.broker().await;
    let expected = publish_events(&client, "term", &KEYS, 500).await;
    // Consumed (the checks see it) but not committed.
    for (key, total) in &expected {
        crate::common::eventually(
            Duration::from_secs(20),
            "the service to consume",
            || async {
                (service.http_check(*key).await.1["tokens_used_this_month"] == *total).then_some(())
            },
        )
        .await;
    }
    assert!(scenario
        .stored_totals(&KEYS)
        .await
        .values()
        .all(|&total| total == 0));
    let (status, took) = service.terminate();
    assert!(
        status.success(),
        "exit status {status:?}; log: {}",
        service.log()
    );
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    assert_eq!(scenario.stored_totals(&KEYS).await, expected);
    assert_eq!(scenario.queued_messages(), 0, "every delivery acknowledged");
}

#[tokio::test]
async fn sigkill_in_the_middle_of_ingestion_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[]).await;
    let mut service = scenario.start_with_keys(&KEYS, None).await;
    let publisher = scenario.spawn_publisher("kill".into(), &KEYS, 3000);
    scenario.wait_for_events_flowing(&KEYS).await;
    service.kill();
    let service = scenario.start();
    service.wait_ready().await;
    let expected = publisher.await.expect("the publisher finishes");
    assert_totals_become(&scenario, &expected).await;
}

#[tokio::test]
async fn five_sigkills_at_random_moments_then_exact_totals() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[]).await;
    let mut service = scenario.start_with_keys(&KEYS, None).await;
    let mut expected = std::collections::BTreeMap::new();
    for round in 0..5 {
        let publisher = scenario.spawn_publisher(format!("round{round}"), &KEYS, 800);
        // A random moment of the stream (or before it): the moment is what the test varies.
        let delay = rand::rng().random_range(50..700);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        service.kill();
        service = scenario.start();
        service.wait_ready().await;
        add_totals(
            &mut expected,
            &publisher.await.expect("the publisher finishes"),
        );
    }
    assert_totals_become(&scenario, &expected).await;
}
