//! Shared bench tools: RPC load generator, latency statistics, resident memory, the app under test.
// Each bench binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use quota_keeper::clock::SystemClock;
use quota_keeper::settings::Settings;
use quota_keeper::startup::Application;

use crate::common::broker::{consume_direct_replies, DIRECT_REPLY_TO};
use crate::common::{Backend, TestDatabase, TestVhost};

/// Latency and throughput of one load run (or of several, pooled).
#[derive(Clone, Debug)]
pub struct RpcStats {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub per_second: f64,
    /// Every round-trip time, sorted; kept so runs can be pooled.
    samples: Vec<Duration>,
    elapsed: Duration,
}

impl RpcStats {
    pub fn from_samples(mut samples: Vec<Duration>, elapsed: Duration) -> RpcStats {
        samples.sort();
        let at = |q: f64| {
            samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6
        };
        RpcStats {
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: at(1.0),
            per_second: samples.len() as f64 / elapsed.as_secs_f64(),
            samples,
            elapsed,
        }
    }

    /// The runs taken as one: all their samples over their summed time.
    pub fn pooled<'a>(runs: impl IntoIterator<Item = &'a RpcStats>) -> RpcStats {
        let mut samples = Vec::new();
        let mut elapsed = Duration::ZERO;
        for run in runs {
            samples.extend_from_slice(&run.samples);
            elapsed += run.elapsed;
        }
        RpcStats::from_samples(samples, elapsed)
    }
}

/// Sends `total` requests over direct reply-to with `in_flight` outstanding; `target(i)` gives (exchange, routing key, body).
pub async fn rpc_load(
    amqp_url: &str,
    total: usize,
    in_flight: usize,
    target: impl Fn(usize) -> (String, String, Vec<u8>),
) -> RpcStats {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .expect("broker up");
    let channel = connection.create_channel().await.expect("channel");
    let mut replies = consume_direct_replies(&channel).await;
    let mut started: HashMap<String, Instant> = HashMap::with_capacity(in_flight * 2);
    let mut samples = Vec::with_capacity(total);
    let mut sent = 0;
    let run_started = Instant::now();
    let send = |i: usize| {
        let (exchange, routing_key, body) = target(i);
        let channel = channel.clone();
        async move {
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_reply_to(DIRECT_REPLY_TO.into())
                        .with_correlation_id(i.to_string().as_str().into())
                        .with_priority(1),
                )
                .await
                .expect("publish");
        }
    };
    while sent < in_flight.min(total) {
        started.insert(sent.to_string(), Instant::now());
        send(sent).await;
        sent += 1;
    }
    while samples.len() < total {
        let delivery = tokio::time::timeout(Duration::from_secs(30), replies.next())
            .await
            .expect("a reply within 30 s")
            .expect("reply stream open")
            .expect("reply");
        let id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .expect("correlation id echoed")
            .to_string();
        if let Some(at) = started.remove(&id) {
            samples.push(at.elapsed());
        }
        if sent < total {
            started.insert(sent.to_string(), Instant::now());
            send(sent).await;
            sent += 1;
        }
    }
    let elapsed = run_started.elapsed();
    let _ = connection.close(200, "done".into()).await;
    RpcStats::from_samples(samples, elapsed)
}

/// Resident set size of this process in bytes.
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm has a resident field");
    pages * 4096
}

/// The service in this process with its own database and vhost.
pub struct BenchApp {
    pub app_port: u16,
    pub amqp_url: String,
    pub database: TestDatabase,
    pub vhost: TestVhost,
    pub registry: quota_keeper::actors::registry::KeyRegistry,
    pub db: sea_orm::DatabaseConnection,
    pub scheduler: actix::Addr<quota_keeper::actors::scheduler::Scheduler>,
}

/// A fresh PostgreSQL database and RabbitMQ vhost, and default settings for a quiet service on
/// them (any free HTTP port, warnings only).
pub async fn bench_environment() -> (TestDatabase, TestVhost, Settings) {
    let database = TestDatabase::create(Backend::Postgres).await;
    let vhost = TestVhost::create();
    let mut settings = Settings::default();
    settings.database.url = database.url.clone();
    settings.amqp.url = vhost.url();
    settings.http.bind = "127.0.0.1:0".into();
    settings.log.level = "warn".into();
    // `QUOTA_BENCH_ARBITERS=N`: run the key actors (and as many broker connections) on N arbiters.
    if let Some(arbiters) = bench_override("QUOTA_BENCH_ARBITERS") {
        settings.actors.arbiters = arbiters;
    }
    // Ingestion settings to compare against the defaults in one sitting, without a rebuild.
    if let Some(prefetch) = bench_override("QUOTA_BENCH_PREFETCH") {
        settings.amqp.prefetch = prefetch;
    }
    if let Some(shards) = bench_override("QUOTA_BENCH_SHARDS") {
        settings.amqp.shards = shards;
    }
    if let Some(batch_size) = bench_override("QUOTA_BENCH_BATCH_SIZE") {
        settings.ingest.batch_size = batch_size;
    }
    if let Some(writers) = bench_override("QUOTA_BENCH_WRITERS") {
        settings.ingest.writers = writers;
    }
    if let Some(flush_interval_ms) = bench_override("QUOTA_BENCH_FLUSH_MS") {
        settings.ingest.flush_interval_ms = flush_interval_ms;
    }
    (database, vhost, settings)
}

/// The value of environment variable `name`, if set and valid.
fn bench_override<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

pub async fn start_app(customize: impl FnOnce(&mut Settings)) -> BenchApp {
    let (database, vhost, mut settings) = bench_environment().await;
    settings.admin.password = Some("bench".into());
    customize(&mut settings);
    let app = Application::build(settings, Arc::new(SystemClock))
        .await
        .expect("the app builds");
    let readiness = app.readiness();
    let bench = BenchApp {
        app_port: app.port(),
        amqp_url: vhost.url(),
        registry: app.registry().clone(),
        db: app.db().clone(),
        scheduler: app.scheduler(),
        database,
        vhost,
    };
    actix_web::rt::spawn(app.run_until(std::future::pending()));
    crate::common::eventually(Duration::from_secs(30), "consuming", || {
        let state = readiness.broker();
        async move { (state == quota_keeper::readiness::BrokerState::Consuming).then_some(()) }
    })
    .await;
    bench
}

/// Inserts keys `1..=count` (unlimited, nothing used, in the current window) in one statement.
pub async fn insert_keys(db: &sea_orm::DatabaseConnection, count: i64) {
    use sea_orm::ConnectionTrait;
    let reset_at = quota_keeper::domain::quota::format_instant(
        quota_keeper::domain::window::next_window_start(chrono::Utc::now()),
    );
    db.execute_unprepared(&format!(
        "INSERT INTO api_keys (id, username, description, created_at, token_quota_monthly, tokens_used_this_month, quota_reset_at) \
         SELECT g, 'bench', '', now(), NULL, 0, '{reset_at}'::timestamptz FROM generate_series(1, {count}) AS g"
    ))
    .await
    .expect("bulk insert");
}
