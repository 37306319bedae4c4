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

/// Where a copy of each event goes: an exchange and, for the default exchange, the queue.
type Destination<'a> = (&'a str, Option<&'a str>);

/// Publishes `count` persistent events with confirms, `PUBLISH_CHUNK` outstanding at a time, each
/// to every destination in turn: to an exchange with the key id as routing key, or through the
/// default exchange to a queue. Interleaved, so every destination's messages are as old when the
/// consumers start (the broker keeps writing persistent messages for a while after their confirms).
async fn publish_all(
    channel: &Channel,
    destinations: &[Destination<'_>],
    count: usize,
    keys: usize,
) {
    let mut confirms = Vec::with_capacity(PUBLISH_CHUNK);
    for i in 0..count {
        for &(exchange, queue) in destinations {
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
        }
        if confirms.len() >= PUBLISH_CHUNK || i + 1 == count {
            for confirm in futures::future::join_all(confirms.drain(..)).await {
                assert!(confirm.expect("confirm").is_ack());
            }
        }
    }
}

async fn declare_plain_queue(channel: &Channel, queue: &str) {
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
}

/// Publishes `count` events to `destinations` on a connection of its own (declaring the plain
/// queues they name), with confirms.
async fn publish(url: &str, destinations: &[Destination<'_>], count: usize, keys: usize) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for (_, queue) in destinations {
        if let Some(queue) = queue {
            declare_plain_queue(&channel, queue).await;
        }
    }
    publish_all(&channel, destinations, count, keys).await;
    let _ = connection.close(200, "published".into()).await;
}

/// (a) The limit: consume and acknowledge every message, nothing else.
async fn bare_drain(url: &str, keys: usize) -> f64 {
    publish(url, &[("", Some("bench.drain"))], EVENTS, keys).await;
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

/// Runs [`bare_consumer`] on the `EVENTS` events queued in `queue`, in a child process (this
/// binary, re-executed), and returns the rate it prints.
async fn bare_consumer_in_own_process(url: &str, queue: &str) -> f64 {
    let output = tokio::process::Command::new(std::env::current_exe().expect("this binary"))
        .args([BARE_CONSUMER_ARG, url, queue])
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
    publish(url, &[("", Some("bench.naive"))], NAIVE_EVENTS, keys).await;
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

/// One round: `EVENTS` events queued for the service (through its exchange, on its shard queues)
/// and the same events in a plain durable queue of the same vhost, published interleaved; once
/// the broker has finished writing them, (c) drains the plain queue and the service is timed
/// from its start until all its events are
/// committed, one right after the other (seconds apart, so the machine's drift between them stays
/// small), in the order given. The service is stopped at the end. Returns (service, (c)) events/s.
async fn round(keys: usize, service_first: bool) -> (f64, f64) {
    const BARE_QUEUE: &str = "bench.bare-consumer";
    let (_database, vhost, settings) = bench_environment().await;
    let db = quota_keeper::db::connect_and_migrate(&settings.database)
        .await
        .expect("migrate");
    insert_keys(&db, keys as i64).await;

    let connection = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .expect("broker");
    quota_keeper::amqp::topology::declare(&connection, settings.amqp.shards)
        .await
        .expect("topology");
    let _ = connection.close(200, "declared".into()).await;
    let destinations = [("quota.usage", None), ("", Some(BARE_QUEUE))];
    publish(&vhost.url(), &destinations, EVENTS, keys).await;
    broker_settled().await;

    let mut consumer = None;
    if !service_first {
        consumer = Some(bare_consumer_in_own_process(&vhost.url(), BARE_QUEUE).await);
    }
    let expected = 3 * EVENTS as i64;
    let started = Instant::now();
    let app = Application::build(settings, Arc::new(SystemClock))
        .await
        .expect("app");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = actix_web::rt::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    // Every 100 ms: the sum reads every key's row, and polling it more often would take CPU from
    // the service being measured (the end is seen at most 100 ms late, 5 % of the shortest run).
    while total_used(&db).await != expected {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let service = EVENTS as f64 / started.elapsed().as_secs_f64();
    // Stopped before anything else is measured, so nothing of it runs alongside.
    let _ = stop.send(());
    let _ = running.await;
    let consumer = match consumer {
        Some(rate) => rate,
        None => bare_consumer_in_own_process(&vhost.url(), BARE_QUEUE).await,
    };
    (service, consumer)
}

/// The broker's CPU time so far (all its threads), from `/proc`; `None` if it cannot be read.
fn broker_cpu_ticks() -> Option<u64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if !stat.contains("(beam.smp)") {
            continue;
        }
        // utime and stime: fields 14 and 15, the 12th and 13th after the command's `)`.
        let after_command = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after_command.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        total = Some(total.unwrap_or(0) + ticks);
    }
    total
}

/// Waits until the broker is idle: it keeps writing persistent messages for seconds after their
/// confirms (classic queues of version 1 most), and whichever consumer ran first paid for every
/// queue's writes. Idle = under 5 % of a core for 500 ms; 30 s at most.
async fn broker_settled() {
    const WINDOW: Duration = Duration::from_millis(500);
    // Clock ticks per second on Linux (`getconf CLK_TCK`).
    const TICKS_PER_SECOND: f64 = 100.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let Some(mut before) = broker_cpu_ticks() else {
        return;
    };
    while Instant::now() < deadline {
        tokio::time::sleep(WINDOW).await;
        let Some(now) = broker_cpu_ticks() else {
            return;
        };
        let busy = (now - before) as f64 / TICKS_PER_SECOND / WINDOW.as_secs_f64();
        if busy < 0.05 {
            return;
        }
        before = now;
    }
}

/// Rounds of the service and the bare consumer (c) per key count: this machine's pace drifts by
/// a third within minutes, so each round's two runs are compared, and the medians reported.
const ROUNDS: usize = 3;

/// The middle value of `values` (an odd count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Every rate for `keys` distinct keys: `ROUNDS` rounds of the service and (c), then (a) and (b).
async fn measure(keys: usize) -> Rates {
    let mut service = Vec::with_capacity(ROUNDS);
    let mut consumer = Vec::with_capacity(ROUNDS);
    for index in 0..ROUNDS {
        // Each goes first in turn: the one that runs second finds its messages older.
        let (service_rate, consumer_rate) = round(keys, index % 2 == 1).await;
        service.push(service_rate);
        consumer.push(consumer_rate);
    }
    let (_database, vhost, settings) = bench_environment().await;
    let db = quota_keeper::db::connect_and_migrate(&settings.database)
        .await
        .expect("migrate");
    insert_keys(&db, keys as i64).await;
    let bare = bare_drain(&vhost.url(), keys).await;
    let naive = naive_consumer(&vhost.url(), &db, keys).await;
    Rates {
        service,
        consumer,
        bare,
        naive,
    }
}

/// Events per second of the service and of each baseline, for one key count.
struct Rates {
    /// One per round.
    service: Vec<f64>,
    /// (c), one per round.
    consumer: Vec<f64>,
    bare: f64,
    naive: f64,
}

async fn run() {
    println!(
        "## Ingestion: {EVENTS} persistent events queued → committed (naive: {NAIVE_EVENTS}); \
         quota-keeper and the bare consumer: medians of {ROUNDS} rounds\n"
    );
    println!("| distinct keys | quota-keeper events/s | bare consumer events/s | bare drain events/s | naive events/s | vs bare consumer (rounds) | vs bare | vs naive |");
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
        let rates = measure(keys).await;
        let ratios: Vec<f64> = rates
            .service
            .iter()
            .zip(&rates.consumer)
            .map(|(service, consumer)| service / consumer)
            .collect();
        let each_round = ratios
            .iter()
            .map(|ratio| format!("{ratio:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let service = median(rates.service);
        println!(
            "| {keys} | {service:.0} | {:.0} | {:.0} | {:.0} | {:.2}x ({each_round}) | {:.2}x | {:.1}x |",
            median(rates.consumer),
            rates.bare,
            rates.naive,
            median(ratios),
            service / rates.bare,
            service / rates.naive
        );
    }
    actix::System::current().stop();
}
