//! Issue 18, item 6: retained messages are bounded in memory (their bodies stay in the
//! store, a bounded cache holds some), and MQTT publishers are throttled above the
//! memory watermark like AMQP ones. Through a raw MQTT client on loopback.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use mqgate_conformance::mqtt::{Backend, Raw, RawEnd, Target};
use mqgate_mqtt::codec::{
    reason, Ack, AckKind, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version,
};
use mqgate_mqtt::{MqttConfig, RetainedStats};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(500);

const CACHE_MESSAGES: usize = 100;
const CACHE_BYTES: usize = 64 * 1024;
const RETAINED: usize = 2_000;
const BODY: usize = 4 * 1024;

use mqgate_conformance::scenario;

scenario!(
    retained_replaced_and_cleared,
    publisher_held_above_watermark,
    held_publisher_is_not_timed_out
);

mod retained_above_the_cache {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rocks() {
        super::retained_above_the_cache(super::Backend::Rocks).await
    }
}

/// Retained messages are the core's: the cache bounds are core settings.
fn small_cache() -> mqgate_core::CoreConfig {
    mqgate_core::CoreConfig {
        retained_cache_messages: CACHE_MESSAGES,
        retained_cache_bytes: CACHE_BYTES,
        ..mqgate_core::CoreConfig::default()
    }
}

/// The payload of retained message `i`: its number, then a filler that depends on it.
fn payload(i: usize) -> Bytes {
    let mut v = format!("{i:08}").into_bytes();
    v.extend((0..BODY - 8).map(|k| (i + k) as u8));
    Bytes::from(v)
}

fn publish(topic: &str, qos: QoS, pkid: u16, retain: bool, body: Bytes) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        pkid,
        properties: Properties::default(),
        payload: body,
    })
}

async fn expect_puback(c: &mut Raw, pkid: u16) {
    match c.recv(WAIT).await {
        Ok(Packet::Ack(Ack {
            kind: AckKind::PubAck,
            pkid: p,
            ..
        })) if p == pkid => {}
        other => panic!("expected PUBACK {pkid}, got {other:?}"),
    }
}

async fn connect(t: &Target, id: &str) -> Raw {
    let (c, ack) = Raw::connect(t, Raw::connect_packet(Version::V5, id, true)).await;
    assert_eq!(ack.code, 0, "CONNACK");
    c
}

/// SUBSCRIBE at QoS 0 (retained messages come without acknowledgements) and SUBACK.
async fn subscribe(c: &mut Raw, filter: &str) {
    c.send(&Packet::Subscribe(Subscribe {
        pkid: 1,
        properties: Properties::default(),
        filters: vec![(
            filter.into(),
            SubOptions {
                qos: QoS::AtMostOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
        )],
    }))
    .await;
    match c.recv(WAIT).await {
        Ok(Packet::SubAck(_)) => {}
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Retained messages that arrive until `QUIET` passes without one (at most `max`).
async fn retained(c: &mut Raw, max: usize) -> HashMap<String, Bytes> {
    let mut got = HashMap::new();
    while got.len() < max {
        match c.recv(if got.is_empty() { WAIT } else { QUIET }).await {
            Ok(Packet::Publish(p)) => {
                assert!(p.retain, "{} is flagged retained", p.topic);
                assert!(
                    got.insert(p.topic.clone(), p.payload).is_none(),
                    "{} sent twice",
                    p.topic
                );
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(RawEnd::Timeout) => break,
            Err(e) => panic!("subscriber: {e:?}"),
        }
    }
    got
}

fn assert_within_cache(s: RetainedStats) {
    assert!(
        s.cached_messages as usize <= CACHE_MESSAGES,
        "cache holds {} messages (bound {CACHE_MESSAGES})",
        s.cached_messages
    );
    assert!(
        s.cached_bytes as usize <= CACHE_BYTES,
        "cache holds {} bytes (bound {CACHE_BYTES})",
        s.cached_bytes
    );
}

/// Every one of the 2,000 retained messages, with its own payload, to a `#` subscriber.
async fn expect_all_retained(t: &Target, id: &str) {
    let mut s = connect(t, id).await;
    subscribe(&mut s, "ret/#").await;
    let got = retained(&mut s, RETAINED).await;
    assert_eq!(got.len(), RETAINED, "every retained message is delivered");
    for i in 0..RETAINED {
        let body = got.get(&format!("ret/{i}")).expect("retained message");
        assert!(body == &payload(i), "payload of ret/{i}");
    }
}

/// 2,000 retained messages of 4 KiB with a cache of 100 messages / 64 KiB: the cache
/// stays within its bounds, the bodies stay in the store, a wildcard subscriber still
/// gets all of them; after a restart nothing but the index is loaded.
async fn retained_above_the_cache(b: Backend) {
    let Some(mut t) = Target::mqgate_with_core(b, MqttConfig::default(), small_cache()).await
    else {
        return;
    };
    let mut p = connect(&t, "ret-pub").await;
    // In windows below the server's Receive Maximum.
    for window in (0..RETAINED).collect::<Vec<_>>().chunks(500) {
        for &i in window {
            let pkid = (i % 60_000 + 1) as u16;
            p.send(&publish(
                &format!("ret/{i}"),
                QoS::AtLeastOnce,
                pkid,
                true,
                payload(i),
            ))
            .await;
        }
        for &i in window {
            expect_puback(&mut p, (i % 60_000 + 1) as u16).await;
        }
    }
    let s = t.mqtt().expect("in process").retained_stats();
    assert_eq!(s.messages, RETAINED as u64);
    assert_within_cache(s);

    expect_all_retained(&t, "ret-sub-1").await;
    assert_within_cache(t.mqtt().expect("in process").retained_stats());

    drop(p);
    t.restart().await;
    let s = t.mqtt().expect("in process").retained_stats();
    assert_eq!(s.messages, RETAINED as u64, "the index is back");
    assert_eq!(
        (s.cached_messages, s.cached_bytes),
        (0, 0),
        "no body is loaded at start"
    );
    expect_all_retained(&t, "ret-sub-2").await;
    assert_within_cache(t.mqtt().expect("in process").retained_stats());
}

/// Replacing and clearing retained messages, with bodies in and out of the cache, and
/// (RocksDB) across a restart.
async fn retained_replaced_and_cleared(b: Backend) {
    let core = mqgate_core::CoreConfig {
        retained_cache_messages: 2,
        ..mqgate_core::CoreConfig::default()
    };
    let Some(mut t) = Target::mqgate_with_core(b, MqttConfig::default(), core).await else {
        return;
    };
    let mut p = connect(&t, "rc-pub").await;
    let mut pkid = 0;
    let mut put = async |p: &mut Raw, topic: &str, body: &'static [u8]| {
        pkid += 1;
        p.send(&publish(
            topic,
            QoS::AtLeastOnce,
            pkid,
            true,
            Bytes::from_static(body),
        ))
        .await;
        expect_puback(p, pkid).await;
    };
    for i in 0..5 {
        put(&mut p, &format!("rc/{i}"), b"v1").await;
    }
    // Replaced: rc/0 (long evicted from the cache) and rc/4 (cached).
    put(&mut p, "rc/0", b"v2").await;
    put(&mut p, "rc/4", b"v2").await;
    // Cleared: rc/1 (evicted) and rc/0 (cached).
    put(&mut p, "rc/1", b"").await;
    put(&mut p, "rc/0", b"").await;
    // A QoS 0 retained publish is kept too.
    p.send(&publish(
        "rc/5",
        QoS::AtMostOnce,
        0,
        true,
        Bytes::from_static(b"q0"),
    ))
    .await;
    // Ordered behind it on the same connection: once this is acknowledged, so is rc/5.
    put(&mut p, "rc/6", b"v1").await;

    let want: HashMap<String, Bytes> = [
        ("rc/2", "v1"),
        ("rc/3", "v1"),
        ("rc/4", "v2"),
        ("rc/5", "q0"),
        ("rc/6", "v1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Bytes::from_static(v.as_bytes())))
    .collect();
    for round in 0..2 {
        for (n, filter) in ["rc/#", "rc/+"].into_iter().enumerate() {
            let mut s = connect(&t, &format!("rc-sub-{round}-{n}")).await;
            subscribe(&mut s, filter).await;
            assert_eq!(retained(&mut s, 10).await, want, "{filter}, round {round}");
        }
        let mut s = connect(&t, &format!("rc-sub-{round}-exact")).await;
        subscribe(&mut s, "rc/1").await;
        assert_eq!(
            s.recv(QUIET).await.err(),
            Some(RawEnd::Timeout),
            "rc/1 was cleared"
        );
        let stats = t.mqtt().expect("in process").retained_stats();
        assert_eq!(stats.messages, 5);
        assert!(stats.cached_messages <= 2);
        if !t.durable() {
            break;
        }
        drop(p);
        t.restart().await;
        p = connect(&t, "rc-pub").await;
    }
}

/// Above the memory watermark an MQTT connection that has published is no longer read
/// (no PUBACK) until memory falls back; a connection that only consumes goes on.
async fn publisher_held_above_watermark(b: Backend) {
    let Some(t) = Target::mqgate_only(b, MqttConfig::default()).await else {
        return;
    };
    let broker = t.broker().expect("in process").clone();
    let mut sub = connect(&t, "wm-sub").await;
    subscribe(&mut sub, "wm/#").await;
    let mut p = connect(&t, "wm-pub").await;
    p.send(&publish(
        "wm/a",
        QoS::AtLeastOnce,
        1,
        false,
        Bytes::from_static(b"one"),
    ))
    .await;
    expect_puback(&mut p, 1).await;
    assert!(matches!(sub.recv(WAIT).await, Ok(Packet::Publish(m)) if m.payload == "one"));

    // A watermark of one byte: resident memory is above it at once.
    broker.set_memory_high_watermark(Some(1));
    assert!(broker.is_memory_blocked());
    p.send(&publish(
        "wm/a",
        QoS::AtLeastOnce,
        2,
        false,
        Bytes::from_static(b"two"),
    ))
    .await;
    assert_eq!(
        p.recv(Duration::from_secs(1)).await.err(),
        Some(RawEnd::Timeout),
        "no PUBACK while blocked"
    );
    // The consumer-only connection is still read and answered.
    sub.send(&Packet::PingReq).await;
    assert!(matches!(sub.recv(WAIT).await, Ok(Packet::PingResp)));
    assert_eq!(sub.recv(QUIET).await.err(), Some(RawEnd::Timeout));

    // Memory back below the watermark: the publish is read, stored and acknowledged.
    broker.set_memory_high_watermark(None);
    assert!(!broker.is_memory_blocked());
    expect_puback(&mut p, 2).await;
    assert!(matches!(sub.recv(WAIT).await, Ok(Packet::Publish(m)) if m.payload == "two"));

    // Blocked by hand (what AMQP's set_blocked does) holds it too.
    broker.set_publishers_blocked(true);
    p.send(&publish(
        "wm/a",
        QoS::AtLeastOnce,
        3,
        false,
        Bytes::from_static(b"three"),
    ))
    .await;
    assert_eq!(p.recv(QUIET).await.err(), Some(RawEnd::Timeout));
    broker.set_publishers_blocked(false);
    expect_puback(&mut p, 3).await;
}

/// A publisher held above the watermark is not read, so its keep alive waits: it is not
/// timed out however long it is held (the keep-alive sweep kicks it, and it finds itself
/// held), and its clock starts again when it is let go.
async fn held_publisher_is_not_timed_out(b: Backend) {
    let Some(t) = Target::mqgate_only(b, MqttConfig::default()).await else {
        return;
    };
    let broker = t.broker().expect("in process").clone();
    let mut c = Raw::connect_packet(Version::V5, "ka-held", true);
    c.keep_alive = 1; // timed out after 1.5 s without a packet
    let (mut p, ack) = Raw::connect(&t, c).await;
    assert_eq!(ack.code, 0, "CONNACK");
    p.send(&publish(
        "ka/a",
        QoS::AtLeastOnce,
        1,
        false,
        Bytes::from_static(b"one"),
    ))
    .await;
    expect_puback(&mut p, 1).await;

    broker.set_publishers_blocked(true);
    // Three allowances without a packet, held: still connected.
    assert_eq!(
        p.recv(Duration::from_millis(4_500)).await.err(),
        Some(RawEnd::Timeout),
        "a held publisher was timed out"
    );
    broker.set_publishers_blocked(false);
    p.send(&Packet::PingReq).await;
    assert!(matches!(p.recv(WAIT).await, Ok(Packet::PingResp)));

    // Let go and silent: timed out after its allowance.
    let start = std::time::Instant::now();
    let code = p.expect_close(Duration::from_secs(5)).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1_200),
        "closed after {took:?}"
    );
    assert_eq!(code, Some(reason::KEEP_ALIVE_TIMEOUT));
}
