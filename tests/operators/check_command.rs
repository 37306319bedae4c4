//! `quota-keeper check --key K [--tokens N]`: a check over RabbitMQ from the command line, against
//! the service built in-process; exit 0 allowed, 1 denied, 2 on error.

use serde_json::{json, Value};

use crate::child::free_port;
use crate::helpers::spawn_app_with_broker;

/// Runs the `check` command against `amqp_url`: (exit code, stdout, stderr).
async fn run_check(amqp_url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    // Asynchronously: the application under test runs on this thread's runtime.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_quota-keeper"))
        .arg("check")
        .args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("RUST_LOG")
        .env("QUOTA__AMQP__URL", amqp_url)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), output)
        .await
        .expect("the command ends within 30 s")
        .expect("the binary runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn reply_of(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| panic!("{error}: {stdout:?}"))
}

#[actix_web::test]
async fn check_prints_the_reply_and_exits_0_when_allowed_and_1_when_denied() {
    let app = spawn_app_with_broker(|_| {}).await;
    let url = app.vhost.as_ref().expect("a broker app has a vhost").url();
    app.create_key("alice", json!({"id": 42, "token_quota_monthly": 1000}))
        .await;

    let (code, stdout, stderr) = run_check(&url, &["--key", "42", "--tokens", "800"]).await;
    assert_eq!(code, Some(0), "{stdout} {stderr}");
    let reply = reply_of(&stdout);
    assert_eq!(reply["allowed"], true);
    assert_eq!(reply["status"], 200);
    assert_eq!(reply["remaining"], 1000);

    let (code, stdout, _) = run_check(&url, &["--key", "42", "--tokens", "1001"]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert_eq!(reply_of(&stdout)["status"], 429);

    app.create_key("bob", json!({"id": 43, "token_quota_monthly": 10}))
        .await;
    app.set_usage(43, 10).await;
    let (code, stdout, _) = run_check(&url, &["--key", "43"]).await;
    assert_eq!(code, Some(1), "{stdout}");
    let reply = reply_of(&stdout);
    assert_eq!(reply["allowed"], false);
    assert!(
        reply["detail"].as_str().is_some_and(
            |detail| detail.starts_with("API key monthly token quota reached (10/10).")
        ),
        "{reply}"
    );
}

#[actix_web::test]
async fn check_exits_2_when_there_is_no_answer() {
    let refused = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let (code, stdout, stderr) = run_check(&refused, &["--key", "42"]).await;
    assert_eq!(code, Some(2), "{stdout} {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("broker"), "{stderr}");

    // A vhost without the service: nobody declared `quota.check`.
    let empty = crate::common::TestVhost::create();
    let (code, _, stderr) = run_check(&empty.url(), &["--key", "42", "--timeout-ms", "2000"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("quota.check"),
        "names the missing exchange: {stderr}"
    );

    // The exchange exists but nothing consumes: no reply, the command gives up after its timeout.
    let connection = lapin::Connection::connect(&empty.url(), Default::default())
        .await
        .expect("the test vhost accepts guest");
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .exchange_declare(
            "quota.check".into(),
            lapin::ExchangeKind::Fanout,
            Default::default(),
            Default::default(),
        )
        .await
        .expect("the exchange is declared");
    let started = std::time::Instant::now();
    let (code, _, stderr) = run_check(&empty.url(), &["--key", "42", "--timeout-ms", "500"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no reply within 500 ms"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    let (code, _, stderr) = run_check(&empty.url(), &["--key", "0"]).await;
    assert_eq!(
        code,
        Some(2),
        "an invalid key is refused by the parser: {stderr}"
    );
}
