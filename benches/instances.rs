//! Several instances (release binaries as child processes on one vhost and database): an HTTP
//! check on the key's owner and on a non-owner (forwarded through the broker) against an AMQP
//! check in the same run, and the takeover after SIGKILL of an owner, repeated.
//!
//! Run: `cargo bench --bench instances` (PostgreSQL and RabbitMQ as in the README).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::BrokerClient;
use support::{bench_environment, insert_keys, RpcStats};

const KEYS: i64 = 64;
const SHARDS: &str = "16";
const PASSWORD: &str = "bench";
/// Latency rounds, each interleaving owner, forwarded and AMQP checks in slices.
const ROUNDS: usize = 3;
const SLICES: usize = 5;
const CHECKS_PER_SLICE: usize = 200;
const KILLS: usize = 20;

fn main() {
    actix_web::rt::System::new().block_on(run());
}

/// One `quota-keeper serve` child process.
struct Instance {
    child: Child,
    base: String,
}

impl Instance {
    fn start(database_url: &str, amqp_url: &str) -> Instance {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_quota-keeper"))
            .arg("serve")
            .current_dir(std::env::temp_dir())
            .env("QUOTA__DATABASE__URL", database_url)
            .env("QUOTA__AMQP__URL", amqp_url)
            .env("QUOTA__AMQP__SHARDS", SHARDS)
            .env("QUOTA__HTTP__BIND", format!("127.0.0.1:{port}"))
            .env("QUOTA__ADMIN__PASSWORD", PASSWORD)
            .env("QUOTA__LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts");
        Instance {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn owned_shards(&self, http: &reqwest::Client) -> Option<usize> {
        let body: serde_json::Value = http
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (body["status"] == "ready").then(|| body["owned_shards"].as_array().map_or(0, Vec::len))
    }

    async fn http_check(&self, http: &reqwest::Client, key: i64) -> Duration {
        let started = Instant::now();
        let response = http
            .post(format!("{}/keys/{key}/check", self.base))
            .basic_auth("admin", Some(PASSWORD))
            .send()
            .await
            .expect("the instance answers");
        assert_eq!(response.status(), 200, "key {key}");
        let _ = response.bytes().await;
        started.elapsed()
    }

    /// Checks this instance forwarded so far (answered by another instance).
    async fn forwarded(&self, http: &reqwest::Client) -> f64 {
        let text = http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|line| {
                line.starts_with("quota_forwarded_requests_total")
                    && line.contains("kind=\"check\"")
                    && line.contains("outcome=\"answered\"")
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until both instances are ready and own 8 shards each.
async fn wait_balanced(http: &reqwest::Client, a: &Instance, b: &Instance) {
    common::eventually(Duration::from_secs(30), "8/8 shards", || async {
        (a.owned_shards(http).await == Some(8) && b.owned_shards(http).await == Some(8))
            .then_some(())
    })
    .await;
}

/// The keys `owner` answers itself: an HTTP check there that it did not forward. Each key is
/// first checked over the broker, so its owner holds its actor.
async fn keys_owned_by(
    http: &reqwest::Client,
    client: &mut BrokerClient,
    owner: &Instance,
) -> Vec<i64> {
    let mut owned = Vec::new();
    for key in 1..=KEYS {
        client.check(key, None).await;
        let before = owner.forwarded(http).await;
        owner.http_check(http, key).await;
        if owner.forwarded(http).await == before {
            owned.push(key);
        }
    }
    owned
}

/// One row of the latency table.
fn print_row(label: &str, amqp: &RpcStats, owner: &RpcStats, forwarded: &RpcStats) {
    println!(
        "| {label} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.0} | {:.0} | {:.0} |",
        amqp.p50_us,
        owner.p50_us,
        forwarded.p50_us,
        forwarded.p50_us / amqp.p50_us,
        forwarded.p50_us / owner.p50_us,
        amqp.p99_us,
        owner.p99_us,
        forwarded.p99_us
    );
}

async fn run() {
    let (database, vhost, _) = bench_environment().await;
    let db = sea_orm::Database::connect(&database.url)
        .await
        .expect("PostgreSQL is up");
    // Migrations come with the first instance; keys are inserted once it is ready.
    let mut a = Instance::start(&database.url, &vhost.url());
    let http = reqwest::Client::new();
    common::eventually(Duration::from_secs(30), "the first instance", || async {
        a.owned_shards(&http).await.map(|_| ())
    })
    .await;
    insert_keys(&db, KEYS).await;
    let mut b = Instance::start(&database.url, &vhost.url());
    wait_balanced(&http, &a, &b).await;

    let mut client = BrokerClient::connect(&vhost.url()).await;
    let owned_by_a = keys_owned_by(&http, &mut client, &a).await;
    println!(
        "{} of {KEYS} keys owned by the first instance",
        owned_by_a.len()
    );
    println!("| round | AMQP p50 µs | owner HTTP p50 µs | forwarded HTTP p50 µs | forwarded vs AMQP p50 | forwarded vs owner p50 | AMQP p99 µs | owner p99 µs | forwarded p99 µs |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut all = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (mut amqp, mut owner, mut forwarded) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..SLICES {
            let slice = |samples: Vec<Duration>| {
                let total = samples.iter().sum();
                RpcStats::from_samples(samples, total)
            };
            let mut amqp_samples = Vec::new();
            for i in 0..CHECKS_PER_SLICE {
                let key = owned_by_a[i % owned_by_a.len()];
                let started = Instant::now();
                client.check(key, None).await;
                amqp_samples.push(started.elapsed());
            }
            amqp.push(slice(amqp_samples));
            let mut owner_samples = Vec::new();
            for i in 0..CHECKS_PER_SLICE {
                owner_samples.push(a.http_check(&http, owned_by_a[i % owned_by_a.len()]).await);
            }
            owner.push(slice(owner_samples));
            let mut forwarded_samples = Vec::new();
            for i in 0..CHECKS_PER_SLICE {
                forwarded_samples.push(b.http_check(&http, owned_by_a[i % owned_by_a.len()]).await);
            }
            forwarded.push(slice(forwarded_samples));
        }
        let (amqp, owner, forwarded) = (
            RpcStats::pooled(&amqp),
            RpcStats::pooled(&owner),
            RpcStats::pooled(&forwarded),
        );
        print_row(&round.to_string(), &amqp, &owner, &forwarded);
        all.0.push(amqp);
        all.1.push(owner);
        all.2.push(forwarded);
    }
    let (amqp, owner, forwarded) = (
        RpcStats::pooled(&all.0),
        RpcStats::pooled(&all.1),
        RpcStats::pooled(&all.2),
    );
    print_row("all", &amqp, &owner, &forwarded);

    // Takeover: kill the owner of a key, measure until a check of that key is answered again;
    // a checker meanwhile records the longest wait of any check. Then restart and rebalance.
    let mut takeovers = Vec::new();
    let mut longest_waits = Vec::new();
    for kill in 0..KILLS {
        let victim = if kill % 2 == 0 { &mut a } else { &mut b };
        let Some(&key) = keys_owned_by(&http, &mut client, victim).await.first() else {
            panic!("the victim owns no key of 1..={KEYS}");
        };
        victim.kill();
        let killed = Instant::now();
        let mut longest = Duration::ZERO;
        let taken_over = loop {
            let started = Instant::now();
            let answered = client
                .try_check(key, Duration::from_secs(2))
                .await
                .is_some();
            longest = longest.max(started.elapsed());
            if answered {
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "no takeover within 10 s"
            );
        };
        takeovers.push(taken_over);
        longest_waits.push(longest);
        *victim = Instance::start(&database.url, &vhost.url());
        wait_balanced(&http, &a, &b).await;
    }
    takeovers.sort();
    longest_waits.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "takeover after SIGKILL over {KILLS} kills: median {:.1} ms, max {:.1} ms; longest wait of a check across a takeover: median {:.1} ms, max {:.1} ms",
        ms(takeovers[KILLS / 2]),
        ms(takeovers[KILLS - 1]),
        ms(longest_waits[KILLS / 2]),
        ms(longest_waits[KILLS - 1])
    );
    drop(a);
    drop(b);
    let _ = db.close().await;
}
