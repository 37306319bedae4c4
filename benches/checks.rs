//! Check path benchmark: RabbitMQ round trip against a bare lapin echo RPC server on the same broker,
//! the in-process actor round trip against a bare actix ping, and memory per resident key actor.
//!
//! Run: `cargo bench --bench checks` (PostgreSQL and RabbitMQ as in the README).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

/// The allocator of the `quota-keeper` binary, so memory is measured as the service runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use quota_keeper::domain::check::CheckAsk;
use support::{insert_keys, resident_bytes, rpc_load, start_app, RpcStats};

const KEYS: i64 = 1_000;
const ECHO_QUEUE: &str = "bench.echo";
/// The echo server's second queue, behind the service's kind of routing: fanout exchange bound
/// to an internal consistent-hash exchange, a priority queue with single active consumer.
const ROUTED_ECHO_EXCHANGE: &str = "bench.routed";
const ROUTED_ECHO_HASH: &str = "bench.routed.hash";
const ROUTED_ECHO_QUEUE: &str = "bench.routed.000";
/// In-process calls kept in flight at once.
const IN_PROCESS_CONCURRENCY: usize = 256;
const MEMORY_KEYS: i64 = 1_000_000;
/// Rounds per number of requests in flight, and interleaved slices per round.
const ROUNDS: usize = 3;
const SLICES: usize = 5;
const IN_PROCESS_CALLS: usize = 200_000;

fn main() {
    actix_web::rt::System::new().block_on(run());
}

/// The baseline: consume, publish the body back to `reply_to` with the correlation id, ack.
async fn echo_server(url: String, ready: std::sync::mpsc::Sender<()>) {
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            ECHO_QUEUE.into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("echo queue");
    channel
        .basic_qos(10_000, BasicQosOptions::default())
        .await
        .expect("qos");
    let replies = connection.create_channel().await.expect("channel");
    declare_routed_echo(&channel).await;
    let plain = channel
        .basic_consume(
            ECHO_QUEUE.into(),
            "echo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let routed = channel
        .basic_consume(
            ROUTED_ECHO_QUEUE.into(),
            "routed-echo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut consumer = futures::stream::select(plain, routed);
    let _ = ready.send(());
    while let Some(Ok(delivery)) = consumer.next().await {
        let Some(reply_to) = delivery.properties.reply_to().clone() else {
            continue;
        };
        let mut properties = BasicProperties::default();
        if let Some(id) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(id.clone());
        }
        let _ = replies
            .basic_publish(
                "".into(),
                reply_to,
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            )
            .await;
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
    }
}

async fn declare_routed_echo(channel: &lapin::Channel) {
    use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions};
    use lapin::types::AMQPValue;
    use lapin::ExchangeKind;
    channel
        .exchange_declare(
            ROUTED_ECHO_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("fanout");
    channel
        .exchange_declare(
            ROUTED_ECHO_HASH.into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            ExchangeDeclareOptions {
                internal: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("hash exchange");
    channel
        .exchange_bind(
            ROUTED_ECHO_HASH.into(),
            ROUTED_ECHO_EXCHANGE.into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let mut arguments = FieldTable::default();
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    arguments.insert("x-max-priority".into(), AMQPValue::LongInt(1));
    channel
        .queue_declare(
            ROUTED_ECHO_QUEUE.into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("routed queue");
    channel
        .queue_bind(
            ROUTED_ECHO_QUEUE.into(),
            ROUTED_ECHO_HASH.into(),
            "1".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind queue");
}

fn routed_echo_target(i: usize) -> (String, String, Vec<u8>) {
    let key = (i as i64 % KEYS) + 1;
    (
        ROUTED_ECHO_EXCHANGE.into(),
        key.to_string(),
        format!(r#"{{"api_key_id": {key}, "tokens": 10}}"#).into_bytes(),
    )
}

fn in_thread<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work)
    })
}

/// A check with an estimate of 10 tokens, as the broker benchmark sends.
fn ten_tokens() -> CheckAsk {
    CheckAsk {
        tokens: Some(10),
        reserve: None,
    }
}

fn check_target(i: usize) -> (String, String, Vec<u8>) {
    let key = (i as i64 % KEYS) + 1;
    (
        "quota.check".into(),
        key.to_string(),
        format!(r#"{{"api_key_id": {key}, "tokens": 10}}"#).into_bytes(),
    )
}

fn echo_target(i: usize) -> (String, String, Vec<u8>) {
    let key = (i as i64 % KEYS) + 1;
    (
        "".into(),
        ECHO_QUEUE.into(),
        format!(r#"{{"api_key_id": {key}, "tokens": 10}}"#).into_bytes(),
    )
}

/// A do-nothing actor: the floor of an actix request/response across threads.
struct Pong;
impl Actor for Pong {
    type Context = Context<Self>;
}
#[derive(Message)]
#[rtype(result = "u64")]
struct Ping(u64);
impl Handler<Ping> for Pong {
    type Result = u64;
    fn handle(&mut self, msg: Ping, _: &mut Self::Context) -> u64 {
        msg.0 + 1
    }
}

async fn run() {
    // `cargo bench --bench checks -- memory` measures only the memory per actor.
    let memory_only = std::env::args().any(|arg| arg == "memory");
    // `-- memory-baseline`: the same count of do-nothing actix actors, for comparison (separate run:
    // freed memory would be reused and hide the second measurement).
    if std::env::args().any(|arg| arg == "memory-baseline") {
        bare_actor_memory().await;
        System::current().stop();
        return;
    }
    // `-- round-trips`: only the RabbitMQ round trips (for comparing settings quickly).
    let round_trips_only = std::env::args().any(|arg| arg == "round-trips");
    let app = start_app(|_| {}).await;
    insert_keys(&app.db, KEYS).await;
    // `-- metrics-memory`: memory kept per check while nobody scrapes `/metrics`.
    if std::env::args().any(|arg| arg == "metrics-memory") {
        metrics_memory_per_check(&app).await;
        System::current().stop();
        return;
    }
    if !memory_only {
        round_trips(&app, round_trips_only).await;
    }
    if !round_trips_only {
        memory_per_actor(&app).await;
    }
    System::current().stop();
}

async fn round_trips(app: &support::BenchApp, round_trips_only: bool) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let _echo = in_thread(echo_server(app.amqp_url.clone(), ready_tx));
    tokio::task::spawn_blocking(move || ready_rx.recv().expect("echo server ready"))
        .await
        .expect("join");

    let url = app.amqp_url.clone();
    let loads = in_thread(async move {
        // Warm up both (and make every key resident).
        rpc_load(&url, 5_000, 64, check_target).await;
        rpc_load(&url, 5_000, 64, echo_target).await;
        // Machine load drifts over seconds (the echo alone moved 1.5x between rounds), so each
        // round interleaves short slices of the three servers and pools each one's samples.
        let mut rows = Vec::new();
        for (in_flight, total) in [(1usize, 3_000usize), (64, 40_000)] {
            for round in 0..ROUNDS {
                let (mut echo, mut routed, mut service) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..SLICES {
                    let slice = total / SLICES;
                    echo.push(rpc_load(&url, slice, in_flight, echo_target).await);
                    routed.push(rpc_load(&url, slice, in_flight, routed_echo_target).await);
                    service.push(rpc_load(&url, slice, in_flight, check_target).await);
                }
                rows.push((
                    in_flight,
                    round,
                    RpcStats::pooled(&echo),
                    RpcStats::pooled(&routed),
                    RpcStats::pooled(&service),
                ));
            }
        }
        rows
    });
    // Joined off the actix thread, which keeps serving the consumer meanwhile.
    let rows = tokio::task::spawn_blocking(move || loads.join().expect("load thread"))
        .await
        .expect("join");

    println!(
        "## Check round trip over RabbitMQ (direct reply-to), {KEYS} keys, same broker, same run\n"
    );
    println!("Baselines: *echo* is a bare lapin echo RPC server on a plain queue; *routed echo* is the same");
    println!("server behind the service's kind of routing (fanout → consistent-hash → priority queue).\n");
    println!("| in flight | round | echo p50 µs | routed echo p50 µs | quota p50 µs | p50 vs echo | p50 vs routed | echo p99 µs | quota p99 µs | echo req/s | routed req/s | quota req/s | req/s vs echo | req/s vs routed |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (in_flight, round, echo, routed, service) in &rows {
        print_row(*in_flight, &round.to_string(), echo, routed, service);
    }
    // Every round of one number in flight taken together: one figure per target.
    for in_flight in [1, 64] {
        let rounds: Vec<_> = rows.iter().filter(|row| row.0 == in_flight).collect();
        print_row(
            in_flight,
            "all",
            &RpcStats::pooled(rounds.iter().map(|row| &row.2)),
            &RpcStats::pooled(rounds.iter().map(|row| &row.3)),
            &RpcStats::pooled(rounds.iter().map(|row| &row.4)),
        );
    }

    if round_trips_only {
        return;
    }
    // In-process: the check's actor round trip against a bare actix ping across threads.
    let pong = Pong::start_in_arbiter(&Arbiter::new().handle(), |_| Pong);
    for i in 0..10_000 {
        pong.send(Ping(i)).await.expect("pong");
    }
    let started = Instant::now();
    for i in 0..IN_PROCESS_CALLS as u64 {
        pong.send(Ping(i)).await.expect("pong");
    }
    let ping_ns = started.elapsed().as_nanos() as f64 / IN_PROCESS_CALLS as f64;
    let started = Instant::now();
    for i in 0..IN_PROCESS_CALLS as i64 {
        app.registry
            .check(i % KEYS + 1, ten_tokens())
            .await
            .expect("check");
    }
    let check_ns = started.elapsed().as_nanos() as f64 / IN_PROCESS_CALLS as f64;
    // Pipelined: many calls in flight, so thread wake-ups are shared and the cost per call shows.
    let started = Instant::now();
    futures::stream::iter(0..IN_PROCESS_CALLS as u64)
        .map(|i| pong.send(Ping(i)))
        .buffer_unordered(IN_PROCESS_CONCURRENCY)
        .for_each(|reply| async move {
            reply.expect("pong");
        })
        .await;
    let ping_pipelined_ns = started.elapsed().as_nanos() as f64 / IN_PROCESS_CALLS as f64;
    let started = Instant::now();
    pipelined_checks(&app.registry, IN_PROCESS_CALLS).await;
    let check_pipelined_ns = started.elapsed().as_nanos() as f64 / IN_PROCESS_CALLS as f64;
    println!("\n## In-process check (registry lookup + actor message round trip), {IN_PROCESS_CALLS} calls\n");
    println!("| mode | bare actix ping ns/call | quota check ns/call | ratio |\n|---|---|---|---|");
    println!(
        "| one at a time (latency, thread wake-ups included) | {ping_ns:.0} | {check_ns:.0} | {:.2}x |",
        check_ns / ping_ns
    );
    println!(
        "| {IN_PROCESS_CONCURRENCY} in flight (cost per call) | {ping_pipelined_ns:.0} | {check_pipelined_ns:.0} | {:.2}x |",
        check_pipelined_ns / ping_pipelined_ns
    );
}

/// `count` in-process checks over the bench keys, `IN_PROCESS_CONCURRENCY` in flight at once.
async fn pipelined_checks(registry: &quota_keeper::actors::registry::KeyRegistry, count: usize) {
    futures::stream::iter(0..count as i64)
        .map(|i| registry.check(i % KEYS + 1, ten_tokens()))
        .buffer_unordered(IN_PROCESS_CONCURRENCY)
        .for_each(|reply| async move {
            reply.expect("check");
        })
        .await;
}

/// RSS after rounds of in-process checks with no scrape of `/metrics`: each check records a
/// latency sample, which the upkeep thread folds into buckets. Freed memory is reused rather than
/// returned, so the first round shows the peak between upkeeps; a leak shows as growth in every round.
async fn metrics_memory_per_check(app: &support::BenchApp) {
    const ROUNDS: usize = 4;
    const CHECKS_PER_ROUND: usize = 4_000_000;
    // Warm up: every key resident, allocator pools filled.
    pipelined_checks(&app.registry, 200_000).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    println!("\n## RSS with no scrape of /metrics, {CHECKS_PER_ROUND} checks per round\n");
    println!("| after round | RSS MiB | growth in the round, bytes per check |\n|---|---|---|");
    let mut previous = resident_bytes();
    println!("| 0 (warm) | {:.1} | |", previous as f64 / 1048576.0);
    for round in 1..=ROUNDS {
        pipelined_checks(&app.registry, CHECKS_PER_ROUND).await;
        // Longer than the upkeep interval, so what upkeep frees is free before the next round.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let now = resident_bytes();
        println!(
            "| {round} | {:.1} | {:.2} |",
            now as f64 / 1048576.0,
            (now as f64 - previous as f64) / CHECKS_PER_ROUND as f64
        );
        previous = now;
    }
}

/// A million do-nothing actix actors spread over two arbiters, their addresses kept in a map.
async fn bare_actor_memory() {
    let arbiters = [Arbiter::new().handle(), Arbiter::new().handle()];
    let before = resident_bytes();
    let mut addrs = std::collections::HashMap::new();
    for i in 0..MEMORY_KEYS {
        addrs.insert(
            i,
            Pong::start_in_arbiter(&arbiters[(i % 2) as usize], |_| Pong),
        );
    }
    for i in (MEMORY_KEYS - 1_000)..MEMORY_KEYS {
        addrs[&i].send(Ping(1)).await.expect("pong");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resident_bytes();
    println!("\n## Memory per bare actix actor (baseline)\n");
    println!("| actors | bytes per actor |\n|---|---|");
    println!(
        "| {} | {:.0} |",
        addrs.len(),
        (after - before) as f64 / addrs.len() as f64
    );
}

/// A million resident key actors: RSS growth per actor.
async fn memory_per_actor(app: &support::BenchApp) {
    let before_count = app.registry.resident_count();
    let before = resident_bytes();
    let now = chrono::Utc::now();
    let reset_at = quota_keeper::domain::window::next_window_start(now);
    app.registry
        .start_resident((0..MEMORY_KEYS).map(|i| entity::api_keys::Model {
            id: 10_000_000 + i,
            username: "bench".into(),
            description: String::new(),
            created_at: now,
            token_quota_monthly: Some(1_000_000),
            tokens_used_this_month: 0,
            quota_reset_at: reset_at,
            counter_version: 0,
        }));
    // Actors start on their arbiters asynchronously: wait until the last ones answer.
    for i in (MEMORY_KEYS - 1_000)..MEMORY_KEYS {
        app.registry
            .check(10_000_000 + i, CheckAsk::default())
            .await
            .expect("resident");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resident_bytes();
    let added = app.registry.resident_count() - before_count;
    println!("\n## Memory per resident key actor\n");
    println!(
        "| actors added | RSS before MiB | RSS after MiB | bytes per actor |\n|---|---|---|---|"
    );
    println!(
        "| {added} | {:.1} | {:.1} | {:.0} |",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        (after - before) as f64 / added as f64
    );
    app.registry.evict_all();
}

fn print_row(
    in_flight: usize,
    round: &str,
    echo: &RpcStats,
    routed: &RpcStats,
    service: &RpcStats,
) {
    println!(
        "| {in_flight} | {round} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x |",
        echo.p50_us,
        routed.p50_us,
        service.p50_us,
        service.p50_us / echo.p50_us,
        service.p50_us / routed.p50_us,
        echo.p99_us,
        service.p99_us,
        echo.per_second,
        routed.per_second,
        service.per_second,
        service.per_second / echo.per_second,
        service.per_second / routed.per_second
    );
}
