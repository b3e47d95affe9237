//! Limits an unauthenticated client meets: how much of a CONNECT it can make the broker
//! hold, and how fast it can guess passwords (MQTT and AMQP share one throttle).

use std::time::{Duration, Instant};

use bytes::Bytes;
use mqgate_conformance::mqtt::{Backend, Raw, RawEnd, Target};
use mqgate_mqtt::codec::{QoS, Version, Will};
use mqgate_mqtt::MqttConfig;

use mqgate_conformance::scenario;

scenario!(
    connect_claiming_a_megabyte_is_refused_at_once,
    wrong_mqtt_passwords_are_answered_later_and_later,
    wrong_amqp_passwords_are_answered_later_and_later,
);

/// A CONNECT that announces 1 MiB (the packet limit) used to be buffered for up to the
/// connect timeout; now anything over `max_connect_size` (64 KiB) closes at once, and a
/// CONNECT with a will of a few KiB is still fine.
async fn connect_claiming_a_megabyte_is_refused_at_once(b: Backend) {
    let Some(t) = Target::mqgate_only(b, MqttConfig::default()).await else {
        return;
    };
    let mut raw = Raw::open(&t, Version::V311).await;
    // CONNECT, remaining length 1,048,000 (varint), then a few bytes of it.
    raw.send_bytes(&[0x10, 0xC0, 0xFB, 0x3F, 0, 4, b'M', b'Q', b'T', b'T', 4, 2])
        .await;
    let started = Instant::now();
    assert_eq!(
        raw.recv(Duration::from_secs(5)).await,
        Err(RawEnd::Closed),
        "closed, without waiting for the rest"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    let mut c = Raw::connect_packet(Version::V311, "big-will", true);
    c.will = Some(Will {
        topic: "wills/big".into(),
        payload: Bytes::from(vec![b'w'; 4096]),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let (_raw, ack) = Raw::connect(&t, c).await;
    assert_eq!(ack.code, 0, "a CONNECT with a 4 KiB will is accepted");
}

fn with_user(client: &str, user: &str, pass: &str) -> mqgate_mqtt::codec::Connect {
    let mut c = Raw::connect_packet(Version::V5, client, true);
    c.username = Some(user.into());
    c.password = Some(Bytes::from(pass.to_owned()));
    c
}

/// Each wrong password from the same address (or for the same user) doubles the delay
/// before the refusal: 200 ms, 400 ms, 800 ms, ... (the defaults).
async fn wrong_mqtt_passwords_are_answered_later_and_later(b: Backend) {
    let mut cfg = MqttConfig::default();
    cfg.users.insert_plain("ann", "secret", &[]);
    cfg.allow_anonymous = false;
    let Some(t) = Target::mqgate_only(b, cfg).await else {
        return;
    };
    let mut took = Vec::new();
    for i in 0..4 {
        let started = Instant::now();
        let (_raw, ack) = Raw::connect(&t, with_user(&format!("guess-{i}"), "ann", "nope")).await;
        assert_eq!(ack.code, 0x86, "bad user name or password");
        took.push(started.elapsed());
    }
    assert!(took[0] >= Duration::from_millis(200), "{took:?}");
    assert!(took[3] >= Duration::from_millis(1600), "{took:?}");
    let (_raw, ack) = Raw::connect(&t, with_user("right", "ann", "secret")).await;
    assert_eq!(ack.code, 0, "the right password still works");
}

async fn wrong_amqp_passwords_are_answered_later_and_later(b: Backend) {
    let Some(t) = mqgate_conformance::amqp::Target::mqgate_only(b).await else {
        return;
    };
    let mut took = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let r = lapin::Connection::connect(
            &t.url_for("guest", "wrong", "/"),
            lapin::ConnectionProperties::default(),
        )
        .await;
        assert!(r.is_err(), "a wrong password is refused");
        took.push(started.elapsed());
    }
    assert!(took[0] >= Duration::from_millis(200), "{took:?}");
    assert!(took[2] >= Duration::from_millis(800), "{took:?}");
    let conn = t.connect().await;
    assert!(conn.status().connected(), "the right password still works");
}
