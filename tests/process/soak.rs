//! Soak: a steady load of events and checks for ten minutes (loopback, stops by itself); memory must
//! stay flat and the totals exact. Ignored by default: `cargo test --test process -- --ignored soak`.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{assert_totals_become, Scenario, SERIAL};

const KEYS: [i64; 50] = {
    let mut keys = [0i64; 50];
    let mut i = 0;
    while i < 50 {
        keys[i] = i as i64 + 1;
        i += 1;
    }
    keys
};
const EVENTS_PER_SECOND: u64 = 200;
const CHECKS_PER_SECOND: u64 = 100;
/// Growth of the resident set allowed between the first and the last minute.
const MAX_RSS_GROWTH_BYTES: u64 = 32 * 1024 * 1024;

fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

#[tokio::test]
#[ignore = "runs for ten minutes (SOAK_SECS to change it); see the README"]
async fn soak_keeps_memory_flat_and_totals_exact() {
    let _serial = SERIAL.lock().await;
    let soak = Duration::from_secs(
        std::env::var("SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600),
    );
    let scenario = Scenario::new(&[]).await;
    let service = scenario.start_with_keys(&KEYS, Some(i64::MAX / 2)).await;
    let pid = service.pid();
    let mut client = scenario.broker().await;
    let mut expected: std::collections::BTreeMap<i64, i64> = KEYS.iter().map(|&k| (k, 0)).collect();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / EVENTS_PER_SECOND));
    let mut sent: u64 = 0;
    let mut first_rss = None;
    let mut samples = Vec::new();
    while started.elapsed() < soak {
        tick.tick().await;
        let key = KEYS[(sent % KEYS.len() as u64) as usize];
        client
            .publish_usage(
                key,
                &json!({"event_id": format!("soak-{sent}"), "api_key_id": key, "tokens": 7}),
            )
            .await;
        *expected.get_mut(&key).expect("known key") += 7;
        if sent.is_multiple_of(EVENTS_PER_SECOND / CHECKS_PER_SECOND) {
            let reply = client.check(key, None).await;
            assert_eq!(reply["status"], 200);
        }
        sent += 1;
        if sent.is_multiple_of(EVENTS_PER_SECOND * 60) {
            let rss = resident_bytes(pid);
            samples.push(rss);
            first_rss.get_or_insert(rss);
        }
    }
    let last_rss = resident_bytes(pid);
    let first_rss = first_rss.unwrap_or(last_rss);
    println!(
        "soak: {sent} events, RSS after the first minute {:.1} MiB, at the end {:.1} MiB, per minute {:?} MiB",
        first_rss as f64 / 1048576.0,
        last_rss as f64 / 1048576.0,
        samples.iter().map(|b| b / 1048576).collect::<Vec<_>>()
    );
    assert!(
        last_rss <= first_rss + MAX_RSS_GROWTH_BYTES,
        "RSS grew from {first_rss} to {last_rss} bytes"
    );
    assert_totals_become(&scenario, &expected).await;
}
