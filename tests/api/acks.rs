//! The ack sequencer against the real broker: a channel's usage deliveries are settled in delivery order.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use quota_keeper::amqp::acks::{AckSequencer, Settlement};

use crate::common::broker::BrokerClient;
use crate::common::{eventually, queue_depths, TestVhost};

const QUEUE: &str = "acks.test";

/// A consuming channel and the three deliveries it received; the channel must stay open (a
/// dropped channel closes and hands its unacknowledged deliveries back).
struct Received {
    connection: Connection,
    channel: Channel,
    _consumer: Consumer,
    deliveries: Vec<Delivery>,
}

async fn three_deliveries(vhost: &TestVhost) -> Received {
    let connection = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .expect("the test vhost accepts guest");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue");
    let publisher = BrokerClient::connect(&vhost.url()).await;
    for body in ["one", "two", "three"] {
        publisher.publish("", QUEUE, body.as_bytes()).await;
    }
    channel
        .basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = channel
        .basic_consume(
            QUEUE.into(),
            "acks-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = Vec::new();
    for _ in 0..3 {
        deliveries.push(consumer.next().await.expect("open").expect("delivery"));
    }
    Received {
        connection,
        channel,
        _consumer: consumer,
        deliveries,
    }
}

/// Returns once the broker has handled every frame sent on `channel` so far: a channel's frames
/// are handled in order, and a passive declare asks the queue itself, after any ack sent before.
async fn broker_took_what_was_sent(channel: &Channel) {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(QUEUE.into(), passive, FieldTable::default())
        .await
        .expect("the test queue exists");
}

async fn unacked_becomes(vhost: &TestVhost, expected: u64) {
    eventually(
        Duration::from_secs(10),
        &format!("{expected} unacknowledged"),
        || async { (queue_depths(&vhost.name, QUEUE).1 == expected).then_some(()) },
    )
    .await;
}

#[actix_web::test]
async fn settlements_go_out_in_delivery_order_and_abandoned_ones_do_not_block() {
    let vhost = TestVhost::create();
    let received = three_deliveries(&vhost).await;
    let sequencer = AckSequencer::start();
    let mut pending: Vec<_> = received
        .deliveries
        .iter()
        .map(|delivery| sequencer.register(delivery.delivery_tag, delivery.acker.clone()))
        .collect();
    let third = pending.pop().expect("three");
    let second = pending.pop().expect("three");
    let first = pending.pop().expect("three");

    // The third is settled first: it waits for the two before it.
    third.settle(Settlement::Ack);
    sequencer.sent().await;
    broker_took_what_was_sent(&received.channel).await;
    assert_eq!(queue_depths(&vhost.name, QUEUE), (0, 3));

    first.settle(Settlement::Ack);
    unacked_becomes(&vhost, 2).await;

    // The second is dropped unsettled: the third goes out, the second stays with the broker.
    drop(second);
    unacked_becomes(&vhost, 1).await;
    let _ = received.connection.close(200, "done".into()).await;
    eventually(
        Duration::from_secs(10),
        "the abandoned one requeued",
        || async { (queue_depths(&vhost.name, QUEUE) == (1, 0)).then_some(()) },
    )
    .await;
}

#[actix_web::test]
async fn a_multiple_ack_never_covers_a_delivery_the_consumer_has_not_settled() {
    let vhost = TestVhost::create();
    let received = three_deliveries(&vhost).await;
    let sequencer = AckSequencer::start();
    let [first, second, third] = &received.deliveries[..] else {
        panic!("three deliveries");
    };
    let first = sequencer.register(first.delivery_tag, first.acker.clone());
    // The second is a check still being answered: the consumer settles it itself.
    let check = sequencer.direct(second.delivery_tag);
    let third = sequencer.register(third.delivery_tag, third.acker.clone());

    third.settle(Settlement::Ack);
    first.settle(Settlement::Ack);
    sequencer.sent().await;
    // The broker takes every ack sent on the connection before its close: an ack of the third
    // that covered the second would leave nothing to requeue.
    let _ = received.connection.close(200, "done".into()).await;
    eventually(
        Duration::from_secs(10),
        "the unanswered check requeued, the usage acknowledged",
        || async { (queue_depths(&vhost.name, QUEUE) == (1, 0)).then_some(()) },
    )
    .await;
    drop(check);
}
