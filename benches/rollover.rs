//! Rollover benchmark: the scheduler rolls 1,000,000 lapsed keys over while checks keep being answered.
//!
//! Run: `cargo bench --bench rollover` (PostgreSQL and RabbitMQ as in the README).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

/// The allocator of the `quota-keeper` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use quota_keeper::actors::scheduler::RollOverLapsedKeys;
use quota_keeper::clock::ManualClock;
use quota_keeper::startup::Application;
use sea_orm::ConnectionTrait;
use support::{bench_environment, rpc_load, RpcStats};

const KEYS: i64 = 1_000_000;
/// Keys the check load cycles through (resident).
const CHECKED_KEYS: i64 = 1_000;
const CHECKS_IN_FLIGHT: usize = 8;
const CHECK_CHUNK: usize = 500;

fn main() {
    actix_web::rt::System::new().block_on(run());
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("valid instant")
        .with_timezone(&Utc)
}

fn check_target(i: usize) -> (String, String, Vec<u8>) {
    let key = (i as i64 % CHECKED_KEYS) + 1;
    (
        "quota.check".into(),
        key.to_string(),
        format!(r#"{{"api_key_id": {key}}}"#).into_bytes(),
    )
}

/// Runs checks in chunks until `stop`; returns every chunk's statistics.
fn check_load(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<RpcStats>> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut chunks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                chunks.push(rpc_load(&url, CHECK_CHUNK, CHECKS_IN_FLIGHT, check_target).await);
            }
            chunks
        })
    })
}

fn summarize(label: &str, chunks: &[RpcStats]) {
    let worst = chunks.iter().map(|c| c.max_us).fold(0.0, f64::max);
    let worst_p99 = chunks.iter().map(|c| c.p99_us).fold(0.0, f64::max);
    let mut p50s: Vec<f64> = chunks.iter().map(|c| c.p50_us).collect();
    p50s.sort_by(|a, b| a.total_cmp(b));
    let median_p50 = p50s.get(p50s.len() / 2).copied().unwrap_or(0.0);
    let rate = chunks.iter().map(|c| c.per_second).sum::<f64>() / chunks.len().max(1) as f64;
    println!(
        "| {label} | {} | {median_p50:.0} | {worst_p99:.0} | {:.1} | {rate:.0} |",
        chunks.len() * CHECK_CHUNK,
        worst / 1000.0
    );
}

async fn run() {
    let (_database, vhost, mut settings) = bench_environment().await;
    settings.scheduler.interval_ms = 3_600_000;
    // Idleness is judged on the clock, which jumps by a month here: the keys stay resident.
    settings.actors.idle_timeout_secs = 60 * 86_400;
    let db = quota_keeper::db::connect_and_migrate(&settings.database)
        .await
        .expect("migrate");
    db.execute_unprepared(&format!(
        "INSERT INTO api_keys (id, username, description, created_at, token_quota_monthly, tokens_used_this_month, quota_reset_at) \
         SELECT g, 'bench', '', '2026-10-01T00:00:00Z', 1000000, g % 1000, '2026-11-01T00:00:00Z'::timestamptz \
         FROM generate_series(1, {KEYS}) AS g"
    ))
    .await
    .expect("bulk insert");
    db.execute_unprepared("ANALYZE api_keys")
        .await
        .expect("analyze");

    // The service starts in October: nothing has lapsed yet.
    let clock = ManualClock::new(at("2026-10-20T00:00:00Z"));
    let app = Application::build(settings, clock.clone())
        .await
        .expect("app");
    let scheduler = app.scheduler();
    let readiness = app.readiness();
    actix_web::rt::spawn(app.run_until(std::future::pending()));
    crate::common::eventually(Duration::from_secs(30), "consuming", || {
        let state = readiness.broker();
        async move { (state == quota_keeper::readiness::BrokerState::Consuming).then_some(()) }
    })
    .await;

    // Baseline: the same check load with no rollover.
    let stop = Arc::new(AtomicBool::new(false));
    let load = check_load(vhost.url(), stop.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let baseline = tokio::task::spawn_blocking(move || load.join().expect("load"))
        .await
        .expect("join");

    // November 23rd: every key has lapsed. Roll them over while the checks go on.
    let stop = Arc::new(AtomicBool::new(false));
    let load = check_load(vhost.url(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    clock.set(at("2026-11-23T12:00:00Z"));
    let started = Instant::now();
    let rolled = scheduler
        .send(RollOverLapsedKeys)
        .await
        .expect("scheduler")
        .expect("rollover");
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = tokio::task::spawn_blocking(move || load.join().expect("load"))
        .await
        .expect("join");

    println!("## Rollover of {KEYS} lapsed keys (PostgreSQL), checks answered meanwhile\n");
    println!("| keys rolled over | seconds | keys/s |\n|---|---|---|");
    println!(
        "| {rolled} | {:.1} | {:.0} |",
        took.as_secs_f64(),
        rolled as f64 / took.as_secs_f64()
    );
    println!("\nChecks over RabbitMQ, {CHECKS_IN_FLIGHT} in flight, {CHECKED_KEYS} resident keys, in chunks of {CHECK_CHUNK}:\n");
    println!("| phase | checks | median p50 µs | worst chunk p99 µs | worst ms | checks/s |\n|---|---|---|---|---|---|");
    summarize("no rollover (baseline)", &baseline);
    summarize("during rollover", &during);
    actix::System::current().stop();
}
