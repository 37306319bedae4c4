//! Runs `quota-keeper serve` as a child process with its own database and vhost, and drives it.

use std::collections::BTreeMap;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::broker::BrokerClient;
use crate::common::{eventually, Backend, TestDatabase, TestVhost};

pub const ADMIN_PASSWORD: &str = "process-test-password";

/// One test at a time: these tests stop the broker or the database.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A database, a vhost and the settings to run the service against them.
pub struct Scenario {
    pub database: TestDatabase,
    pub vhost: TestVhost,
    pub port: u16,
    pub env: Vec<(String, String)>,
}

impl Scenario {
    pub async fn new(extra: &[(&str, &str)]) -> Scenario {
        let database = TestDatabase::create(Backend::Postgres).await;
        let vhost = TestVhost::create();
        let port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("QUOTA__DATABASE__URL".into(), database.url.clone()),
            ("QUOTA__AMQP__URL".into(), vhost.url()),
            ("QUOTA__AMQP__SHARDS".into(), "4".into()),
            // Two broker connections whatever the machine, so the tests cross lanes.
            ("QUOTA__ACTORS__ARBITERS".into(), "2".into()),
            ("QUOTA__AMQP__PREFETCH".into(), "2000".into()),
            (
                "QUOTA__AMQP__RECONNECT_MAX_BACKOFF_MS".into(),
                "1000".into(),
            ),
            ("QUOTA__HTTP__BIND".into(), format!("127.0.0.1:{port}")),
            ("QUOTA__ADMIN__PASSWORD".into(), ADMIN_PASSWORD.into()),
            ("QUOTA__INGEST__BATCH_SIZE".into(), "100".into()),
            ("QUOTA__INGEST__FLUSH_INTERVAL_MS".into(), "20".into()),
        ];
        for (key, value) in extra {
            env.retain(|(existing, _)| existing != key);
            env.push((key.to_string(), value.to_string()));
        }
        Scenario {
            database,
            vhost,
            port,
            env,
        }
    }

    pub fn start(&self) -> Service {
        self.start_on(self.port, "")
    }

    /// Starts one more instance on the same database and vhost, on an HTTP port of its own.
    pub fn start_instance(&self, name: &str) -> Service {
        self.start_on(free_port(), name)
    }

    fn start_on(&self, port: u16, name: &str) -> Service {
        let log_path = std::env::temp_dir().join(format!("{}{name}.log", self.vhost.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("the temp dir is writable");
        let child = Command::new(env!("CARGO_BIN_EXE_quota-keeper"))
            .arg("serve")
            .current_dir(std::env::temp_dir())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("QUOTA__HTTP__BIND", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the binary starts");
        Service {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            log_path,
            http: reqwest::Client::new(),
        }
    }

    /// Starts the service, waits until it is ready and creates `keys` with `quota`.
    pub async fn start_with_keys(&self, keys: &[i64], quota: Option<i64>) -> Service {
        let service = self.start();
        service.wait_ready().await;
        for &key in keys {
            service.create_key(key, quota).await;
        }
        service
    }

    /// Publishes `count` events on a task of its own; it returns what each key should total.
    pub fn spawn_publisher(
        &self,
        prefix: String,
        keys: &'static [i64],
        count: usize,
    ) -> tokio::task::JoinHandle<BTreeMap<i64, i64>> {
        let url = self.vhost.url();
        tokio::spawn(async move {
            let client = BrokerClient::connect(&url).await;
            publish_events(&client, &prefix, keys, count).await
        })
    }

    pub async fn broker(&self) -> BrokerClient {
        BrokerClient::connect(&self.vhost.url()).await
    }

    /// The committed counters of the given keys.
    pub async fn stored_totals(&self, keys: &[i64]) -> BTreeMap<i64, i64> {
        let db = sea_orm::Database::connect(&self.database.url)
            .await
            .expect("PostgreSQL is up");
        let mut totals = BTreeMap::new();
        for &key in keys {
            let row = <entity::api_keys::Entity as sea_orm::EntityTrait>::find_by_id(key)
                .one(&db)
                .await
                .expect("the database answers")
                .expect("the key exists");
            totals.insert(key, row.tokens_used_this_month);
        }
        let _ = db.close().await;
        totals
    }

    /// Messages ready or unacknowledged in the shard queues.
    pub fn queued_messages(&self) -> u64 {
        crate::common::queued_messages(&self.vhost.name)
    }

    /// Waits until some of `keys`' events are committed: the stream a publisher started is
    /// flowing through the service, so what a test does next meets it mid-way.
    pub async fn wait_for_events_flowing(&self, keys: &[i64]) {
        eventually(
            Duration::from_secs(20),
            "the first events committed",
            || async {
                let stored = self.stored_totals(keys).await;
                stored.values().any(|&total| total > 0).then_some(())
            },
        )
        .await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A running `quota-keeper serve`; killed when dropped.
pub struct Service {
    child: Option<Child>,
    pub base: String,
    log_path: std::path::PathBuf,
    pub http: reqwest::Client,
}

impl Service {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let http = self.http.clone();
        let url = self.url("/readyz");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = http.get(&url).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "not ready within 30 s; log: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn readyz(&self) -> (u16, Value) {
        let response = self
            .http
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("the service answers HTTP");
        let status = response.status().as_u16();
        (status, response.json().await.expect("readyz is JSON"))
    }

    pub async fn create_key(&self, id: i64, quota: Option<i64>) {
        let response = self
            .http
            .post(self.url("/users/process/apikeys"))
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .json(&json!({"id": id, "token_quota_monthly": quota}))
            .send()
            .await
            .expect("the service answers HTTP");
        assert_eq!(response.status(), 201);
    }

    pub async fn http_check(&self, id: i64) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(&format!("/keys/{id}/check")))
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .send()
            .await
            .expect("the service answers HTTP");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.expect("check replies are JSON"),
        )
    }

    /// The shards this instance owns, per `/readyz`.
    pub async fn owned_shards(&self) -> Vec<u16> {
        let (_, body) = self.readyz().await;
        body["owned_shards"]
            .as_array()
            .map(|shards| {
                shards
                    .iter()
                    .filter_map(|shard| shard.as_u64().and_then(|s| u16::try_from(s).ok()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status();
        assert!(
            sent.is_ok_and(|status| status.success()),
            "kill -{signal} works"
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the service is running").id()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the status and how long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("the service is running");
        let started = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        assert!(
            sent.is_ok_and(|status| status.success()),
            "kill -TERM works"
        );
        loop {
            if let Some(status) = child.try_wait().expect("waiting on the child works") {
                return (status, started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("no exit within 20 s of SIGTERM; log: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Publishes `count` events over `keys` with confirms; returns what each key should total.
pub async fn publish_events(
    client: &BrokerClient,
    prefix: &str,
    keys: &[i64],
    count: usize,
) -> BTreeMap<i64, i64> {
    let mut expected: BTreeMap<i64, i64> = keys.iter().map(|&key| (key, 0)).collect();
    // A Send generator: publishers run as spawned tasks.
    let mut rng = rand::rngs::StdRng::from_os_rng();
    for i in 0..count {
        let key = keys[rng.random_range(0..keys.len())];
        let tokens: i64 = rng.random_range(1..=100);
        client
            .publish_usage(
                key,
                &json!({"event_id": format!("{prefix}-{i}"), "api_key_id": key, "tokens": tokens}),
            )
            .await;
        *expected.get_mut(&key).expect("keys are known") += tokens;
    }
    expected
}

/// Adds `more` into `total`, key by key.
pub fn add_totals(total: &mut BTreeMap<i64, i64>, more: &BTreeMap<i64, i64>) {
    for (key, tokens) in more {
        *total.entry(*key).or_default() += tokens;
    }
}

/// How long `assert_totals_become` watches the totals stay put: several flush intervals.
const NOTHING_MORE_ARRIVES_WITHIN: Duration = Duration::from_millis(500);

/// Waits until every published event is committed and acknowledged, then checks the totals stay exact.
pub async fn assert_totals_become(scenario: &Scenario, expected: &BTreeMap<i64, i64>) {
    let keys: Vec<i64> = expected.keys().copied().collect();
    eventually(
        Duration::from_secs(60),
        "the committed totals to match what was published",
        || async {
            let stored = scenario.stored_totals(&keys).await;
            (stored == *expected && scenario.queued_messages() == 0).then_some(())
        },
    )
    .await;
    // Nothing is queued, so nothing more should commit; only waiting can show that nothing does
    // (a second commit of an event would be a bug with no signal of its own).
    tokio::time::sleep(NOTHING_MORE_ARRIVES_WITHIN).await;
    assert_eq!(
        scenario.stored_totals(&keys).await,
        *expected,
        "and nothing more arrives"
    );
}
