//! Start-up failures: every configuration or environment problem ends the process with one clear
//! line and a non-zero exit, never a panic. These start only the binary; no shared service stops.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Exit code for an invalid setting (`src/main.rs`).
const EXIT_BAD_CONFIGURATION: i32 = 2;

/// Runs `quota-keeper serve` with `env` until it exits (at most 30 s): (exit code, stderr).
fn run_until_exit(env: &[(&str, String)]) -> (i32, String) {
    let stderr_path = std::env::temp_dir().join(format!("qk-startup-{}.log", uuid::Uuid::new_v4()));
    let stderr = std::fs::File::create(&stderr_path).expect("the temp dir is writable");
    let mut child = Command::new(env!("CARGO_BIN_EXE_quota-keeper"))
        .arg("serve")
        .current_dir(std::env::temp_dir())
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("the binary starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the service did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    (
        status.code().expect("exited, not killed by a signal"),
        output,
    )
}

fn sqlite_url() -> String {
    format!(
        "sqlite://{}?mode=rwc",
        std::env::temp_dir()
            .join(format!("qk-startup-{}.db", uuid::Uuid::new_v4()))
            .display()
    )
}

fn assert_clear_failure(code: i32, stderr: &str, mentions: &str) {
    assert_ne!(code, 0, "{stderr}");
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    assert!(
        !stderr.contains("stack backtrace"),
        "no backtrace: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("quota-keeper: ") && last.contains(mentions),
        "the last line says what failed ({mentions}): {stderr}"
    );
}

#[test]
fn a_port_in_use_stops_the_start_without_a_panic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let bind = taken.local_addr().expect("bound").to_string();
    let (code, stderr) = run_until_exit(&[
        ("QUOTA__HTTP__BIND", bind),
        ("QUOTA__DATABASE__URL", sqlite_url()),
        ("QUOTA__AMQP__ENABLED", "false".into()),
        ("RUST_BACKTRACE", "1".into()),
    ]);
    assert_clear_failure(code, &stderr, "Address already in use");
}

#[test]
fn an_unreachable_database_stops_the_start_without_a_panic() {
    let (code, stderr) = run_until_exit(&[
        ("QUOTA__HTTP__BIND", "127.0.0.1:0".into()),
        // Port 1: nothing listens there.
        (
            "QUOTA__DATABASE__URL",
            "postgres://postgres@127.0.0.1:1/quota".into(),
        ),
        ("QUOTA__AMQP__ENABLED", "false".into()),
        ("RUST_BACKTRACE", "1".into()),
    ]);
    assert_clear_failure(code, &stderr, "database");
}

#[test]
fn a_malformed_broker_url_is_refused_at_start_with_exit_code_2() {
    let (code, stderr) = run_until_exit(&[
        ("QUOTA__HTTP__BIND", "127.0.0.1:0".into()),
        ("QUOTA__DATABASE__URL", sqlite_url()),
        ("QUOTA__AMQP__URL", "amqp://:::".into()),
    ]);
    assert_eq!(code, EXIT_BAD_CONFIGURATION, "{stderr}");
    assert_clear_failure(code, &stderr, "amqp.url");
}
