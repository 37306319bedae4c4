//! `spawn_app()`: builds the application through `Application::build` on port 0 with a fresh database.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use quota_keeper::clock::ManualClock;
use quota_keeper::settings::Settings;
use quota_keeper::startup::Application;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use serde_json::Value;

pub const ADMIN_PASSWORD: &str = "test-admin-password";
const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The instant every test clock starts at.
pub fn test_now() -> DateTime<Utc> {
    at("2026-11-23T10:00:00Z")
}

pub fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .expect("tests pass valid RFC 3339 literals")
        .with_timezone(&Utc)
}

fn init_test_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var("TEST_LOG").is_ok() {
            quota_keeper::telemetry::init(&Default::default());
        }
    });
}

/// Which database a test runs against.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A database that exists for one test and is dropped after it, even when the test fails.
pub struct TestDatabase {
    pub url: String,
    name: String,
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
                    .execute_raw(Statement::from_string(DbBackend::Postgres, format!("CREATE DATABASE {name}")))
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

fn sqlite_path(name: &str) -> String {
    std::env::temp_dir().join(format!("{name}.db")).display().to_string()
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

/// A running application and what a test needs to talk to it.
pub struct TestApp {
    pub address: String,
    pub db: DatabaseConnection,
    pub clock: Arc<ManualClock>,
    pub client: reqwest::Client,
    pub settings: Settings,
    _database: TestDatabase,
}

/// Settings for a test: port 0, the admin password, the given database.
pub fn test_settings(database_url: &str) -> Settings {
    let mut settings = Settings::default();
    settings.database.url = database_url.to_string();
    settings.database.max_connections = 5;
    settings.http.bind = "127.0.0.1:0".into();
    settings.http.workers = 1;
    settings.admin.password = Some(ADMIN_PASSWORD.into());
    settings
}

pub async fn spawn_app() -> TestApp {
    spawn_app_on(Backend::Postgres, |_| {}).await
}

/// Spawns the application on `backend`, after `customize` has adjusted the settings.
pub async fn spawn_app_on(backend: Backend, customize: impl FnOnce(&mut Settings)) -> TestApp {
    init_test_logging();
    let database = TestDatabase::create(backend).await;
    let mut settings = test_settings(&database.url);
    customize(&mut settings);
    let clock = ManualClock::new(test_now());
    let app = Application::build(settings.clone(), clock.clone())
        .await
        .expect("the application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let db = app.db().clone();
    actix_web::rt::spawn(app.run_until(std::future::pending()));
    TestApp {
        address,
        db,
        clock,
        client: reqwest::Client::new(),
        settings,
        _database: database,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// An admin request with the right credentials.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .basic_auth("admin", Some(ADMIN_PASSWORD))
    }

    /// Creates a key for `username` with the JSON `body` and returns the created key.
    pub async fn create_key(&self, username: &str, body: Value) -> Value {
        let response = self
            .admin(reqwest::Method::POST, &format!("/users/{username}/apikeys"))
            .json(&body)
            .send()
            .await
            .expect("the app answers");
        assert_eq!(response.status(), 201, "creating a key");
        response.json().await.expect("a created key is JSON")
    }
}
