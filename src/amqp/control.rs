//! The control link of a broker session: heartbeats between instances, probes of the shard
//! queues, the shard balancer, and requests forwarded to a key's owner over direct reply-to.
//!
//! Every instance publishes a heartbeat (its id and owned shards) to the fanout exchange
//! `quota.control` twice a second and hears everyone's on a queue of its own, so each knows the
//! live instances and what they own. From that, each computes its fair share (`balance`) and
//! hands over what it holds above it while another instance is short; a shard handed over goes
//! to the next waiting consumer, which keeps it or passes it on by the same rule.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::balance::{shards_to_hand_over, MemberView};
use super::ownership::Ownership;
use super::topology::{Layout, CHECK_EXCHANGE};
use crate::readiness::Readiness;

/// Fanout exchange of the instances' heartbeats.
pub const CONTROL_EXCHANGE: &str = "quota.control";
/// Header of a probe: a message whose only job is to reach the active consumer of a shard queue.
const PROBE_HEADER: &str = "x-quota-probe";
/// Header naming an internal command sent to a key's owner through `quota.check`.
const COMMAND_HEADER: &str = "x-quota-command";
/// The command: reload the key from the database (another instance changed it).
const REFRESH_COMMAND: &str = "refresh";
/// The command: list the key's live holds (they live in the owner's memory, SPEC §2.3).
const RESERVATIONS_COMMAND: &str = "reservations";
/// RabbitMQ's pseudo-queue for replies to the consuming channel.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// How often heartbeats, probes and balancing happen.
const ROUND: Duration = Duration::from_millis(500);
/// An instance not heard from for this long has left (killed, or cut off from the broker).
const MEMBER_SILENCE_LIMIT: Duration = Duration::from_secs(3);
/// After handing shards over, heartbeats get this long to show where they went before the next.
const HAND_OVER_COOLDOWN: Duration = Duration::from_secs(2);
/// A probe nobody consumed is dropped by the broker after this many milliseconds.
const PROBE_TTL_MS: &str = "2000";

/// An internal message reaching a shard consumer, told apart from clients' by its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InternalRequest {
    Probe,
    Refresh,
    Reservations,
}

/// The internal request a delivery carries, if any: a probe comes straight to the queue
/// (default exchange), a command through `quota.check`; the same headers on a client's usage
/// event mean nothing, so it is never acknowledged uncounted.
pub fn internal_request(exchange: &str, properties: &BasicProperties) -> Option<InternalRequest> {
    let headers = properties.headers().as_ref()?;
    if exchange.is_empty() && headers.contains_key(PROBE_HEADER) {
        return Some(InternalRequest::Probe);
    }
    match headers.inner().get(COMMAND_HEADER) {
        Some(AMQPValue::LongString(command))
            if exchange == CHECK_EXCHANGE && command.as_bytes() == REFRESH_COMMAND.as_bytes() =>
        {
            Some(InternalRequest::Refresh)
        }
        Some(AMQPValue::LongString(command))
            if exchange == CHECK_EXCHANGE
                && command.as_bytes() == RESERVATIONS_COMMAND.as_bytes() =>
        {
            Some(InternalRequest::Reservations)
        }
        _ => None,
    }
}

/// What an instance says of itself twice a second.
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    instance: String,
    owned: Vec<u16>,
    /// Sent once by an instance that is stopping: forget it now rather than after the silence limit.
    #[serde(default)]
    leaving: bool,
    /// Whether the instance runs the sharded layout (the broker has the plugin).
    #[serde(default = "sharded_by_default")]
    sharded: bool,
}

fn sharded_by_default() -> bool {
    true
}

/// Why the control link ended its session.
#[derive(Debug, thiserror::Error)]
pub enum ControlEnded {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("the broker closed the control consumers")]
    ConsumersClosed,
    #[error("another instance runs the sharded layout: reconnecting to move to it")]
    LayoutChanged,
}

/// Why a request to a key's owner got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("not connected to the broker: the owner of key {0} cannot be asked")]
    NotConnected(i64),
    #[error("the owner of key {0} did not answer within {1} ms")]
    Timeout(i64, u128),
    #[error("the request to the owner of key {0} was not sent: {1}")]
    Broker(i64, lapin::Error),
}

type PendingReplies = Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>;

/// The live part of the forwarder during one broker session.
struct Link {
    channel: Channel,
    pending: PendingReplies,
}

impl Link {
    /// The replies awaited, by correlation id.
    fn pending(&self) -> MutexGuard<'_, HashMap<String, oneshot::Sender<Vec<u8>>>> {
        self.pending
            .lock()
            .expect("the pending-reply map is never held across a panic")
    }

    /// Drops every waiting reply: their requests fail now instead of at their timeout.
    fn fail_pending(&self) {
        self.pending().clear();
    }
}

/// Sends requests to the owner of a key (whichever instance consumes its shard) and waits for
/// the reply. Cheap to clone; lives across broker sessions, connected only during one.
#[derive(Clone, Default)]
pub struct Forwarder {
    link: Arc<Mutex<Option<Arc<Link>>>>,
}

impl Forwarder {
    /// Asks the owner of `api_key_id` a check (`body` as a client would send it); returns the reply body.
    pub async fn check(
        &self,
        api_key_id: i64,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ForwardError> {
        self.request(api_key_id, body, None, timeout).await
    }

    /// Asks the owner of `api_key_id` to reload it from the database; returns once it has.
    pub async fn refresh(&self, api_key_id: i64, timeout: Duration) -> Result<(), ForwardError> {
        let body = serde_json::json!({ "api_key_id": api_key_id }).to_string();
        self.request(
            api_key_id,
            body.into_bytes(),
            Some(REFRESH_COMMAND),
            timeout,
        )
        .await
        .map(|_| ())
    }

    /// Asks the owner of `api_key_id` for its live holds; returns the reply body.
    pub async fn reservations(
        &self,
        api_key_id: i64,
        timeout: Duration,
    ) -> Result<Vec<u8>, ForwardError> {
        let body = serde_json::json!({ "api_key_id": api_key_id }).to_string();
        self.request(
            api_key_id,
            body.into_bytes(),
            Some(RESERVATIONS_COMMAND),
            timeout,
        )
        .await
    }

    async fn request(
        &self,
        api_key_id: i64,
        body: Vec<u8>,
        command: Option<&str>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ForwardError> {
        let link = self
            .current()
            .ok_or(ForwardError::NotConnected(api_key_id))?;
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let (reply_sender, reply) = oneshot::channel();
        link.pending().insert(correlation_id.clone(), reply_sender);
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(correlation_id.as_str().into())
            // Overtakes queued usage events at the owner, as a client's check does.
            .with_priority(1);
        match command {
            Some(command) => {
                let mut headers = FieldTable::default();
                headers.insert(COMMAND_HEADER.into(), AMQPValue::LongString(command.into()));
                properties = properties.with_headers(headers);
            }
            // A check nobody answered in time is not worth answering later; a refresh always is.
            None => {
                properties =
                    properties.with_expiration(timeout.as_millis().to_string().as_str().into())
            }
        }
        let outcome = async {
            link.channel
                .basic_publish(
                    CHECK_EXCHANGE.into(),
                    api_key_id.to_string().as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
                .map_err(|error| ForwardError::Broker(api_key_id, error))?;
            match tokio::time::timeout(timeout, reply).await {
                Ok(Ok(body)) => Ok(body),
                // The session ended and took the pending replies with it.
                Ok(Err(_)) => Err(ForwardError::NotConnected(api_key_id)),
                Err(_) => Err(ForwardError::Timeout(api_key_id, timeout.as_millis())),
            }
        }
        .await;
        link.pending().remove(&correlation_id);
        outcome
    }

    /// The link of the session running now, if one runs.
    fn slot(&self) -> MutexGuard<'_, Option<Arc<Link>>> {
        self.link
            .lock()
            .expect("the forwarder link is never held across a panic")
    }

    fn current(&self) -> Option<Arc<Link>> {
        self.slot().clone()
    }

    fn connect(&self, link: Arc<Link>) {
        *self.slot() = Some(link);
    }

    /// The session ended: requests waiting for a reply fail at once.
    pub fn disconnect(&self) {
        let link = self.slot().take();
        if let Some(link) = link {
            link.fail_pending();
        }
    }

    /// Disconnects `link` if it is still the current one (a later session may have replaced it).
    fn disconnect_link(&self, link: &Arc<Link>) {
        let mut current = self.slot();
        if current
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, link))
        {
            current.take();
        }
        drop(current);
        link.fail_pending();
    }
}

/// The live instances as heard in their heartbeats, this one excluded.
#[derive(Default)]
struct Members {
    heard: HashMap<String, (Instant, Vec<u16>)>,
}

impl Members {
    /// Takes in a heartbeat; an instance of another layout (mid-move to the plugin) is not a
    /// member to balance with: it does not consume these queues.
    fn hear(&mut self, heartbeat: Heartbeat, me: &str, layout: Layout) {
        let same_layout = heartbeat.sharded == matches!(layout, Layout::Sharded(_));
        if heartbeat.instance == me || !same_layout {
            self.heard.remove(&heartbeat.instance);
            return;
        }
        if heartbeat.leaving {
            self.heard.remove(&heartbeat.instance);
        } else {
            self.heard
                .insert(heartbeat.instance, (Instant::now(), heartbeat.owned));
        }
    }

    /// The others heard within the silence limit, forgetting the rest.
    fn live(&mut self) -> Vec<MemberView> {
        self.heard
            .retain(|_, (last_heard, _)| last_heard.elapsed() < MEMBER_SILENCE_LIMIT);
        self.heard
            .iter()
            .map(|(instance, (_, owned))| MemberView {
                instance: instance.clone(),
                owned: owned.len(),
            })
            .collect()
    }

    /// Whether a live instance other than this one says it owns `shard`.
    fn claimed(&self, shard: u16) -> bool {
        self.heard.values().any(|(_, owned)| owned.contains(&shard))
    }
}

/// The control connection of one session.
pub struct ControlLink {
    connection: Connection,
    channel: Channel,
    heartbeats: Consumer,
    replies: Consumer,
    link: Arc<Link>,
    forwarder: Forwarder,
}

impl ControlLink {
    /// Connects, declares the control exchange and this instance's heartbeat queue, starts
    /// consuming heartbeats and direct replies, and connects `forwarder` (before the instance
    /// reports ready, so no request finds it unconnected).
    pub async fn open(
        url: &str,
        instance: &str,
        forwarder: Forwarder,
    ) -> Result<ControlLink, lapin::Error> {
        let connection = Connection::connect(
            url,
            ConnectionProperties::default()
                .with_connection_name(format!("quota-keeper-control-{instance}").as_str().into()),
        )
        .await?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                CONTROL_EXCHANGE.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        // Exclusive and named by the broker: deleted with this connection, so a dead instance
        // leaves no queue behind, and a reconnect never meets its previous session's queue
        // still held (RESOURCE_LOCKED) before the broker has noticed that session is gone.
        let queue: ShortString = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?
            .name()
            .clone();
        channel
            .queue_bind(
                queue.clone(),
                CONTROL_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let heartbeats = channel
            .basic_consume(queue, "".into(), no_ack, FieldTable::default())
            .await?;
        // Replies to forwarded requests reach only the channel that consumes direct reply-to.
        let replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await?;
        let link = Arc::new(Link {
            channel: channel.clone(),
            pending: Mutex::new(HashMap::new()),
        });
        forwarder.connect(Arc::clone(&link));
        Ok(ControlLink {
            connection,
            channel,
            heartbeats,
            replies,
            link,
            forwarder,
        })
    }

    /// Runs heartbeats, probes, balancing and reply dispatch until `stop` or a broker error.
    /// On `stop` it says goodbye first, so the others rebalance without waiting for the silence limit.
    pub async fn run(
        self,
        ownership: Arc<Ownership>,
        layout: Layout,
        readiness: Arc<Readiness>,
        stop: CancellationToken,
    ) -> Result<(), ControlEnded> {
        let ControlLink {
            connection,
            channel,
            mut heartbeats,
            mut replies,
            link,
            forwarder,
        } = self;
        let me = ownership.instance().to_string();
        let mut members = Members::default();
        let mut rounds = tokio::time::interval(ROUND);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cooldown_until = Instant::now();
        let result = loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    let goodbye = Heartbeat {
                        instance: me.clone(),
                        owned: Vec::new(),
                        leaving: true,
                        sharded: matches!(layout, Layout::Sharded(_)),
                    };
                    let _ = publish_heartbeat(&channel, &goodbye).await;
                    break Ok(());
                }
                heard = heartbeats.next() => match heard {
                    Some(Ok(delivery)) => {
                        if let Ok(heartbeat) = serde_json::from_slice::<Heartbeat>(&delivery.data) {
                            // The plugin appeared and another instance moved: follow it, or
                            // this one would wait on a queue nothing is routed to any more.
                            if layout == Layout::Single && heartbeat.sharded && heartbeat.instance != me {
                                break Err(ControlEnded::LayoutChanged);
                            }
                            members.hear(heartbeat, &me, layout);
                        }
                    }
                    Some(Err(error)) => break Err(error.into()),
                    None => break Err(ControlEnded::ConsumersClosed),
                },
                reply = replies.next() => match reply {
                    Some(Ok(delivery)) => {
                        if let Some(correlation_id) = delivery.properties.correlation_id() {
                            let waiting = link.pending()
                                .remove(correlation_id.as_str());
                            if let Some(waiting) = waiting {
                                let _ = waiting.send(delivery.data);
                            }
                        }
                    }
                    Some(Err(error)) => break Err(error.into()),
                    None => break Err(ControlEnded::ConsumersClosed),
                },
                _ = rounds.tick() => {
                    // A hand-off waits for the last commit: not while the database is away.
                    let hand_offs = readiness.database_error().is_none();
                    if let Err(error) = round(&channel, &ownership, layout, hand_offs, &mut members, &mut cooldown_until).await {
                        break Err(error.into());
                    }
                }
            }
        };
        forwarder.disconnect_link(&link);
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            connection.close(200, "session over".into()),
        )
        .await;
        result
    }
}

/// One round: say who we are, probe the shards we do not own, hand over what is above our share,
/// and log what changed.
async fn round(
    channel: &Channel,
    ownership: &Ownership,
    layout: Layout,
    hand_offs: bool,
    members: &mut Members,
    cooldown_until: &mut Instant,
) -> Result<(), lapin::Error> {
    let owned = ownership.owned();
    let me = ownership.instance();
    publish_heartbeat(
        channel,
        &Heartbeat {
            instance: me.to_string(),
            owned: owned.clone(),
            leaving: false,
            sharded: matches!(layout, Layout::Sharded(_)),
        },
    )
    .await?;
    let others = members.live();
    // Only shards nobody claims: at rest no probe is sent. A shard whose owner died is found by
    // its next delivery at once, or by a probe once the dead owner's claim has lapsed.
    for shard in 0..ownership.shard_count() {
        if !ownership.owns(shard) && !members.claimed(shard) {
            probe(channel, &layout.queue(shard), me).await?;
        }
    }
    let hand_over = shards_to_hand_over(
        usize::from(ownership.shard_count()),
        me,
        owned.len(),
        &others,
    );
    // One queue (no plugin) is a hot standby: moving it would only stall it.
    let balancing = hand_offs && layout.shard_count() > 1;
    if balancing && hand_over > 0 && Instant::now() >= *cooldown_until {
        // The highest shards go first: any choice balances, a fixed one keeps logs readable.
        for shard in owned.iter().rev().take(hand_over) {
            ownership.request_hand_over(*shard);
        }
        *cooldown_until = Instant::now() + HAND_OVER_COOLDOWN;
    }
    let (gained, lost) = ownership.take_changes();
    if !gained.is_empty() {
        tracing::info!(shards = ?gained, owned = ?ownership.owned(), instances = others.len() + 1, "took over shards");
    }
    if !lost.is_empty() {
        tracing::info!(shards = ?lost, owned = ?ownership.owned(), instances = others.len() + 1, "handed over or lost shards");
    }
    Ok(())
}

async fn publish_heartbeat(channel: &Channel, heartbeat: &Heartbeat) -> Result<(), lapin::Error> {
    let body = serde_json::to_vec(heartbeat).expect("a heartbeat always serializes");
    channel
        .basic_publish(
            CONTROL_EXCHANGE.into(),
            "".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_expiration(PROBE_TTL_MS.into()),
        )
        .await?;
    Ok(())
}

/// Publishes a probe straight to `queue`: only its active consumer receives it.
pub async fn probe(channel: &Channel, queue: &str, me: &str) -> Result<(), lapin::Error> {
    let mut headers = FieldTable::default();
    headers.insert(PROBE_HEADER.into(), AMQPValue::LongString(me.into()));
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default()
                .with_headers(headers)
                .with_priority(1)
                .with_expiration(PROBE_TTL_MS.into()),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_requests_are_told_by_their_headers() {
        let plain = BasicProperties::default();
        assert_eq!(internal_request("", &plain), None);
        let mut headers = FieldTable::default();
        headers.insert(PROBE_HEADER.into(), AMQPValue::LongString("a".into()));
        let probe = plain.clone().with_headers(headers);
        assert_eq!(internal_request("", &probe), Some(InternalRequest::Probe));
        // On a public exchange the header is a client's: no probe, the message is handled as sent.
        assert_eq!(internal_request("quota.usage", &probe), None);
        let mut headers = FieldTable::default();
        headers.insert(
            COMMAND_HEADER.into(),
            AMQPValue::LongString(REFRESH_COMMAND.into()),
        );
        let refresh = plain.clone().with_headers(headers);
        assert_eq!(
            internal_request(CHECK_EXCHANGE, &refresh),
            Some(InternalRequest::Refresh)
        );
        assert_eq!(internal_request("quota.usage", &refresh), None);
        let mut headers = FieldTable::default();
        headers.insert(
            COMMAND_HEADER.into(),
            AMQPValue::LongString(RESERVATIONS_COMMAND.into()),
        );
        assert_eq!(
            internal_request(CHECK_EXCHANGE, &plain.clone().with_headers(headers)),
            Some(InternalRequest::Reservations)
        );
        let mut headers = FieldTable::default();
        headers.insert(COMMAND_HEADER.into(), AMQPValue::LongString("drop".into()));
        assert_eq!(
            internal_request(CHECK_EXCHANGE, &plain.with_headers(headers)),
            None
        );
    }

    #[test]
    fn members_leave_when_they_say_so_and_never_include_me() {
        let mut members = Members::default();
        let beat = |instance: &str, owned: Vec<u16>, leaving| Heartbeat {
            instance: instance.into(),
            owned,
            leaving,
            sharded: true,
        };
        let sharded = Layout::Sharded(4);
        members.hear(beat("me", vec![1], false), "me", sharded);
        members.hear(beat("b", vec![1, 2], false), "me", sharded);
        members.hear(beat("c", vec![], false), "me", sharded);
        let mut live = members.live();
        live.sort_by(|x, y| x.instance.cmp(&y.instance));
        assert_eq!(
            live,
            vec![
                MemberView {
                    instance: "b".into(),
                    owned: 2
                },
                MemberView {
                    instance: "c".into(),
                    owned: 0
                }
            ]
        );
        members.hear(beat("c", vec![], true), "me", sharded);
        assert_eq!(members.live().len(), 1);
        // An instance still on the single queue is no member to balance the shards with.
        members.hear(beat("d", vec![0], false), "me", Layout::Single);
        assert_eq!(members.live().len(), 1);
    }
}
