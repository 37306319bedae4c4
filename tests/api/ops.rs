//! Ops routes (health, readiness, metrics), unknown routes, and the binary's settings handling.

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use serde_json::Value;

use crate::helpers::spawn_app;

#[actix_web::test]
async fn healthz_answers_ok() {
    let app = spawn_app().await;
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        serde_json::json!({"status": "ok"})
    );
}

#[actix_web::test]
async fn readyz_names_the_database_when_it_is_gone() {
    let app = spawn_app().await;
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["database"], "ok");

    let database_name = app
        .settings
        .database
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let admin = Database::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    admin
        .execute_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("DROP DATABASE {database_name} WITH (FORCE)"),
        ))
        .await
        .unwrap();
    let not_ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(not_ready.status(), 503);
    let body: Value = not_ready.json().await.unwrap();
    assert_eq!(body["failing"], serde_json::json!(["database"]));
    assert_ne!(body["database"], "ok");
}

#[actix_web::test]
async fn metrics_are_prometheus_text() {
    let app = spawn_app().await;
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
}

#[actix_web::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = spawn_app().await;
    let missing = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.json::<Value>().await.unwrap()["detail"].is_string());
    let wrong_method = app.client.put(app.url("/healthz")).send().await.unwrap();
    assert!(wrong_method.status().is_client_error());
    assert!(wrong_method.json::<Value>().await.unwrap()["detail"].is_string());
}

fn run_binary(envs: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_quota-keeper"));
    command.args(args).env_remove("RUST_LOG");
    for (key, value) in envs {
        command.env(key, value);
    }
    // An empty working directory: no config.toml is picked up by accident.
    command.current_dir(std::env::temp_dir());
    command.output().expect("the binary runs")
}

#[test]
fn an_invalid_setting_exits_2_naming_the_key() {
    for (key, value, named) in [
        (
            "QUOTA__SCHEDULER__INTERVAL_MS",
            "soon",
            "scheduler.interval_ms",
        ),
        (
            "QUOTA__SCHEDULER__INTERVAL_MS",
            "0",
            "scheduler.interval_ms",
        ),
        ("QUOTA__CHECK__UNKNOWN_KEY", "maybe", "check.unknown_key"),
        ("QUOTA__HTTP__BIND", "everywhere", "http.bind"),
        ("QUOTA__DATABASE__URL", "mysql://x", "database.url"),
    ] {
        let output = run_binary(&[(key, value)], &["migrate"]);
        assert_eq!(output.status.code(), Some(2), "{key}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(named), "{stderr} should name {named}");
    }
}

#[test]
fn a_missing_config_file_given_on_the_command_line_exits_2() {
    let output = run_binary(&[], &["--config", "/nonexistent/quota.toml", "migrate"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn migrate_applies_the_schema_to_a_fresh_sqlite_file() {
    let path =
        std::env::temp_dir().join(format!("qk_migrate_{}.db", uuid::Uuid::new_v4().simple()));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let output = run_binary(&[("QUOTA__DATABASE__URL", &url)], &["migrate"]);
    let _ = std::fs::remove_file(&path);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
