//! Test support shared by the test binaries: throwaway databases and vhosts, a broker client, polling.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

pub mod alerts;
pub mod broker;

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};

pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Which database a test runs against.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A database that exists for one test and is dropped after it, even when the test fails.
pub struct TestDatabase {
    pub url: String,
    pub name: String,
    backend: Backend,
}

impl TestDatabase {
    pub async fn create(backend: Backend) -> TestDatabase {
        let name = format!("qk_test_{}", uuid::Uuid::new_v4().simple());
        match backend {
            Backend::Postgres => {
                let admin = Database::connect(POSTGRES_ADMIN_URL)
                    .await
                    .expect("PostgreSQL must be running on 127.0.0.1:5432 (see .ci/run)");
                admin
                    .execute_raw(Statement::from_string(
                        DbBackend::Postgres,
                        format!("CREATE DATABASE {name}"),
                    ))
                    .await
                    .expect("the postgres user may create databases");
                let _ = admin.close().await;
                TestDatabase {
                    url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
                    name,
                    backend,
                }
            }
            Backend::Sqlite => TestDatabase {
                url: format!("sqlite://{}?mode=rwc", sqlite_path(&name)),
                name,
                backend,
            },
        }
    }
}

pub fn sqlite_path(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("{name}.db"))
        .display()
        .to_string()
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match self.backend {
            Backend::Sqlite => {
                let path = sqlite_path(&self.name);
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{path}{suffix}"));
                }
            }
            Backend::Postgres => {
                let name = self.name.clone();
                // Drop runs inside the test's runtime; a separate thread with its own runtime
                // can block on the async driver.
                let dropped = std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a current-thread runtime can always be built");
                    runtime.block_on(async move {
                        if let Ok(admin) = Database::connect(POSTGRES_ADMIN_URL).await {
                            let _ = admin
                                .execute_raw(Statement::from_string(
                                    DbBackend::Postgres,
                                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                                ))
                                .await;
                            let _ = admin.close().await;
                        }
                    })
                });
                let _ = dropped.join();
            }
        }
    }
}

/// A RabbitMQ vhost that exists for one test.
pub struct TestVhost {
    pub name: String,
}

pub fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (tests run as root next to the broker)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The broker plugin of the sharded layout, as tests expect it.
pub const CONSISTENT_HASH_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// `rabbitmq-plugins enable|disable PLUGIN` on the local node (node-wide). Tried three times:
/// the command fails while another plugin change (from another test process) is under way.
pub fn rabbitmq_plugins(action: &str, plugin: &str) {
    let mut last_error = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        let output = std::process::Command::new("rabbitmq-plugins")
            .args([action, "--quiet", plugin])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("rabbitmq-plugins runs (tests run as root next to the broker)");
        if output.status.success() {
            return;
        }
        last_error = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    panic!("rabbitmq-plugins {action} {plugin} failed three times: {last_error}");
}

static PLUGIN_ENABLED: std::sync::Once = std::sync::Once::new();

/// Enables the consistent-hash plugin once per test process, so the README's test command works
/// on a stock broker too (the service itself runs without it, in the single-queue layout).
pub fn ensure_consistent_hash_plugin() {
    PLUGIN_ENABLED.call_once(|| rabbitmq_plugins("enable", CONSISTENT_HASH_PLUGIN));
}

impl TestVhost {
    pub fn create() -> TestVhost {
        ensure_consistent_hash_plugin();
        let name = format!("qk_test_{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        grant_guest_everything(&name);
        TestVhost { name }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }
}

/// Lets `guest` configure, write and read everything in `vhost`.
pub fn grant_guest_everything(vhost: &str) {
    rabbitmqctl(&["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]);
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

/// Polls `probe` every 20 ms until it yields `Some`, for at most `within`.
pub async fn eventually<T, F, Fut>(within: std::time::Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Names of the queues of `vhost`.
pub fn list_queue_names(vhost: &str) -> Vec<String> {
    list_queues(vhost, &[])
        .into_iter()
        .filter_map(|row| row.into_iter().next())
        .collect()
}

/// The declaration arguments of `queue` in `vhost` as `rabbitmqctl` prints them, for example
/// `[{"x-single-active-consumer",true},{"x-max-priority",1}]`.
pub fn queue_arguments(vhost: &str, queue: &str) -> String {
    list_queues(vhost, &["arguments"])
        .into_iter()
        .find(|row| row.first().is_some_and(|name| name == queue))
        .and_then(|row| row.get(1).cloned())
        .unwrap_or_else(|| panic!("queue {queue} exists in {vhost}"))
}

/// One row per queue of `vhost`: its name, then the requested `columns`, as `rabbitmqctl` lists them.
fn list_queues(vhost: &str, columns: &[&str]) -> Vec<Vec<String>> {
    let output = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
        ])
        .args(columns)
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Consumers of each shard queue of `vhost`, by queue name.
pub fn shard_consumers(vhost: &str) -> Vec<(String, u64)> {
    list_queues(vhost, &["consumers"])
        .into_iter()
        .filter(|row| {
            row.first()
                .is_some_and(|name| name.starts_with("quota.shard."))
        })
        .filter_map(|row| Some((row.first()?.clone(), row.get(1)?.parse().ok()?)))
        .collect()
}

/// Number of client connections open on `vhost`.
pub fn vhost_connections(vhost: &str) -> usize {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "--no-table-headers", "vhost"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.trim() == vhost)
        .count()
}

/// Messages ready or unacknowledged in the shard queues of `vhost`, per `rabbitmqctl`.
pub fn queued_messages(vhost: &str) -> u64 {
    list_queues(vhost, &["messages"])
        .iter()
        .filter(|row| {
            row.first()
                .is_some_and(|name| name.starts_with("quota.shard."))
        })
        .filter_map(|row| row.get(1)?.parse::<u64>().ok())
        .sum()
}

/// (ready, unacknowledged) messages of `queue` in `vhost`, asked of the queue itself.
pub fn queue_depths(vhost: &str, queue: &str) -> (u64, u64) {
    list_queues(vhost, &["messages_ready", "messages_unacknowledged"])
        .iter()
        .find(|row| row.first().is_some_and(|name| name == queue))
        .and_then(|row| Some((row.get(1)?.parse().ok()?, row.get(2)?.parse().ok()?)))
        .unwrap_or_else(|| panic!("queue {queue} not listed in {vhost}"))
}
