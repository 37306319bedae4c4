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
//! A run of usage acks that follows on from everything already settled on the channel goes out as
//! one `multiple` ack naming its last tag: one frame (and one lapin task) instead of one per event,
//! and one step for the broker. A multiple ack also settles every earlier unacknowledged delivery,
//! so the sequencer keeps a frontier, the highest tag up to which every delivery is known settled:
//! by itself, or by the consumer (which reports each delivery it settles directly once that ack or
//! nack is handed to lapin, see [`DirectSettlement`]). Acks beyond the frontier go out one by one.
//! A delivery abandoned (or dropped unsettled) stays unacknowledged, so the frontier stops there for
//! the channel's life and every later ack goes out one by one.
//!
//! lapin hands each ack to the runtime that opened the connection as a task of its own; that is
//! the current-thread runtime of a key-actor arbiter, where they run in the order spawned, which
//! is the order `send_in_order` gives them.

use std::collections::{BTreeMap, BTreeSet};

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
    /// A delivery the consumer settled itself (`true`: its ack or nack is handed to lapin) or
    /// left unsettled (`false`).
    Direct(u64, bool),
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

/// A delivery of the channel that the consumer settles itself (a check, a refused or empty
/// event): call [`DirectSettlement::settled`] once its ack or nack has been handed to lapin.
/// Dropping it unsettled tells the sequencer the delivery may stay unacknowledged.
pub struct DirectSettlement {
    sequencer: AckSequencer,
    tag: u64,
    settled: bool,
}

impl DirectSettlement {
    pub fn settled(mut self) {
        self.settled = true;
        self.sequencer.send(Command::Direct(self.tag, true));
    }
}

impl Drop for DirectSettlement {
    fn drop(&mut self) {
        if !self.settled {
            self.sequencer.send(Command::Direct(self.tag, false));
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

    /// A delivery the consumer settles itself; see [`DirectSettlement`].
    pub fn direct(&self, delivery_tag: u64) -> DirectSettlement {
        DirectSettlement {
            sequencer: self.clone(),
            tag: delivery_tag,
            settled: false,
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
    let mut frontier = Frontier::default();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = commands.recv().await {
        // Take everything queued, then send once: one pass per burst, not per settlement.
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                Command::Register(tag, acker) => order.register(tag, acker),
                Command::Settle(tag, settlement) => order.settle(tag, settlement),
                Command::Direct(tag, true) => frontier.note_settled(tag),
                Command::Direct(_, false) => frontier.stop(),
                Command::Sent(done) => waiting.push(done),
            }
            next = commands.try_recv().ok();
        }
        send_in_order(frontier.frames(order.take_ready())).await;
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Which registered usage deliveries may be settled now, oldest first. `A` is what settles one
/// delivery (a lapin `Acker`).
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
    fn take_ready(&mut self) -> Vec<(u64, A, Settlement)> {
        let mut ready = Vec::new();
        while let Some(entry) = self.outstanding.first_entry() {
            let Some(settlement) = entry.get().1 else {
                break;
            };
            let (tag, (acker, _)) = entry.remove_entry();
            ready.push((tag, acker, settlement));
        }
        ready
    }
}

/// Settled deliveries above the frontier at most; past this the sequencer stops using multiple
/// acks on the channel rather than keep growing (a direct delivery never reported, for instance).
const MAX_SETTLED_BEYOND_FRONTIER: usize = 65_536;

/// Which of a channel's deliveries are known settled, to tell when a `multiple` ack is safe.
#[derive(Debug, Default)]
struct Frontier {
    /// Every delivery tag up to this one is settled (delivery tags count from 1 on a channel).
    through: u64,
    /// Settled tags above `through`, waiting for the gaps below them to close.
    beyond: BTreeSet<u64>,
    /// A delivery may stay unacknowledged: no more multiple acks on this channel.
    stopped: bool,
}

/// One frame to send for a usage delivery.
#[derive(Debug)]
enum Frame<A> {
    /// Acknowledges this delivery alone.
    Ack(A),
    /// Acknowledges this delivery and every earlier one still unacknowledged.
    AckThrough(A),
}

impl Frontier {
    /// `tag` is settled (by the consumer, or by an ack sent alone): the frontier moves up to
    /// it once every tag before it is settled too.
    fn note_settled(&mut self, tag: u64) {
        if !self.stopped {
            self.beyond.insert(tag);
            self.advance();
        }
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.beyond = BTreeSet::new();
    }

    fn advance(&mut self) {
        while self.beyond.remove(&(self.through + 1)) {
            self.through += 1;
        }
        if self.beyond.len() > MAX_SETTLED_BEYOND_FRONTIER {
            self.stop();
        }
    }

    /// The frames that settle `ready` (in tag order): a run that continues the frontier as one
    /// multiple ack, every other ack alone, nothing for an abandoned delivery.
    fn frames<A>(&mut self, ready: Vec<(u64, A, Settlement)>) -> Vec<Frame<A>> {
        let mut frames = Vec::new();
        let mut run_end: Option<A> = None;
        for (tag, acker, settlement) in ready {
            match settlement {
                Settlement::Abandon => self.stop(),
                Settlement::Ack if !self.stopped && tag == self.through + 1 => {
                    self.through = tag;
                    self.advance();
                    run_end = Some(acker);
                }
                Settlement::Ack => {
                    frames.extend(run_end.take().map(Frame::AckThrough));
                    frames.push(Frame::Ack(acker));
                    self.note_settled(tag);
                }
            }
        }
        frames.extend(run_end.map(Frame::AckThrough));
        frames
    }
}

/// Sends the frames in the given order: each future hands its frame to lapin on first poll,
/// and `join_all` polls them first to last.
async fn send_in_order(frames: Vec<Frame<Acker>>) {
    let sends = frames.iter().map(|frame| async move {
        let (acker, multiple) = match frame {
            Frame::Ack(acker) => (acker, false),
            Frame::AckThrough(acker) => (acker, true),
        };
        if let Err(error) = acker.ack(BasicAckOptions { multiple }).await {
            // The channel is gone: the broker hands the deliveries out again, and committed
            // events come back as duplicates.
            tracing::debug!(%error, multiple, "acknowledging usage deliveries failed");
        }
    });
    futures::future::join_all(sends).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(tags: &[u64]) -> Vec<(u64, u64, Settlement)> {
        tags.iter()
            .map(|&tag| (tag, tag, Settlement::Ack))
            .collect()
    }

    /// The frames as (tag, multiple).
    fn sent(frames: Vec<Frame<u64>>) -> Vec<(u64, bool)> {
        frames
            .into_iter()
            .map(|frame| match frame {
                Frame::Ack(tag) => (tag, false),
                Frame::AckThrough(tag) => (tag, true),
            })
            .collect()
    }

    #[test]
    fn a_run_from_the_first_delivery_goes_out_as_one_multiple_ack() {
        let mut frontier = Frontier::default();
        assert_eq!(sent(frontier.frames(acks(&[1, 2, 3]))), [(3, true)]);
        assert_eq!(sent(frontier.frames(acks(&[4, 5]))), [(5, true)]);
    }

    #[test]
    fn a_delivery_settled_elsewhere_is_never_covered_before_it_is_reported() {
        let mut frontier = Frontier::default();
        // 3 is a check still being answered: 4 and 5 go out alone.
        assert_eq!(
            sent(frontier.frames(acks(&[1, 2, 4, 5]))),
            [(2, true), (4, false), (5, false)]
        );
        assert_eq!(sent(frontier.frames(acks(&[6]))), [(6, false)]);
        // Once its ack is handed to lapin, the frontier closes the gap and runs on.
        frontier.note_settled(3);
        assert_eq!(sent(frontier.frames(acks(&[7, 8]))), [(8, true)]);
    }

    #[test]
    fn a_gap_reported_before_the_run_joins_it() {
        let mut frontier = Frontier::default();
        frontier.note_settled(2);
        assert_eq!(sent(frontier.frames(acks(&[1, 3]))), [(3, true)]);
    }

    #[test]
    fn after_an_abandoned_delivery_every_ack_goes_out_alone() {
        let mut frontier = Frontier::default();
        let ready = vec![
            (1, 1, Settlement::Ack),
            (2, 2, Settlement::Abandon),
            (3, 3, Settlement::Ack),
        ];
        assert_eq!(sent(frontier.frames(ready)), [(1, true), (3, false)]);
        frontier.note_settled(2);
        assert_eq!(
            sent(frontier.frames(acks(&[4, 5]))),
            [(4, false), (5, false)]
        );
    }

    #[test]
    fn a_direct_delivery_left_unsettled_stops_multiple_acks() {
        let mut frontier = Frontier::default();
        frontier.stop();
        assert_eq!(
            sent(frontier.frames(acks(&[1, 2]))),
            [(1, false), (2, false)]
        );
    }

    #[test]
    fn a_gap_that_never_closes_stops_tracking_at_the_bound() {
        let mut frontier = Frontier::default();
        let beyond: Vec<u64> = (2..=MAX_SETTLED_BEYOND_FRONTIER as u64 + 2).collect();
        frontier.frames(acks(&beyond));
        assert!(frontier.stopped);
        assert!(frontier.beyond.is_empty());
    }

    /// The ready deliveries as (tag, settlement).
    fn ready_tags(order: &mut SettlementOrder<u64>) -> Vec<(u64, Settlement)> {
        order
            .take_ready()
            .into_iter()
            .map(|(tag, acker, settlement)| {
                assert_eq!(tag, acker, "each tag keeps its own acker");
                (tag, settlement)
            })
            .collect()
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
