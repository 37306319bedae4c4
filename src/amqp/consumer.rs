//! One delivery from a shard queue: answer a check, or take a usage event in (or dead-letter it);
//! consecutive usage events are taken in together.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel};
use tokio_util::task::TaskTracker;

use super::acks::{AckSequencer, DeadLetterStore, DirectSettlement, PendingAck};
use super::control::{self, InternalRequest};
use super::replies::{validate_reply_to, ReplyChannel};
use super::topology::{CHECK_EXCHANGE, DEAD_LETTER_QUEUE, ERROR_HEADER, USAGE_EXCHANGE};
use super::PERSISTENT;
use crate::actors::key_actor::{KeyError, UsageRecorded, UsageToRecord};
use crate::actors::registry::KeyRegistry;
use crate::clock::SharedClock;
use crate::domain::batch_plan::PlanRefusal;
use crate::domain::check::{decode_check_request, CheckReply};
use crate::domain::outcome::CheckOutcome;
use crate::domain::reservation::ReservationsReply;
use crate::domain::usage::{decode_usage_event, Rejection, UsageEvent};
use crate::ingest::{BatchWriterHandle, ConsumedEvent};
use crate::metrics as names;

/// Pause before a delivery whose dead-lettering failed is handed back to the broker.
const DEAD_LETTER_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// What handling a delivery needs; one per broker session.
pub struct DeliveryContext {
    pub registry: KeyRegistry,
    pub writer: BatchWriterHandle,
    /// The lane's channel for check replies, reopened if the broker closes it.
    pub replies: Arc<ReplyChannel>,
    /// Channel in confirm mode: a refused message is acknowledged only once its dead letter is
    /// stored. Shared, not cloned per delivery: a lapin `Channel` is a dozen reference counts.
    pub dead_letters: Arc<Channel>,
    pub clock: SharedClock,
}

/// Deliveries a shard loop received together (what lapin had buffered when it looked), taken
/// in in delivery order. Consecutive counted usage events form a run, taken in by one task: each
/// key's actor gets the key's events in one message, and the run reaches the batch writer as one
/// command per lane, instead of a task, an actor message and a writer command per event. Anything else
/// (a check, a refused or empty event) ends the run before it and gets a task of its own, so it
/// still reaches its actor after the usage delivered before it.
pub struct Burst<'a> {
    context: &'a Arc<DeliveryContext>,
    acks: &'a AckSequencer,
    in_flight: &'a TaskTracker,
    run: Vec<(UsageEvent, PendingAck)>,
    taken: usize,
}

impl<'a> Burst<'a> {
    pub fn new(
        context: &'a Arc<DeliveryContext>,
        acks: &'a AckSequencer,
        in_flight: &'a TaskTracker,
    ) -> Burst<'a> {
        Burst {
            context,
            acks,
            in_flight,
            run: Vec::new(),
            taken: 0,
        }
    }

    /// Deliveries taken so far.
    pub fn taken(&self) -> usize {
        self.taken
    }

    /// Takes the next delivery, in the order the channel delivered them.
    pub fn take(&mut self, delivery: Delivery) {
        self.taken += 1;
        match take_delivery(delivery, self.context, self.acks) {
            Taken::Usage(event, ack) => self.run.push((event, ack)),
            Taken::Other(handler) => {
                self.end_run();
                self.in_flight.spawn(handler);
            }
        }
    }

    /// Starts the task of the current run, if any.
    fn end_run(&mut self) {
        if !self.run.is_empty() {
            let run = std::mem::take(&mut self.run);
            self.in_flight
                .spawn(take_usage_run(run, Arc::clone(self.context)));
        }
    }
}

/// The last run starts when the burst ends, however the shard loop leaves it.
impl Drop for Burst<'_> {
    fn drop(&mut self) {
        self.end_run();
    }
}

/// What a delivery became once classified.
enum Taken<F> {
    /// A counted usage event, registered with its channel's sequencer: it joins the run.
    Usage(UsageEvent, PendingAck),
    /// Everything else: the task that handles and settles it.
    Other(F),
}

/// Classifies a delivery by the exchange the client published to. Called in delivery order: a
/// valid usage event with tokens is registered with its channel's `acks` sequencer here.
/// Everything else (checks, refused or empty events) is settled directly by the returned task,
/// so a message whose dead letter cannot be stored never holds back the acks behind it.
fn take_delivery(
    delivery: Delivery,
    context: &Arc<DeliveryContext>,
    acks: &AckSequencer,
) -> Taken<impl std::future::Future<Output = ()> + Send + 'static> {
    let internal = control::internal_request(delivery.exchange.as_str(), &delivery.properties);
    let is_check = match delivery.exchange.as_str() {
        CHECK_EXCHANGE => true,
        USAGE_EXCHANGE => false,
        // Published straight to a shard queue: a request names where to reply, an event does not.
        _ => delivery.properties.reply_to().is_some(),
    };
    let usage = (!is_check && internal.is_none()).then(|| {
        decode_usage_event(&delivery.data, context.clock.now()).and_then(|event| {
            routed_by_key(&delivery, event.api_key_id)?;
            Ok(event)
        })
    });
    match usage {
        // A void (0 tokens naming a hold) must still reach the actor and the table.
        Some(Ok(event)) if event.tokens != 0 || event.reservation_id.is_some() => {
            let Delivery {
                delivery_tag,
                exchange,
                properties,
                data,
                acker,
                ..
            } = delivery;
            // The delivery's body moves into the way to refuse it later: no copy per event.
            let refuse = dead_letter_store(
                DeadLetter {
                    data,
                    properties,
                    exchange,
                },
                context,
            );
            let ack = acks.register(delivery_tag, acker).with_dead_letter(refuse);
            Taken::Usage(event, ack)
        }
        usage => {
            let direct = acks.direct(delivery.delivery_tag);
            Taken::Other(settle_directly(
                delivery,
                internal,
                usage,
                Arc::clone(context),
                direct,
            ))
        }
    }
}

/// Handles a delivery that is not a counted usage event and settles it, then tells the
/// sequencer, so its multiple acks never cover a delivery still unsettled.
async fn settle_directly(
    delivery: Delivery,
    internal: Option<InternalRequest>,
    usage: Option<Result<UsageEvent, Rejection>>,
    context: Arc<DeliveryContext>,
    direct: DirectSettlement,
) {
    match (internal, usage) {
        // A probe only tells this instance it owns the shard, which its arrival already did.
        (Some(InternalRequest::Probe), _) => ack(&delivery).await,
        // The rare arms are boxed: a spawned future is as large as its largest arm, and every
        // such delivery's task is moved and allocated at that size.
        (Some(InternalRequest::Refresh), _) => Box::pin(answer_refresh(delivery, &context)).await,
        (Some(InternalRequest::Reservations), _) => {
            Box::pin(answer_reservations(delivery, &context)).await
        }
        (None, None) => answer_check(delivery, &context).await,
        (None, Some(Ok(_))) => {
            metrics::counter!(names::USAGE_EVENTS_TOTAL, "outcome" => "zero").increment(1);
            ack(&delivery).await;
        }
        (None, Some(Err(rejection))) => Box::pin(dead_letter(delivery, rejection, &context)).await,
    }
    direct.settled();
}

/// SPEC §2: the routing key is the body's `api_key_id`, since it decides which shard, and so
/// which instance, gets the message; a mismatch would reach an instance that does not own the key.
/// A message published straight to a queue through the default exchange has the queue's name as
/// routing key and is not checked (README, "Choices").
fn routed_by_key(delivery: &Delivery, api_key_id: i64) -> Result<(), Rejection> {
    if delivery.exchange.as_str().is_empty() {
        return Ok(());
    }
    let routing_key = delivery.routing_key.as_str();
    // The decimal form exactly (`042` or `+42` hash to other shards than `42`), without
    // formatting the id on every delivery.
    let canonical = !routing_key.starts_with(['0', '+']);
    if canonical && routing_key.parse::<i64>() == Ok(api_key_id) {
        Ok(())
    } else {
        Err(Rejection::new(format!(
            "routing key {routing_key:?} is not the api_key_id {api_key_id}"
        )))
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
        tracing::debug!(%error, "ack failed; the delivery will come again");
    }
}

/// Answers a check to its `reply_to`, echoing `correlation_id`; acknowledges after replying.
async fn answer_check(delivery: Delivery, context: &DeliveryContext) {
    // Nothing is worked out for a request nobody can be answered.
    let Some(reply_to) = reply_target(&delivery).await else {
        return;
    };
    let request = decode_check_request(&delivery.data).and_then(|request| {
        routed_by_key(&delivery, request.api_key_id)?;
        Ok(request)
    });
    let reply = match request {
        Ok(request) => match context
            .registry
            .check(request.api_key_id, request.ask)
            .await
        {
            Ok(reply) => reply,
            Err(error) => CheckReply::unavailable(request.api_key_id, error),
        },
        Err(rejection) => {
            let outcome = names::check_outcome_label(CheckOutcome::Malformed);
            metrics::counter!(names::CHECKS_TOTAL, "outcome" => outcome).increment(1);
            CheckReply::malformed(None, &rejection)
        }
    };
    let body = serde_json::to_vec(&reply).expect("a CheckReply always serializes");
    reply_and_ack(&delivery, context, &reply_to, body).await;
}

/// The delivery's `reply_to` if a reply can go there; else the request is counted as dropped
/// (with why), acknowledged, and `None` comes back. A reply to a name the broker cannot decode
/// would close the whole connection, so such names are refused here.
async fn reply_target(delivery: &Delivery) -> Option<ShortString> {
    let reason = match delivery.properties.reply_to() {
        None => {
            tracing::debug!("request without reply_to dropped");
            "no_reply_to"
        }
        Some(reply_to) => match validate_reply_to(reply_to.as_str()) {
            Ok(()) => return Some(reply_to.clone()),
            Err(invalid) => {
                tracing::debug!(reply_to = %reply_to, reason = %invalid, "request dropped");
                "invalid_reply_to"
            }
        },
    };
    metrics::counter!(names::CHECK_REQUESTS_DROPPED_TOTAL, "reason" => reason).increment(1);
    ack(delivery).await;
    None
}

/// Publishes `body` to `reply_to` (echoing the delivery's `correlation_id`), then acknowledges it.
async fn reply_and_ack(
    delivery: &Delivery,
    context: &DeliveryContext,
    reply_to: &ShortString,
    body: Vec<u8>,
) {
    let mut properties = BasicProperties::default().with_content_type("application/json".into());
    if let Some(correlation_id) = delivery.properties.correlation_id() {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    let publish = context
        .replies
        .publish(reply_to.as_str(), &body, properties);
    // Both frames are handed to lapin in this order on the first poll and written together: the
    // reply goes out before the ack, without waiting for the reply's write to be reported first.
    let (published, ()) = futures::future::join(publish, ack(delivery)).await;
    if let Err(error) = published {
        tracing::warn!(%error, "check reply not sent");
    }
}

/// Another instance changed a key of this shard in the database: the key's actor reloads it, then
/// the reply says so (the change's HTTP response waits for it: read your writes on every instance).
async fn answer_refresh(delivery: Delivery, context: &DeliveryContext) {
    let reply = match decode_check_request(&delivery.data) {
        Ok(request) => match context.registry.refresh(request.api_key_id).await {
            Ok(()) => serde_json::json!({ "api_key_id": request.api_key_id, "refreshed": true }),
            Err(error) => serde_json::json!({
                "api_key_id": request.api_key_id,
                "refreshed": false,
                "detail": error.to_string(),
            }),
        },
        Err(rejection) => {
            serde_json::json!({ "refreshed": false, "detail": rejection.to_string() })
        }
    };
    if let Some(reply_to) = reply_target(&delivery).await {
        reply_and_ack(
            &delivery,
            context,
            &reply_to,
            reply.to_string().into_bytes(),
        )
        .await;
    }
}

/// Another instance serves `GET /keys/{id}/reservations` for a key of this shard: the key's actor
/// (loading it and its stored holds if needed) lists its live holds.
async fn answer_reservations(delivery: Delivery, context: &DeliveryContext) {
    let reply = match decode_check_request(&delivery.data) {
        Ok(request) => {
            let answer = context.registry.reservations(request.api_key_id).await;
            ReservationsReply::from_answer(answer)
        }
        Err(rejection) => ReservationsReply::Unavailable {
            detail: rejection.to_string(),
        },
    };
    let body = serde_json::to_vec(&reply).expect("a ReservationsReply always serializes");
    if let Some(reply_to) = reply_target(&delivery).await {
        reply_and_ack(&delivery, context, &reply_to, body).await;
    }
}

/// Counts a run of valid usage events in their keys' memory and hands them to the batch writer
/// as one command. Each key's actor is sent all its events of the run in one message, and every
/// actor is sent its message before any answer is awaited, in the order of the keys' first events.
async fn take_usage_run(run: Vec<(UsageEvent, PendingAck)>, context: Arc<DeliveryContext>) {
    // Each key's events, as positions in the run, keys in the order they first appear.
    let mut positions_by_key: Vec<(i64, Vec<usize>)> = Vec::new();
    let mut key_slot: HashMap<i64, usize> = HashMap::with_capacity(run.len());
    for (position, (event, _)) in run.iter().enumerate() {
        let slot = *key_slot.entry(event.api_key_id).or_insert_with(|| {
            positions_by_key.push((event.api_key_id, Vec::new()));
            positions_by_key.len() - 1
        });
        positions_by_key[slot].1.push(position);
    }
    let registry = &context.registry;
    let answers = futures::future::join_all(positions_by_key.iter().map(|(key, positions)| {
        let events = positions
            .iter()
            .map(|&position| {
                let event = &run[position].0;
                UsageToRecord {
                    tokens: event.tokens,
                    occurred_at: event.occurred_at,
                    reservation_id: event.reservation_id.clone(),
                }
            })
            .collect();
        registry.record_usage(*key, events)
    }))
    .await;
    let mut recorded: Vec<Option<Result<UsageRecorded, KeyError>>> = vec![None; run.len()];
    for ((_, positions), answers) in positions_by_key.iter().zip(answers) {
        for (&position, answer) in positions.iter().zip(answers) {
            recorded[position] = Some(answer);
        }
    }
    let mut consumed = Vec::with_capacity(run.len());
    let mut overflowing = Vec::new();
    for ((event, ack), recorded) in run.into_iter().zip(recorded) {
        let ticket = match recorded {
            Some(Ok(UsageRecorded::Pending(ticket))) => Some(ticket),
            Some(Ok(UsageRecorded::WouldOverflow { used })) => {
                let reason = PlanRefusal::CounterOverflow {
                    api_key_id: event.api_key_id,
                    used,
                    delta: event.tokens,
                };
                overflowing.push((ack, reason));
                continue;
            }
            // The actor's "unknown" may be a few seconds old (a key just created elsewhere), and
            // a key that could not be loaded may exist: the batch writer decides against the
            // database.
            // `None` cannot happen: the registry answers every event of a key.
            Some(Ok(UsageRecorded::NotPending | UsageRecorded::UnknownKey) | Err(_)) | None => None,
        };
        consumed.push(ConsumedEvent {
            event,
            ticket,
            completion: Box::new(ack),
        });
    }
    context.writer.submit_all(consumed);
    for (ack, reason) in overflowing {
        ack.dead_letter(reason.to_string()).await;
    }
}

/// Stores the message in `quota.usage.dead` with the reason, then acknowledges the original.
async fn dead_letter(delivery: Delivery, rejection: Rejection, context: &DeliveryContext) {
    let stored = store_dead_letter(
        Arc::clone(&context.dead_letters),
        DeadLetter::of(&delivery),
        rejection.to_string(),
    )
    .await;
    if stored {
        ack(&delivery).await;
    } else {
        tokio::time::sleep(DEAD_LETTER_RETRY_PAUSE).await;
        let _ = delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await;
    }
}

/// What a dead letter keeps of the original delivery.
struct DeadLetter {
    data: Vec<u8>,
    properties: BasicProperties,
    exchange: ShortString,
}

impl DeadLetter {
    fn of(delivery: &Delivery) -> DeadLetter {
        DeadLetter {
            data: delivery.data.clone(),
            properties: delivery.properties.clone(),
            exchange: delivery.exchange.clone(),
        }
    }
}

/// How a delivery already taken in is refused later (the actor or the database will not count
/// it): the same dead letter as a malformed message gets.
fn dead_letter_store(original: DeadLetter, context: &DeliveryContext) -> DeadLetterStore {
    let channel = Arc::clone(&context.dead_letters);
    Box::new(move |reason| Box::pin(store_dead_letter(channel, original, reason)))
}

/// Publishes the message to `quota.usage.dead` with the reason; `true` once the broker confirmed it.
async fn store_dead_letter(channel: Arc<Channel>, original: DeadLetter, reason: String) -> bool {
    tracing::info!(%reason, "usage message dead-lettered");
    let mut headers = original.properties.headers().clone().unwrap_or_default();
    headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(
        "x-quota-original-exchange".into(),
        AMQPValue::LongString(original.exchange.as_str().into()),
    );
    // A fresh set of properties: the original's `expiration` must not make the dead letter expire.
    let mut properties = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT);
    if let Some(content_type) = original.properties.content_type() {
        properties = properties.with_content_type(content_type.clone());
    }
    if let Some(message_id) = original.properties.message_id() {
        properties = properties.with_message_id(message_id.clone());
    }
    if let Some(timestamp) = original.properties.timestamp() {
        properties = properties.with_timestamp(*timestamp);
    }
    let stored = async {
        channel
            .basic_publish(
                "".into(),
                DEAD_LETTER_QUEUE.into(),
                // Mandatory: if the queue were missing, the broker returns the message instead of dropping it.
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &original.data,
                properties,
            )
            .await?
            .await
    }
    .await;
    match stored {
        Ok(lapin::Confirmation::Ack(None)) => {
            metrics::counter!(names::USAGE_DEAD_LETTERED_TOTAL).increment(1);
            true
        }
        outcome => {
            tracing::warn!(?outcome, "dead letter not stored; the message comes again");
            false
        }
    }
}
