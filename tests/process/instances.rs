//! Several instances on one vhost and one database behave as one service (SPEC §5): same answers,
//! read-your-writes, balance, failover on SIGKILL and SIGSTOP, rolling restarts.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::broker::BrokerClient;
use crate::common::eventually;
use crate::harness::{
    add_totals, assert_totals_become, publish_events, Scenario, Service, ADMIN_PASSWORD, SERIAL,
};

const KEYS: [i64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

/// Waits until the instances own disjoint shards covering all `shards`, with the counts in
/// `expected` (sorted), within `within`; returns how long it took.
async fn wait_for_balance(
    instances: &[&Service],
    shards: u16,
    expected: &[usize],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    eventually(within, "the shards to be balanced", || async {
        let mut owned = Vec::new();
        for instance in instances {
            owned.push(instance.owned_shards().await);
        }
        let mut counts: Vec<usize> = owned.iter().map(Vec::len).collect();
        counts.sort_unstable();
        let union: BTreeSet<u16> = owned.iter().flatten().copied().collect();
        let disjoint = owned.iter().map(Vec::len).sum::<usize>() == union.len();
        (counts == expected && disjoint && union.len() == usize::from(shards)).then_some(())
    })
    .await;
    started.elapsed()
}

async fn patch(service: &Service, id: i64, body: Value) -> Value {
    let response = service
        .http
        .patch(service.url(&format!("/users/process/apikeys/{id}")))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .json(&body)
        .send()
        .await
        .expect("the service answers HTTP");
    assert_eq!(response.status(), 200);
    response.json().await.expect("a key is JSON")
}

async fn delete(service: &Service, id: i64) {
    let response = service
        .http
        .delete(service.url(&format!("/users/process/apikeys/{id}")))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .send()
        .await
        .expect("the service answers HTTP");
    assert_eq!(response.status(), 200);
}

async fn usage(service: &Service, id: i64) -> (u16, Value) {
    let response = service
        .http
        .get(service.url(&format!("/keys/{id}/usage")))
        .basic_auth("admin", Some(ADMIN_PASSWORD))
        .send()
        .await
        .expect("the service answers HTTP");
    let status = response.status().as_u16();
    (status, response.json().await.expect("usage is JSON"))
}

#[tokio::test]
async fn two_instances_give_the_same_answers_and_see_every_change_at_once() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[]).await;
    let a = scenario.start_with_keys(&KEYS, Some(1000)).await;
    let b = scenario.start_instance("-b");
    b.wait_ready().await;
    wait_for_balance(&[&a, &b], 4, &[2, 2], Duration::from_secs(10)).await;
    let mut client = scenario.broker().await;
    for &key in &KEYS {
        client
            .publish_usage(
                key,
                &json!({"event_id": format!("use-{key}"), "api_key_id": key, "tokens": 600}),
            )
            .await;
    }
    for &key in &KEYS {
        // Consumed by the owner: every instance answers with it, over HTTP and AMQP.
        eventually(
            Duration::from_secs(10),
            "the usage to be consumed",
            || async { (a.http_check(key).await.1["tokens_used_this_month"] == 600).then_some(()) },
        )
        .await;
        assert_eq!(b.http_check(key).await.1["tokens_used_this_month"], 600);
        assert_eq!(usage(&b, key).await.1["current"]["tokens"], 600);
        assert_eq!(client.check(key, None).await["tokens_used_this_month"], 600);
    }
    // Every change is seen by the very next check, whichever instance made it or answers it.
    for &key in &KEYS {
        patch(&b, key, json!({"token_quota_monthly": 500})).await;
        let amqp = client.check(key, None).await;
        assert_eq!(amqp["token_quota_monthly"], 500, "key {key}: {amqp}");
        assert_eq!(amqp["allowed"], false);
        assert_eq!(a.http_check(key).await.0, 429);
        assert_eq!(b.http_check(key).await.0, 429);

        patch(&a, key, json!({"reset_usage": true})).await;
        assert_eq!(b.http_check(key).await.1["tokens_used_this_month"], 0);
        assert_eq!(client.check(key, None).await["allowed"], true);

        delete(&b, key).await;
        let amqp = client.check(key, None).await;
        assert_eq!(amqp["known"], false, "key {key} deleted: {amqp}");
        assert_eq!(a.http_check(key).await.1["known"], false);
        assert_eq!(b.http_check(key).await.1["known"], false);
        assert_eq!(usage(&a, key).await.0, 404);
    }
    // A key created through one instance is known on the other at once.
    b.create_key(100, Some(7)).await;
    assert_eq!(a.http_check(100).await.1["token_quota_monthly"], 7);
    assert_eq!(client.check(100, None).await["known"], true);
}

#[tokio::test]
async fn three_instances_share_sixteen_shards_and_two_take_them_all_when_one_leaves() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[("QUOTA__AMQP__SHARDS", "16")]).await;
    let a = scenario.start_with_keys(&KEYS, None).await;
    let b = scenario.start_instance("-b");
    let mut c = scenario.start_instance("-c");
    b.wait_ready().await;
    c.wait_ready().await;
    let joined = wait_for_balance(&[&a, &b, &c], 16, &[5, 5, 6], Duration::from_secs(10)).await;
    let (status, _) = c.terminate();
    assert!(status.success(), "log: {}", c.log());
    let left = wait_for_balance(&[&a, &b], 16, &[8, 8], Duration::from_secs(10)).await;
    println!("balanced {joined:?} after the joins, {left:?} after the leave");
    // Every key is still answered, and the metric agrees with /readyz.
    for &key in &KEYS {
        assert_eq!(b.http_check(key).await.0, 200);
    }
    let metrics = a
        .http
        .get(a.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("quota_owned_shards 8"), "{metrics}");
}

/// Polls AMQP checks of `key` until one is answered; returns how long that took.
async fn time_until_answered(client: &mut BrokerClient, key: i64, within: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < within {
        if client
            .try_check(key, Duration::from_millis(100))
            .await
            .is_some()
        {
            return started.elapsed();
        }
    }
    panic!("key {key} not answered within {within:?}");
}

#[tokio::test]
async fn an_owner_killed_or_hung_while_events_flow_is_replaced_and_nothing_is_lost() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[("QUOTA__AMQP__HEARTBEAT_SECS", "1")]).await;
    let mut a = scenario.start_with_keys(&KEYS, None).await;
    let mut b = scenario.start_instance("-b");
    b.wait_ready().await;
    wait_for_balance(&[&a, &b], 4, &[2, 2], Duration::from_secs(10)).await;
    let mut client = scenario.broker().await;
    let mut expected = std::collections::BTreeMap::new();

    // SIGKILL of "a" while events flow: "b" answers every key within a second.
    let publisher = scenario.spawn_publisher("kill".into(), &KEYS, 3000);
    scenario.wait_for_events_flowing(&KEYS).await;
    a.kill();
    let mut slowest = Duration::ZERO;
    for &key in &KEYS {
        slowest = slowest.max(time_until_answered(&mut client, key, Duration::from_secs(5)).await);
    }
    add_totals(
        &mut expected,
        &publisher.await.expect("the publisher finishes"),
    );
    println!("after SIGKILL every key was answered within {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "takeover took {slowest:?}"
    );
    assert_totals_become(&scenario, &expected).await;

    // "a" comes back; then "b" hangs (SIGSTOP) while events flow: "a" takes over once the
    // broker misses b's heartbeats, and "b", resumed, gives up what it no longer owns.
    a = scenario.start();
    a.wait_ready().await;
    wait_for_balance(&[&a, &b], 4, &[2, 2], Duration::from_secs(10)).await;
    let publisher = scenario.spawn_publisher("stop".into(), &KEYS, 3000);
    scenario.wait_for_events_flowing(&KEYS).await;
    b.signal("STOP");
    let hung_at = Instant::now();
    let mut slowest = Duration::ZERO;
    for &key in &KEYS {
        time_until_answered(&mut client, key, Duration::from_secs(15)).await;
        slowest = hung_at.elapsed();
    }
    println!("after SIGSTOP every key was answered within {slowest:?} (heartbeat 1 s)");
    assert!(
        slowest < Duration::from_secs(4),
        "takeover took {slowest:?}"
    );
    add_totals(
        &mut expected,
        &publisher.await.expect("the publisher finishes"),
    );
    b.signal("CONT");
    assert_totals_become(&scenario, &expected).await;
    wait_for_balance(&[&a, &b], 4, &[2, 2], Duration::from_secs(15)).await;
    assert!(
        b.is_running(),
        "the resumed instance reconnects; log: {}",
        b.log()
    );
    // Events published to a balanced pair still count exactly once.
    let client_events = publish_events(&client, "after", &KEYS, 200).await;
    add_totals(&mut expected, &client_events);
    assert_totals_become(&scenario, &expected).await;
}

#[tokio::test]
async fn a_rolling_restart_under_load_loses_nothing_and_no_check_waits_a_second() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&[]).await;
    let mut instances = vec![scenario.start_with_keys(&KEYS, None).await];
    for name in ["-b", "-c"] {
        let instance = scenario.start_instance(name);
        instance.wait_ready().await;
        instances.push(instance);
    }
    let publisher = scenario.spawn_publisher("roll".into(), &KEYS, 4000);
    // A checker asks every key in turn, each check allowed 1 s; it records the longest wait.
    let stop_checking = tokio_util::sync::CancellationToken::new();
    let checker = {
        let url = scenario.vhost.url();
        let stop = stop_checking.clone();
        tokio::spawn(async move {
            let mut client = BrokerClient::connect(&url).await;
            let (mut longest, mut unanswered, mut answered) = (Duration::ZERO, 0, 0);
            while !stop.is_cancelled() {
                for &key in &KEYS {
                    let started = Instant::now();
                    match client.try_check(key, Duration::from_secs(1)).await {
                        Some(_) => answered += 1,
                        None => unanswered += 1,
                    }
                    longest = longest.max(started.elapsed());
                }
            }
            (longest, unanswered, answered)
        })
    };
    for (index, instance) in instances.iter_mut().enumerate() {
        let (status, _) = instance.terminate();
        assert!(status.success(), "log: {}", instance.log());
        let restarted = if index == 0 {
            scenario.start()
        } else {
            scenario.start_instance(&format!("-{index}-again"))
        };
        restarted.wait_ready().await;
        *instance = restarted;
    }
    let expected = publisher.await.expect("the publisher finishes");
    stop_checking.cancel();
    let (longest, unanswered, answered) = checker.await.expect("the checker finishes");
    println!("rolling restart: {answered} checks answered, longest wait {longest:?}, {unanswered} unanswered");
    assert_eq!(unanswered, 0, "every check answered within 1 s");
    assert!(answered > 0);
    assert_totals_become(&scenario, &expected).await;
}
