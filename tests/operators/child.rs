//! `quota-keeper serve` as a child process on a fresh SQLite file, its log in a file; killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::sqlite_path;

/// The admin password of every child service.
pub const ADMIN_PASSWORD: &str = "operators-test-password";

/// A running `quota-keeper serve`.
pub struct ChildService {
    child: Child,
    pub base_url: String,
    log_path: std::path::PathBuf,
    database_name: String,
}

impl ChildService {
    /// Starts the binary with `env` on top of a fresh SQLite database, a free port and no `RUST_LOG`.
    pub fn start(env: &[(&str, &str)]) -> ChildService {
        let database_name = format!("qk_child_{}", uuid::Uuid::new_v4().simple());
        let port = free_port();
        let log_path = std::env::temp_dir().join(format!("{database_name}.log"));
        let log = std::fs::File::create(&log_path).expect("the temp dir is writable");
        let child = Command::new(env!("CARGO_BIN_EXE_quota-keeper"))
            .arg("serve")
            // An empty working directory: no config.toml is picked up by accident.
            .current_dir(std::env::temp_dir())
            .env_remove("RUST_LOG")
            .env(
                "QUOTA__DATABASE__URL",
                format!("sqlite://{}?mode=rwc", sqlite_path(&database_name)),
            )
            .env("QUOTA__HTTP__BIND", format!("127.0.0.1:{port}"))
            .env("QUOTA__HTTP__WORKERS", "1")
            .env("QUOTA__ADMIN__PASSWORD", ADMIN_PASSWORD)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the binary starts");
        ChildService {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            log_path,
            database_name,
        }
    }

    /// Waits until `/healthz` answers, for at most 30 s.
    pub async fn wait_until_serving(&self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answered = client
                .get(format!("{}/healthz", self.base_url))
                .send()
                .await
                .is_ok_and(|response| response.status() == 200);
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not serving within 30 s; log: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn get_text(&self, path: &str) -> String {
        reqwest::get(format!("{}{path}", self.base_url))
            .await
            .expect("the service answers")
            .text()
            .await
            .expect("the body is text")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log_path);
        let path = sqlite_path(&self.database_name);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
}

/// A loopback port nobody listens on (free when asked; nothing else here binds ports by number).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The `/metrics` page of a service that has served nothing yet: HTTP only, so no broker traffic.
pub async fn fresh_metrics_page() -> String {
    let service = ChildService::start(&[("QUOTA__AMQP__ENABLED", "false")]);
    service.wait_until_serving().await;
    service.get_text("/metrics").await
}

/// The metric family names declared in `src/metrics.rs` (every `const …: &str = "quota_…"`).
pub fn declared_families() -> Vec<String> {
    let source = include_str!("../../src/metrics.rs");
    let families: Vec<String> = source
        .lines()
        .filter(|line| line.trim_start().starts_with("pub const") && line.contains("&str ="))
        .filter_map(|line| line.split('"').nth(1))
        .filter(|name| name.starts_with("quota_"))
        .map(str::to_string)
        .collect();
    assert!(
        families.len() >= 10,
        "parsed too few families: {families:?}"
    );
    families
}

/// The family names a Prometheus text page exports (from its `# TYPE` lines).
pub fn exported_families(page: &str) -> Vec<String> {
    page.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}
