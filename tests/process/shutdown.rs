//! SIGTERM under load, again and again: every committed event is acknowledged before exit.
//! Only the service is stopped; the shared broker and database keep running.

use std::time::Duration;

use rand::Rng;
use sea_orm::{ConnectionTrait, Statement};

use crate::harness::{add_totals, assert_totals_become, Scenario, SERIAL};

const KEYS: [i64; 5] = [1, 2, 3, 4, 5];
const ROUNDS: usize = 8;
/// Publishers at once, each with confirms: enough load that the stop meets work in flight.
const PUBLISHERS: usize = 4;
const EVENTS_PER_PUBLISHER: usize = 600;

/// Events of this round (`event_id` prefix) committed to the database.
async fn committed_events(scenario: &Scenario, prefix: &str) -> u64 {
    let db = sea_orm::Database::connect(&scenario.database.url)
        .await
        .expect("PostgreSQL is up");
    let row = db
        .query_one_raw(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!("SELECT COUNT(*) FROM processed_events WHERE event_id LIKE '{prefix}-%'"),
        ))
        .await
        .expect("the database answers")
        .expect("a count");
    let _ = db.close().await;
    row.try_get_by_index::<i64>(0).expect("a count") as u64
}

#[tokio::test]
async fn sigterms_under_load_acknowledge_every_committed_event() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[]).await;
    let mut service = scenario.start_with_keys(&KEYS, None).await;
    let mut expected = std::collections::BTreeMap::new();
    for round in 0..ROUNDS {
        let prefixes: Vec<String> = (0..PUBLISHERS)
            .map(|publisher| format!("stop{round}p{publisher}"))
            .collect();
        let publishers: Vec<_> = prefixes
            .iter()
            .map(|prefix| scenario.spawn_publisher(prefix.clone(), &KEYS, EVENTS_PER_PUBLISHER))
            .collect();
        // A random moment of the stream: the moment is what the test varies.
        let delay = rand::rng().random_range(100..800);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let (status, took) = service.terminate();
        let log = service.log();
        assert!(
            status.success(),
            "round {round}: exit {status:?}; log: {log}"
        );
        assert!(
            took < Duration::from_secs(10),
            "round {round}: stopped in {took:?}"
        );
        assert!(
            !log.contains("AMQP session ended"),
            "round {round}: the session must end by the shutdown only; log: {log}"
        );
        for publisher in publishers {
            add_totals(
                &mut expected,
                &publisher.await.expect("the publisher finishes"),
            );
        }
        // Nothing consumes now: every event of the round is either committed or still queued,
        // never both (committed yet unacknowledged) and never neither.
        let mut committed = 0;
        for prefix in &prefixes {
            committed += committed_events(&scenario, prefix).await;
        }
        let queued = scenario.queued_messages();
        assert_eq!(
            committed + queued,
            (PUBLISHERS * EVENTS_PER_PUBLISHER) as u64,
            "round {round}: {committed} committed + {queued} still queued"
        );
        service = scenario.start();
        service.wait_ready().await;
        assert_totals_become(&scenario, &expected).await;
    }
}
