//! MQTT conformance: every behaviour of issue 4, through real clients (rumqttc 3.1.1 and
//! 5.0) and, for what real clients never send, a raw client on mqgate's codec.
//!
//! Each scenario runs on an in-process mqgate on both backends, or, with
//! `MQGATE_MQTT_ADDR=host:port`, once against that broker. Scenarios marked
//! `mqgate_only` (extensions, or mqgate configuration) are skipped there.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use mqgate_conformance::mqtt::{Backend, Raw, RawEnd, Target};
use mqgate_mqtt::codec::{
    self, reason, Ack, AckKind, Packet, Properties, Publish as RawPublish, QoS as RQoS, SubOptions,
    Subscribe as RawSubscribe, Version,
};
use mqgate_mqtt::{Access, AclRule, MqttConfig};
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS as Q3;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

use mqgate_conformance::mqtt::uniq;
use mqgate_conformance::scenario_clustered as scenario;

// ---------------------------------------------------------------------------------------
// rumqttc wrappers: an event loop in a task, events in a channel, no reconnects.

/// A client wrapper per rumqttc flavour: its event loop runs in a task that forwards
/// events to a channel and stops at the first error (no reconnects); dropping the
/// wrapper closes the connection without DISCONNECT (an abnormal close).
macro_rules! client_wrapper {
    ($name:ident, $client:ty, $event:ty, $publish:ty, $extract:ident, $outgoing_disconnect:pat) => {
        struct $name {
            client: $client,
            rx: mpsc::UnboundedReceiver<Result<$event, String>>,
            task: tokio::task::JoinHandle<()>,
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.task.abort();
            }
        }

        impl $name {
            fn start(client: $client, mut el: impl EventSource<$event> + Send + 'static) -> Self {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(async move {
                    loop {
                        let r = el.next_event().await;
                        let failed = r.is_err();
                        if tx.send(r).is_err() || failed {
                            return;
                        }
                    }
                });
                Self { client, rx, task }
            }

            async fn next(&mut self, within: Duration) -> Option<$event> {
                match tokio::time::timeout(within, self.rx.recv()).await {
                    Ok(Some(Ok(ev))) => Some(ev),
                    Ok(Some(Err(e))) => {
                        eprintln!("client error: {e}");
                        None
                    }
                    _ => None,
                }
            }

            async fn publish_in(&mut self, within: Duration) -> Option<$publish> {
                let deadline = tokio::time::Instant::now() + within;
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self.next(left).await.map($extract) {
                        Some(Some(p)) => return Some(p),
                        Some(None) => {}
                        None => return None,
                    }
                }
            }

            async fn publishes(&mut self, n: usize) -> Vec<$publish> {
                let mut out = Vec::new();
                while out.len() < n {
                    match self.publish_in(WAIT).await {
                        Some(p) => out.push(p),
                        None => panic!("got {} of {n} messages", out.len()),
                    }
                }
                out
            }

            async fn disconnect(mut self) {
                let _ = self.client.disconnect().await;
                while let Some(ev) = self.next(Duration::from_secs(2)).await {
                    if matches!(ev, $outgoing_disconnect) {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
}

/// What both rumqttc event loops offer.
trait EventSource<E> {
    fn next_event(&mut self) -> impl std::future::Future<Output = Result<E, String>> + Send;
}

impl EventSource<rumqttc::Event> for rumqttc::EventLoop {
    async fn next_event(&mut self) -> Result<rumqttc::Event, String> {
        self.poll().await.map_err(|e| e.to_string())
    }
}

impl EventSource<rumqttc::v5::Event> for rumqttc::v5::EventLoop {
    async fn next_event(&mut self) -> Result<rumqttc::v5::Event, String> {
        self.poll().await.map_err(|e| e.to_string())
    }
}

fn publish3(e: rumqttc::Event) -> Option<rumqttc::Publish> {
    match e {
        rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Some(p),
        _ => None,
    }
}

fn publish5(e: rumqttc::v5::Event) -> Option<p5::Publish> {
    match e {
        rumqttc::v5::Event::Incoming(p5::Packet::Publish(p)) => Some(p),
        _ => None,
    }
}

client_wrapper!(
    C3,
    rumqttc::AsyncClient,
    rumqttc::Event,
    rumqttc::Publish,
    publish3,
    rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)
);
client_wrapper!(
    C5,
    rumqttc::v5::AsyncClient,
    rumqttc::v5::Event,
    p5::Publish,
    publish5,
    rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)
);

fn opts3(t: &Target, id: &str, clean: bool) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, t.host.clone(), t.next_port());
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

async fn c3_with(o: rumqttc::MqttOptions) -> Result<(C3, bool), String> {
    let (client, el) = rumqttc::AsyncClient::new(o, 1000);
    let mut c = C3::start(client, el);
    loop {
        match tokio::time::timeout(WAIT, c.rx.recv()).await {
            Ok(Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))))) => {
                return Ok((c, a.session_present));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err("event loop ended".into()),
            Err(_) => return Err("no CONNACK".into()),
        }
    }
}

async fn c3(t: &Target, id: &str, clean: bool) -> (C3, bool) {
    c3_with(opts3(t, id, clean)).await.expect("connect 3.1.1")
}

impl C3 {
    async fn subscribe(&mut self, filter: &str, qos: Q3) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.unwrap();
        loop {
            match self.next(WAIT).await {
                Some(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) => {
                    return a.return_codes
                }
                Some(_) => {}
                None => panic!("no SUBACK"),
            }
        }
    }

    /// Wait until every outgoing publish is acknowledged (PUBACK / PUBCOMP seen `n` times).
    async fn acked(&mut self, n: usize) {
        let mut seen = 0;
        while seen < n {
            match self.next(WAIT).await {
                Some(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))
                | Some(rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_))) => seen += 1,
                Some(_) => {}
                None => panic!("{seen} of {n} publishes acknowledged"),
            }
        }
    }
}

fn opts5(t: &Target, id: &str, clean: bool) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, t.host.clone(), t.next_port());
    o.set_clean_start(clean);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

async fn c5_with(o: rumqttc::v5::MqttOptions) -> Result<(C5, p5::ConnAck), String> {
    let (client, el) = rumqttc::v5::AsyncClient::new(o, 1000);
    let mut c = C5::start(client, el);
    loop {
        match tokio::time::timeout(WAIT, c.rx.recv()).await {
            Ok(Some(Ok(rumqttc::v5::Event::Incoming(p5::Packet::ConnAck(a))))) => {
                return Ok((c, a));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err("event loop ended".into()),
            Err(_) => return Err("no CONNACK".into()),
        }
    }
}

async fn c5(t: &Target, id: &str, clean: bool) -> C5 {
    c5_with(opts5(t, id, clean)).await.expect("connect 5.0").0
}

impl C5 {
    async fn suback(&mut self) -> Vec<p5::SubscribeReasonCode> {
        loop {
            match self.next(WAIT).await {
                Some(rumqttc::v5::Event::Incoming(p5::Packet::SubAck(a))) => return a.return_codes,
                Some(_) => {}
                None => panic!("no SUBACK"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: Q5) -> Vec<p5::SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.unwrap();
        self.suback().await
    }
}

/// Clear the retained messages of `topics` (an empty retained publish each), waiting for
/// the broker's acknowledgements: what a scenario sets, it removes, so a later scenario
/// on the same broker (an external one keeps everything) starts without it.
async fn clear_retained(p: &mut C3, topics: &[String]) {
    for topic in topics {
        p.client
            .publish(topic, Q3::AtLeastOnce, true, Vec::<u8>::new())
            .await
            .unwrap();
    }
    p.acked(topics.len()).await;
}

fn body(p: &rumqttc::Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

fn body5(p: &p5::Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

fn topic5(p: &p5::Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

fn raw_publish(topic: &str, qos: RQoS, pkid: u16, payload: &'static [u8]) -> Packet {
    Packet::Publish(RawPublish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        pkid,
        properties: Properties::default(),
        payload: Bytes::from_static(payload),
    })
}

/// The next packet is the acknowledgement `kind` of `pkid`.
async fn expect_ack(raw: &mut Raw, kind: AckKind, pkid: u16) {
    match raw.recv(WAIT).await {
        Ok(Packet::Ack(a)) if a.kind == kind && a.pkid == pkid => {}
        other => panic!("expected {kind:?} {pkid}, got {other:?}"),
    }
}

/// A DISCONNECT with reason 0 (normal: no will).
async fn leave_politely(raw: &mut Raw) {
    raw.send(&Packet::Disconnect(codec::Disconnect {
        reason: 0,
        properties: Properties::default(),
    }))
    .await;
}

fn raw_ack(kind: AckKind, pkid: u16, reason: u8) -> Packet {
    Packet::Ack(Ack {
        kind,
        pkid,
        reason,
        properties: Properties::default(),
    })
}

/// Subscribe through a raw client and expect the SUBACK.
async fn subscribed(raw: &mut Raw, pkid: u16, filter: &str, qos: RQoS) {
    raw.send(&raw_subscribe(pkid, filter, qos)).await;
    assert!(matches!(raw.recv(WAIT).await, Ok(Packet::SubAck(_))));
}

fn raw_subscribe(pkid: u16, filter: &str, qos: RQoS) -> Packet {
    Packet::Subscribe(RawSubscribe {
        pkid,
        properties: Properties::default(),
        filters: vec![(
            filter.into(),
            SubOptions {
                qos,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
        )],
    })
}

// ---------------------------------------------------------------------------------------
// Connecting

scenario!(pub_sub_both_versions, cross_version_delivery);

async fn pub_sub_both_versions(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("basic");
    let (mut s3, _) = c3(&t, &uniq("s3"), true).await;
    s3.subscribe(&topic, Q3::AtLeastOnce).await;
    let mut s5 = c5(&t, &uniq("s5"), true).await;
    s5.subscribe(&topic, Q5::AtLeastOnce).await;
    let (mut p3, _) = c3(&t, &uniq("p3"), true).await;
    for i in 0..20 {
        p3.client
            .publish(&topic, Q3::AtLeastOnce, false, format!("m{i}"))
            .await
            .unwrap();
    }
    p3.acked(20).await;
    let got3: Vec<String> = s3.publishes(20).await.iter().map(body).collect();
    let got5: Vec<String> = s5.publishes(20).await.iter().map(body5).collect();
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(got3, want, "3.1.1 subscriber, in order");
    assert_eq!(got5, want, "5.0 subscriber, in order");
}

async fn cross_version_delivery(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("x/ver");
    let (mut s3, _) = c3(&t, &uniq("s3"), true).await;
    s3.subscribe(&topic, Q3::ExactlyOnce).await;
    let p5c = c5(&t, &uniq("p5"), true).await;
    p5c.client
        .publish(&topic, Q5::ExactlyOnce, false, "from5")
        .await
        .unwrap();
    let got = s3.publish_in(WAIT).await.expect("delivered");
    assert_eq!(body(&got), "from5");
    assert_eq!(got.qos, Q3::ExactlyOnce);
}

scenario!(
    auth_users_and_anonymous,
    empty_client_id,
    pipelined_after_connect,
    unsupported_protocol_level,
    takeover,
    keep_alive_timeout,
    server_keep_alive_announced,
);

async fn auth_users_and_anonymous(b: Backend) {
    let mut cfg = MqttConfig {
        allow_anonymous: false,
        ..Default::default()
    };
    cfg.users.insert_plain("ann", "secret", &[]);
    let Some(t) = Target::mqgate_only(b, cfg).await else {
        return;
    };
    // Anonymous: 3.1.1 code 5 (not authorized), 5.0 0x87.
    let (_, a) = Raw::connect(&t, Raw::connect_packet(Version::V311, "anon", true)).await;
    assert_eq!(a.code, 5);
    let (_, a) = Raw::connect(&t, Raw::connect_packet(Version::V5, "anon", true)).await;
    assert_eq!(a.code, reason::NOT_AUTHORIZED);
    // Wrong password: 3.1.1 code 4, 5.0 0x86.
    let mut c = Raw::connect_packet(Version::V311, "ann1", true);
    c.username = Some("ann".into());
    c.password = Some(Bytes::from_static(b"wrong"));
    assert_eq!(Raw::connect(&t, c.clone()).await.1.code, 4);
    c.version = Version::V5;
    assert_eq!(
        Raw::connect(&t, c.clone()).await.1.code,
        reason::BAD_USERNAME_OR_PASSWORD
    );
    // Right password, through rumqttc.
    let mut o = opts3(&t, "ann2", true);
    o.set_credentials("ann", "secret");
    assert!(c3_with(o).await.is_ok());
    let mut o = opts5(&t, "ann3", true);
    o.set_credentials("ann", "secret");
    assert!(c5_with(o).await.is_ok());
}

async fn empty_client_id(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    // 5.0: an id is assigned and returned.
    let (mut raw, a) = Raw::connect(&t, Raw::connect_packet(Version::V5, "", true)).await;
    assert_eq!(a.code, 0);
    let assigned = a.properties.assigned_client_id.expect("assigned client id");
    assert!(!assigned.is_empty());
    raw.send(&Packet::PingReq).await;
    assert_eq!(raw.recv(WAIT).await, Ok(Packet::PingResp));
    // 3.1.1 with clean session: accepted.
    let (_, a) = Raw::connect(&t, Raw::connect_packet(Version::V311, "", true)).await;
    assert_eq!(a.code, 0);
    // 3.1.1 without clean session: identifier rejected (2), then closed.
    let (mut raw, a) = Raw::connect(&t, Raw::connect_packet(Version::V311, "", false)).await;
    assert_eq!(a.code, 2);
    assert_eq!(raw.expect_close(WAIT).await, None);
}

async fn pipelined_after_connect(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("pipelined");
    // CONNECT, SUBSCRIBE and PINGREQ in one write, before any answer.
    let mut raw = Raw::open(&t, Version::V311).await;
    let mut out = bytes::BytesMut::new();
    let c = Raw::connect_packet(Version::V311, &uniq("eager"), true);
    codec::encode(&Packet::Connect(Box::new(c)), Version::V311, &mut out);
    codec::encode(
        &raw_subscribe(1, &topic, RQoS::AtLeastOnce),
        Version::V311,
        &mut out,
    );
    codec::encode(&Packet::PingReq, Version::V311, &mut out);
    raw.send_bytes(&out).await;
    assert!(matches!(raw.recv(WAIT).await, Ok(Packet::ConnAck(_))));
    assert!(matches!(raw.recv(WAIT).await, Ok(Packet::SubAck(_))));
    assert_eq!(raw.recv(WAIT).await, Ok(Packet::PingResp));
}

async fn unsupported_protocol_level(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let mut raw = Raw::open(&t, Version::V311).await;
    // CONNECT "MQTT" level 9.
    raw.send_bytes(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 30, 0, 0])
        .await;
    match raw.recv(WAIT).await {
        Ok(Packet::ConnAck(a)) => assert_eq!(a.code, 1, "unacceptable protocol version"),
        Err(RawEnd::Closed) => {} // a broker may also just close
        other => panic!("{other:?}"),
    }
}

async fn takeover(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let id = uniq("dup");
    let (mut first, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &id, true)).await;
    let (mut second, a) = Raw::connect(&t, Raw::connect_packet(Version::V5, &id, true)).await;
    assert_eq!(a.code, 0);
    let r = first.expect_close(WAIT).await;
    if t.mqgate {
        assert_eq!(r, Some(reason::SESSION_TAKEN_OVER));
    } else {
        // The spec asks for DISCONNECT 0x8E without a MUST; the close is the MUST.
        assert!(
            r.is_none() || r == Some(reason::SESSION_TAKEN_OVER),
            "{r:?}"
        );
    }
    second.send(&Packet::PingReq).await;
    assert_eq!(second.recv(WAIT).await, Ok(Packet::PingResp));
    // 3.1.1: the first is simply closed.
    let id = uniq("dup3");
    let (mut first, _) = Raw::connect(&t, Raw::connect_packet(Version::V311, &id, true)).await;
    let _second = Raw::connect(&t, Raw::connect_packet(Version::V311, &id, true)).await;
    assert_eq!(first.expect_close(WAIT).await, None);
}

async fn keep_alive_timeout(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let mut c = Raw::connect_packet(Version::V5, &uniq("ka"), true);
    c.keep_alive = 1;
    let (mut raw, _) = Raw::connect(&t, c).await;
    let start = std::time::Instant::now();
    let r = raw.expect_close(Duration::from_secs(5)).await;
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(
        r.is_none() || r == Some(reason::KEEP_ALIVE_TIMEOUT),
        "{r:?}"
    );
    // Pings keep a connection alive.
    let mut c = Raw::connect_packet(Version::V311, &uniq("ka"), true);
    c.keep_alive = 1;
    let (mut raw, _) = Raw::connect(&t, c).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        raw.send(&Packet::PingReq).await;
        assert_eq!(raw.recv(WAIT).await, Ok(Packet::PingResp));
    }
}

async fn server_keep_alive_announced(b: Backend) {
    let cfg = MqttConfig {
        max_keep_alive: 20,
        ..Default::default()
    };
    let Some(t) = Target::mqgate_only(b, cfg).await else {
        return;
    };
    let mut c = Raw::connect_packet(Version::V5, &uniq("ska"), true);
    c.keep_alive = 600;
    let (_, a) = Raw::connect(&t, c).await;
    assert_eq!(a.properties.server_keep_alive, Some(20));
    assert_eq!(a.properties.receive_maximum, Some(1024));
    assert!(a.properties.maximum_packet_size.is_some());
    assert!(a.properties.topic_alias_maximum.is_some());
    // 3.1.1 has no Server Keep Alive: a client asking for more than the maximum (or for
    // none) would be held to a keep alive it does not know, so it is refused with 2, as
    // Mosquitto's max_keepalive after 2.0.11 (2.0.11 accepts it); one within is accepted.
    for (asked, code) in [(600, 2), (0, 2), (21, 2), (20, 0), (5, 0)] {
        let mut c = Raw::connect_packet(Version::V311, &uniq("ska3"), true);
        c.keep_alive = asked;
        let (_, a) = Raw::connect(&t, c).await;
        assert_eq!(a.code, code, "3.1.1 keep alive {asked}");
    }
}

// ---------------------------------------------------------------------------------------
// Wills

scenario!(
    will_on_abnormal_close_only,
    will_delay,
    will_at_takeover,
    delayed_will_expiry_counts_from_publication,
    delayed_will_at_clean_start
);

async fn will_on_abnormal_close_only(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("will");
    let (mut watcher, _) = c3(&t, &uniq("w"), true).await;
    watcher.subscribe(&topic, Q3::AtLeastOnce).await;
    // Dropped without DISCONNECT: the will is published.
    let mut c = Raw::connect_packet(Version::V311, &uniq("dying"), true);
    c.will = Some(codec::Will {
        topic: topic.clone(),
        payload: Bytes::from_static(b"gone"),
        qos: RQoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    });
    let (raw, _) = Raw::connect(&t, c.clone()).await;
    drop(raw);
    let p = watcher.publish_in(WAIT).await.expect("will delivered");
    assert_eq!(body(&p), "gone");
    // A normal DISCONNECT: no will.
    c.client_id = uniq("polite");
    let (mut raw, _) = Raw::connect(&t, c).await;
    leave_politely(&mut raw).await;
    assert!(
        watcher.publish_in(QUIET).await.is_none(),
        "no will after DISCONNECT"
    );
}

/// A connection taken over by its own client id: the will goes out only if the session
/// ends there (a 3.1.1 clean session, or a new connection with Clean Session); a client
/// that reconnects to resume its session (the everyday reconnect after a half-open TCP
/// connection) is not gone, and its subscribers must not hear "offline". As Mosquitto 2.
async fn will_at_takeover(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("willto");
    let (mut watcher, _) = c3(&t, &uniq("w"), true).await;
    watcher.subscribe(&topic, Q3::AtLeastOnce).await;
    let with_will = |id: &str, clean: bool| {
        let mut c = Raw::connect_packet(Version::V311, id, clean);
        c.keep_alive = 60;
        c.will = Some(codec::Will {
            topic: topic.clone(),
            payload: Bytes::from(format!("{id} offline")),
            qos: RQoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        });
        c
    };
    // Persistent session resumed by the same client: no will.
    let id = uniq("resume");
    let (mut old, _) = Raw::connect(&t, with_will(&id, false)).await;
    let (mut new, a) = Raw::connect(&t, with_will(&id, false)).await;
    assert!(a.session_present, "the session goes on");
    assert_eq!(old.expect_close(WAIT).await, None);
    assert!(
        watcher.publish_in(QUIET).await.is_none(),
        "no will when the session is resumed"
    );
    // The new connection leaves politely (no will).
    leave_politely(&mut new).await;
    drop(new);
    // Persistent session, taken over with Clean Session: the session ends, the will goes.
    let id = uniq("restart");
    let (_old, _) = Raw::connect(&t, with_will(&id, false)).await;
    let (mut new, _) = Raw::connect(&t, with_will(&id, true)).await;
    let p = watcher
        .publish_in(WAIT)
        .await
        .expect("will of the ended session");
    assert_eq!(body(&p), format!("{id} offline"));
    leave_politely(&mut new).await;
    // A clean session taken over: it ends, the will goes.
    let id = uniq("cleanold");
    let (_old, _) = Raw::connect(&t, with_will(&id, true)).await;
    let (mut new, _) = Raw::connect(&t, with_will(&id, false)).await;
    let p = watcher
        .publish_in(WAIT)
        .await
        .expect("will of the clean session");
    assert_eq!(body(&p), format!("{id} offline"));
    assert!(watcher.publish_in(QUIET).await.is_none(), "one will each");
    leave_politely(&mut new).await;
}

/// A delayed will's Message Expiry Interval counts from when the will is published
/// (5.0 3.1.3.2.4): delay 3 s, expiry 60 s, the subscriber is told 59-60 s are left
/// (counted from the disconnect it would be 57 at most; 58 leaves a second for a slow
/// machine).
async fn delayed_will_expiry_counts_from_publication(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("willexp");
    let mut watcher = c5(&t, &uniq("w"), true).await;
    watcher.subscribe(&topic, Q5::AtLeastOnce).await;
    let c = with_delayed_will(&uniq("dying"), &topic, b"late", 3);
    let (raw, _) = Raw::connect(&t, c).await;
    drop(raw);
    let p = watcher
        .publish_in(Duration::from_secs(10))
        .await
        .expect("the will");
    assert_eq!(body5(&p), "late");
    expiry_counted_from_publication(&p);
}

/// A 5.0 CONNECT for `id` (session expiry 120 s) with a QoS 1 will of `payload` on
/// `topic`, delayed `delay` s, its Message Expiry Interval 60 s.
fn with_delayed_will(id: &str, topic: &str, payload: &'static [u8], delay: u32) -> codec::Connect {
    let mut c = Raw::connect_packet(Version::V5, id, true);
    c.properties.session_expiry = Some(120);
    c.will = Some(codec::Will {
        topic: topic.to_owned(),
        payload: Bytes::from_static(payload),
        qos: RQoS::AtLeastOnce,
        retain: false,
        properties: Properties {
            will_delay: Some(delay),
            message_expiry: Some(60),
            ..Default::default()
        },
    });
    c
}

/// The will [`with_delayed_will`] gave 60 s to live is told 58-60 are left: counted from
/// its publication, not from the disconnect (58 leaves a second for a slow machine).
fn expiry_counted_from_publication(p: &p5::Publish) {
    let left = p
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .expect("expiry sent on");
    assert!(
        left >= 58,
        "counted from the will's publication: {left} s left"
    );
}

/// A client gone with a delayed will comes back with Clean Start: that ends its old
/// session, and a will goes out when its session ends if that comes before its delay
/// (5.0 3.1.3.2.2), so it is published then, not cancelled and not held for its delay
/// (30 s here). Its Message Expiry Interval counts from then. As HiveMQ (its pull
/// request 369); Mosquitto 2.0.11 drops the will (conformance/README.md).
async fn delayed_will_at_clean_start(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("willcs");
    let mut watcher = c5(&t, &uniq("w"), true).await;
    watcher.subscribe(&topic, Q5::AtLeastOnce).await;
    let id = uniq("cs");
    let c = with_delayed_will(&id, &topic, b"session over", 30);
    let (raw, _) = Raw::connect(&t, c).await;
    drop(raw);
    assert!(
        watcher
            .publish_in(Duration::from_millis(300))
            .await
            .is_none(),
        "held for its delay while the session lasts"
    );
    let mut back = Raw::connect_packet(Version::V5, &id, true);
    back.properties.session_expiry = Some(120);
    let (mut raw2, a) = Raw::connect(&t, back).await;
    assert!(!a.session_present);
    let p = watcher
        .publish_in(WAIT)
        .await
        .expect("the will of the ended session, before its delay");
    assert_eq!(body5(&p), "session over");
    expiry_counted_from_publication(&p);
    leave_politely(&mut raw2).await;
    assert!(watcher.publish_in(QUIET).await.is_none(), "published once");
}

async fn will_delay(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("willd");
    let (mut watcher, _) = c3(&t, &uniq("w"), true).await;
    watcher.subscribe(&topic, Q3::AtLeastOnce).await;
    let id = uniq("delayed");
    let mut c = Raw::connect_packet(Version::V5, &id, true);
    c.properties.session_expiry = Some(60);
    let wp = Properties {
        will_delay: Some(1),
        ..Default::default()
    };
    c.will = Some(codec::Will {
        topic: topic.clone(),
        payload: Bytes::from_static(b"late"),
        qos: RQoS::AtLeastOnce,
        retain: false,
        properties: wp,
    });
    // Reconnecting within the delay cancels the will.
    let (raw, _) = Raw::connect(&t, c.clone()).await;
    drop(raw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut back = c.clone();
    back.clean_start = false;
    back.will = None;
    let (raw2, _) = Raw::connect(&t, back).await;
    assert!(
        watcher
            .publish_in(Duration::from_millis(1500))
            .await
            .is_none(),
        "cancelled"
    );
    drop(raw2);
    // Not reconnecting: published after about a second.
    let start = std::time::Instant::now();
    let (raw3, _) = Raw::connect(&t, c).await;
    drop(raw3);
    let p = watcher
        .publish_in(WAIT)
        .await
        .expect("will after its delay");
    assert_eq!(body(&p), "late");
    assert!(start.elapsed() >= Duration::from_millis(900));
}

// ---------------------------------------------------------------------------------------
// Sessions

scenario!(
    persistent_session_keeps_messages,
    clean_session_forgets,
    session_expiry,
    session_survives_restart,
);

async fn persistent_session_keeps_messages(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("persist");
    let id = uniq("keeper");
    let (mut s, present) = c3(&t, &id, false).await;
    assert!(!present);
    s.subscribe(&topic, Q3::AtLeastOnce).await;
    s.disconnect().await;
    let (mut p, _) = c3(&t, &uniq("pub"), true).await;
    for i in 0..10 {
        p.client
            .publish(&topic, Q3::AtLeastOnce, false, format!("m{i}"))
            .await
            .unwrap();
    }
    p.acked(10).await;
    let (mut s, present) = c3(&t, &id, false).await;
    assert!(present, "session present");
    let got: Vec<String> = s.publishes(10).await.iter().map(body).collect();
    assert_eq!(got, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // 5.0 with a session expiry: the same.
    let id5 = uniq("keeper5");
    let mut o = opts5(&t, &id5, true);
    o.set_connect_properties(p5::ConnectProperties {
        session_expiry_interval: Some(300),
        ..Default::default()
    });
    let (mut s5, _) = c5_with(o.clone()).await.unwrap();
    s5.subscribe(&topic, Q5::ExactlyOnce).await;
    s5.disconnect().await;
    p.client
        .publish(&topic, Q3::ExactlyOnce, false, "q2")
        .await
        .unwrap();
    p.acked(1).await;
    o.set_clean_start(false);
    let (mut s5, a) = c5_with(o).await.unwrap();
    assert!(a.session_present);
    assert_eq!(body5(&s5.publish_in(WAIT).await.expect("kept")), "q2");
}

async fn clean_session_forgets(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("clean");
    let id = uniq("c");
    let (mut s, _) = c3(&t, &id, false).await;
    s.subscribe(&topic, Q3::AtLeastOnce).await;
    s.disconnect().await;
    let (mut p, _) = c3(&t, &uniq("pub"), true).await;
    p.client
        .publish(&topic, Q3::AtLeastOnce, false, "x")
        .await
        .unwrap();
    p.acked(1).await;
    // Clean session: no session, no messages, no subscription.
    let (mut s, present) = c3(&t, &id, true).await;
    assert!(!present);
    assert!(s.publish_in(QUIET).await.is_none());
    p.client
        .publish(&topic, Q3::AtLeastOnce, false, "y")
        .await
        .unwrap();
    p.acked(1).await;
    assert!(
        s.publish_in(QUIET).await.is_none(),
        "the subscription went with the session"
    );
}

async fn session_expiry(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let id = uniq("exp");
    let mut c = Raw::connect_packet(Version::V5, &id, true);
    c.properties.session_expiry = Some(1);
    let (mut raw, _) = Raw::connect(&t, c.clone()).await;
    subscribed(
        &mut raw,
        1,
        &format!("{}/+", uniq("exp")),
        RQoS::AtLeastOnce,
    )
    .await;
    leave_politely(&mut raw).await;
    drop(raw);
    // Within the interval: present.
    c.clean_start = false;
    let (raw, a) = Raw::connect(&t, c.clone()).await;
    assert!(a.session_present);
    drop(raw); // abnormal close: the expiry runs from here
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, a) = Raw::connect(&t, c).await;
    assert!(!a.session_present, "expired");
}

async fn session_survives_restart(b: Backend) {
    let Some(mut t) = Target::mqgate_only(b, MqttConfig::default()).await else {
        return;
    };
    if !t.durable() {
        return; // the memory backend keeps nothing across a restart, by design
    }
    let topic = uniq("restart");
    let id = uniq("durable");
    let (mut s, _) = c3(&t, &id, false).await;
    s.subscribe(&topic, Q3::AtLeastOnce).await;
    s.disconnect().await;
    let (mut p, _) = c3(&t, &uniq("pub"), true).await;
    for i in 0..5 {
        p.client
            .publish(&topic, Q3::AtLeastOnce, true, format!("m{i}"))
            .await
            .unwrap();
    }
    p.acked(5).await;
    drop(p);
    t.restart().await;
    let (mut s, present) = c3(&t, &id, false).await;
    assert!(present);
    let got: Vec<String> = s.publishes(5).await.iter().map(body).collect();
    assert_eq!(got, (0..5).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // The retained message survived too.
    let (mut n, _) = c3(&t, &uniq("new"), true).await;
    n.subscribe(&topic, Q3::AtLeastOnce).await;
    let r = n.publish_in(WAIT).await.expect("retained");
    assert!(r.retain);
    assert_eq!(body(&r), "m4");
}

// ---------------------------------------------------------------------------------------
// QoS

scenario!(
    qos_levels_both_ways,
    qos2_duplicate_suppressed,
    qos2_packet_id_reused_without_dup,
    redelivery_with_dup_after_reconnect,
    client_receive_maximum_respected,
    receive_maximum_exceeded,
    receive_maximum_exceeded_while_writing,
    qos1_acks_in_order_with_writes_in_flight,
    qos0_slow_subscriber_slows_publisher,
    qos0_stuck_subscriber_costs_a_bounded_wait,
);

/// Publish `n` QoS 0 messages of 1 KiB, numbered in their first 4 bytes, in a task.
fn flood_qos0(p: &C3, topic: &str, n: u32) -> tokio::task::JoinHandle<()> {
    let client = p.client.clone();
    let topic = topic.to_owned();
    tokio::spawn(async move {
        for i in 0..n {
            let mut body = vec![b'.'; 1024];
            body[..4].copy_from_slice(&i.to_be_bytes());
            client
                .publish(&topic, Q3::AtMostOnce, false, body)
                .await
                .unwrap();
        }
    })
}

/// QoS 1 publishes whose store writes are in flight while the connection reads on:
/// sent in bursts of 100 per write, then one per millisecond, with nothing read in
/// between. Every PUBACK comes once, in publish order; a SUBSCRIBE sent behind them is
/// answered after the last of them; a subscriber gets every message in order.
async fn qos1_acks_in_order_with_writes_in_flight(b: Backend) {
    let Some(t) = Target::mqgate_only(b, MqttConfig::default()).await else {
        return;
    };
    let topic = uniq("inflight1");
    let (mut sub, _) =
        Raw::connect(&t, Raw::connect_packet(Version::V311, &uniq("sub"), true)).await;
    subscribed(&mut sub, 1, &topic, RQoS::AtLeastOnce).await;
    let (mut publisher, _) =
        Raw::connect(&t, Raw::connect_packet(Version::V311, &uniq("pub"), true)).await;
    let (burst, paced) = (1_000u16, 300u16);
    // QoS 1, packet id i + 1, the number i in its first four bytes.
    let numbered = |i: u16| {
        Packet::Publish(RawPublish {
            pkid: i + 1,
            payload: Bytes::copy_from_slice(&u32::from(i).to_be_bytes()),
            ..match raw_publish(&topic, RQoS::AtLeastOnce, 0, b"") {
                Packet::Publish(p) => p,
                _ => unreachable!(),
            }
        })
    };
    for chunk in 0..burst / 100 {
        let mut bytes = bytes::BytesMut::new();
        for i in chunk * 100..(chunk + 1) * 100 {
            publisher.encode(&numbered(i), &mut bytes);
        }
        publisher
            .try_send_bytes(&bytes)
            .await
            .expect("burst written");
    }
    for i in burst..burst + paced {
        publisher.send(&numbered(i)).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    publisher
        .send(&raw_subscribe(9, &uniq("other"), RQoS::AtMostOnce))
        .await;
    let mut next_ack = 1u16;
    loop {
        match publisher.recv(WAIT).await {
            Ok(Packet::Ack(a)) if a.kind == AckKind::PubAck => {
                assert_eq!(a.pkid, next_ack, "PUBACKs in publish order");
                next_ack += 1;
            }
            Ok(Packet::SubAck(_)) => {
                assert_eq!(next_ack, burst + paced + 1, "SUBACK before the last PUBACK");
                break;
            }
            other => panic!("publisher got {other:?} after {} PUBACKs", next_ack - 1),
        }
    }
    let mut next = 0u32;
    while next < u32::from(burst + paced) {
        match next_acked(&mut sub, WAIT).await {
            Some(Packet::Publish(m)) => {
                let i = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
                assert_eq!(i, next, "delivery order");
                next += 1;
            }
            Some(_) => {}
            None => panic!("after {next} messages nothing more came"),
        }
    }
}

/// Receive messages numbered 0..n (as `flood_qos0` sends them): every one, in order.
async fn expect_all_in_order(raw: &mut Raw, n: u32, what: &str) {
    let mut next = 0u32;
    while next < n {
        match raw.recv(WAIT).await {
            Ok(Packet::Publish(m)) => {
                let i = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
                assert_eq!(i, next, "{what}");
                next += 1;
            }
            Ok(_) => {}
            Err(e) => panic!("after {next} of {n} messages: {e:?}"),
        }
    }
}

/// A subscriber that never reads holds a publisher up for at most `qos0_max_wait` per
/// batch; then its QoS 0 messages are dropped for it, and a subscriber that reads gets
/// every message, in order (mqgate only).
async fn qos0_stuck_subscriber_costs_a_bounded_wait(b: Backend) {
    let cfg = MqttConfig {
        qos0_queue: 64,
        qos0_max_wait: Duration::from_millis(10),
        ..MqttConfig::default()
    };
    let Some(t) = Target::mqgate_only(b, cfg).await else {
        return;
    };
    let topic = uniq("stuck0");
    let (mut stuck, _) =
        Raw::connect(&t, Raw::connect_packet(Version::V311, &uniq("stuck"), true)).await;
    subscribed(&mut stuck, 1, &topic, RQoS::AtMostOnce).await;
    let (mut reader, _) = Raw::connect(
        &t,
        Raw::connect_packet(Version::V311, &uniq("reader"), true),
    )
    .await;
    subscribed(&mut reader, 1, &topic, RQoS::AtMostOnce).await;
    let (p, _) = c3(&t, &uniq("p"), true).await;
    // 20 MiB: the stuck subscriber's queue and sockets fill long before the end.
    const N: u32 = 20_000;
    let publisher = flood_qos0(&p, &topic, N);
    expect_all_in_order(&mut reader, N, "the reading subscriber gets all, in order").await;
    publisher.await.unwrap();
    drop((p, stuck));
}

/// A connected QoS 0 subscriber that stops reading does not lose messages: once its
/// queue (64 here) and the socket buffers are full, the publisher is slowed down
/// instead (mqgate only: Mosquitto and RabbitMQ drop them).
async fn qos0_slow_subscriber_slows_publisher(b: Backend) {
    let cfg = MqttConfig {
        qos0_queue: 64,
        ..MqttConfig::default()
    };
    let Some(t) = Target::mqgate_only(b, cfg).await else {
        return;
    };
    let topic = uniq("slow0");
    let (mut sub, _) = Raw::connect(&t, Raw::connect_packet(Version::V311, &uniq("s"), true)).await;
    subscribed(&mut sub, 1, &topic, RQoS::AtMostOnce).await;
    let (p, _) = c3(&t, &uniq("p"), true).await;
    // 20 MiB: far more than the queue, the connection's output buffer and both sockets
    // can hold while the subscriber does not read.
    const N: u32 = 20_000;
    let publisher = flood_qos0(&p, &topic, N);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    expect_all_in_order(&mut sub, N, "QoS 0 messages arrive all and in order").await;
    publisher.await.unwrap();
    drop(p);
}

async fn qos_levels_both_ways(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let base = uniq("qos");
    let (mut s, _) = c3(&t, &uniq("s"), true).await;
    s.subscribe(&format!("{base}/0"), Q3::AtMostOnce).await;
    s.subscribe(&format!("{base}/1"), Q3::AtLeastOnce).await;
    s.subscribe(&format!("{base}/2"), Q3::ExactlyOnce).await;
    let (p, _) = c3(&t, &uniq("p"), true).await;
    for (sub, q) in [
        ("0", Q3::ExactlyOnce),
        ("1", Q3::ExactlyOnce),
        ("2", Q3::ExactlyOnce),
        ("2", Q3::AtMostOnce),
    ] {
        p.client
            .publish(format!("{base}/{sub}"), q, false, sub)
            .await
            .unwrap();
    }
    let got = s.publishes(4).await;
    let mut seen: Vec<(String, Q3)> = got.iter().map(|p| (p.topic.clone(), p.qos)).collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0).then((a.1 as u8).cmp(&(b.1 as u8))));
    assert_eq!(
        seen,
        vec![
            (format!("{base}/0"), Q3::AtMostOnce),
            (format!("{base}/1"), Q3::AtLeastOnce),
            (format!("{base}/2"), Q3::AtMostOnce),
            (format!("{base}/2"), Q3::ExactlyOnce),
        ],
        "delivered at the lower of published and granted QoS"
    );
}

async fn qos2_duplicate_suppressed(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("q2dup");
    let (mut s, _) = c3(&t, &uniq("s"), true).await;
    s.subscribe(&topic, Q3::ExactlyOnce).await;
    let (mut raw, _) = Raw::connect(&t, Raw::connect_packet(Version::V311, &uniq("p"), true)).await;
    let publish = raw_publish(&topic, RQoS::ExactlyOnce, 7, b"once");
    raw.send(&publish).await;
    expect_ack(&mut raw, AckKind::PubRec, 7).await;
    // The same packet id again, with DUP, before PUBREL: not a new message.
    if let Packet::Publish(mut p) = publish {
        p.dup = true;
        raw.send(&Packet::Publish(p)).await;
    }
    expect_ack(&mut raw, AckKind::PubRec, 7).await;
    raw.send(&raw_ack(AckKind::PubRel, 7, 0)).await;
    expect_ack(&mut raw, AckKind::PubComp, 7).await;
    assert_eq!(body(&s.publish_in(WAIT).await.unwrap()), "once");
    assert!(s.publish_in(QUIET).await.is_none(), "exactly once");
}

/// A QoS 2 packet id the broker still holds (its PUBREL never came: the client restarted
/// and numbers from 1 again; or the broker's record of the release was lost in a crash),
/// reused without DUP: a new message, PUBREC'd and delivered, never acknowledged and
/// dropped as a duplicate (MQTT-3.3.1-1: a re-delivery sets DUP). Mosquitto delivers it.
async fn qos2_packet_id_reused_without_dup(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("q2reuse");
    let (mut s, _) = c3(&t, &uniq("s"), true).await;
    s.subscribe(&topic, Q3::ExactlyOnce).await;
    let id = uniq("p");
    let mut c = Raw::connect_packet(Version::V311, &id, false);
    c.keep_alive = 60;
    let (mut raw, _) = Raw::connect(&t, c.clone()).await;
    raw.send(&raw_publish(&topic, RQoS::ExactlyOnce, 9, b"first"))
        .await;
    expect_ack(&mut raw, AckKind::PubRec, 9).await;
    // The client dies before its PUBREL and comes back without its state.
    drop(raw);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut raw, a) = Raw::connect(&t, c).await;
    assert!(a.session_present);
    raw.send(&raw_publish(&topic, RQoS::ExactlyOnce, 9, b"second"))
        .await;
    expect_ack(&mut raw, AckKind::PubRec, 9).await;
    raw.send(&raw_ack(AckKind::PubRel, 9, 0)).await;
    expect_ack(&mut raw, AckKind::PubComp, 9).await;
    // "first" may or may not have gone out (delivered at PUBLISH, or at PUBREL as
    // Mosquitto does): "second" must.
    let mut got = Vec::new();
    while let Some(p) = s.publish_in(WAIT).await {
        got.push(body(&p));
        if got.iter().any(|b| b == "second") {
            break;
        }
    }
    assert!(got.iter().any(|b| b == "second"), "delivered: {got:?}");
    leave_politely(&mut raw).await;
}

async fn redelivery_with_dup_after_reconnect(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("redeliver");
    let id = uniq("slow");
    let mut c = Raw::connect_packet(Version::V311, &id, false);
    c.keep_alive = 60;
    let (mut raw, _) = Raw::connect(&t, c.clone()).await;
    subscribed(&mut raw, 1, &topic, RQoS::AtLeastOnce).await;
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    p.client
        .publish(&topic, Q3::AtLeastOnce, false, "again")
        .await
        .unwrap();
    p.acked(1).await;
    let first = match raw.recv(WAIT).await {
        Ok(Packet::Publish(p)) => p,
        other => panic!("{other:?}"),
    };
    assert!(!first.dup);
    drop(raw); // never acknowledged
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut raw, a) = Raw::connect(&t, c).await;
    assert!(a.session_present);
    let again = match raw.recv(WAIT).await {
        Ok(Packet::Publish(p)) => p,
        other => panic!("{other:?}"),
    };
    assert!(again.dup, "resent with DUP");
    assert_eq!(again.pkid, first.pkid, "with its packet identifier");
    assert_eq!(again.payload, first.payload);
    raw.send(&raw_ack(AckKind::PubAck, again.pkid, 0)).await;
    assert!(
        matches!(raw.recv(QUIET).await, Err(RawEnd::Timeout)),
        "nothing more"
    );
}

async fn client_receive_maximum_respected(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("rm");
    let mut c = Raw::connect_packet(Version::V5, &uniq("small"), true);
    c.properties.receive_maximum = Some(2);
    let (mut raw, _) = Raw::connect(&t, c).await;
    subscribed(&mut raw, 1, &topic, RQoS::AtLeastOnce).await;
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    for i in 0..6 {
        p.client
            .publish(&topic, Q3::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    p.acked(6).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        match raw.recv(WAIT).await {
            Ok(Packet::Publish(p)) => ids.push(p.pkid),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        matches!(raw.recv(QUIET).await, Err(RawEnd::Timeout)),
        "at most 2 in flight"
    );
    let mut got = 2;
    while got < 6 {
        let id = ids.remove(0);
        raw.send(&raw_ack(AckKind::PubAck, id, 0)).await;
        match raw.recv(WAIT).await {
            Ok(Packet::Publish(p)) => {
                ids.push(p.pkid);
                got += 1;
            }
            other => panic!("{other:?}"),
        }
    }
}

async fn receive_maximum_exceeded(b: Backend) {
    let cfg = MqttConfig {
        receive_maximum: 2,
        ..Default::default()
    };
    let Some(t) = Target::mqgate_only(b, cfg).await else {
        return;
    };
    let (mut raw, a) =
        Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("greedy"), true)).await;
    assert_eq!(a.properties.receive_maximum, Some(2));
    // Three QoS 2 publishes without PUBREL: the third exceeds the window.
    for id in 1..=3 {
        raw.send(&raw_publish("rm/x", RQoS::ExactlyOnce, id, b"x"))
            .await;
    }
    assert_eq!(
        raw.expect_close(WAIT).await,
        Some(reason::RECEIVE_MAXIMUM_EXCEEDED)
    );
}

/// A client over the Receive Maximum that goes on writing (20 MB of QoS 1 publishes in
/// one write, more than the sockets' buffers hold) and reads only afterwards: every
/// write succeeds, then it finds DISCONNECT 0x93 and the end of the stream. The server
/// reads and discards what follows its DISCONNECT until the client closes, so its
/// kernel does not answer that data with a reset. (mqgate closed the socket with the
/// burst unread: the client's write failed with "connection reset" or "broken pipe",
/// and a client that stops there never reads the reason code.) Mosquitto answers an
/// excess publish with PUBACK / PUBREC 0x97 and keeps the connection: mqgate only.
async fn receive_maximum_exceeded_while_writing(b: Backend) {
    let cfg = MqttConfig {
        receive_maximum: 2,
        ..Default::default()
    };
    let Some(t) = Target::mqgate_only(b, cfg).await else {
        return;
    };
    let topic = uniq("rm-burst");
    let (mut raw, _) =
        Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("flood"), true)).await;
    // Three QoS 2 publishes without PUBREL exceed the window; the QoS 1 publishes
    // follow in the same write.
    let mut burst = bytes::BytesMut::new();
    for id in 1..=3 {
        raw.encode(
            &raw_publish(&topic, RQoS::ExactlyOnce, id, b"x"),
            &mut burst,
        );
    }
    for i in 0..180_000u32 {
        let pkid = (i % 60_000) as u16 + 4;
        let p = raw_publish(&topic, RQoS::AtLeastOnce, pkid, &[b'.'; 80]);
        raw.encode(&p, &mut burst);
    }
    let written = raw.try_send_bytes(&burst).await.map_err(|e| e.kind());
    let got = raw.expect_close(WAIT).await;
    assert_eq!(
        (written, got, raw.read_error),
        (Ok(()), Some(reason::RECEIVE_MAXIMUM_EXCEEDED), None),
        "every write taken, then the DISCONNECT and an orderly close"
    );
}

// ---------------------------------------------------------------------------------------
// Subscriptions

scenario!(
    wildcards_and_dollar_topics,
    unsubscribe_stops_delivery,
    publisher_sees_subscription_changes,
    acl_denied_filter,
    subscription_options,
    overlapping_subscriptions,
    subscription_checks_after_earlier_sessions,
    shared_subscription_splits_and_hands_over,
    shared_subscription_rotates_with_a_paced_publisher,
    shared_subscription_last_holder_leaves_as_another_comes,
);

async fn wildcards_and_dollar_topics(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let base = uniq("wc");
    let (mut s, _) = c3(&t, &uniq("s"), true).await;
    s.subscribe(&format!("{base}/+/temp"), Q3::AtLeastOnce)
        .await;
    s.subscribe(&format!("{base}/alarms/#"), Q3::AtLeastOnce)
        .await;
    let (mut all, _) = c3(&t, &uniq("all"), true).await;
    all.subscribe("#", Q3::AtMostOnce).await;
    let (p, _) = c3(&t, &uniq("p"), true).await;
    for topic in [
        format!("{base}/kitchen/temp"),
        format!("{base}/kitchen/humidity"),
        format!("{base}/alarms"),
        format!("{base}/alarms/fire/1"),
        format!("{base}/a/b/temp"),
    ] {
        p.client
            .publish(&topic, Q3::AtLeastOnce, false, topic.clone())
            .await
            .unwrap();
    }
    let got: HashSet<String> = s.publishes(3).await.iter().map(body).collect();
    let want: HashSet<String> = [
        format!("{base}/kitchen/temp"),
        format!("{base}/alarms"),
        format!("{base}/alarms/fire/1"),
    ]
    .into();
    assert_eq!(got, want);
    assert!(s.publish_in(QUIET).await.is_none());
    // `#` does not match `$` topics.
    p.client
        .publish(format!("$test/{base}"), Q3::AtMostOnce, false, "dollar")
        .await
        .unwrap();
    let mut saw_dollar = false;
    while let Some(m) = all.publish_in(QUIET).await {
        saw_dollar |= m.topic.starts_with('$');
    }
    assert!(!saw_dollar, "a leading wildcard matched a $ topic");
}

async fn unsubscribe_stops_delivery(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("unsub");
    let mut s = c5(&t, &uniq("s"), true).await;
    s.subscribe(&topic, Q5::AtLeastOnce).await;
    s.client.unsubscribe(&topic).await.unwrap();
    loop {
        match s.next(WAIT).await {
            Some(rumqttc::v5::Event::Incoming(p5::Packet::UnsubAck(u))) => {
                assert_eq!(u.reasons, vec![p5::UnsubAckReason::Success]);
                break;
            }
            Some(_) => {}
            None => panic!("no UNSUBACK"),
        }
    }
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    p.client
        .publish(&topic, Q3::AtLeastOnce, false, "x")
        .await
        .unwrap();
    p.acked(1).await;
    assert!(s.publish_in(QUIET).await.is_none());
    // Unsubscribing from nothing: "no subscription existed" (a raw client: rumqttc's
    // 5.0 client treats that code as a fatal error).
    let (mut raw, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("u"), true)).await;
    raw.send(&Packet::Unsubscribe(codec::Unsubscribe {
        pkid: 4,
        properties: Properties::default(),
        filters: vec!["never/subscribed".into()],
    }))
    .await;
    match raw.recv(WAIT).await {
        Ok(Packet::UnsubAck(u)) => assert_eq!(
            (u.pkid, u.codes),
            (4, vec![reason::NO_SUBSCRIPTION_EXISTED])
        ),
        other => panic!("{other:?}"),
    }
}

/// A connection that keeps publishing to one topic sees every subscription made or
/// removed meanwhile (mqgate reuses a connection's last route while the routing tables
/// are unchanged): a subscriber that joins gets the next message, one that leaves no
/// longer does. Publishes are paced by their PUBACKs, with one at QoS 0.
async fn publisher_sees_subscription_changes(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("reroute");
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    let (mut first, _) = c3(&t, &uniq("a"), true).await;
    first.subscribe(&topic, Q3::AtLeastOnce).await;
    for body in ["1", "2"] {
        p.client
            .publish(&topic, Q3::AtLeastOnce, false, body)
            .await
            .unwrap();
        p.acked(1).await;
    }
    let (mut second, _) = c3(&t, &uniq("b"), true).await;
    second.subscribe(&topic, Q3::AtLeastOnce).await;
    p.client
        .publish(&topic, Q3::AtLeastOnce, false, "3")
        .await
        .unwrap();
    p.acked(1).await;
    let got: Vec<String> = first.publishes(3).await.iter().map(body).collect();
    assert_eq!(got, ["1", "2", "3"], "the first subscriber");
    first.client.unsubscribe(&topic).await.unwrap();
    loop {
        match first.next(WAIT).await {
            Some(rumqttc::Event::Incoming(rumqttc::Packet::UnsubAck(_))) => break,
            Some(_) => {}
            None => panic!("no UNSUBACK"),
        }
    }
    p.client
        .publish(&topic, Q3::AtMostOnce, false, "4")
        .await
        .unwrap();
    p.client
        .publish(&topic, Q3::AtLeastOnce, false, "5")
        .await
        .unwrap();
    p.acked(1).await;
    let mut got: Vec<String> = second.publishes(3).await.iter().map(body).collect();
    got.sort();
    assert_eq!(got, ["3", "4", "5"], "the subscriber that joined");
    assert!(
        first.publish_in(QUIET).await.is_none(),
        "a delivery after UNSUBACK"
    );
}

async fn acl_denied_filter(b: Backend) {
    let cfg = MqttConfig {
        acl: vec![
            AclRule {
                user: None,
                access: Access::Subscribe,
                filter: "secret/#".into(),
                allow: false,
            },
            AclRule {
                user: None,
                access: Access::Publish,
                filter: "readonly/#".into(),
                allow: false,
            },
        ],
        ..Default::default()
    };
    let Some(t) = Target::mqgate_only(b, cfg).await else {
        return;
    };
    // (rumqttc's 5.0 client treats a failure code as a fatal error: a raw client here.)
    let (mut s, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("s"), true)).await;
    let opts = SubOptions {
        qos: RQoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
    };
    s.send(&Packet::Subscribe(RawSubscribe {
        pkid: 1,
        properties: Properties::default(),
        filters: vec![("secret/x".into(), opts), ("public/x".into(), opts)],
    }))
    .await;
    match s.recv(WAIT).await {
        Ok(Packet::SubAck(a)) => assert_eq!(a.codes, vec![reason::NOT_AUTHORIZED, 1]),
        other => panic!("{other:?}"),
    }
    let (mut s3, _) = c3(&t, &uniq("s3"), true).await;
    let codes = s3.subscribe("secret/y", Q3::AtLeastOnce).await;
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Failure]);
    // A denied publish is acknowledged with "not authorized" and not delivered.
    let mut r = c5(&t, &uniq("r"), true).await;
    r.subscribe("readonly/#", Q5::AtLeastOnce).await;
    let (mut raw, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("p"), true)).await;
    raw.send(&raw_publish("readonly/a", RQoS::AtLeastOnce, 3, b"no"))
        .await;
    match raw.recv(WAIT).await {
        Ok(Packet::Ack(a)) => {
            assert_eq!(
                (a.kind, a.reason),
                (AckKind::PubAck, reason::NOT_AUTHORIZED)
            );
            assert!(a.properties.reason_string.is_some(), "with a reason string");
        }
        other => panic!("{other:?}"),
    }
    assert!(r.publish_in(QUIET).await.is_none());
}

async fn subscription_options(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let base = uniq("opts");
    let (mut raw, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("me"), true)).await;
    let sub = |pkid, filter: String, no_local, rap, rh, id: Option<u32>| {
        let mut properties = Properties::default();
        properties.subscription_ids.extend(id);
        Packet::Subscribe(RawSubscribe {
            pkid,
            properties,
            filters: vec![(
                filter,
                SubOptions {
                    qos: RQoS::AtLeastOnce,
                    no_local,
                    retain_as_published: rap,
                    retain_handling: rh,
                },
            )],
        })
    };
    // A retained message exists before subscribing.
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    p.client
        .publish(format!("{base}/r"), Q3::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    p.acked(1).await;
    // No local: my own publishes are not sent back.
    raw.send(&sub(1, format!("{base}/nl"), true, false, 0, Some(11)))
        .await;
    assert!(matches!(raw.recv(WAIT).await, Ok(Packet::SubAck(_))));
    raw.send(&raw_publish(
        &format!("{base}/nl"),
        RQoS::AtMostOnce,
        0,
        b"mine",
    ))
    .await;
    assert!(
        matches!(raw.recv(QUIET).await, Err(RawEnd::Timeout)),
        "no local"
    );
    // Retain handling 2: no retained message on subscribe.
    raw.send(&sub(2, format!("{base}/r"), false, false, 2, None))
        .await;
    assert!(matches!(raw.recv(WAIT).await, Ok(Packet::SubAck(_))));
    assert!(
        matches!(raw.recv(QUIET).await, Err(RawEnd::Timeout)),
        "retain handling 2"
    );
    // Retain handling 1 on an existing subscription: none either.
    raw.send(&sub(3, format!("{base}/r"), false, true, 1, Some(5)))
        .await;
    assert!(matches!(raw.recv(WAIT).await, Ok(Packet::SubAck(_))));
    assert!(
        matches!(raw.recv(QUIET).await, Err(RawEnd::Timeout)),
        "retain handling 1, existing"
    );
    // Retain as published, with the subscription identifier.
    p.client
        .publish(format!("{base}/r"), Q3::AtLeastOnce, true, "again")
        .await
        .unwrap();
    match raw.recv(WAIT).await {
        Ok(Packet::Publish(m)) => {
            assert!(m.retain, "retain as published");
            assert_eq!(m.properties.subscription_ids, vec![5]);
            raw.send(&raw_ack(AckKind::PubAck, m.pkid, 0)).await;
        }
        other => panic!("{other:?}"),
    }
    // Retain handling 0 on a new subscription: the retained message, flagged retained.
    raw.send(&sub(4, format!("{base}/+"), false, false, 0, None))
        .await;
    assert!(matches!(raw.recv(WAIT).await, Ok(Packet::SubAck(_))));
    match raw.recv(WAIT).await {
        Ok(Packet::Publish(m)) => {
            assert!(m.retain);
            assert_eq!(&m.payload[..], b"again");
        }
        other => panic!("{other:?}"),
    }
    // Leave no retained message behind for later scenarios on the same broker.
    clear_retained(&mut p, &[format!("{base}/r")]).await;
}

async fn overlapping_subscriptions(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let base = uniq("ovl");
    let (mut raw, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("me"), true)).await;
    for (pkid, filter, qos, id) in [
        (1, format!("{base}/#"), RQoS::AtMostOnce, 1),
        (2, format!("{base}/a"), RQoS::AtLeastOnce, 2),
    ] {
        let mut properties = Properties::default();
        properties.subscription_ids.push(id);
        raw.send(&Packet::Subscribe(RawSubscribe {
            pkid,
            properties,
            filters: vec![(
                filter,
                SubOptions {
                    qos,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                },
            )],
        }))
        .await;
        assert!(matches!(raw.recv(WAIT).await, Ok(Packet::SubAck(_))));
    }
    let (p, _) = c3(&t, &uniq("p"), true).await;
    p.client
        .publish(format!("{base}/a"), Q3::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let mut ids = Vec::new();
    let mut max_qos = RQoS::AtMostOnce;
    let mut copies = 0;
    // The first copy within WAIT (a loaded machine), further ones within QUIET.
    while let Ok(Packet::Publish(m)) = raw.recv(if copies == 0 { WAIT } else { QUIET }).await {
        copies += 1;
        max_qos = max_qos.max(m.qos);
        ids.extend(m.properties.subscription_ids.clone());
        if m.qos != RQoS::AtMostOnce {
            raw.send(&raw_ack(AckKind::PubAck, m.pkid, 0)).await;
        }
    }
    ids.sort();
    assert!(copies >= 1);
    assert_eq!(
        max_qos,
        RQoS::AtLeastOnce,
        "delivered at the highest granted QoS"
    );
    assert_eq!(ids, vec![1, 2], "every matching subscription identifier");
}

/// A PUBLISH from a raw client, with its retain flag.
fn raw_publish_retained(topic: &str, pkid: u16, retain: bool, payload: &'static [u8]) -> Packet {
    Packet::Publish(RawPublish {
        dup: false,
        qos: RQoS::AtLeastOnce,
        retain,
        topic: topic.into(),
        pkid,
        properties: Properties::default(),
        payload: Bytes::from_static(payload),
    })
}

/// Publish at QoS 1 through a raw client and wait for its PUBACK.
async fn raw_publish_acked(
    raw: &mut Raw,
    topic: &str,
    pkid: u16,
    retain: bool,
    payload: &'static [u8],
) {
    raw.send(&raw_publish_retained(topic, pkid, retain, payload))
        .await;
    loop {
        match raw.recv(WAIT).await {
            Ok(Packet::Ack(a)) if a.kind == AckKind::PubAck && a.pkid == pkid => return,
            Ok(_) => {}
            other => panic!("no PUBACK for {topic}: {other:?}"),
        }
    }
}

/// A SUBSCRIBE of one filter with its options and subscription identifier.
fn raw_subscribe_with(pkid: u16, filter: &str, options: SubOptions, id: u32) -> Packet {
    let mut properties = Properties::default();
    properties.subscription_ids.push(id);
    Packet::Subscribe(RawSubscribe {
        pkid,
        properties,
        filters: vec![(filter.into(), options)],
    })
}

fn opts(qos: RQoS, no_local: bool, retain_as_published: bool, retain_handling: u8) -> SubOptions {
    SubOptions {
        qos,
        no_local,
        retain_as_published,
        retain_handling,
    }
}

/// The next packet, PUBACKed when it is a QoS 1 publish; `None` when nothing came.
async fn next_acked(raw: &mut Raw, within: Duration) -> Option<Packet> {
    let p = raw.recv(within).await.ok()?;
    if let Packet::Publish(m) = &p {
        if m.qos == RQoS::AtLeastOnce {
            raw.send(&raw_ack(AckKind::PubAck, m.pkid, 0)).await;
        }
    }
    Some(p)
}

/// Subscribe and collect the SUBACK and the `retained` publishes it brings, in any
/// order: (topic, payload, subscription identifiers) of each.
async fn subscribe_collect(
    raw: &mut Raw,
    sub: Packet,
    retained: usize,
) -> Vec<(String, String, Vec<u32>)> {
    raw.send(&sub).await;
    let (mut acked, mut got) = (false, Vec::new());
    while !acked || got.len() < retained {
        match next_acked(raw, WAIT).await {
            Some(Packet::SubAck(a)) => {
                assert!(a.codes.iter().all(|c| *c < 0x80), "{:?}", a.codes);
                acked = true;
            }
            Some(Packet::Publish(m)) => {
                assert!(m.retain, "only retained messages before a live publish");
                got.push((
                    m.topic.to_string(),
                    String::from_utf8_lossy(&m.payload).into_owned(),
                    m.properties.subscription_ids.clone(),
                ));
            }
            other => panic!("SUBACK and {retained} retained, got {got:?} then {other:?}"),
        }
    }
    got.sort();
    got
}

/// Issue 13: the subscription-identifier and subscribe-option checks run after what
/// earlier scenarios leave on one broker, as a suite that reuses its client ids leaves
/// it: retained messages on overlapping topics, another client's persistent session
/// subscribed to them, and, under the client id the checks use, a session holding
/// overlapping subscriptions (other identifiers, no no-local), an unacked delivery and
/// a subscription the checks make again, that ended (1) with a DISCONNECT setting its
/// expiry to 0 and at once a new connection, (2) without an expiry, by that new
/// connection taking it over. The checks connect with Clean Start 0, as a client
/// resuming would: the session ended with its connection, so nothing of it may come
/// back. (mqgate kept a taken-over session without an expiry for the new connection,
/// and in (1) a session whose DISCONNECT was still unread in the socket when the
/// takeover came (3 runs in 16): session present, the old subscriptions with
/// their identifiers (the live publish carried 1, 2 and 8) and options, the unacked
/// message again. Mosquitto 2.0 keeps none of it.)
async fn subscription_checks_after_earlier_sessions(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let base = uniq("after");
    let id = uniq("reused");
    let o = |s: &str| format!("{base}/o/{s}");
    let (mut p, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("p"), true)).await;
    // Earlier scenarios: retained messages on overlapping topics, and a persistent
    // session of another client subscribed over them, left behind.
    raw_publish_acked(&mut p, &o("a"), 1, true, b"ra").await;
    raw_publish_acked(&mut p, &o("b/c"), 2, true, b"rbc").await;
    raw_publish_acked(&mut p, &format!("{base}/r"), 3, true, b"rr").await;
    let keeper = uniq("keeper");
    let mut kc = Raw::connect_packet(Version::V5, &keeper, true);
    kc.properties.session_expiry = Some(300);
    let (mut k, _) = Raw::connect(&t, kc).await;
    let q2 = opts(RQoS::ExactlyOnce, false, false, 2);
    k.send(&raw_subscribe_with(1, &o("#"), q2, 7)).await;
    assert!(matches!(k.recv(WAIT).await, Ok(Packet::SubAck(_))));
    drop(k);

    // The client id's own session, left twice, the checks after each.
    // Round 1's session has an expiry until its DISCONNECT sets it to 0.
    let mut c = Raw::connect_packet(Version::V5, &id, true);
    c.properties.session_expiry = Some(300);
    let (mut old, _) = Raw::connect(&t, c).await;
    for round in 1..=2u8 {
        // Leftovers: overlapping subscriptions with other identifiers, `nl` without no
        // local, `r` subscribed already (retain handling 1 would then send nothing).
        for (pkid, filter, sub_id) in [
            (101, o("#"), 9),
            (102, o("+"), 8),
            (103, format!("{base}/nl"), 9),
            (104, format!("{base}/r"), 9),
        ] {
            old.send(&raw_subscribe_with(pkid, &filter, q2, sub_id))
                .await;
            assert!(matches!(old.recv(WAIT).await, Ok(Packet::SubAck(_))));
        }
        // A delivery it does not acknowledge.
        raw_publish_acked(&mut p, &o("a"), 10 + u16::from(round), false, b"unacked").await;
        assert!(matches!(old.recv(WAIT).await, Ok(Packet::Publish(_))));
        // Ended: (1) DISCONNECT, and the new connection right behind it; (2) taken over.
        if round == 1 {
            old.send(&Packet::Disconnect(codec::Disconnect {
                reason: 0,
                properties: Properties {
                    session_expiry: Some(0),
                    ..Default::default()
                },
            }))
            .await;
        }
        let (mut raw, a) = Raw::connect(&t, Raw::connect_packet(Version::V5, &id, false)).await;
        drop(old);
        assert!(
            !a.session_present,
            "round {round}: the session ended with its connection"
        );
        assert!(
            next_acked(&mut raw, QUIET).await.is_none(),
            "round {round}: nothing of the old session is sent again"
        );

        // Overlapping subscriptions with identifiers: each brings its retained messages
        // with its own identifier, and a live publish carries both.
        let got = subscribe_collect(
            &mut raw,
            raw_subscribe_with(1, &o("#"), opts(RQoS::AtMostOnce, false, false, 0), 1),
            2,
        )
        .await;
        assert_eq!(
            got,
            vec![
                (o("a"), "ra".into(), vec![1]),
                (o("b/c"), "rbc".into(), vec![1])
            ],
            "round {round}"
        );
        let got = subscribe_collect(
            &mut raw,
            raw_subscribe_with(2, &o("a"), opts(RQoS::AtLeastOnce, false, false, 0), 2),
            1,
        )
        .await;
        assert_eq!(got, vec![(o("a"), "ra".into(), vec![2])], "round {round}");
        raw_publish_acked(&mut p, &o("a"), 20, false, b"live").await;
        let (mut ids, mut max_qos) = (Vec::new(), RQoS::AtMostOnce);
        let mut copies = 0;
        while let Some(pk) = next_acked(&mut raw, if copies == 0 { WAIT } else { QUIET }).await {
            match pk {
                Packet::Publish(m) => {
                    assert_eq!((&m.payload[..], m.retain), (&b"live"[..], false));
                    ids.extend(m.properties.subscription_ids.clone());
                    max_qos = max_qos.max(m.qos);
                    copies += 1;
                }
                other => panic!("round {round}: {other:?}"),
            }
        }
        ids.sort();
        assert_eq!(
            (ids, max_qos),
            (vec![1, 2], RQoS::AtLeastOnce),
            "round {round}: every matching identifier, the highest granted QoS"
        );

        // No local: the client's own publish does not come back.
        let got = subscribe_collect(
            &mut raw,
            raw_subscribe_with(
                3,
                &format!("{base}/nl"),
                opts(RQoS::AtLeastOnce, true, false, 0),
                3,
            ),
            0,
        )
        .await;
        assert!(got.is_empty());
        raw.send(&raw_publish(
            &format!("{base}/nl"),
            RQoS::AtMostOnce,
            0,
            b"mine",
        ))
        .await;
        assert!(
            next_acked(&mut raw, QUIET).await.is_none(),
            "round {round}: no local"
        );
        // Retain handling 1: a new subscription of this session gets the retained
        // message, once.
        let rh1 = opts(RQoS::AtLeastOnce, false, false, 1);
        let got = subscribe_collect(
            &mut raw,
            raw_subscribe_with(4, &format!("{base}/r"), rh1, 4),
            1,
        )
        .await;
        assert_eq!(
            got,
            vec![(format!("{base}/r"), "rr".into(), vec![4])],
            "round {round}"
        );
        let got = subscribe_collect(
            &mut raw,
            raw_subscribe_with(5, &format!("{base}/r"), rh1, 4),
            0,
        )
        .await;
        assert!(got.is_empty());
        assert!(
            next_acked(&mut raw, QUIET).await.is_none(),
            "round {round}: retain handling 1 on an existing subscription"
        );
        // Retain as published, on a subscription of its own.
        let rap = format!("{base}/rap/{round}");
        let got = subscribe_collect(
            &mut raw,
            raw_subscribe_with(6, &rap, opts(RQoS::AtLeastOnce, false, true, 2), 6),
            0,
        )
        .await;
        assert!(got.is_empty());
        raw_publish_acked(&mut p, &rap, 21, true, b"kept").await;
        match next_acked(&mut raw, WAIT).await {
            Some(Packet::Publish(m)) => {
                assert!(m.retain, "round {round}: retain as published");
                assert_eq!(m.properties.subscription_ids, vec![6]);
            }
            other => panic!("round {round}: {other:?}"),
        }
        raw_publish_acked(&mut p, &rap, 22, true, b"").await;
        assert!(matches!(
            next_acked(&mut raw, WAIT).await,
            Some(Packet::Publish(_))
        ));
        // The next round's leftovers are this connection's.
        old = raw;
    }

    // Leave nothing behind: the retained messages, the keeper's session, this one.
    for (pkid, topic) in [(30, o("a")), (31, o("b/c")), (32, format!("{base}/r"))] {
        raw_publish_acked(&mut p, &topic, pkid, true, b"").await;
    }
    let (mut k, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &keeper, true)).await;
    for r in [&mut k, &mut old] {
        leave_politely(r).await;
    }
}

/// A publisher that waits for each PUBACK and each delivery before the next message (a
/// burst hides this): 2 and 4 members of one shared subscription take turns, as on
/// Mosquitto. (mqgate gave one member all 200 of such a run.)
async fn shared_subscription_rotates_with_a_paced_publisher(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    for n in [2usize, 4] {
        let topic = uniq("paced");
        let share = format!("$share/{}/{topic}", uniq("g"));
        let mut members = Vec::new();
        for i in 0..n {
            let mut m = c5(&t, &uniq(&format!("m{i}")), true).await;
            m.subscribe(&share, Q5::AtLeastOnce).await;
            members.push(m);
        }
        let (mut p, _) = c3(&t, &uniq("p"), true).await;
        let rounds = 20 * n;
        let mut got = vec![0usize; n];
        for k in 0..rounds {
            p.client
                .publish(&topic, Q3::AtLeastOnce, false, format!("{k}"))
                .await
                .unwrap();
            p.acked(1).await;
            let waits = members
                .iter_mut()
                .enumerate()
                .map(|(i, m)| Box::pin(async move { (i, m.publish_in(WAIT).await) }));
            let ((i, m), _, _) = futures_util::future::select_all(waits).await;
            let m = m.unwrap_or_else(|| panic!("message {k} delivered to no member"));
            assert_eq!(body5(&m), k.to_string());
            got[i] += 1;
        }
        for (i, g) in got.iter().enumerate() {
            assert!(
                (*g as f64 - 20.0).abs() <= 2.0,
                "{n} members: member {i} got {g} of {rounds}: {got:?}"
            );
        }
    }
}

async fn shared_subscription_splits_and_hands_over(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("work");
    let share = format!("$share/{}/{topic}", uniq("g"));
    let mut m1 = c5(&t, &uniq("m1"), true).await;
    m1.subscribe(&share, Q5::AtLeastOnce).await;
    let mut m2 = c5(&t, &uniq("m2"), true).await;
    m2.subscribe(&share, Q5::AtLeastOnce).await;
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    for i in 0..40 {
        p.client
            .publish(&topic, Q3::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    p.acked(40).await;
    let mut got = Vec::new();
    let (mut n1, mut n2) = (0, 0);
    loop {
        tokio::select! {
            Some(m) = m1.publish_in(QUIET) => { n1 += 1; got.push(body5(&m)); }
            Some(m) = m2.publish_in(QUIET) => { n2 += 1; got.push(body5(&m)); }
            else => break,
        }
        if got.len() == 40 {
            break;
        }
    }
    got.sort_by_key(|s| s.parse::<u32>().unwrap());
    assert_eq!(
        got,
        (0..40).map(|i| i.to_string()).collect::<Vec<_>>(),
        "each message once"
    );
    assert!(n1 > 0 && n2 > 0, "both members got a share ({n1}, {n2})");
    // A member that leaves with unacknowledged messages: another member gets them.
    let mut o = opts5(&t, &uniq("lazy"), true);
    o.set_manual_acks(true);
    let (mut lazy, _) = c5_with(o).await.unwrap();
    lazy.subscribe(&share, Q5::AtLeastOnce).await;
    m1.disconnect().await;
    m2.disconnect().await;
    for i in 0..5 {
        p.client
            .publish(&topic, Q3::AtLeastOnce, false, format!("late{i}"))
            .await
            .unwrap();
    }
    p.acked(5).await;
    let held = lazy.publishes(5).await;
    assert_eq!(held.len(), 5);
    let mut m3 = c5(&t, &uniq("m3"), true).await;
    m3.subscribe(&share, Q5::AtLeastOnce).await;
    drop(lazy); // gone without acknowledging
    let mut again: Vec<String> = m3.publishes(5).await.iter().map(body5).collect();
    again.sort();
    assert_eq!(
        again,
        (0..5).map(|i| format!("late{i}")).collect::<Vec<_>>()
    );
}

/// The last holder of a shared subscription unsubscribes while a new one subscribes
/// (through another gateway in the cluster variant): the new one gets what is published
/// next. The release (count to 0, then unbind) and the new hold (bind, then count)
/// interleave; an unbind that lands after the new bind must not leave the topic unbound.
async fn shared_subscription_last_holder_leaves_as_another_comes(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("race");
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    for round in 0..12 {
        let share = format!("$share/{}/{topic}", uniq("g"));
        let mut leaving = c5(&t, &uniq("leaving"), true).await;
        leaving.subscribe(&share, Q5::AtLeastOnce).await;
        let mut staying = c5(&t, &uniq("staying"), true).await;
        let unsubscribed = async {
            leaving.client.unsubscribe(&share).await.unwrap();
            loop {
                match leaving.next(WAIT).await {
                    Some(rumqttc::v5::Event::Incoming(p5::Packet::UnsubAck(_))) => break,
                    Some(_) => {}
                    None => panic!("no UNSUBACK"),
                }
            }
        };
        tokio::join!(unsubscribed, staying.subscribe(&share, Q5::AtLeastOnce));
        p.client
            .publish(&topic, Q3::AtLeastOnce, false, format!("{round}"))
            .await
            .unwrap();
        p.acked(1).await;
        let got = staying.publish_in(WAIT).await;
        assert_eq!(
            got.as_ref().map(body5),
            Some(round.to_string()),
            "round {round}: the new holder got what was published after it subscribed"
        );
        leaving.disconnect().await;
        staying.disconnect().await;
    }
}

// ---------------------------------------------------------------------------------------
// Retained messages and 5.0 properties

scenario!(
    retained_lifecycle,
    message_expiry,
    message_expiry_zero,
    properties_pass_through,
    topic_aliases,
    alias_of_a_dropped_delivery,
    no_matching_subscribers
);

async fn retained_lifecycle(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("ret");
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    p.client
        .publish(&topic, Q3::AtLeastOnce, true, "v1")
        .await
        .unwrap();
    p.client
        .publish(&topic, Q3::AtLeastOnce, true, "v2")
        .await
        .unwrap();
    p.acked(2).await;
    let (mut s, _) = c3(&t, &uniq("s"), true).await;
    s.subscribe(&topic, Q3::AtLeastOnce).await;
    let m = s.publish_in(WAIT).await.expect("retained");
    assert!(m.retain);
    assert_eq!(body(&m), "v2", "replaced");
    assert!(s.publish_in(QUIET).await.is_none(), "only the latest");
    // A live delivery of a retained publish is not flagged retained (3.1.1).
    p.client
        .publish(&topic, Q3::AtLeastOnce, true, "v3")
        .await
        .unwrap();
    let live = s.publish_in(WAIT).await.unwrap();
    assert!(!live.retain);
    // An empty retained payload clears it.
    p.client
        .publish(&topic, Q3::AtLeastOnce, true, "")
        .await
        .unwrap();
    p.acked(2).await;
    let (mut s2, _) = c3(&t, &uniq("s2"), true).await;
    s2.subscribe(&topic, Q3::AtLeastOnce).await;
    assert!(s2.publish_in(QUIET).await.is_none(), "cleared");
}

async fn message_expiry(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("expiry");
    let id = uniq("away");
    let mut c = Raw::connect_packet(Version::V5, &id, true);
    c.properties.session_expiry = Some(60);
    let (mut raw, _) = Raw::connect(&t, c.clone()).await;
    subscribed(&mut raw, 1, &topic, RQoS::AtLeastOnce).await;
    leave_politely(&mut raw).await;
    drop(raw);
    let pc = c5(&t, &uniq("p"), true).await;
    let short = p5::PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    let long = p5::PublishProperties {
        message_expiry_interval: Some(100),
        ..Default::default()
    };
    pc.client
        .publish_with_properties(&topic, Q5::AtLeastOnce, false, "short", short)
        .await
        .unwrap();
    pc.client
        .publish_with_properties(&topic, Q5::AtLeastOnce, false, "long", long)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    c.clean_start = false;
    let (mut raw, _) = Raw::connect(&t, c).await;
    match raw.recv(WAIT).await {
        Ok(Packet::Publish(m)) => {
            assert_eq!(&m.payload[..], b"long", "the expired message was dropped");
            let left = m.properties.message_expiry.expect("expiry sent on");
            assert!((95..100).contains(&left), "decremented: {left}");
        }
        other => panic!("{other:?}"),
    }
}

/// A Message Expiry Interval of 0 is no expiry, as Mosquitto takes it: the message is
/// delivered (it used to expire on arrival, while its publisher had its PUBACK).
async fn message_expiry_zero(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("expiry0");
    let mut s = c5(&t, &uniq("s"), true).await;
    s.subscribe(&topic, Q5::AtLeastOnce).await;
    let pc = c5(&t, &uniq("p"), true).await;
    let zero = p5::PublishProperties {
        message_expiry_interval: Some(0),
        ..Default::default()
    };
    pc.client
        .publish_with_properties(&topic, Q5::AtLeastOnce, false, "zero", zero)
        .await
        .unwrap();
    let p = s.publish_in(WAIT).await.expect("delivered");
    assert_eq!(body5(&p), "zero");
    assert_eq!(
        p.properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval),
        None,
        "no expiry to count down"
    );
}

async fn properties_pass_through(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("props");
    let mut s = c5(&t, &uniq("s"), true).await;
    s.subscribe(&topic, Q5::AtLeastOnce).await;
    let pc = c5(&t, &uniq("p"), true).await;
    let props = p5::PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        content_type: Some("application/json".into()),
        user_properties: vec![
            ("k".into(), "v1".into()),
            ("k".into(), "v2".into()),
            ("other".into(), "x".into()),
        ],
        ..Default::default()
    };
    pc.client
        .publish_with_properties(&topic, Q5::AtLeastOnce, false, "{}", props.clone())
        .await
        .unwrap();
    let m = s.publish_in(WAIT).await.expect("delivered");
    let got = m.properties.expect("properties");
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.response_topic, props.response_topic);
    assert_eq!(got.correlation_data, props.correlation_data);
    assert_eq!(got.content_type, props.content_type);
    assert_eq!(
        got.user_properties, props.user_properties,
        "user properties, in order"
    );
}

async fn topic_aliases(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("alias");
    let (mut sub, _) = c3(&t, &uniq("s"), true).await;
    sub.subscribe(&topic, Q3::AtLeastOnce).await;
    // Inbound: set the alias with the topic, then use it alone.
    let (mut raw, a) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("p"), true)).await;
    assert!(a.properties.topic_alias_maximum.unwrap_or(0) >= 1);
    let mut first = RawPublish {
        dup: false,
        qos: RQoS::AtLeastOnce,
        retain: false,
        topic: topic.clone(),
        pkid: 1,
        properties: Properties::default(),
        payload: Bytes::from_static(b"a"),
    };
    first.properties.topic_alias = Some(1);
    raw.send(&Packet::Publish(first.clone())).await;
    let mut second = first.clone();
    second.topic.clear();
    second.pkid = 2;
    second.payload = Bytes::from_static(b"b");
    raw.send(&Packet::Publish(second)).await;
    let got: Vec<String> = sub.publishes(2).await.iter().map(body).collect();
    assert_eq!(got, vec!["a", "b"]);
    // Outbound: a client allowing aliases gets them.
    let mut c = Raw::connect_packet(Version::V5, &uniq("r"), true);
    c.properties.topic_alias_maximum = Some(5);
    let (mut r, _) = Raw::connect(&t, c).await;
    subscribed(&mut r, 1, &topic, RQoS::AtMostOnce).await;
    for (i, payload) in [b"1", b"2"].iter().enumerate() {
        raw.send(&raw_publish(&topic, RQoS::AtMostOnce, 0, *payload))
            .await;
        match r.recv(WAIT).await {
            Ok(Packet::Publish(m)) => {
                let alias = m.properties.topic_alias;
                if i == 0 {
                    assert_eq!(m.topic, topic);
                } else if alias.is_some() {
                    assert!(m.topic.is_empty(), "an alias already set stands alone");
                }
            }
            other => panic!("{other:?}"),
        }
    }
    // An alias over the maximum: DISCONNECT 0x94.
    let mut bad = first;
    bad.properties.topic_alias = Some(u16::MAX);
    bad.pkid = 9;
    raw.send(&Packet::Publish(bad)).await;
    assert_eq!(
        raw.expect_close(WAIT).await,
        Some(reason::TOPIC_ALIAS_INVALID)
    );
}

/// A delivery over the client's Maximum Packet Size is dropped (MQTT 5.0, 3.1.2.11.4):
/// a topic alias it would have set is not taken with it, so the next message on that
/// topic still names the topic (an alias the client never saw would be a protocol
/// error, 3.3.2.3.4).
async fn alias_of_a_dropped_delivery(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let topic = uniq("alias-big");
    let mut c = Raw::connect_packet(Version::V5, &uniq("r"), true);
    c.properties.topic_alias_maximum = Some(5);
    c.properties.maximum_packet_size = Some(128);
    let (mut r, _) = Raw::connect(&t, c).await;
    subscribed(&mut r, 1, &topic, RQoS::AtMostOnce).await;
    let (mut raw, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("p"), true)).await;
    raw.send(&raw_publish(&topic, RQoS::AtMostOnce, 0, &[b'x'; 400]))
        .await;
    raw.send(&raw_publish(&topic, RQoS::AtMostOnce, 0, b"small"))
        .await;
    match r.recv(WAIT).await {
        Ok(Packet::Publish(m)) => {
            assert_eq!(&m.payload[..], b"small", "the large one is dropped");
            assert_eq!(m.topic, topic, "the first delivery on the topic names it");
        }
        other => panic!("{other:?}"),
    }
}

async fn no_matching_subscribers(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let (mut raw, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("p"), true)).await;
    raw.send(&raw_publish(
        &uniq("nobody/home"),
        RQoS::AtLeastOnce,
        1,
        b"x",
    ))
    .await;
    match raw.recv(WAIT).await {
        Ok(Packet::Ack(a)) => {
            assert_eq!(a.kind, AckKind::PubAck);
            assert!(
                a.reason == reason::NO_MATCHING_SUBSCRIBERS || a.reason == 0,
                "{}",
                a.reason
            );
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Bad input

scenario!(
    publish_before_connect,
    second_connect,
    wildcard_in_publish_topic,
    invalid_utf8,
    oversize_packet,
    malformed_reserved_flags,
);

/// A bystander that must not notice anything.
async fn bystander(t: &Target) -> (C3, String) {
    let topic = uniq("bystander");
    let (mut c, _) = c3(t, &uniq("b"), true).await;
    c.subscribe(&topic, Q3::AtLeastOnce).await;
    (c, topic)
}

async fn bystander_ok(t: &Target, c: &mut C3, topic: &str) {
    let (p, _) = c3(t, &uniq("bp"), true).await;
    p.client
        .publish(topic, Q3::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    assert_eq!(
        body(&c.publish_in(WAIT).await.expect("bystander unaffected")),
        "still here"
    );
}

async fn publish_before_connect(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let (mut by, topic) = bystander(&t).await;
    let mut raw = Raw::open(&t, Version::V311).await;
    raw.send(&raw_publish("a/b", RQoS::AtMostOnce, 0, b"x"))
        .await;
    assert_eq!(raw.expect_close(WAIT).await, None);
    bystander_ok(&t, &mut by, &topic).await;
}

async fn second_connect(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let (mut by, topic) = bystander(&t).await;
    let c = Raw::connect_packet(Version::V5, &uniq("twice"), true);
    let (mut raw, _) = Raw::connect(&t, c.clone()).await;
    raw.send(&Packet::Connect(Box::new(c))).await;
    let r = raw.expect_close(WAIT).await;
    assert!(r.is_none() || r == Some(reason::PROTOCOL_ERROR), "{r:?}");
    bystander_ok(&t, &mut by, &topic).await;
}

async fn wildcard_in_publish_topic(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let (mut by, topic) = bystander(&t).await;
    for v in [Version::V311, Version::V5] {
        let (mut raw, _) = Raw::connect(&t, Raw::connect_packet(v, &uniq("wild"), true)).await;
        raw.send(&raw_publish("a/+/c", RQoS::AtLeastOnce, 1, b"x"))
            .await;
        let r = raw.expect_close(WAIT).await;
        if v == Version::V5 {
            assert!(
                r.is_none()
                    || r == Some(reason::TOPIC_NAME_INVALID)
                    || r == Some(reason::PROTOCOL_ERROR),
                "{r:?}"
            );
        } else {
            assert_eq!(r, None);
        }
    }
    bystander_ok(&t, &mut by, &topic).await;
}

async fn invalid_utf8(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let (mut by, topic) = bystander(&t).await;
    let (mut raw, _) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("utf"), true)).await;
    // PUBLISH QoS 0, topic of 2 bytes 0xC3 0x28 (invalid UTF-8).
    raw.send_bytes(&[0x30, 5, 0, 2, 0xC3, 0x28, 0]).await;
    let r = raw.expect_close(WAIT).await;
    assert!(r.is_none() || r == Some(reason::MALFORMED_PACKET), "{r:?}");
    bystander_ok(&t, &mut by, &topic).await;
}

async fn oversize_packet(b: Backend) {
    let cfg = MqttConfig {
        max_packet_size: 1024,
        ..Default::default()
    };
    let Some(t) = Target::mqgate_only(b, cfg).await else {
        return;
    };
    let (mut by, topic) = bystander(&t).await;
    let (mut raw, a) = Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("big"), true)).await;
    assert_eq!(a.properties.maximum_packet_size, Some(1024));
    // Announce 1 MiB; the broker refuses before the body arrives.
    raw.send_bytes(&[0x30, 0x80, 0x80, 0x40]).await;
    assert_eq!(raw.expect_close(WAIT).await, Some(reason::PACKET_TOO_LARGE));
    let (mut raw, _) =
        Raw::connect(&t, Raw::connect_packet(Version::V311, &uniq("big3"), true)).await;
    raw.send_bytes(&[0x30, 0x80, 0x80, 0x40]).await;
    assert_eq!(raw.expect_close(WAIT).await, None, "3.1.1: a plain close");
    bystander_ok(&t, &mut by, &topic).await;
}

async fn malformed_reserved_flags(b: Backend) {
    let Some(t) = Target::standard(b).await else {
        return;
    };
    let (mut by, topic) = bystander(&t).await;
    for bytes in [
        &[0x82u8, 2, 0, 1][..],          // SUBSCRIBE without filters
        &[0x80, 6, 0, 1, 0, 1, b'a', 0], // SUBSCRIBE with flags 0000
        &[0x36, 5, 0, 1, b'a', 0, 1],    // PUBLISH QoS 3
        &[0x00, 0],                      // reserved type 0
    ] {
        let (mut raw, _) =
            Raw::connect(&t, Raw::connect_packet(Version::V311, &uniq("flags"), true)).await;
        raw.send_bytes(bytes).await;
        assert_eq!(raw.expect_close(WAIT).await, None, "{bytes:?}");
    }
    bystander_ok(&t, &mut by, &topic).await;
}

// ---------------------------------------------------------------------------------------
// mqgate extensions: delay, retry ladder, replay

scenario!(
    delayed_topic_prefix,
    delay_user_properties,
    failed_consumption_retries_then_dlq,
    shared_replay_from_timestamp,
    session_start_stored_unless_clean
);

/// A session's group stores its start offset when the session connects, so that it is
/// known (listed, resettable) after a crash, except a clean session's (3.1.1 clean
/// session, 5.0 session expiry 0), which ends with its connection: its start waits for
/// its first delivery, and an idle clean connection writes none.
async fn session_start_stored_unless_clean(b: Backend) {
    let Some(t) = Target::mqgate_only(b, MqttConfig::default()).await else {
        return;
    };
    let topic = uniq("starts");
    let stored = |id: &str| {
        let g = mqgate_mqtt::session::session_group(id);
        let stores = t.stores().to_vec();
        async move {
            let mut n = 0;
            for s in stores {
                n += mqgate_store::Store::committed_offsets(&*s, &g)
                    .await
                    .unwrap()
                    .len();
            }
            n
        }
    };
    let clean = uniq("clean");
    let (mut c, _) = c3(&t, &clean, true).await;
    c.subscribe(&topic, Q3::AtLeastOnce).await;
    let kept = uniq("kept");
    let (mut k, _) = c3(&t, &kept, false).await;
    k.subscribe(&topic, Q3::AtLeastOnce).await;
    let (v5_clean, v5_kept) = (uniq("clean5"), uniq("kept5"));
    let mut c5_clean = c5(&t, &v5_clean, true).await;
    c5_clean.subscribe(&topic, Q5::AtLeastOnce).await;
    let mut o = opts5(&t, &v5_kept, true);
    o.set_connect_properties(p5::ConnectProperties {
        session_expiry_interval: Some(60),
        ..Default::default()
    });
    let (mut k5, _) = c5_with(o).await.unwrap();
    k5.subscribe(&topic, Q5::AtLeastOnce).await;
    assert_eq!(stored(&clean).await, 0, "3.1.1 clean session");
    assert_eq!(stored(&v5_clean).await, 0, "5.0 session expiry 0");
    assert_eq!(stored(&kept).await, 1, "3.1.1 persistent session");
    assert_eq!(stored(&v5_kept).await, 1, "5.0 session expiry 60");
    // The first delivery stores the clean session's start with its delivered mark.
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    p.client
        .publish(&topic, Q3::AtLeastOnce, false, "one")
        .await
        .unwrap();
    p.acked(1).await;
    assert_eq!(body(&c.publishes(1).await[0]), "one");
    assert_eq!(stored(&clean).await, 1, "stored with the first delivery");
}

async fn delayed_topic_prefix(b: Backend) {
    let Some(t) = Target::mqgate_only(b, MqttConfig::default()).await else {
        return;
    };
    let topic = uniq("later");
    let (mut s, _) = c3(&t, &uniq("s"), true).await;
    s.subscribe(&topic, Q3::AtLeastOnce).await;
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    let start = std::time::Instant::now();
    p.client
        .publish(
            format!("$delayed/1/{topic}"),
            Q3::AtLeastOnce,
            false,
            "tick",
        )
        .await
        .unwrap();
    p.acked(1).await;
    let m = s.publish_in(WAIT).await.expect("released");
    assert_eq!(m.topic, topic, "delivered on the real topic");
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "{:?}",
        start.elapsed()
    );
}

async fn delay_user_properties(b: Backend) {
    let Some(t) = Target::mqgate_only(b, MqttConfig::default()).await else {
        return;
    };
    let topic = uniq("later5");
    let mut s = c5(&t, &uniq("s"), true).await;
    s.subscribe(&topic, Q5::AtLeastOnce).await;
    let p = c5(&t, &uniq("p"), true).await;
    let start = std::time::Instant::now();
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 1200;
    let by_delay = p5::PublishProperties {
        user_properties: vec![("x-delay".into(), "800".into())],
        ..Default::default()
    };
    let by_time = p5::PublishProperties {
        user_properties: vec![("x-deliver-at".into(), at.to_string())],
        ..Default::default()
    };
    p.client
        .publish_with_properties(&topic, Q5::AtLeastOnce, false, "delay", by_delay)
        .await
        .unwrap();
    p.client
        .publish_with_properties(&topic, Q5::AtLeastOnce, false, "at", by_time)
        .await
        .unwrap();
    let first = s.publish_in(WAIT).await.unwrap();
    assert_eq!(body5(&first), "delay");
    assert!(start.elapsed() >= Duration::from_millis(750));
    let second = s.publish_in(WAIT).await.unwrap();
    assert_eq!(body5(&second), "at");
    assert!(start.elapsed() >= Duration::from_millis(1150));
    assert_eq!(topic5(&second), topic);
}

async fn failed_consumption_retries_then_dlq(b: Backend) {
    let core = mqgate_core::CoreConfig {
        delay_levels: vec![Duration::from_millis(100); 18],
        max_reconsume_times: 2,
        ..Default::default()
    };
    let Some(t) = Target::mqgate_with_core(b, MqttConfig::default(), core).await else {
        return;
    };
    let topic = uniq("fail");
    let group = uniq("g");
    let (mut raw, _) =
        Raw::connect(&t, Raw::connect_packet(Version::V5, &uniq("picky"), true)).await;
    subscribed(
        &mut raw,
        1,
        &format!("$share/{group}/{topic}"),
        RQoS::AtLeastOnce,
    )
    .await;
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    p.client
        .publish(&topic, Q3::AtLeastOnce, false, "poison")
        .await
        .unwrap();
    p.acked(1).await;
    // Delivered, refused (0x80), retried, ... then dead-lettered: 1 + 2 retries.
    for attempt in 0..3 {
        match raw.recv(WAIT).await {
            Ok(Packet::Publish(m)) => {
                assert_eq!(&m.payload[..], b"poison", "attempt {attempt}");
                raw.send(&raw_ack(AckKind::PubAck, m.pkid, reason::UNSPECIFIED_ERROR))
                    .await;
            }
            other => panic!("attempt {attempt}: {other:?}"),
        }
    }
    assert!(
        matches!(
            raw.recv(Duration::from_millis(800)).await,
            Err(RawEnd::Timeout)
        ),
        "no more after the last retry"
    );
    let broker = t.broker().unwrap();
    let g = mqgate_store::GroupName::new(format!(
        "{}{group}/{topic}",
        mqgate_mqtt::session::SHARED_PREFIX
    ))
    .unwrap();
    let mut dead = Vec::new();
    for _ in 0..50 {
        dead = broker.dlq(&g, 0, 10).await.unwrap();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1, "in the group's DLQ");
    assert_eq!(&dead[0].message.message.body[..], b"poison");
}

async fn shared_replay_from_timestamp(b: Backend) {
    let Some(t) = Target::mqgate_only(b, MqttConfig::default()).await else {
        return;
    };
    let topic = uniq("replay");
    let share = format!("$share/{}/{topic}", uniq("g"));
    let mut s = c5(&t, &uniq("s"), true).await;
    s.subscribe(&share, Q5::AtLeastOnce).await;
    let (mut p, _) = c3(&t, &uniq("p"), true).await;
    for i in 0..3 {
        p.client
            .publish(&topic, Q3::AtLeastOnce, false, format!("old{i}"))
            .await
            .unwrap();
    }
    p.acked(3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mid = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..3 {
        p.client
            .publish(&topic, Q3::AtLeastOnce, false, format!("new{i}"))
            .await
            .unwrap();
    }
    p.acked(3).await;
    assert_eq!(s.publishes(6).await.len(), 6);
    // Replay from the middle: a SUBSCRIBE carrying x-stream-offset.
    let props = p5::SubscribeProperties {
        id: None,
        user_properties: vec![("x-stream-offset".into(), mid.to_string())],
    };
    s.client
        .subscribe_with_properties(&share, Q5::AtLeastOnce, props)
        .await
        .unwrap();
    s.suback().await;
    let again: Vec<String> = s.publishes(3).await.iter().map(body5).collect();
    assert_eq!(again, vec!["new0", "new1", "new2"]);
    // And from the first.
    let props = p5::SubscribeProperties {
        id: None,
        user_properties: vec![("x-stream-offset".into(), "first".into())],
    };
    s.client
        .subscribe_with_properties(&share, Q5::AtLeastOnce, props)
        .await
        .unwrap();
    s.suback().await;
    let all: Vec<String> = s.publishes(6).await.iter().map(body5).collect();
    assert_eq!(all[0], "old0");
}
