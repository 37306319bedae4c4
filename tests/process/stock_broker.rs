//! A stock RabbitMQ without the consistent-hash plugin (SPEC §4): one queue for every key, a hot
//! standby, and the move to the sharded layout when the plugin appears, losing and doubling nothing.

use std::time::Duration;

use crate::common::{
    ensure_consistent_hash_plugin, eventually, list_queue_names, rabbitmq_plugins,
    CONSISTENT_HASH_PLUGIN,
};
use crate::harness::{add_totals, assert_totals_become, publish_events, Scenario, SERIAL};

const KEYS: [i64; 6] = [1, 2, 3, 4, 5, 6];

/// The plugin disabled node-wide for one test; enabled again however the test ends. Only under
/// `SERIAL`: every other test of this binary needs it.
struct PluginDisabled;

impl PluginDisabled {
    fn new() -> PluginDisabled {
        // Consumes the once-per-process enable first, so no vhost created later turns it back on.
        ensure_consistent_hash_plugin();
        rabbitmq_plugins("disable", CONSISTENT_HASH_PLUGIN);
        PluginDisabled
    }
}

impl Drop for PluginDisabled {
    fn drop(&mut self) {
        rabbitmq_plugins("enable", CONSISTENT_HASH_PLUGIN);
    }
}

#[tokio::test]
async fn without_the_plugin_one_queue_serves_every_key_and_the_move_to_shards_is_exact() {
    let _serial = SERIAL.lock().await;
    let plugin = PluginDisabled::new();
    let scenario = Scenario::new(&[]).await;
    let mut a = scenario.start_with_keys(&KEYS, Some(1_000_000)).await;
    let mut b = scenario.start_instance("-b");
    b.wait_ready().await;
    // One queue, owned by one instance; the other is a hot standby.
    eventually(
        Duration::from_secs(10),
        "one owner of the single queue",
        || async {
            let mut owned = a.owned_shards().await;
            owned.extend(b.owned_shards().await);
            (owned == vec![0]).then_some(())
        },
    )
    .await;
    let queues = list_queue_names(&scenario.vhost.name);
    assert!(
        queues.contains(&"quota.shard.all".to_string()),
        "{queues:?}"
    );
    assert!(!queues.iter().any(|q| q == "quota.shard.000"), "{queues:?}");
    let warnings = a
        .log()
        .matches("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange")
        .count();
    assert_eq!(warnings, 1, "the command logged once: {}", a.log());

    // Every feature works: usage, checks over AMQP and HTTP on both instances, admin changes.
    let client = scenario.broker().await;
    let mut expected = publish_events(&client, "single", &KEYS, 300).await;
    assert_totals_become(&scenario, &expected).await;
    let mut checks = scenario.broker().await;
    for &key in &KEYS {
        let total = expected[&key];
        assert_eq!(
            checks.check(key, None).await["tokens_used_this_month"],
            total
        );
        assert_eq!(a.http_check(key).await.1["tokens_used_this_month"], total);
        assert_eq!(b.http_check(key).await.1["tokens_used_this_month"], total);
    }

    // Stopped, with events waiting in the single queue; then the plugin appears.
    assert!(a.terminate().0.success());
    assert!(b.terminate().0.success());
    add_totals(
        &mut expected,
        // More than the prefetch (2,000): once the queue shows no ready message, deliveries
        // still wait in the drain's buffer, and must not be deleted with the queue.
        &publish_events(&client, "queued", &KEYS, 2500).await,
    );
    drop(plugin);
    let a = scenario.start();
    a.wait_ready().await;
    add_totals(
        &mut expected,
        &publish_events(&client, "sharded", &KEYS, 300).await,
    );
    assert_totals_become(&scenario, &expected).await;
    eventually(
        Duration::from_secs(15),
        "the single queue drained and deleted",
        || async {
            (!list_queue_names(&scenario.vhost.name).contains(&"quota.shard.all".to_string()))
                .then_some(())
        },
    )
    .await;
    assert_eq!(a.owned_shards().await, vec![0, 1, 2, 3]);
    let mut checks = scenario.broker().await;
    for &key in &KEYS {
        assert_eq!(
            checks.check(key, None).await["tokens_used_this_month"],
            expected[&key]
        );
    }
}
