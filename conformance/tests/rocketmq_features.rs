//! RocketMQ features every AMQP and MQTT client reaches without changing the client
//! (issue 13): message keys, producer groups, per-key strict order with competing
//! consumers, reconsume counts, and cancelling delayed messages. The conventions are
//! user headers (an AMQP header, an MQTT 5 user property) with the same names in both
//! protocols; see README.md "RocketMQ features from any client".
//!
//! Each scenario runs on an in-process mqgate on both backends (its AMQP and MQTT
//! listeners). They are mqgate extensions, skipped against an external broker, except
//! `delivery_count_on_requeue`: RabbitMQ's quorum queues have `x-delivery-count`, and
//! that scenario passes against RabbitMQ 3.10 too (`MQGATE_AMQP_URL=...`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use mqgate_conformance::amqp::{test_config, Backend, Target};
use mqgate_conformance::scenario;
use mqgate_core::CoreConfig;
use mqgate_mqtt::codec::{
    self, Ack, AckKind, Connect, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version,
};
use mqgate_store::TopicName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Helpers.

fn uniq(base: &str) -> String {
    mqgate_conformance::mqtt::uniq(base)
}

fn s(v: &str) -> ShortString {
    v.into()
}

fn ls(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(s(k), v.clone());
    }
    t
}

fn header<'a>(d: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
}

fn header_int(d: &lapin::message::Delivery, name: &str) -> Option<i64> {
    match header(d, name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        other => panic!("{name} is not an integer: {other:?}"),
    }
}

/// A target with short retry delays and orderly pauses.
async fn target(b: Backend) -> Option<Target> {
    let core = CoreConfig {
        delay_levels: vec![Duration::from_millis(100); 18],
        orderly_suspend: Duration::from_millis(100),
        ..Default::default()
    };
    Target::mqgate_with_core(b, test_config(), core).await
}

async fn connect_with(t: &Target, props: ConnectionProperties) -> Connection {
    Connection::connect(&t.url_for("guest", "guest", "/"), props)
        .await
        .expect("connect")
}

async fn confirmed(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], headers: FieldTable) {
    ch.basic_publish(
        s(exchange),
        s(key),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
}

async fn declare_queue(ch: &Channel, q: &str, args: FieldTable) {
    ch.queue_declare(
        s(q),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("queue.declare");
}

/// A durable queue bound to `exchange` with `key`.
async fn bound_queue(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    declare_queue(ch, queue, FieldTable::default()).await;
    ch.queue_bind(
        s(queue),
        s(exchange),
        s(key),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn next(c: &mut lapin::Consumer, within: Duration) -> Option<lapin::message::Delivery> {
    match tokio::time::timeout(within, c.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        _ => None,
    }
}

/// A minimal MQTT 5 client on mqgate's codec, to set user properties and send
/// failed-consumption reason codes.
struct Mqtt {
    stream: TcpStream,
    buf: BytesMut,
}

impl Mqtt {
    async fn connect(t: &Target, client_id: &str, user: Vec<(String, String)>) -> Mqtt {
        let (host, port) = t.mqtt_addr().expect("an MQTT listener");
        let stream = TcpStream::connect((host.as_str(), port))
            .await
            .expect("connect");
        stream.set_nodelay(true).ok();
        let mut m = Mqtt {
            stream,
            buf: BytesMut::new(),
        };
        let properties = Properties {
            user,
            ..Default::default()
        };
        m.send(&Packet::Connect(Box::new(Connect {
            version: Version::V5,
            clean_start: true,
            keep_alive: 30,
            properties,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
        })))
        .await;
        match m.recv(WAIT).await {
            Some(Packet::ConnAck(a)) => assert_eq!(a.code, 0, "CONNACK"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        m
    }

    async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        codec::encode(p, Version::V5, &mut out);
        self.stream.write_all(&out).await.expect("write");
    }

    async fn recv(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Some(Version::V5), codec::MAX_PACKET_SIZE)
                .expect("decodable")
            {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// The next PUBLISH (other packets skipped).
    async fn publish_in(&mut self, within: Duration) -> Option<Publish> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await? {
                Packet::Publish(p) => return Some(p),
                _ => continue,
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, user: Vec<(String, String)>) {
        let properties = Properties {
            user,
            ..Default::default()
        };
        self.send(&Packet::Subscribe(Subscribe {
            pkid: 1,
            properties,
            filters: vec![(
                filter.into(),
                SubOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                },
            )],
        }))
        .await;
        match self.recv(WAIT).await {
            Some(Packet::SubAck(a)) => assert_eq!(a.codes, vec![1], "SUBACK of {filter}"),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    fn publish_packet(topic: &str, pkid: u16, body: &[u8], user: Vec<(String, String)>) -> Packet {
        let properties = Properties {
            user,
            ..Default::default()
        };
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            pkid,
            properties,
            payload: Bytes::copy_from_slice(body),
        })
    }

    /// Publish at QoS 1 and wait for the PUBACK.
    async fn publish(&mut self, topic: &str, body: &[u8], user: Vec<(String, String)>) {
        self.send(&Self::publish_packet(topic, 1, body, user)).await;
        loop {
            match self.recv(WAIT).await {
                Some(Packet::Ack(a)) if a.kind == AckKind::PubAck => {
                    assert!(a.reason < 0x80, "PUBACK {:#x}", a.reason);
                    return;
                }
                Some(_) => {}
                None => panic!("no PUBACK"),
            }
        }
    }

    async fn ack(&mut self, pkid: u16, reason: u8) {
        self.send(&Packet::Ack(Ack {
            kind: AckKind::PubAck,
            pkid,
            reason,
            properties: Properties::default(),
        }))
        .await;
    }
}

fn user(entries: &[(&str, &str)]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn user_prop<'a>(p: &'a Publish, name: &str) -> Option<&'a str> {
    p.properties
        .user
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------
// Message keys and producer groups.

scenario!(message_keys_find_messages, producer_groups_are_counted);

/// `x-keys` (AMQP header, MQTT 5 user property): the message is found by each key under
/// its address (the AMQP exchange, the MQTT topic), and consumers still get the header.
async fn message_keys_find_messages(b: Backend) {
    let Some(t) = target(b).await else { return };
    let conn = t.connect().await;
    let ch = confirmed(&conn).await;
    let ex = uniq("keys.ex");
    let q = uniq("keys.q");
    ch.exchange_declare(
        s(&ex),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    bound_queue(&ch, &q, &ex, "k").await;
    publish(
        &ch,
        &ex,
        "k",
        b"order one",
        table(&[("x-keys", ls("order-1 cust-7"))]),
    )
    .await;
    publish(&ch, &ex, "k", b"no keys", FieldTable::default()).await;
    // An MQTT publish is stored when something subscribes to its topic.
    let topic = uniq("keys/mqtt");
    let mq = uniq("keys.mq");
    bound_queue(&ch, &mq, "amq.topic", &topic.replace('/', ".")).await;
    let mut m = Mqtt::connect(&t, &uniq("kp"), Vec::new()).await;
    m.publish(&topic, b"order two", user(&[("x-keys", "order-2")]))
        .await;

    let broker = t.broker().unwrap();
    let by = |topic: String, key: &'static str| async move {
        broker
            .messages_by_key(&TopicName::new(&topic).unwrap(), key, 10)
            .await
            .unwrap()
    };
    for key in ["order-1", "cust-7"] {
        let found = by(ex.clone(), key).await;
        assert_eq!(found.len(), 1, "AMQP message by key {key}");
        assert_eq!(&found[0].message.body[..], b"order one");
        assert_eq!(found[0].message.keys, vec!["order-1", "cust-7"]);
    }
    assert!(
        by(ex.clone(), "order-2").await.is_empty(),
        "keys are per topic"
    );
    let found = by(topic.clone(), "order-2").await;
    assert_eq!(found.len(), 1, "MQTT message by key");
    assert_eq!(&found[0].message.body[..], b"order two");

    // The consumer sees the header as published.
    let mut c = ch
        .basic_consume(
            s(&q),
            s(""),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = next(&mut c, WAIT).await.expect("delivery");
    assert_eq!(header(&d, "x-keys"), Some(&ls("order-1 cust-7")));
}

/// Producer groups: the AMQP client property `producer_group`, the `x-producer-group`
/// header / user property (per message, overriding the connection's).
async fn producer_groups_are_counted(b: Backend) {
    let Some(t) = target(b).await else { return };
    let conn = connect_with(
        &t,
        ConnectionProperties::default().with_client_property(s("producer_group"), "billing".into()),
    )
    .await;
    let ch = confirmed(&conn).await;
    let ex = uniq("pg.ex");
    ch.exchange_declare(
        s(&ex),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let q = uniq("pg.q");
    bound_queue(&ch, &q, &ex, "").await;
    for i in 0..3 {
        publish(
            &ch,
            &ex,
            "",
            format!("b{i}").as_bytes(),
            FieldTable::default(),
        )
        .await;
    }
    publish(
        &ch,
        &ex,
        "",
        b"r",
        table(&[("x-producer-group", ls("refunds"))]),
    )
    .await;
    let topic = uniq("pg/mqtt");
    let mqtt_q = uniq("pg.mq");
    bound_queue(&ch, &mqtt_q, "amq.topic", &topic.replace('/', ".")).await;
    let mut m = Mqtt::connect(&t, &uniq("pgp"), Vec::new()).await;
    m.publish(&topic, b"s", user(&[("x-producer-group", "sensors")]))
        .await;
    // MQTT 5: a CONNECT user property names the connection's group.
    let mut meters = Mqtt::connect(&t, &uniq("pgm"), user(&[("x-producer-group", "meters")])).await;
    meters.publish(&topic, b"m1", Vec::new()).await;
    meters.publish(&topic, b"m2", Vec::new()).await;

    let broker = t.broker().unwrap();
    let count = |topic: &str, group: &str| {
        broker
            .producer_stats()
            .into_iter()
            .find(|p| p.topic.as_str() == topic && p.producer_group == group)
            .map_or(0, |p| p.messages)
    };
    // Counted once per message under the address it was published to (the exchange,
    // the MQTT topic), not per queue reached.
    assert_eq!(count(&ex, "billing"), 3, "{:?}", broker.producer_stats());
    assert_eq!(count(&ex, "refunds"), 1);
    assert_eq!(count(&topic, "sensors"), 1);
    assert_eq!(count(&topic, "meters"), 2);
    let qt = mqgate_amqp::queue::queue_topic("/", &q).0;
    // And each stored message names its group.
    let stored = broker
        .peek(
            &mqgate_store::QueueRef::new(qt, 0),
            mqgate_store::QueueOffset(0),
            mqgate_store::ReadLimits::count(10),
        )
        .await
        .unwrap();
    let groups: Vec<&str> = stored
        .iter()
        .map(|m| m.message.message.producer_group.as_ref())
        .collect();
    assert_eq!(groups, ["billing", "billing", "billing", "refunds"]);
}

// ---------------------------------------------------------------------------------------
// Reconsume counts.

scenario!(
    delivery_count_on_requeue,
    delivery_count_through_the_retry_ladder,
    mqtt_delivery_count_user_property,
    replay_leaves_retries_alone,
    single_active_consumer_gets_its_retries
);

/// RabbitMQ quorum queues' `x-delivery-count`: absent on the first delivery, then how
/// many times the message was delivered before. Passes against RabbitMQ 3.10 too.
async fn delivery_count_on_requeue(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = confirmed(&conn).await;
    let q = uniq("dc.q");
    declare_queue(&ch, &q, table(&[("x-queue-type", ls("quorum"))])).await;
    publish(&ch, "", &q, b"again", FieldTable::default()).await;
    let mut c = ch
        .basic_consume(
            s(&q),
            s(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = next(&mut c, WAIT).await.expect("first delivery");
    assert!(!d.redelivered);
    assert_eq!(header(&d, "x-delivery-count"), None, "first delivery");
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .await
    .unwrap();
    for want in 1..=2 {
        let d = next(&mut c, WAIT).await.expect("redelivery");
        assert!(d.redelivered);
        assert_eq!(header_int(&d, "x-delivery-count"), Some(want));
        if want < 2 {
            d.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
        } else {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    ch.queue_delete(s(&q), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// With `x-retry-policy: rocketmq` a rejected message comes back through the retry
/// topic: its count says how many times it was consumed before (RocketMQ's reconsume
/// times), growing with each failure.
async fn delivery_count_through_the_retry_ladder(b: Backend) {
    let Some(t) = target(b).await else { return };
    let conn = t.connect().await;
    let ch = confirmed(&conn).await;
    let q = uniq("dcr.q");
    declare_queue(&ch, &q, table(&[("x-retry-policy", ls("rocketmq"))])).await;
    publish(&ch, "", &q, b"retry me", FieldTable::default()).await;
    let mut c = ch
        .basic_consume(
            s(&q),
            s(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for want in 0..3 {
        let d = next(&mut c, WAIT).await.expect("delivery");
        assert_eq!(&d.data[..], b"retry me");
        let got = header_int(&d, "x-delivery-count");
        assert_eq!(got, (want > 0).then_some(want), "attempt {want}");
        if want < 2 {
            d.reject(BasicRejectOptions { requeue: false })
                .await
                .unwrap();
        } else {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
}

/// A single-active-consumer queue with the retry ladder: the active consumer gets the
/// retries too, and the other consumer stays idle (it used to own the retry queue, so two
/// consumers were active).
async fn single_active_consumer_gets_its_retries(b: Backend) {
    let Some(t) = target(b).await else { return };
    let conn = t.connect().await;
    let ch = confirmed(&conn).await;
    let q = uniq("sacr.q");
    declare_queue(
        &ch,
        &q,
        table(&[
            ("x-retry-policy", ls("rocketmq")),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ]),
    )
    .await;
    let consume = |ch: Channel, tag: &'static str| {
        let q = q.clone();
        async move {
            ch.basic_consume(
                s(&q),
                s(tag),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap()
        }
    };
    let mut active = consume(conn.create_channel().await.unwrap(), "first").await;
    let mut idle = consume(conn.create_channel().await.unwrap(), "second").await;
    publish(&ch, "", &q, b"fails once", FieldTable::default()).await;
    let d = next(&mut active, WAIT)
        .await
        .expect("to the active consumer");
    d.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let again = next(&mut active, WAIT)
        .await
        .expect("its retry, to the active consumer");
    assert_eq!(&again.data[..], b"fails once");
    again.ack(BasicAckOptions::default()).await.unwrap();
    assert!(
        next(&mut idle, Duration::from_millis(500)).await.is_none(),
        "the other consumer stays idle"
    );
}

/// A replay (`x-stream-offset` on a queue) moves the group on its queue, not on its
/// `%RETRY%` queue: a failed message whose retry is due, waiting for a consumer, is still
/// delivered after a consumer replays from an offset past it (it used to be skipped with
/// the rest: the offset was applied to the retry queue too).
async fn replay_leaves_retries_alone(b: Backend) {
    let Some(t) = target(b).await else { return };
    let conn = t.connect().await;
    let ch = confirmed(&conn).await;
    let q = uniq("rra.q");
    declare_queue(&ch, &q, table(&[("x-retry-policy", ls("rocketmq"))])).await;
    publish(&ch, "", &q, b"fails once", FieldTable::default()).await;
    {
        let cch = conn.create_channel().await.expect("channel");
        let mut c = cch
            .basic_consume(
                s(&q),
                s(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let d = next(&mut c, WAIT).await.expect("delivery");
        d.reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
        cch.close(200, s("bye")).await.unwrap();
    }
    // Its retry is due (100 ms here) while nobody consumes.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut c = ch
        .basic_consume(
            s(&q),
            s(""),
            BasicConsumeOptions::default(),
            table(&[("x-stream-offset", AMQPValue::LongLongInt(1))]),
        )
        .await
        .unwrap();
    let d = next(&mut c, WAIT)
        .await
        .expect("the retry, still delivered");
    assert_eq!(&d.data[..], b"fails once");
    assert_eq!(header_int(&d, "x-delivery-count"), Some(1));
    d.ack(BasicAckOptions::default()).await.unwrap();
}

/// MQTT 5: a shared subscriber that fails a message (PUBACK 0x80) gets it again with the
/// user property `x-delivery-count`.
async fn mqtt_delivery_count_user_property(b: Backend) {
    let Some(t) = target(b).await else { return };
    let topic = uniq("dc/mqtt");
    let mut sub = Mqtt::connect(&t, &uniq("dcs"), Vec::new()).await;
    sub.subscribe(&format!("$share/{}/{topic}", uniq("g")), Vec::new())
        .await;
    let mut p = Mqtt::connect(&t, &uniq("dcp"), Vec::new()).await;
    p.publish(&topic, b"m", Vec::new()).await;
    for want in 0..3u32 {
        let m = sub.publish_in(WAIT).await.expect("delivery");
        let got = user_prop(&m, "x-delivery-count");
        assert_eq!(
            got.map(|v| v.parse::<u32>().unwrap()),
            (want > 0).then_some(want),
            "attempt {want}"
        );
        sub.ack(m.pkid, if want < 2 { 0x80 } else { 0 }).await;
    }
}

// ---------------------------------------------------------------------------------------
// Per-key strict order with competing consumers.

scenario!(orderly_amqp_queue, orderly_mqtt_shared_subscription);

/// What the consumers of an orderly scenario saw.
#[derive(Default)]
struct OrderLog {
    /// Per key: the last sequence number handled.
    last: HashMap<String, u64>,
    /// Keys a consumer is handling now.
    busy: HashSet<String>,
    /// Messages handled (acknowledged).
    done: u64,
    /// Out of order, duplicated, or handled twice at once.
    violations: Vec<String>,
    /// Per consumer: messages handled.
    per_consumer: HashMap<usize, u64>,
    /// The poison message was failed once.
    failed_once: bool,
}

impl OrderLog {
    /// A consumer starts handling `key`/`seq`: must be the key's next, and the key idle.
    fn start(&mut self, consumer: usize, key: &str, seq: u64) {
        if !self.busy.insert(key.to_owned()) {
            self.violations
                .push(format!("{key}: two messages at once (seq {seq})"));
        }
        let last = self.last.get(key).copied();
        let want = last.map_or(0, |l| l + 1);
        if seq != want {
            self.violations.push(format!(
                "{key}: got {seq} after {last:?} (consumer {consumer})"
            ));
        }
    }

    /// Done with it: `ok` acknowledged, else failed (to be retried in place).
    fn finish(&mut self, consumer: usize, key: &str, seq: u64, ok: bool) {
        self.busy.remove(key);
        if ok {
            self.last.insert(key.to_owned(), seq);
            self.done += 1;
            *self.per_consumer.entry(consumer).or_default() += 1;
        }
    }
}

fn parse_body(b: &[u8]) -> (String, u64) {
    let s = std::str::from_utf8(b).expect("utf8");
    let (k, q) = s.rsplit_once(':').expect("key:seq");
    (k.to_owned(), q.parse().expect("seq"))
}

const ORDERLY_CONSUMERS: usize = 4;

fn orderly_size() -> (u64, u64) {
    let n = std::env::var("MQGATE_ORDERLY_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    (n, 1_000)
}

/// An AMQP queue with `x-orderly: true`: four consumers share it; each key's messages
/// (`x-sharding-key`) are handled in publish order and one at a time, a failed message
/// is retried in place (nothing of its key overtakes it), and a consumer that leaves
/// midway hands its keys over without reordering. Published in bursts, then paced.
async fn orderly_amqp_queue(b: Backend) {
    let Some(t) = target(b).await else { return };
    let (n, keys) = orderly_size();
    let conn = t.connect().await;
    let ch = confirmed(&conn).await;
    let q = uniq("orderly.q");
    declare_queue(
        &ch,
        &q,
        table(&[
            ("x-orderly", AMQPValue::Boolean(true)),
            ("x-queues", AMQPValue::LongInt(16)),
        ]),
    )
    .await;
    // Redeclaring with other logs is inequivalent; basic.get is refused.
    let ch2 = conn.create_channel().await.unwrap();
    let e = ch2
        .queue_declare(
            s(&q),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[
                ("x-orderly", AMQPValue::Boolean(true)),
                ("x-queues", AMQPValue::LongInt(8)),
            ]),
        )
        .await
        .expect_err("inequivalent x-queues");
    assert!(
        e.to_string().contains("406") || e.to_string().contains("PRECONDITION"),
        "{e}"
    );
    let ch3 = conn.create_channel().await.unwrap();
    let e = ch3
        .basic_get(s(&q), BasicGetOptions::default())
        .await
        .expect_err("basic.get on an orderly queue");
    assert!(
        e.to_string().contains("406") || e.to_string().contains("PRECONDITION"),
        "{e}"
    );

    let log = Arc::new(Mutex::new(OrderLog::default()));
    let poison = format!("k{}:{}", 7, 3);
    let leaver = ORDERLY_CONSUMERS - 1;
    let mut tasks = Vec::new();
    for i in 0..ORDERLY_CONSUMERS {
        let cconn = t.connect().await;
        let cch = cconn.create_channel().await.unwrap();
        cch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
        let mut c = cch
            .basic_consume(
                s(&q),
                s(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let log = Arc::clone(&log);
        let poison = poison.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                // The leaver goes once a third is handled (between two messages: what
                // it holds unhandled goes back to its queues' new owners).
                if i == leaver && log.lock().unwrap().done >= n / 3 {
                    drop(c);
                    cconn.close(200, "leaving".into()).await.ok();
                    return;
                }
                let Some(d) = next(&mut c, Duration::from_secs(1)).await else {
                    if log.lock().unwrap().done >= n {
                        return;
                    }
                    continue;
                };
                let (key, seq) = parse_body(&d.data);
                let fail = {
                    let mut l = log.lock().unwrap();
                    l.start(i, &key, seq);
                    let fail = !l.failed_once && format!("{key}:{seq}") == poison;
                    l.failed_once |= fail;
                    fail
                };
                if fail {
                    log.lock().unwrap().finish(i, &key, seq, false);
                    d.nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                } else {
                    log.lock().unwrap().finish(i, &key, seq, true);
                    d.ack(BasicAckOptions::default()).await.unwrap();
                }
            }
        }));
    }
    // Publish: bursts of 1,000 confirmed together, the last 500 one at a time.
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    let paced_from = n.saturating_sub(500);
    let mut pending = Vec::new();
    for i in 0..n {
        let k = i % keys;
        let seq = {
            let e = seqs.entry(k).or_default();
            *e += 1;
            *e - 1
        };
        let key = format!("k{k}");
        let body = format!("{key}:{seq}");
        let confirm = ch
            .basic_publish(
                s(""),
                s(&q),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(table(&[("x-sharding-key", ls(&key))])),
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() == 1_000 || i >= paced_from {
            for c in pending.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in pending {
        c.await.expect("confirm");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (done, bad) = {
            let l = log.lock().unwrap();
            (l.done, l.violations.len())
        };
        assert_eq!(bad, 0, "{:?}", log.lock().unwrap().violations);
        if done >= n {
            break;
        }
        assert!(Instant::now() < deadline, "handled {done} of {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    let l = log.lock().unwrap();
    assert!(l.violations.is_empty(), "{:?}", l.violations);
    assert!(l.failed_once, "the poison message was failed once");
    assert_eq!(l.done, n, "every message handled once");
    assert_eq!(l.last.len() as u64, keys);
    for (k, last) in &l.last {
        assert_eq!(*last, seqs[&k[1..].parse::<u64>().unwrap()] - 1, "{k}");
    }
    let busy = l.per_consumer.values().filter(|v| **v > 0).count();
    assert_eq!(
        busy, ORDERLY_CONSUMERS,
        "every consumer took a share: {:?}",
        l.per_consumer
    );
}

/// An MQTT 5 shared subscription with `x-orderly: true`: members split the work, each
/// MQTT topic's messages (the default key) and each `x-sharding-key`'s are handled in
/// order and one at a time; a failed message (PUBACK 0x80) is retried in place.
async fn orderly_mqtt_shared_subscription(b: Backend) {
    let Some(t) = target(b).await else { return };
    let n: u64 = 4_000;
    let keys: u64 = 200;
    let base = uniq("ord");
    let group = uniq("og");
    let filter = format!("$share/{group}/{base}/#");
    let log = Arc::new(Mutex::new(OrderLog::default()));
    let mut tasks = Vec::new();
    let poison = "t8:2".to_owned();
    for i in 0..ORDERLY_CONSUMERS {
        let mut m = Mqtt::connect(&t, &uniq("om"), Vec::new()).await;
        m.subscribe(&filter, user(&[("x-orderly", "true")])).await;
        let log = Arc::clone(&log);
        let poison = poison.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(p) = m.publish_in(Duration::from_secs(1)).await else {
                    if log.lock().unwrap().done >= n {
                        return;
                    }
                    continue;
                };
                let (key, seq) = parse_body(&p.payload);
                let fail = {
                    let mut l = log.lock().unwrap();
                    l.start(i, &key, seq);
                    let fail = !l.failed_once && format!("{key}:{seq}") == poison;
                    l.failed_once |= fail;
                    l.finish(i, &key, seq, !fail);
                    fail
                };
                m.ack(p.pkid, if fail { 0x80 } else { 0 }).await;
            }
        }));
    }
    // Half the keys are topics (`<base>/t<k>`), half are x-sharding-keys on one topic.
    let mut p = Mqtt::connect(&t, &uniq("op"), Vec::new()).await;
    let mut seqs: HashMap<String, u64> = HashMap::new();
    let mut in_flight = 0u16;
    for i in 0..n {
        let k = i % keys;
        let (topic, key, props) = if k.is_multiple_of(2) {
            (format!("{base}/t{k}"), format!("t{k}"), Vec::new())
        } else {
            let key = format!("s{k}");
            (
                format!("{base}/shared"),
                key.clone(),
                user(&[("x-sharding-key", key.as_str())]),
            )
        };
        let seq = {
            let e = seqs.entry(key.clone()).or_default();
            *e += 1;
            *e - 1
        };
        let pkid = (i % 60_000) as u16 + 1;
        p.send(&Mqtt::publish_packet(
            &topic,
            pkid,
            format!("{key}:{seq}").as_bytes(),
            props,
        ))
        .await;
        in_flight += 1;
        // Bursts of 100 in flight, then the last 200 one at a time.
        let window = if i + 200 >= n { 1 } else { 100 };
        while in_flight >= window {
            match p.recv(WAIT).await {
                Some(Packet::Ack(a)) if a.kind == AckKind::PubAck => in_flight -= 1,
                Some(_) => {}
                None => panic!("PUBACKs stopped"),
            }
        }
    }
    while in_flight > 0 {
        match p.recv(WAIT).await {
            Some(Packet::Ack(a)) if a.kind == AckKind::PubAck => in_flight -= 1,
            Some(_) => {}
            None => panic!("PUBACKs stopped"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = log.lock().unwrap().done;
        if done >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "handled {done} of {n}; {:?}",
            log.lock().unwrap().violations
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    let l = log.lock().unwrap();
    assert!(l.violations.is_empty(), "{:?}", l.violations);
    assert!(l.failed_once);
    assert_eq!(l.done, n);
    for (k, last) in &l.last {
        assert_eq!(*last, seqs[k] - 1, "{k}");
    }
    assert_eq!(
        l.per_consumer.len(),
        ORDERLY_CONSUMERS,
        "every member took a share: {:?}",
        l.per_consumer
    );
}

// ---------------------------------------------------------------------------------------
// Cancelling delayed messages.

scenario!(cancel_delayed_messages);

/// A delayed message is cancelled by key (AMQP and MQTT) or by id before it is due: it
/// is never delivered; the others are. The cancellation survives a restart (RocksDB).
async fn cancel_delayed_messages(b: Backend) {
    let Some(mut t) = target(b).await else { return };
    let conn = t.connect().await;
    let ch = confirmed(&conn).await;
    let ex = uniq("cd.ex");
    let q = uniq("cd.q");
    ch.exchange_declare(
        s(&ex),
        ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[("x-delayed-type", ls("direct"))]),
    )
    .await
    .unwrap();
    bound_queue(&ch, &q, &ex, "k").await;
    let delay = |ms: i32, keys: Option<&str>| {
        let mut h = table(&[("x-delay", AMQPValue::LongInt(ms))]);
        if let Some(k) = keys {
            h.insert(s("x-keys"), ls(k));
        }
        h
    };
    publish(
        &ch,
        &ex,
        "k",
        b"cancel me",
        delay(2_500, Some("cancel-me order-9")),
    )
    .await;
    publish(
        &ch,
        &ex,
        "k",
        b"cancel me too",
        delay(2_500, Some("cancel-me")),
    )
    .await;
    publish(&ch, &ex, "k", b"keep me", delay(2_500, Some("keep-me"))).await;
    publish(&ch, &ex, "k", b"by id", delay(2_500, None)).await;
    // MQTT: `$delayed/<s>/<topic>` with x-keys, seen by an AMQP queue on amq.topic.
    let topic = uniq("cd/mqtt");
    let mq = uniq("cd.mq");
    bound_queue(&ch, &mq, "amq.topic", &topic.replace('/', ".")).await;
    let mut m = Mqtt::connect(&t, &uniq("cdp"), Vec::new()).await;
    m.publish(
        &format!("$delayed/2/{topic}"),
        b"mqtt cancel",
        user(&[("x-keys", "m-cancel")]),
    )
    .await;
    m.publish(
        &format!("$delayed/2/{topic}"),
        b"mqtt keep",
        user(&[("x-keys", "m-keep")]),
    )
    .await;
    drop(m);

    let broker = t.broker().unwrap().clone();
    let page = broker.delayed(None, 100, Some(&ex), None).await.unwrap();
    assert_eq!(page.timers.len(), 4, "{:?}", page.timers);
    let keyed = broker
        .delayed(None, 100, Some(&ex), Some("cancel-me"))
        .await
        .unwrap();
    assert_eq!(keyed.timers.len(), 2);
    assert_eq!(
        broker
            .cancel_delayed_by_key(&ex, "cancel-me")
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        broker.cancel_delayed_by_key(&ex, "order-9").await.unwrap(),
        0,
        "already cancelled under its other key"
    );
    assert_eq!(
        broker
            .cancel_delayed_by_key(&topic, "m-cancel")
            .await
            .unwrap(),
        1
    );
    let by_id = broker
        .delayed(None, 100, Some(&ex), None)
        .await
        .unwrap()
        .timers
        .into_iter()
        .find(|d| d.keys.is_empty())
        .expect("the keyless one");
    assert!(broker.cancel_delayed(by_id.id).await.unwrap());
    assert!(!broker.cancel_delayed(by_id.id).await.unwrap(), "only once");
    let left = broker.delayed(None, 100, Some(&ex), None).await.unwrap();
    assert_eq!(left.timers.len(), 1, "{:?}", left.timers);
    assert_eq!(left.timers[0].keys, vec!["keep-me"]);
    drop(broker);
    drop(ch);
    drop(conn);
    if t.durable() {
        t.restart().await;
    }
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    for queue in [&q, &mq] {
        let mut c = ch
            .basic_consume(
                s(queue),
                s(""),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let first = next(&mut c, Duration::from_secs(6))
            .await
            .unwrap_or_else(|| panic!("the kept one, from {queue}"));
        got.push(String::from_utf8_lossy(&first.data).into_owned());
        // Nothing else arrives after the due time.
        if let Some(more) = next(&mut c, Duration::from_millis(1_000)).await {
            panic!(
                "cancelled message delivered: {:?}",
                String::from_utf8_lossy(&more.data)
            );
        }
    }
    assert_eq!(got, ["keep me", "mqtt keep"]);
    let broker = t.broker().unwrap();
    let left = broker.delayed(None, 100, Some(&ex), None).await.unwrap();
    assert!(left.timers.is_empty(), "{:?}", left.timers);
}
