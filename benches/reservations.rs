//! Reservations benchmark: a check with `reserve` against a plain check over RabbitMQ in the same
//! run, memory per live hold, and checks while 100,000 holds expire at once.
//!
//! Run: `cargo bench --bench reservations` (PostgreSQL and RabbitMQ as in the README).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

/// The allocator of the `quota-keeper` binary, so memory is measured as the service runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use quota_keeper::actors::registry::KeyRegistry;
use quota_keeper::clock::ManualClock;
use quota_keeper::domain::check::CheckAsk;
use quota_keeper::domain::reservation::ReserveRequest;
use quota_keeper::settings::UnknownKeyPolicy;
use support::{insert_keys, resident_bytes, rpc_load, start_app, RpcStats};

const KEYS: i64 = 1_000;
const CHECKS_PER_SLICE: usize = 10_000;
const SLICES: usize = 6;
const IN_FLIGHT: usize = 1;
const MEMORY_HOLDS: usize = 1_000_000;
const EXPIRING_HOLDS: usize = 100_000;

fn main() {
    actix_web::rt::System::new().block_on(run());
}

async fn run() {
    let app = start_app(|_| {}).await;
    insert_keys(&app.db, KEYS).await;
    round_trips(&app.amqp_url).await;
    memory_per_hold(&app.db).await;
    mass_expiry(&app.db).await;
}

/// Plain checks and checks that hold (each a new `reservation_id`), in interleaved slices.
async fn round_trips(amqp_url: &str) {
    let next_hold = AtomicUsize::new(0);
    let plain = |i: usize| {
        let key = (i as i64 % KEYS) + 1;
        (
            "quota.check".to_string(),
            key.to_string(),
            format!(r#"{{"api_key_id": {key}, "tokens": 10}}"#).into_bytes(),
        )
    };
    let holding = |i: usize| {
        let key = (i as i64 % KEYS) + 1;
        let hold = next_hold.fetch_add(1, Ordering::Relaxed);
        (
            "quota.check".to_string(),
            key.to_string(),
            format!(
                r#"{{"api_key_id": {key}, "reserve": 10, "reservation_id": "{}", "ttl_secs": 3600}}"#,
                uuid::Uuid::from_u128(hold as u128)
            )
            .into_bytes(),
        )
    };
    // Warm: every key resident.
    rpc_load(amqp_url, KEYS as usize * 2, 16, plain).await;
    let mut plain_runs = Vec::new();
    let mut hold_runs = Vec::new();
    for _ in 0..SLICES {
        plain_runs.push(rpc_load(amqp_url, CHECKS_PER_SLICE, IN_FLIGHT, plain).await);
        hold_runs.push(rpc_load(amqp_url, CHECKS_PER_SLICE, IN_FLIGHT, &holding).await);
    }
    let plain = RpcStats::pooled(&plain_runs);
    let hold = RpcStats::pooled(&hold_runs);
    println!(
        "## Check with `reserve` vs plain check over RabbitMQ, {IN_FLIGHT} in flight, {} each\n",
        CHECKS_PER_SLICE * SLICES
    );
    println!("| check | p50 µs | p99 µs | max µs | req/s |\n|---|---|---|---|---|");
    for (name, stats) in [("plain (`tokens: 10`)", &plain), ("`reserve: 10`", &hold)] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |",
            stats.p50_us, stats.p99_us, stats.max_us, stats.per_second
        );
    }
    println!(
        "\np50 ratio reserve / plain: {:.2}",
        hold.p50_us / plain.p50_us
    );
}

fn reserve_ask(id: String, ttl_secs: u32) -> CheckAsk {
    CheckAsk {
        tokens: None,
        reserve: Some(ReserveRequest {
            id,
            tokens: 1,
            ttl_secs,
        }),
    }
}

/// A registry of its own, without a batch writer: holds stay in memory only, so RSS measures them.
fn bare_registry(
    db: &sea_orm::DatabaseConnection,
    clock: std::sync::Arc<ManualClock>,
) -> KeyRegistry {
    KeyRegistry::start(
        db.clone(),
        clock,
        UnknownKeyPolicy::Allow,
        // Idleness is judged on the clock, which `mass_expiry` moves by hours: keys stay resident.
        Duration::from_secs(86_400),
        0,
        quota_keeper::alerts::Alerts::new(Default::default()),
    )
}

/// Grants `count` holds with UUID ids over keys `1..=keys`, 512 requests in flight.
async fn grant_holds(registry: &KeyRegistry, count: usize, keys: i64, ttl_secs: u32, prefix: u128) {
    use futures::StreamExt;
    futures::stream::iter(0..count)
        .map(|i| {
            let key = (i as i64 % keys) + 1;
            let id = uuid::Uuid::from_u128(prefix << 64 | i as u128).to_string();
            registry.check(key, reserve_ask(id, ttl_secs))
        })
        .buffer_unordered(512)
        .for_each(|reply| async move {
            assert!(reply.expect("answered").reservation.is_some(), "granted");
        })
        .await;
}

async fn memory_per_hold(db: &sea_orm::DatabaseConnection) {
    let registry = bare_registry(db, ManualClock::new(chrono::Utc::now()));
    // Every key resident first, so only holds are added below.
    for key in 1..=KEYS {
        registry
            .check(key, CheckAsk::default())
            .await
            .expect("resident");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = resident_bytes();
    grant_holds(&registry, MEMORY_HOLDS, KEYS, 3600, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resident_bytes();
    println!(
        "\n## Memory per live hold ({MEMORY_HOLDS} holds over {KEYS} keys, 36-character ids)\n"
    );
    println!("| RSS before MiB | RSS after MiB | bytes per hold |\n|---|---|---|");
    println!(
        "| {:.1} | {:.1} | {:.0} |",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        (after - before) as f64 / MEMORY_HOLDS as f64
    );
    registry.shutdown();
}

/// 100,000 holds on one key (the worst case: one actor releases them all) plus plain checks of
/// other keys and of that key, timed one by one while the clock jumps past every expiry.
async fn mass_expiry(db: &sea_orm::DatabaseConnection) {
    let start = chrono::Utc::now();
    let clock = ManualClock::new(start);
    let registry = bare_registry(db, clock.clone());
    for key in 1..=KEYS {
        registry
            .check(key, CheckAsk::default())
            .await
            .expect("resident");
    }
    grant_holds(&registry, EXPIRING_HOLDS, 1, 60, 2).await;
    // Past these holds' expiry and the hour-long ones the round trips stored (loaded with the keys).
    clock.set(start + chrono::Duration::hours(2));
    let mut worst = Duration::ZERO;
    let mut worst_holding_key = Duration::ZERO;
    let run_for = Instant::now() + Duration::from_secs(3);
    let mut i = 0i64;
    while Instant::now() < run_for {
        let key = (i % KEYS) + 1;
        let started = Instant::now();
        let reply = registry
            .check(key, CheckAsk::default())
            .await
            .expect("answered");
        let took = started.elapsed();
        if key == 1 {
            assert_eq!(reply.tokens_reserved, 0, "expired");
            worst_holding_key = worst_holding_key.max(took);
        }
        worst = worst.max(took);
        i += 1;
    }
    println!("\n## {EXPIRING_HOLDS} holds of one key expiring at once\n");
    println!(
        "| checks timed | slowest check ms | slowest check of the holding key ms |\n|---|---|---|"
    );
    println!(
        "| {i} | {:.2} | {:.2} |",
        worst.as_secs_f64() * 1e3,
        worst_holding_key.as_secs_f64() * 1e3
    );
    registry.shutdown();
}
