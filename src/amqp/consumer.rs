//! One delivery from a shard queue: answer a check, or take a usage event in (or dead-letter it).

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel};

use super::acks::{AckSequencer, DeadLetterStore, DirectSettlement, PendingAck};
use super::control::{self, InternalRequest};
use super::replies::{validate_reply_to, ReplyChannel};
use super::topology::{CHECK_EXCHANGE, DEAD_LETTER_QUEUE, ERROR_HEADER, USAGE_EXCHANGE};
use super::PERSISTENT;
use crate::actors::key_actor::UsageRecorded;
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
    /// Channel in confirm mode: a refused message is acknowledged only once its dead letter is stored.
    pub dead_letters: Channel,
    pub clock: SharedClock,
}

/// Routes a delivery by the exchange the client published to. Called in delivery order: a valid
/// usage event with tokens is registered with its channel's `acks` sequencer before the returned
/// future runs. Everything else (checks, refused or empty events) is settled directly, so a
/// message whose dead letter cannot be stored never holds back the acks behind it; the sequencer
/// learns once that ack or nack is handed to lapin, so its multiple acks never cover one unsettled.
pub fn handle_delivery(
    delivery: Delivery,
    context: Arc<DeliveryContext>,
    acks: &AckSequencer,
) -> impl std::future::Future<Output = ()> + Send + 'static {
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
    // A void (0 tokens naming a hold) must still reach the actor and the table.
    let counted = match &usage {
        Some(Ok(event)) if event.tokens != 0 || event.reservation_id.is_some() => {
            Some(acks.register(delivery.delivery_tag, delivery.acker.clone()))
        }
        _ => None,
    };
    let direct: Option<DirectSettlement> = counted
        .is_none()
        .then(|| acks.direct(delivery.delivery_tag));
    async move {
        match (internal, usage, counted) {
            // A probe only tells this instance it owns the shard, which its arrival already did.
            (Some(InternalRequest::Probe), _, _) => ack(&delivery).await,
            // The rare arms are boxed: a spawned future is as large as its largest arm, and
            // every delivery's task is moved and allocated at that size.
            (Some(InternalRequest::Refresh), _, _) => {
                Box::pin(answer_refresh(delivery, &context)).await
            }
            (Some(InternalRequest::Reservations), _, _) => {
                Box::pin(answer_reservations(delivery, &context)).await
            }
            (None, None, _) => answer_check(delivery, &context).await,
            (None, Some(Ok(event)), Some(ack)) => {
                // The delivery's body moves into the way to refuse it later: no copy per event.
                let ack = ack.with_dead_letter(dead_letter_store(delivery, &context));
                take_usage(event, ack, &context).await
            }
            (None, Some(Ok(_)), None) => {
                metrics::counter!(names::USAGE_EVENTS_TOTAL, "outcome" => "zero").increment(1);
                ack(&delivery).await;
            }
            (None, Some(Err(rejection)), _) => {
                Box::pin(dead_letter(delivery, rejection, &context)).await
            }
        }
        // Every path above has acknowledged or nacked the delivery unless it is a usage event.
        if let Some(direct) = direct {
            direct.settled();
        }
    }
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

/// Counts a valid usage event in its key's memory and hands it to the batch writer.
async fn take_usage(event: UsageEvent, ack: PendingAck, context: &DeliveryContext) {
    let ticket = match context
        .registry
        .record_usage(
            event.api_key_id,
            event.tokens,
            event.occurred_at,
            event.reservation_id.clone(),
        )
        .await
    {
        Ok(UsageRecorded::Pending(ticket)) => Some(ticket),
        Ok(UsageRecorded::WouldOverflow { used }) => {
            let reason = PlanRefusal::CounterOverflow {
                api_key_id: event.api_key_id,
                used,
                delta: event.tokens,
            };
            ack.dead_letter(reason.to_string()).await;
            return;
        }
        // The actor's "unknown" may be a few seconds old (a key just created elsewhere), and a key
        // that could not be loaded may exist: the batch writer decides against the database.
        Ok(UsageRecorded::NotPending | UsageRecorded::UnknownKey) | Err(_) => None,
    };
    context.writer.submit(ConsumedEvent {
        event,
        ticket,
        completion: Box::new(ack),
    });
}

/// Stores the message in `quota.usage.dead` with the reason, then acknowledges the original.
async fn dead_letter(delivery: Delivery, rejection: Rejection, context: &DeliveryContext) {
    let stored = store_dead_letter(
        context.dead_letters.clone(),
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
fn dead_letter_store(delivery: Delivery, context: &DeliveryContext) -> DeadLetterStore {
    let original = DeadLetter {
        data: delivery.data,
        properties: delivery.properties,
        exchange: delivery.exchange,
    };
    let channel = context.dead_letters.clone();
    Box::new(move |reason| Box::pin(store_dead_letter(channel, original, reason)))
}

/// Publishes the message to `quota.usage.dead` with the reason; `true` once the broker confirmed it.
async fn store_dead_letter(channel: Channel, original: DeadLetter, reason: String) -> bool {
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
