//! `Ownership`: the shard queues this instance is the single active consumer of, learned from deliveries.
//!
//! RabbitMQ 3.10 does not tell a single-active-consumer whether it is the active one on a classic
//! queue, but only the active consumer receives deliveries, and it stays active until its channel
//! closes (no other consumer can take a live one's place). So a shard is owned from its first
//! delivery (a probe published to the queue brings one even without traffic) until its channel
//! closes or it is handed over; losing it drops the actors of its keys.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::metrics as names;

/// One shard's ownership and the hand-off request of the balancer.
struct ShardSlot {
    owned: AtomicBool,
    hand_over: Notify,
}

/// Shared by the shard loops (which learn ownership), the balancer (which asks for hand-offs)
/// and `/readyz`.
pub struct Ownership {
    instance: String,
    slots: Vec<ShardSlot>,
    /// Shards of the current session's layout (all the slots, or one without the plugin).
    in_layout: AtomicU16,
    /// Shards gained or lost since the last report, logged once per balancer round.
    gained: Mutex<BTreeSet<u16>>,
    lost: Mutex<BTreeSet<u16>>,
}

impl Ownership {
    /// Room for `shards` shards (`amqp.shards`), all in the layout until `set_layout_shards`.
    pub fn new(instance: String, shards: u16) -> Ownership {
        metrics::gauge!(names::OWNED_SHARDS).set(0.0);
        Ownership {
            instance,
            in_layout: AtomicU16::new(shards),
            slots: (0..shards.max(1))
                .map(|_| ShardSlot {
                    owned: AtomicBool::new(false),
                    hand_over: Notify::new(),
                })
                .collect(),
            gained: Mutex::new(BTreeSet::new()),
            lost: Mutex::new(BTreeSet::new()),
        }
    }

    /// This process's id among the instances, unique per start.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Shards in the current layout.
    pub fn shard_count(&self) -> u16 {
        self.in_layout.load(Ordering::Acquire)
    }

    /// A new session found a layout of `shards` shards (owning none yet).
    pub fn set_layout_shards(&self, shards: u16) {
        self.lose_all();
        self.in_layout
            .store(shards.clamp(1, self.slots.len() as u16), Ordering::Release);
    }

    pub fn owns(&self, shard: u16) -> bool {
        self.slot(shard)
            .is_some_and(|slot| slot.owned.load(Ordering::Acquire))
    }

    /// A delivery came on `shard`: this instance is its active consumer. `true` if it just
    /// became so.
    pub fn delivered(&self, shard: u16) -> bool {
        let Some(slot) = self.slot(shard) else {
            return false;
        };
        let gained =
            !slot.owned.load(Ordering::Relaxed) && !slot.owned.swap(true, Ordering::AcqRel);
        if gained {
            self.record(&self.gained, &self.lost, shard);
        }
        gained
    }

    /// `shard`'s channel closed (handed over, or lost with its connection).
    pub fn lost(&self, shard: u16) {
        let Some(slot) = self.slot(shard) else { return };
        if slot.owned.swap(false, Ordering::AcqRel) {
            self.record(&self.lost, &self.gained, shard);
        }
    }

    /// Every shard is lost (the broker session ended).
    pub fn lose_all(&self) {
        for shard in 0..self.slots.len() as u16 {
            self.lost(shard);
        }
    }

    /// The shards owned now, ascending.
    pub fn owned(&self) -> Vec<u16> {
        (0..self.shard_count()).filter(|s| self.owns(*s)).collect()
    }

    /// Asks the loop of `shard` to hand it over after its last commit.
    pub fn request_hand_over(&self, shard: u16) {
        if let Some(slot) = self.slot(shard) {
            slot.hand_over.notify_one();
        }
    }

    /// Drops a hand-over request nobody took up (made while the shard was already going).
    pub fn forget_hand_over_request(&self, shard: u16) {
        if let Some(slot) = self.slot(shard) {
            let _ = futures::FutureExt::now_or_never(slot.hand_over.notified());
        }
    }

    /// Completes when the balancer asks for `shard` to be handed over.
    pub async fn hand_over_requested(&self, shard: u16) {
        match self.slot(shard) {
            Some(slot) => slot.hand_over.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Shards gained and lost since the last call (a shard gained then lost in between is in neither).
    pub fn take_changes(&self) -> (Vec<u16>, Vec<u16>) {
        let take = |set: &Mutex<BTreeSet<u16>>| -> Vec<u16> {
            std::mem::take(
                &mut *set
                    .lock()
                    .expect("ownership sets are never held across a panic"),
            )
            .into_iter()
            .collect()
        };
        (take(&self.gained), take(&self.lost))
    }

    fn slot(&self, shard: u16) -> Option<&ShardSlot> {
        (shard < self.shard_count())
            .then(|| self.slots.get(usize::from(shard)))
            .flatten()
    }

    fn record(&self, into: &Mutex<BTreeSet<u16>>, cancels: &Mutex<BTreeSet<u16>>, shard: u16) {
        if !cancels
            .lock()
            .expect("ownership sets are never held across a panic")
            .remove(&shard)
        {
            into.lock()
                .expect("ownership sets are never held across a panic")
                .insert(shard);
        }
        metrics::gauge!(names::OWNED_SHARDS).set(self.owned().len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_starts_with_a_delivery_and_ends_with_the_channel() {
        let ownership = Ownership::new("a".into(), 4);
        assert!(ownership.owned().is_empty());
        assert!(ownership.delivered(2));
        assert!(!ownership.delivered(2));
        assert!(ownership.delivered(0));
        assert_eq!(ownership.owned(), vec![0, 2]);
        assert_eq!(ownership.take_changes(), (vec![0, 2], vec![]));
        ownership.lost(2);
        assert!(ownership.delivered(3));
        ownership.lost(3);
        assert_eq!(ownership.owned(), vec![0]);
        // Shard 3 came and went within one report: neither gained nor lost.
        assert_eq!(ownership.take_changes(), (vec![], vec![2]));
        ownership.lose_all();
        assert!(ownership.owned().is_empty());
        // Out-of-range shards are ignored, never a panic.
        assert!(!ownership.delivered(99));
        assert!(!ownership.owns(99));
    }

    #[tokio::test]
    async fn a_hand_over_request_waits_for_its_loop() {
        let ownership = Ownership::new("a".into(), 2);
        // Requested before anyone waits: the permit is kept.
        ownership.request_hand_over(1);
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            ownership.hand_over_requested(1),
        )
        .await
        .expect("the stored request completes the wait");
        // A request forgotten before its loop looked is gone.
        ownership.request_hand_over(0);
        ownership.forget_hand_over_request(0);
        assert!(futures::FutureExt::now_or_never(ownership.hand_over_requested(0)).is_none());
    }
}
