//! Ingestion benchmark: events queued → committed, against (a) a bare lapin consumer draining the same
//! persistent messages, (b) a naive consumer with one read-modify-write transaction per event and
//! (c) a bare consumer in its own process that parses each body and acknowledges in batches.
//!
//! Run: `cargo bench --bench ingest` (PostgreSQL and RabbitMQ as in the README).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

/// The allocator of the `quota-keeper` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use quota_keeper::clock::SystemClock;
use quota_keeper::startup::Application;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use support::{bench_environment, insert_keys};

/// Events per run of the service and of the bare drain.
const EVENTS: usize = 100_000;
/// Events per run of the naive consumer (it is slow; its rate is what counts).
const NAIVE_EVENTS: usize = 5_000;
/// Publisher confirms awaited per chunk.
const PUBLISH_CHUNK: usize = 2_000;
/// The argument that makes this binary run only the bare consumer (c) and print its rate.
const BARE_CONSUMER_ARG: &str = "--bare-consumer";
/// Prefetch of the bare consumer (c).
const BARE_CONSUMER_PREFETCH: u16 = 2_000;
/// The bare consumer (c) acknowledges every this many deliveries at once (`multiple`).
const BARE_CONSUMER_ACK_EVERY: usize = 200;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == BARE_CONSUMER_ARG) {
        let (url, queue) = (&args[at + 1], &args[at + 2]);
        // The runtime `#[tokio::main]` gives a plain consumer.
        let rate = tokio::runtime::Runtime::new()
            .expect("a runtime")
            .block_on(bare_consumer(url, queue));
        println!("{rate}");
        return;
    }
    actix_web::rt::System::new().block_on(run());
}

fn event_body(i: usize, keys: usize) -> Vec<u8> {
    let key = (i % keys) + 1;
    format!(r#"{{"event_id": "e-{i}", "api_key_id": {key}, "tokens": 3}}"#).into_bytes()
}

/// Publishes persistent messages with confirms, `PUBLISH_CHUNK` outstanding at a time, to
/// `exchange` with the key id as routing key, or through the default exchange to `queue`.
async fn publish_all(
    channel: &Channel,
    exchange: &str,
    queue: Option<&str>,
    count: usize,
    keys: usize,
) {
    let mut confirms = Vec::with_capacity(PUBLISH_CHUNK);
    for i in 0..count {
        let routing_key = match queue {
            Some(queue) => queue.to_string(),
            None => ((i % keys) + 1).to_string(),
        };
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &event_body(i, keys),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
        if confirms.len() == PUBLISH_CHUNK || i + 1 == count {
            for confirm in futures::future::join_all(confirms.drain(..)).await {
                assert!(confirm.expect("confirm").is_ack());
            }
        }
    }
}

async fn publish_to_queue(url: &str, queue: &str, count: usize, keys: usize) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
    publish_all(&channel, "", Some(queue), count, keys).await;
    let _ = connection.close(200, "done".into()).await;
}

/// (a) The limit: consume and acknowledge every message, nothing else.
async fn bare_drain(url: &str, keys: usize) -> f64 {
    publish_to_queue(url, "bench.drain", EVENTS, keys).await;
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(10_000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            "bench.drain".into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let started = Instant::now();
    for _ in 0..EVENTS {
        let delivery = consumer.next().await.expect("open").expect("delivery");
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "done".into()).await;
    rate
}

/// The fields of a usage event, as a consumer that reads them would decode them.
#[derive(serde::Deserialize)]
#[allow(dead_code)] // Decoded to pay for the parse; nothing reads them.
struct BareEvent {
    event_id: String,
    api_key_id: i64,
    tokens: i64,
    occurred_at: Option<chrono::DateTime<chrono::Utc>>,
    reservation_id: Option<String>,
}

/// (c) The broker's pace as a user would measure it, in this binary's child process (so it shares
/// no runtime or allocator with the parent): `EVENTS` messages already queued in `queue`, each body
/// parsed, every `BARE_CONSUMER_ACK_EVERY`th delivery (and the last) acknowledged with `multiple`.
/// Timed from connecting to the last ack, as the service is from its start to its last commit.
async fn bare_consumer(url: &str, queue: &str) -> f64 {
    let started = Instant::now();
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(BARE_CONSUMER_PREFETCH, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for received in 1..=EVENTS {
        let delivery = consumer.next().await.expect("open").expect("delivery");
        let event: BareEvent = serde_json::from_slice(&delivery.data).expect("a usage event");
        std::hint::black_box(event);
        if received % BARE_CONSUMER_ACK_EVERY == 0 || received == EVENTS {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
    }
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "done".into()).await;
    rate
}

/// Queues `EVENTS` events in a plain durable queue, then runs [`bare_consumer`] on them in a child
/// process (this binary, re-executed) and returns the rate it prints.
async fn bare_consumer_in_own_process(url: &str, keys: usize) -> f64 {
    const QUEUE: &str = "bench.bare-consumer";
    publish_to_queue(url, QUEUE, EVENTS, keys).await;
    let output = tokio::process::Command::new(std::env::current_exe().expect("this binary"))
        .args([BARE_CONSUMER_ARG, url, QUEUE])
        .output()
        .await
        .expect("the bare consumer runs");
    assert!(
        output.status.success(),
        "bare consumer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("the bare consumer prints its rate")
}

/// (b) One transaction per event: look the event up, read the key, write the new total, commit, ack.
async fn naive_consumer(url: &str, db: &DatabaseConnection, keys: usize) -> f64 {
    publish_to_queue(url, "bench.naive", NAIVE_EVENTS, keys).await;
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(1_000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            "bench.naive".into(),
            "naive".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let started = Instant::now();
    for _ in 0..NAIVE_EVENTS {
        let delivery = consumer.next().await.expect("open").expect("delivery");
        let event: serde_json::Value = serde_json::from_slice(&delivery.data).expect("json");
        let (event_id, key, tokens) = (
            event["event_id"].as_str().expect("id").to_string(),
            event["api_key_id"].as_i64().expect("key"),
            event["tokens"].as_i64().expect("tokens"),
        );
        let txn = db.begin().await.expect("begin");
        let seen = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 FROM processed_events WHERE event_id = $1",
                [event_id.clone().into()],
            ))
            .await
            .expect("select event");
        if seen.is_none() {
            let row = txn
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT tokens_used_this_month FROM api_keys WHERE id = $1 FOR UPDATE",
                    [key.into()],
                ))
                .await
                .expect("select key")
                .expect("key exists");
            let used: i64 = row.try_get_by_index(0).expect("used");
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE api_keys SET tokens_used_this_month = $1 WHERE id = $2",
                [(used + tokens).into(), key.into()],
            ))
            .await
            .expect("update");
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO processed_events (event_id, api_key_id, processed_at) VALUES ($1, $2, now())",
                [event_id.into(), key.into()],
            ))
            .await
            .expect("insert");
        }
        txn.commit().await.expect("commit");
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let rate = NAIVE_EVENTS as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "done".into()).await;
    rate
}

async fn total_used(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT COALESCE(SUM(tokens_used_this_month), 0)::BIGINT FROM api_keys",
        ))
        .await
        .expect("sum")
        .expect("one row");
    row.try_get_by_index(0).expect("sum")
}

/// The service: events already queued when it starts; timed until all are committed.
async fn service_run(keys: usize) -> Rates {
    let (_database, vhost, settings) = bench_environment().await;
    let db = quota_keeper::db::connect_and_migrate(&settings.database)
        .await
        .expect("migrate");
    insert_keys(&db, keys as i64).await;

    let connection = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    quota_keeper::amqp::topology::declare(&connection, settings.amqp.shards)
        .await
        .expect("topology");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    publish_all(&channel, "quota.usage", None, EVENTS, keys).await;
    let _ = connection.close(200, "published".into()).await;

    let expected = 3 * EVENTS as i64;
    let started = Instant::now();
    let app = Application::build(settings, Arc::new(SystemClock))
        .await
        .expect("app");
    actix_web::rt::spawn(app.run_until(std::future::pending()));
    // Every 100 ms: the sum reads every key's row, and polling it more often would take CPU from
    // the service being measured (the end is seen at most 100 ms late, 2 % of the shortest run).
    while total_used(&db).await != expected {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let service = EVENTS as f64 / started.elapsed().as_secs_f64();

    let consumer = bare_consumer_in_own_process(&vhost.url(), keys).await;
    let bare = bare_drain(&vhost.url(), keys).await;
    let naive = naive_consumer(&vhost.url(), &db, keys).await;
    Rates {
        service,
        consumer,
        bare,
        naive,
    }
}

/// Events per second of the service and of each baseline, measured in one run.
struct Rates {
    service: f64,
    consumer: f64,
    bare: f64,
    naive: f64,
}

async fn run() {
    println!(
        "## Ingestion: {EVENTS} persistent events queued → committed (naive: {NAIVE_EVENTS})\n"
    );
    println!("| distinct keys | quota-keeper events/s | bare consumer events/s | bare drain events/s | naive events/s | vs bare consumer | vs bare | vs naive |");
    println!("|---|---|---|---|---|---|---|---|");
    // `cargo bench --bench ingest -- 100000` runs only the given key counts.
    let requested: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let key_counts = if requested.is_empty() {
        vec![1, 1_000, 100_000]
    } else {
        requested
    };
    for keys in key_counts {
        let Rates {
            service,
            consumer,
            bare,
            naive,
        } = service_run(keys).await;
        println!(
            "| {keys} | {service:.0} | {consumer:.0} | {bare:.0} | {naive:.0} | {:.2}x | {:.2}x | {:.1}x |",
            service / consumer,
            service / bare,
            service / naive
        );
    }
    actix::System::current().stop();
}
