//! Ingestion benchmark: events queued → committed, against (a) a bare lapin consumer draining the same
//! persistent messages, (b) a naive consumer with one read-modify-write transaction per event,
//! (c) a bare consumer in its own process that parses each body and acknowledges in batches, and
//! (d) that consumer on queues declared like the service's shard queues.
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
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use quota_keeper::clock::SystemClock;
use quota_keeper::startup::Application;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use support::{bench_environment, insert_keys};

/// Clock ticks per second of `/proc/<pid>/stat` on Linux (`getconf CLK_TCK`).
const TICKS_PER_SECOND: f64 = 100.0;
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
        let (url, queues) = (&args[at + 1], &args[at + 2]);
        let queues: Vec<&str> = queues.split(',').collect();
        let before = cpu_ticks(Party::Own);
        // The runtime `#[tokio::main]` gives a plain consumer.
        let rate = tokio::runtime::Runtime::new()
            .expect("a runtime")
            .block_on(bare_consumer(url, &queues));
        // Its rate, and the CPU it took per event (NaN if unknown).
        println!("{rate} {}", micros_per_event(before, cpu_ticks(Party::Own)));
        return;
    }
    actix_web::rt::System::new().block_on(run());
}

fn event_body(i: usize, keys: usize) -> Vec<u8> {
    let key = (i % keys) + 1;
    format!(r#"{{"event_id": "e-{i}", "api_key_id": {key}, "tokens": 3}}"#).into_bytes()
}

/// Where a copy of each event goes.
#[derive(Clone, Copy)]
enum Destination<'a> {
    /// An exchange, with the key id as routing key.
    Exchange(&'a str),
    /// A plain durable queue, through the default exchange.
    Queue(&'a str),
    /// The queues of (d), through the default exchange: key id modulo their count.
    LayoutQueues(usize),
}

/// The name of queue `index` of (d).
fn layout_queue(index: usize) -> String {
    format!("bench.layout.{index:03}")
}

/// Publishes `count` persistent events with confirms, `PUBLISH_CHUNK` outstanding at a time, each
/// to every destination in turn. Interleaved, so every destination's messages are as old when the
/// consumers start (the broker keeps writing persistent messages for a while after their confirms).
async fn publish_all(
    channel: &Channel,
    destinations: &[Destination<'_>],
    count: usize,
    keys: usize,
) {
    let mut confirms = Vec::with_capacity(PUBLISH_CHUNK);
    for i in 0..count {
        let key = (i % keys) + 1;
        for &destination in destinations {
            let (exchange, routing_key) = match destination {
                Destination::Exchange(exchange) => (exchange, key.to_string()),
                Destination::Queue(queue) => ("", queue.to_string()),
                Destination::LayoutQueues(count) => ("", layout_queue(key % count)),
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

async fn declare_queue(channel: &Channel, queue: &str, arguments: FieldTable) {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("queue");
}

/// The arguments `src/amqp/topology.rs` declares the shard queues with: one active consumer,
/// a priority for checks, the broker's second queue format.
fn shard_queue_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    arguments.insert("x-max-priority".into(), AMQPValue::LongInt(1));
    arguments.insert("x-queue-version".into(), AMQPValue::LongInt(2));
    arguments
}

/// Publishes `count` events to `destinations` on a connection of its own (declaring the queues
/// they name), with confirms.
async fn publish(url: &str, destinations: &[Destination<'_>], count: usize, keys: usize) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for destination in destinations {
        match *destination {
            Destination::Exchange(_) => {}
            Destination::Queue(queue) => {
                declare_queue(&channel, queue, FieldTable::default()).await
            }
            Destination::LayoutQueues(count) => {
                for index in 0..count {
                    declare_queue(&channel, &layout_queue(index), shard_queue_arguments()).await;
                }
            }
        }
    }
    publish_all(&channel, destinations, count, keys).await;
    let _ = connection.close(200, "published".into()).await;
}

/// (a) The limit: consume and acknowledge every message, nothing else.
async fn bare_drain(url: &str, keys: usize) -> f64 {
    publish(url, &[Destination::Queue("bench.drain")], EVENTS, keys).await;
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
/// no runtime or allocator with the parent): `EVENTS` messages already queued in `queues` (each
/// consumed on a channel of its own), each body parsed, every `BARE_CONSUMER_ACK_EVERY`th delivery
/// of a channel (and its last) acknowledged with `multiple`. Timed from connecting to the last
/// ack, as the service is from its start to its last commit.
async fn bare_consumer(url: &str, queues: &[&str]) -> f64 {
    let started = Instant::now();
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("broker");
    let mut channels = Vec::with_capacity(queues.len());
    let mut consumers = Vec::with_capacity(queues.len());
    for (index, queue) in queues.iter().enumerate() {
        let channel = connection.create_channel().await.expect("channel");
        channel
            .basic_qos(BARE_CONSUMER_PREFETCH, BasicQosOptions::default())
            .await
            .expect("qos");
        let consumer = channel
            .basic_consume(
                (*queue).into(),
                "bare".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        consumers.push(consumer.map(move |delivery| (index, delivery)));
        channels.push(channel);
    }
    let mut deliveries = futures::stream::select_all(consumers);
    // Per channel: deliveries since its last ack, and the last of them.
    let mut unacknowledged: Vec<(usize, Option<lapin::Acker>)> =
        queues.iter().map(|_| (0, None)).collect();
    for _ in 0..EVENTS {
        let (index, delivery) = deliveries.next().await.expect("open");
        let delivery = delivery.expect("delivery");
        let event: BareEvent = serde_json::from_slice(&delivery.data).expect("a usage event");
        std::hint::black_box(event);
        let (count, last) = &mut unacknowledged[index];
        *count += 1;
        if *count == BARE_CONSUMER_ACK_EVERY {
            *count = 0;
            *last = None;
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        } else {
            *last = Some(delivery.acker);
        }
    }
    for (_, last) in unacknowledged {
        if let Some(acker) = last {
            acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
    }
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    drop(channels);
    let _ = connection.close(200, "done".into()).await;
    rate
}

/// Runs [`bare_consumer`] on the `EVENTS` events queued in `queues`, in a child process (this
/// binary, re-executed); returns the rate and CPU per event it prints, with the broker's.
async fn bare_consumer_in_own_process(url: &str, queues: &[String]) -> Run {
    let broker_before = cpu_ticks(Party::Broker);
    let output = tokio::process::Command::new(std::env::current_exe().expect("this binary"))
        .args([BARE_CONSUMER_ARG, url, &queues.join(",")])
        .output()
        .await
        .expect("the bare consumer runs");
    assert!(
        output.status.success(),
        "bare consumer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let broker = micros_per_event(broker_before, cpu_ticks(Party::Broker));
    let printed = String::from_utf8_lossy(&output.stdout);
    let mut numbers = printed.split_whitespace().map(|number| {
        number
            .parse::<f64>()
            .expect("the bare consumer prints numbers")
    });
    Run {
        rate: numbers.next().expect("the bare consumer prints its rate"),
        cpu: CpuPerEvent {
            broker,
            database: f64::NAN,
            consumer: numbers.next().expect("the bare consumer prints its CPU"),
        },
    }
}

/// (b) One transaction per event: look the event up, read the key, write the new total, commit, ack.
async fn naive_consumer(url: &str, db: &DatabaseConnection, keys: usize) -> f64 {
    publish(
        url,
        &[Destination::Queue("bench.naive")],
        NAIVE_EVENTS,
        keys,
    )
    .await;
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

/// Waits until every key's counter adds up to `expected`. The sum reads every key's row: every
/// 100 ms until 90 % is there, then as often as four times its own duration allows (at least
/// every 10 ms), so the end is seen within a few ms without taking much from the service.
async fn wait_for_total(db: &DatabaseConnection, expected: i64) {
    loop {
        let asked = Instant::now();
        let total = total_used(db).await;
        if total == expected {
            return;
        }
        let pause = if total * 10 < expected * 9 {
            Duration::from_millis(100)
        } else {
            (asked.elapsed() * 4).max(Duration::from_millis(10))
        };
        tokio::time::sleep(pause).await;
    }
}

/// A timed run: events per second, and CPU per event meanwhile.
#[derive(Clone, Copy)]
struct Run {
    rate: f64,
    cpu: CpuPerEvent,
}

/// Microseconds of CPU per event of a run (NaN where not measured).
#[derive(Clone, Copy)]
struct CpuPerEvent {
    broker: f64,
    database: f64,
    /// The consumer's own process.
    consumer: f64,
}

/// CPU ticks of the broker, PostgreSQL and this process at one moment.
struct CpuSnapshot {
    broker: Option<u64>,
    database: Option<u64>,
    own: Option<u64>,
}

impl CpuSnapshot {
    fn take() -> CpuSnapshot {
        CpuSnapshot {
            broker: cpu_ticks(Party::Broker),
            database: cpu_ticks(Party::Database),
            own: cpu_ticks(Party::Own),
        }
    }

    fn per_event_since(&self) -> CpuPerEvent {
        let now = CpuSnapshot::take();
        CpuPerEvent {
            broker: micros_per_event(self.broker, now.broker),
            database: micros_per_event(self.database, now.database),
            consumer: micros_per_event(self.own, now.own),
        }
    }
}

/// What a round times; each round starts with a different one.
#[derive(Clone, Copy)]
enum Contender {
    Service,
    /// (c) on one plain queue.
    BareConsumer,
    /// (d) on queues like the service's.
    BareOnLayout,
}

/// One round's three runs.
struct RoundRuns {
    service: Run,
    bare_consumer: Run,
    bare_on_layout: Run,
}

/// One round: `EVENTS` events queued for the service (through its exchange, on its shard queues),
/// the same events in a plain durable queue (c) and in as many queues as the service has shards,
/// declared like them (d), all in one vhost, published interleaved; once the broker has finished
/// writing them, the three are timed one right after the other (seconds apart, so the machine's
/// drift between them stays small), starting with `first`; the service from its start until all
/// its events are committed, then stopped.
async fn round(keys: usize, first: usize) -> RoundRuns {
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
    let shards = usize::from(settings.amqp.shards);
    let destinations = [
        Destination::Exchange("quota.usage"),
        Destination::Queue(BARE_QUEUE),
        Destination::LayoutQueues(shards),
    ];
    publish(&vhost.url(), &destinations, EVENTS, keys).await;
    broker_settled().await;

    let layout_queues: Vec<String> = (0..shards).map(layout_queue).collect();
    let mut order = [
        Contender::Service,
        Contender::BareConsumer,
        Contender::BareOnLayout,
    ];
    let contenders = order.len();
    order.rotate_left(first % contenders);
    let (mut service, mut bare_consumer, mut bare_on_layout) = (None, None, None);
    for contender in order {
        match contender {
            Contender::Service => service = Some(service_run(&settings, &db).await),
            Contender::BareConsumer => {
                let queues = [BARE_QUEUE.to_string()];
                bare_consumer = Some(bare_consumer_in_own_process(&vhost.url(), &queues).await)
            }
            Contender::BareOnLayout => {
                bare_on_layout =
                    Some(bare_consumer_in_own_process(&vhost.url(), &layout_queues).await)
            }
        }
    }
    RoundRuns {
        service: service.expect("the service ran"),
        bare_consumer: bare_consumer.expect("(c) ran"),
        bare_on_layout: bare_on_layout.expect("(d) ran"),
    }
}

/// Starts the service on the queued events, times it until they are all committed, stops it.
async fn service_run(settings: &quota_keeper::settings::Settings, db: &DatabaseConnection) -> Run {
    let expected = 3 * EVENTS as i64;
    let before = CpuSnapshot::take();
    let started = Instant::now();
    let app = Application::build(settings.clone(), Arc::new(SystemClock))
        .await
        .expect("app");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = actix_web::rt::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    wait_for_total(db, expected).await;
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    let cpu = before.per_event_since();
    // Stopped before anything else is measured, so nothing of it runs alongside.
    let _ = stop.send(());
    let _ = running.await;
    Run { rate, cpu }
}

/// Processes whose CPU a run is charged with.
#[derive(Clone, Copy)]
enum Party {
    Broker,
    Database,
    /// The process reading it: the service, or the bare consumer in its child process.
    Own,
}

/// CPU time so far of every process of `party` (all threads), in clock ticks, from `/proc`;
/// `None` if it cannot be read.
fn cpu_ticks(party: Party) -> Option<u64> {
    let command = match party {
        Party::Broker => "(beam.smp)",
        Party::Database => "(postgres)",
        Party::Own => return process_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?),
    };
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat.contains(command) {
            total = Some(total.unwrap_or(0) + process_ticks(&stat)?);
        }
    }
    total
}

/// utime + stime of a `/proc/<pid>/stat` line: fields 14 and 15, the 12th and 13th after the
/// command's `)`.
fn process_ticks(stat: &str) -> Option<u64> {
    let after_command = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_command.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Microseconds of CPU per event of a run from `before` to `after` (ticks); NaN if unknown.
fn micros_per_event(before: Option<u64>, after: Option<u64>) -> f64 {
    match (before, after) {
        (Some(before), Some(after)) => {
            (after - before) as f64 / TICKS_PER_SECOND * 1e6 / EVENTS as f64
        }
        _ => f64::NAN,
    }
}

/// Waits until the broker is idle: it keeps writing persistent messages for seconds after their
/// confirms (classic queues of version 1 most), and whichever consumer ran first paid for every
/// queue's writes. Idle = under 5 % of a core for 500 ms; 30 s at most.
async fn broker_settled() {
    const WINDOW: Duration = Duration::from_millis(500);
    let deadline = Instant::now() + Duration::from_secs(30);
    let Some(mut before) = cpu_ticks(Party::Broker) else {
        return;
    };
    while Instant::now() < deadline {
        tokio::time::sleep(WINDOW).await;
        let Some(now) = cpu_ticks(Party::Broker) else {
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

/// Every rate for `keys` distinct keys: `ROUNDS` rounds of the service, (c) and (d), then (a) and (b).
async fn measure(keys: usize) -> Rates {
    let mut rounds = Vec::with_capacity(ROUNDS);
    for index in 0..ROUNDS {
        // Each goes first in turn: the ones that run later find their messages older.
        rounds.push(round(keys, index).await);
    }
    let (_database, vhost, settings) = bench_environment().await;
    let db = quota_keeper::db::connect_and_migrate(&settings.database)
        .await
        .expect("migrate");
    insert_keys(&db, keys as i64).await;
    let bare = bare_drain(&vhost.url(), keys).await;
    let naive = naive_consumer(&vhost.url(), &db, keys).await;
    Rates {
        rounds,
        bare,
        naive,
    }
}

/// Events per second of the service and of each baseline, for one key count.
struct Rates {
    rounds: Vec<RoundRuns>,
    bare: f64,
    naive: f64,
}

/// The median of `of` over `rounds`.
fn median_of(rounds: &[RoundRuns], of: impl Fn(&RoundRuns) -> f64) -> f64 {
    median(rounds.iter().map(of).collect())
}

/// `median (each round's)` of the service's rate against `baseline`'s, round by round.
fn ratios(rounds: &[RoundRuns], baseline: impl Fn(&RoundRuns) -> Run) -> String {
    let each: Vec<f64> = rounds
        .iter()
        .map(|runs| runs.service.rate / baseline(runs).rate)
        .collect();
    let listed = each
        .iter()
        .map(|ratio| format!("{ratio:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{:.2}x ({listed})", median(each))
}

async fn run() {
    println!(
        "## Ingestion: {EVENTS} persistent events queued → committed (naive: {NAIVE_EVENTS}); \
         quota-keeper, (c) and (d): medians of {ROUNDS} rounds\n"
    );
    println!("| distinct keys | quota-keeper events/s | (c) bare consumer events/s | (d) bare consumer, service's queues events/s | (a) bare drain events/s | (b) naive events/s | vs (c) (rounds) | vs (d) (rounds) | vs (a) | vs (b) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
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
    let mut cpu_rows = Vec::new();
    for keys in key_counts {
        let rates = measure(keys).await;
        let rounds = &rates.rounds;
        let service = median_of(rounds, |runs| runs.service.rate);
        println!(
            "| {keys} | {service:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.2}x | {:.1}x |",
            median_of(rounds, |runs| runs.bare_consumer.rate),
            median_of(rounds, |runs| runs.bare_on_layout.rate),
            rates.bare,
            rates.naive,
            ratios(rounds, |runs| runs.bare_consumer),
            ratios(rounds, |runs| runs.bare_on_layout),
            service / rates.bare,
            service / rates.naive,
        );
        let cpu = |of: fn(&RoundRuns) -> Run| {
            let median_cpu =
                |part: fn(&CpuPerEvent) -> f64| median_of(rounds, |runs| part(&of(runs).cpu));
            (
                median_cpu(|cpu| cpu.broker),
                median_cpu(|cpu| cpu.database),
                median_cpu(|cpu| cpu.consumer),
            )
        };
        let (service_broker, service_database, service_own) = cpu(|runs| runs.service);
        let (c_broker, _, c_own) = cpu(|runs| runs.bare_consumer);
        let (d_broker, _, d_own) = cpu(|runs| runs.bare_on_layout);
        cpu_rows.push(format!(
            "| {keys} | {service_broker:.1} | {service_database:.1} | {service_own:.1} | {:.1} | {c_broker:.1} | {c_own:.1} | {d_broker:.1} | {d_own:.1} |",
            service_broker + service_database + service_own
        ));
    }
    println!("\nCPU per event (µs, medians of the rounds; the consumer's own process: the service, or the bare consumer's child process):\n");
    println!("| distinct keys | quota-keeper: broker | PostgreSQL | quota-keeper | all three | (c): broker | (c) | (d): broker | (d) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in cpu_rows {
        println!("{row}");
    }
    actix::System::current().stop();
}
