//! `AckSequencer`: settles one channel's usage deliveries with the broker in delivery-tag order.
//!
//! RabbitMQ 3.x keeps a channel's unacknowledged deliveries in a queue and finds an acknowledged
//! tag by walking it from the oldest, so an ack far from the head costs time in proportion to the
//! distance. Batches commit out of delivery order (cold keys load first, writers run in parallel,
//! actor mailboxes reorder), and with thousands of deliveries in flight per channel those walks
//! made the broker the bottleneck of ingestion (BENCHMARKS.md). Here every counted usage event is
//! registered as it arrives and its ack goes out only once every earlier one is settled, so usage
//! acks name the head of the broker's queue (or sit just behind checks still being answered).
//! Checks, refused and empty events are acknowledged directly: they are never held back behind
//! usage waiting for the database, though they still share the channel's prefetch window with it.
//!
//! lapin hands each ack to the runtime that opened the connection as a task of its own; that is
//! the current-thread runtime of a key-actor arbiter, where they run in the order spawned, which
//! is the order `send_in_order` gives them.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use lapin::options::BasicAckOptions;
use lapin::Acker;
use tokio::sync::{mpsc, oneshot};

use crate::ingest::Completion;

/// What to tell the broker about a usage delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Committed: the broker may forget it.
    Ack,
    /// Say nothing: the delivery stays unacknowledged (holding a prefetch slot) and comes again
    /// when the channel closes.
    Abandon,
}

enum Command {
    Register(u64, Acker),
    Settle(u64, Settlement),
    /// Answered once everything settled before it that could go out has been sent.
    Sent(oneshot::Sender<()>),
}

/// Cheap to clone; every clone feeds the same channel's sequencer task.
#[derive(Clone)]
pub struct AckSequencer {
    commands: mpsc::UnboundedSender<Command>,
}

/// Stores a refused delivery, with the reason, where refused messages go; resolves to `true`
/// once that copy is safely stored (so the original may be acknowledged).
pub type DeadLetterStore = Box<dyn FnOnce(String) -> BoxFuture<'static, bool> + Send + Sync>;

/// A registered usage delivery; settle it exactly once. Dropping it unsettled abandons it, so a
/// lost delivery never holds back the acknowledgements of the ones after it.
pub struct PendingAck {
    sequencer: AckSequencer,
    tag: u64,
    settled: bool,
    /// How to refuse the delivery after it was taken in (e.g. the database will never take it).
    dead_letter: Option<DeadLetterStore>,
}

impl PendingAck {
    pub fn settle(mut self, settlement: Settlement) {
        self.settled = true;
        self.sequencer.send(Command::Settle(self.tag, settlement));
    }

    /// Gives the delivery a way to be refused with [`PendingAck::dead_letter`].
    pub fn with_dead_letter(mut self, store: DeadLetterStore) -> PendingAck {
        self.dead_letter = Some(store);
        self
    }

    /// Refuses the delivery: stores it as a dead letter with `reason`, then acknowledges it in
    /// its turn. If it cannot be stored (or has no store), it is abandoned and comes again once
    /// its channel closes, to be refused again.
    pub async fn dead_letter(mut self, reason: String) {
        let stored = match self.dead_letter.take() {
            Some(store) => store(reason).await,
            None => {
                tracing::warn!(%reason, "a refused usage delivery has no dead-letter store; abandoned");
                false
            }
        };
        self.settle(if stored {
            Settlement::Ack
        } else {
            Settlement::Abandon
        });
    }
}

/// The batch writer's word, in the broker's terms: committed → ack in its turn, refused → dead
/// letter, then ack; a completion dropped unsaid abandons the delivery (see `Drop`).
impl Completion for PendingAck {
    fn committed(self: Box<Self>) {
        self.settle(Settlement::Ack);
    }

    fn refused(self: Box<Self>, reason: String) -> BoxFuture<'static, ()> {
        Box::pin(self.dead_letter(reason))
    }
}

impl Drop for PendingAck {
    fn drop(&mut self) {
        if !self.settled {
            self.sequencer
                .send(Command::Settle(self.tag, Settlement::Abandon));
        }
    }
}

impl AckSequencer {
    /// Starts the sequencer task of one channel; it ends when every handle is gone.
    pub fn start() -> AckSequencer {
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(receiver));
        AckSequencer { commands }
    }

    /// Registers a delivery; must be called in the order the channel delivered them.
    pub fn register(&self, delivery_tag: u64, acker: Acker) -> PendingAck {
        self.send(Command::Register(delivery_tag, acker));
        PendingAck {
            sequencer: self.clone(),
            tag: delivery_tag,
            settled: false,
            dead_letter: None,
        }
    }

    /// Waits until every settlement made so far that is not held back by an earlier unsettled
    /// delivery has been sent.
    pub async fn sent(&self) {
        let (done, sent) = oneshot::channel();
        self.send(Command::Sent(done));
        let _ = sent.await;
    }

    fn send(&self, command: Command) {
        // The task lives as long as any handle; if it is gone the channel is closing anyway and
        // its unacknowledged deliveries come again.
        let _ = self.commands.send(command);
    }
}

async fn run(mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut order = SettlementOrder::default();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = commands.recv().await {
        // Take everything queued, then send once: one pass per burst, not per settlement.
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                Command::Register(tag, acker) => order.register(tag, acker),
                Command::Settle(tag, settlement) => order.settle(tag, settlement),
                Command::Sent(done) => waiting.push(done),
            }
            next = commands.try_recv().ok();
        }
        send_in_order(order.take_ready()).await;
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// The sequencer's bookkeeping, apart from the broker: which registered deliveries may be
/// settled now, oldest first. `A` is what settles one delivery (a lapin `Acker`).
struct SettlementOrder<A> {
    /// Registered deliveries by tag, with their settlement once known.
    outstanding: BTreeMap<u64, (A, Option<Settlement>)>,
}

impl<A> Default for SettlementOrder<A> {
    fn default() -> Self {
        SettlementOrder {
            outstanding: BTreeMap::new(),
        }
    }
}

impl<A> SettlementOrder<A> {
    fn register(&mut self, tag: u64, acker: A) {
        // Tags only repeat on a new channel, which gets a new sequencer.
        let previous = self.outstanding.insert(tag, (acker, None));
        debug_assert!(previous.is_none(), "delivery tag {tag} registered twice");
    }

    /// Records how `tag` is settled; a tag never registered (or already sent) is ignored.
    fn settle(&mut self, tag: u64, settlement: Settlement) {
        if let Some((_, slot)) = self.outstanding.get_mut(&tag) {
            *slot = Some(settlement);
        }
    }

    /// The settled deliveries with no unsettled one before them, in tag order; they leave.
    fn take_ready(&mut self) -> Vec<(A, Settlement)> {
        let mut ready = Vec::new();
        while let Some(entry) = self.outstanding.first_entry() {
            let Some(settlement) = entry.get().1 else {
                break;
            };
            let (acker, _) = entry.remove();
            ready.push((acker, settlement));
        }
        ready
    }
}

/// Sends the frames in the given order: each future hands its frame to lapin on first poll,
/// and `join_all` polls them first to last.
async fn send_in_order(ready: Vec<(Acker, Settlement)>) {
    let frames = ready.iter().map(|(acker, settlement)| async move {
        let result = match settlement {
            Settlement::Ack => acker.ack(BasicAckOptions::default()).await,
            Settlement::Abandon => Ok(true),
        };
        if let Err(error) = result {
            // The channel is gone: the broker hands the delivery out again, and a committed
            // event comes back as a duplicate.
            tracing::debug!(%error, ?settlement, "settling a usage delivery failed");
        }
    });
    futures::future::join_all(frames).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_tags(order: &mut SettlementOrder<u64>) -> Vec<(u64, Settlement)> {
        order.take_ready()
    }

    #[test]
    fn a_settlement_waits_for_every_earlier_delivery() {
        let mut order = SettlementOrder::default();
        for tag in 1..=4 {
            order.register(tag, tag);
        }
        order.settle(3, Settlement::Ack);
        order.settle(2, Settlement::Ack);
        assert!(ready_tags(&mut order).is_empty(), "1 is not settled yet");
        order.settle(1, Settlement::Abandon);
        assert_eq!(
            ready_tags(&mut order),
            vec![
                (1, Settlement::Abandon),
                (2, Settlement::Ack),
                (3, Settlement::Ack)
            ]
        );
        order.settle(4, Settlement::Ack);
        assert_eq!(ready_tags(&mut order), vec![(4, Settlement::Ack)]);
        assert!(ready_tags(&mut order).is_empty(), "each goes out once");
    }

    #[test]
    fn unknown_tags_are_ignored_and_later_registrations_queue_behind() {
        let mut order = SettlementOrder::default();
        order.register(5, 5);
        order.settle(9, Settlement::Ack);
        order.register(9, 9);
        assert!(
            ready_tags(&mut order).is_empty(),
            "9 was settled before it was registered"
        );
        order.settle(9, Settlement::Ack);
        assert!(ready_tags(&mut order).is_empty(), "5 holds 9 back");
        order.settle(5, Settlement::Ack);
        assert_eq!(
            ready_tags(&mut order),
            vec![(5, Settlement::Ack), (9, Settlement::Ack)]
        );
    }
}
