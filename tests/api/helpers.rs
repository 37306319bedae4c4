//! `spawn_app()`: builds the application through `Application::build` on port 0 with a fresh database.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use quota_keeper::clock::ManualClock;
use quota_keeper::readiness::{BrokerState, Readiness};
use quota_keeper::settings::Settings;
use quota_keeper::startup::Application;
use sea_orm::{DatabaseConnection, EntityTrait};

pub use crate::common::{eventually, Backend, TestDatabase, TestVhost};
use serde_json::Value;

pub const ADMIN_PASSWORD: &str = "test-admin-password";

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

/// A running application and what a test needs to talk to it.
pub struct TestApp {
    pub address: String,
    pub db: DatabaseConnection,
    pub clock: Arc<ManualClock>,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub readiness: Arc<Readiness>,
    pub scheduler: actix::Addr<quota_keeper::actors::scheduler::Scheduler>,
    pub registry: quota_keeper::actors::registry::KeyRegistry,
    pub vhost: Option<TestVhost>,
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
    // Tests that need the broker turn it on with their own vhost (`spawn_app_with_broker`).
    settings.amqp.enabled = false;
    settings.amqp.shards = 4;
    // Two broker connections whatever the machine, so the tests cross lanes.
    settings.actors.arbiters = 2;
    settings.amqp.prefetch = 2_000;
    settings.amqp.reconnect_max_backoff_ms = 1_000;
    settings.ingest.flush_interval_ms = 50;
    settings
}

/// Sends `request` and returns its JSON body, whatever the status.
pub async fn json_body(request: reqwest::RequestBuilder) -> Value {
    request
        .send()
        .await
        .expect("the app answers")
        .json()
        .await
        .expect("the body is JSON")
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
    let readiness = app.readiness();
    let scheduler = app.scheduler();
    let registry = app.registry().clone();
    actix_web::rt::spawn(app.run_until(std::future::pending()));
    TestApp {
        address,
        db,
        clock,
        client: reqwest::Client::new(),
        settings,
        readiness,
        scheduler,
        registry,
        vhost: None,
        _database: database,
    }
}

/// Spawns the application with the broker on a vhost of its own, and waits until it consumes.
pub async fn spawn_app_with_broker(customize: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on_vhost(TestVhost::create(), customize).await
}

/// Spawns the application with the broker on `vhost` (which the test may have prepared), and
/// waits until it consumes.
pub async fn spawn_app_on_vhost(
    vhost: TestVhost,
    customize: impl FnOnce(&mut Settings),
) -> TestApp {
    let url = vhost.url();
    let mut app = spawn_app_on(Backend::Postgres, |settings| {
        settings.amqp.enabled = true;
        settings.amqp.url = url;
        customize(settings);
    })
    .await;
    app.vhost = Some(vhost);
    app.wait_until_consuming().await;
    app
}

impl TestApp {
    pub async fn wait_until_consuming(&self) {
        let readiness = self.readiness.clone();
        eventually(
            std::time::Duration::from_secs(20),
            "the broker to be consumed",
            || {
                let state = readiness.broker();
                async move { (state == BrokerState::Consuming).then_some(()) }
            },
        )
        .await;
    }

    /// Sets a key's committed counter straight in the database (before its actor loads it).
    pub async fn set_usage(&self, id: i64, used: i64) {
        sea_orm::ConnectionTrait::execute_unprepared(
            &self.db,
            &format!("UPDATE api_keys SET tokens_used_this_month = {used} WHERE id = {id}"),
        )
        .await
        .expect("the database answers");
    }

    /// The committed counter of a key, read from the database.
    pub async fn stored_usage(&self, id: i64) -> i64 {
        entity::api_keys::Entity::find_by_id(id)
            .one(&self.db)
            .await
            .expect("the database answers")
            .expect("the key exists")
            .tokens_used_this_month
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// An admin request with the right credentials.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .basic_auth("admin", Some(ADMIN_PASSWORD))
    }

    /// An admin GET of `path`, its JSON body.
    pub async fn admin_get_json(&self, path: &str) -> Value {
        json_body(self.admin(reqwest::Method::GET, path)).await
    }

    /// The `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("the app answers")
            .text()
            .await
            .expect("metrics are text")
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
