//! Issue 18, item 2: topic ACLs cannot be bypassed. Every scenario drives an in-process
//! mqgate (MQTT and AMQP listeners over one core, one rule set) on both backends the way
//! an attacker would: raw MQTT packets on mqgate's codec and lapin.
//!
//! - a subscription may be granted (`#`, `+/x`, `$share/g/#`, ...), but a message whose
//!   topic the subscriber may not read is never delivered to it, retained ones included,
//!   whatever door it was published through;
//! - `%c` / `%u` never widen a rule: a client id `#` or `+` gets nothing of `app/%c/#`;
//! - AMQP publishes to `amq.topic` and bindings from it obey the same rules (403);
//! - a named user without a permission on vhost `/` cannot connect over MQTT;
//! - a catch-all deny and deny-by-default cover `$`-topics.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    QueueBindOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use mqgate_amqp::{AmqpConfig, AmqpServer, Permission};
use mqgate_conformance::mqtt::Backend;
use mqgate_core::{Broker, CoreConfig, SystemClock, TopicAcl};
use mqgate_mqtt::codec::{
    self, reason, Ack, AckKind, Connect, Packet, Properties, Publish, QoS, SubOptions, Subscribe,
    Version,
};
use mqgate_mqtt::{Access, AclDefault, AclRule, MqttConfig, MqttServer};
use mqgate_store::{MemoryStore, RocksConfig, RocksStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

use mqgate_conformance::scenario;

scenario!(
    wildcard_subscriptions_never_deliver_denied_topics,
    client_id_wildcards_never_widen_pattern_rules,
    amqp_publish_to_amq_topic_obeys_the_topic_acl,
    amqp_bindings_with_amq_topic_obey_the_topic_acl,
    mqtt_user_without_vhost_permission_is_refused,
    catch_all_deny_and_deny_by_default_cover_dollar_topics,
);

// ---------------------------------------------------------------------------------------
// The broker: MQTT and AMQP on one core, the same users and topic rules for both.

/// Users: `guest` (every permission on `/` and `other`), `alice` (every permission on
/// `/`), `outsider` (a permission on `other` only).
struct Env {
    broker: Option<Broker>,
    mqtt: Option<MqttServer>,
    amqp: Option<AmqpServer>,
    mqtt_port: u16,
    amqp_port: u16,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Env {
    fn drop(&mut self) {
        let (Some(broker), Some(mqtt), Some(amqp)) =
            (self.broker.take(), self.mqtt.take(), self.amqp.take())
        else {
            return;
        };
        let dir = self.dir.take();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                amqp.shutdown(Duration::from_millis(200)).await;
                mqtt.shutdown(Duration::from_millis(200)).await;
                broker.shutdown().await;
                drop(dir);
            });
        }
    }
}

fn rule(access: Access, filter: &str, allow: bool) -> AclRule {
    AclRule {
        user: None,
        access,
        filter: filter.into(),
        allow,
    }
}

async fn start(b: Backend, rules: Vec<AclRule>, default: AclDefault) -> Env {
    if let Ok(filter) = std::env::var("MQGATE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let dir = (b == Backend::Rocks).then(|| tempfile::tempdir().expect("tempdir"));
    let store: Arc<dyn Store> = match &dir {
        Some(d) => Arc::new(RocksStore::open(RocksConfig::new(d.path())).expect("open rocks")),
        None => Arc::new(MemoryStore::new()),
    };
    let broker = Broker::start(store, CoreConfig::default(), Arc::new(SystemClock))
        .await
        .expect("start core");

    let mut users = mqgate_core::Users::default();
    for u in ["guest", "alice", "outsider"] {
        users.insert_plain(u, if u == "guest" { "guest" } else { "pw" }, &[]);
    }
    let permissions = HashMap::from([
        (
            "guest".to_owned(),
            HashMap::from([
                ("/".to_owned(), Permission::all()),
                ("other".to_owned(), Permission::all()),
            ]),
        ),
        (
            "alice".to_owned(),
            HashMap::from([("/".to_owned(), Permission::all())]),
        ),
        (
            "outsider".to_owned(),
            HashMap::from([("other".to_owned(), Permission::all())]),
        ),
    ]);
    let vhost_users: HashSet<String> = permissions
        .iter()
        .filter(|(_, v)| v.contains_key("/"))
        .map(|(u, _)| u.clone())
        .collect();
    let acl = TopicAcl::new(rules, default);
    let amqp_cfg = AmqpConfig {
        users: users.clone(),
        permissions,
        vhosts: vec!["/".into(), "other".into()],
        topic_acl: acl.clone(),
        ..AmqpConfig::default()
    };
    let mqtt_cfg = MqttConfig {
        users,
        acl: acl.rules,
        acl_default: acl.default,
        vhost_users: Some(vhost_users),
        ..MqttConfig::default()
    };
    let amqp_l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mqtt_l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let amqp_port = amqp_l.local_addr().expect("addr").port();
    let mqtt_port = mqtt_l.local_addr().expect("addr").port();
    let amqp = AmqpServer::start(broker.clone(), amqp_cfg)
        .await
        .expect("start amqp");
    amqp.listen(amqp_l);
    let mqtt = MqttServer::start(broker.clone(), mqtt_cfg)
        .await
        .expect("start mqtt");
    mqtt.listen(mqtt_l);
    Env {
        broker: Some(broker),
        mqtt: Some(mqtt),
        amqp: Some(amqp),
        mqtt_port,
        amqp_port,
        dir,
    }
}

impl Env {
    async fn amqp(&self, user: &str, pass: &str) -> Connection {
        Connection::connect(
            &format!("amqp://{user}:{pass}@127.0.0.1:{}/%2f", self.amqp_port),
            lapin::ConnectionProperties::default(),
        )
        .await
        .expect("AMQP connect")
    }
}

// ---------------------------------------------------------------------------------------
// A raw MQTT client on mqgate's codec (real clients treat refusals as fatal errors).

struct Mq {
    stream: TcpStream,
    buf: BytesMut,
    version: Version,
    /// Topics of the PUBLISH packets received so far (QoS 1/2 ones acknowledged).
    seen: Vec<String>,
    closed: bool,
}

impl Mq {
    /// CONNECT; returns the client and the CONNACK code.
    async fn connect(
        env: &Env,
        version: Version,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> (Mq, u8) {
        let stream = TcpStream::connect(("127.0.0.1", env.mqtt_port))
            .await
            .expect("connect");
        stream.set_nodelay(true).ok();
        let mut mq = Mq {
            stream,
            buf: BytesMut::new(),
            version,
            seen: Vec::new(),
            closed: false,
        };
        mq.send(&Packet::Connect(Box::new(Connect {
            version,
            clean_start: true,
            keep_alive: 30,
            properties: Properties::default(),
            client_id: client_id.into(),
            will: None,
            username: login.map(|(u, _)| u.to_owned()),
            password: login.map(|(_, p)| Bytes::copy_from_slice(p.as_bytes())),
        })))
        .await;
        match mq.recv(WAIT).await {
            Some(Packet::ConnAck(a)) => {
                let code = a.code;
                (mq, code)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        codec::encode(p, self.version, &mut out);
        let _ = self.stream.write_all(&out).await;
    }

    /// The next packet (`None`: nothing in time, or closed). Publishes are recorded in
    /// `seen` and acknowledged.
    async fn recv(&mut self, within: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match codec::decode(&mut self.buf, Some(self.version), codec::MAX_PACKET_SIZE) {
                Ok(Some(p)) => {
                    if let Packet::Publish(p) = &p {
                        self.seen.push(p.topic.clone());
                        let kind = match p.qos {
                            QoS::AtMostOnce => None,
                            QoS::AtLeastOnce => Some(AckKind::PubAck),
                            QoS::ExactlyOnce => Some(AckKind::PubRec),
                        };
                        if let Some(kind) = kind {
                            let ack = Packet::Ack(Ack {
                                kind,
                                pkid: p.pkid,
                                reason: 0,
                                properties: Properties::default(),
                            });
                            self.send(&ack).await;
                        }
                    }
                    return Some(p);
                }
                Ok(None) => {}
                Err(e) => panic!("undecodable bytes from the broker: {e}"),
            }
            if self.closed {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.closed = true;
                    return None;
                }
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    }

    /// SUBSCRIBE at QoS 1; the SUBACK codes.
    async fn subscribe(&mut self, pkid: u16, filters: &[&str]) -> Vec<u8> {
        let opts = SubOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: true,
            retain_handling: 0,
        };
        self.send(&Packet::Subscribe(Subscribe {
            pkid,
            properties: Properties::default(),
            filters: filters.iter().map(|f| ((*f).to_owned(), opts)).collect(),
        }))
        .await;
        loop {
            match self.recv(WAIT).await {
                Some(Packet::SubAck(a)) if a.pkid == pkid => return a.codes,
                Some(_) => {}
                None => panic!("no SUBACK for {filters:?}"),
            }
        }
    }

    /// PUBLISH; for QoS 1 the PUBACK reason with every success code as 0 (5.0 sends
    /// 0x10 "no matching subscribers"; 3.1.1 always 0), for QoS 0 `None`.
    async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, pkid: u16) -> Option<u8> {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: topic.into(),
            pkid: if qos == QoS::AtMostOnce { 0 } else { pkid },
            properties: Properties::default(),
            payload: Bytes::from_static(b"payload"),
        }))
        .await;
        if qos == QoS::AtMostOnce {
            return None;
        }
        loop {
            match self.recv(WAIT).await {
                Some(Packet::Ack(a)) if a.kind == AckKind::PubAck && a.pkid == pkid => {
                    return Some(if a.reason < 0x80 { 0 } else { a.reason });
                }
                Some(_) => {}
                None => panic!("no PUBACK for {topic}"),
            }
        }
    }

    /// Read until a publish on `marker` arrived and nothing more comes for a while; the
    /// topics received.
    async fn drain_until(&mut self, marker: &str) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.seen.iter().any(|t| t == marker) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if self.recv(left).await.is_none() {
                panic!("{marker} never arrived; got {:?}", self.seen);
            }
        }
        while self.recv(QUIET).await.is_some() {}
        self.seen.clone()
    }
}

fn v5_denied(code: u8) -> bool {
    code == reason::NOT_AUTHORIZED
}

// ---------------------------------------------------------------------------------------
// Scenarios

/// A rule denying reads of `denied/#` and no catch-all: subscribing `#`, `+/x`, `+/+`,
/// `$share/g/#`, `$share/g/+/x` is granted, but neither the retained `denied/x` nor live
/// ones (QoS 0, QoS 1, and from AMQP) are delivered; `ok/x` is.
async fn wildcard_subscriptions_never_deliver_denied_topics(b: Backend) {
    let env = start(
        b,
        vec![rule(Access::Subscribe, "denied/#", false)],
        AclDefault::Allow,
    )
    .await;
    let (mut p, code) = Mq::connect(&env, Version::V5, "publisher", Some(("alice", "pw"))).await;
    assert_eq!(code, reason::SUCCESS);
    // Retained first: delivered on subscribe.
    assert_eq!(
        p.publish("denied/x", QoS::AtLeastOnce, true, 1).await,
        Some(0)
    );
    assert_eq!(p.publish("ok/x", QoS::AtLeastOnce, true, 2).await, Some(0));

    let filters = ["#", "+/x", "+/+", "$share/g/#", "$share/g/+/x"];
    let (mut s, code) = Mq::connect(&env, Version::V5, "reader", Some(("alice", "pw"))).await;
    assert_eq!(code, reason::SUCCESS);
    let codes = s.subscribe(1, &filters).await;
    assert_eq!(codes, vec![1; filters.len()], "subscriptions are granted");
    // A 3.1.1 reader too.
    let (mut s3, code) = Mq::connect(&env, Version::V311, "reader3", None).await;
    assert_eq!(code, 0);
    assert_eq!(s3.subscribe(1, &["#"]).await, vec![1]);

    // Live: MQTT QoS 0 and 1, and AMQP through amq.topic.
    p.publish("denied/x", QoS::AtMostOnce, false, 0).await;
    assert_eq!(
        p.publish("denied/x", QoS::AtLeastOnce, false, 3).await,
        Some(0)
    );
    let conn = env.amqp("guest", "guest").await;
    let ch = confirmed(&conn).await;
    publish_amqp(&ch, "denied.x")
        .await
        .expect("AMQP publish allowed (only reads are denied)");
    assert_eq!(p.publish("ok/x", QoS::AtLeastOnce, false, 4).await, Some(0));
    p.publish("ok/end", QoS::AtLeastOnce, false, 5).await;

    for (who, c) in [("5.0", &mut s), ("3.1.1", &mut s3)] {
        let seen = c.drain_until("ok/end").await;
        assert!(
            !seen.iter().any(|t| t.starts_with("denied")),
            "{who} reader got a denied topic: {seen:?}"
        );
        assert!(
            seen.iter().filter(|t| *t == "ok/x").count() >= 2,
            "{who} reader got the retained and the live ok/x: {seen:?}"
        );
    }
    // A subscription naming the denied topics is still refused outright.
    assert_eq!(
        s.subscribe(2, &["denied/x", "$share/h/denied/#"]).await,
        vec![reason::NOT_AUTHORIZED; 2]
    );
}

/// `app/%c/#` allowed, `app/#` denied: a client with id `#` or `+` must not read or write
/// another client's `app/<id>/` topics (substituted, `app/#/#` would cover them all).
async fn client_id_wildcards_never_widen_pattern_rules(b: Backend) {
    let env = start(
        b,
        vec![
            rule(Access::All, "app/%c/#", true),
            rule(Access::All, "app/#", false),
        ],
        AclDefault::Allow,
    )
    .await;
    let (mut victim, code) = Mq::connect(&env, Version::V5, "victim", None).await;
    assert_eq!(code, reason::SUCCESS);
    assert_eq!(victim.subscribe(1, &["app/victim/#"]).await, vec![1]);

    for (n, id) in ["#", "+"].into_iter().enumerate() {
        let (mut evil, code) = Mq::connect(&env, Version::V5, id, None).await;
        assert_eq!(code, reason::SUCCESS, "client id {id}");
        // Reading: refused when named, never delivered through a wildcard.
        let codes = evil
            .subscribe(1, &["app/victim/#", "app/+/cmd", "$share/g/app/victim/#"])
            .await;
        assert!(
            codes.iter().all(|c| v5_denied(*c)),
            "client id {id} subscribing to another client's topics: {codes:?}"
        );
        assert_eq!(evil.subscribe(2, &["#"]).await, vec![1]);
        // Writing: refused.
        let pkid = 10 + n as u16;
        assert_eq!(
            evil.publish("app/victim/cmd", QoS::AtLeastOnce, false, pkid)
                .await,
            Some(reason::NOT_AUTHORIZED),
            "client id {id} publishing into another client's topics"
        );
        // The victim's own traffic works, and the attacker sees none of it.
        assert_eq!(
            victim
                .publish("app/victim/data", QoS::AtLeastOnce, false, pkid)
                .await,
            Some(0)
        );
        let marker = format!("public/{n}");
        assert_eq!(
            victim
                .publish(&marker, QoS::AtLeastOnce, false, pkid + 100)
                .await,
            Some(0)
        );
        let seen = evil.drain_until(&marker).await;
        assert!(
            !seen.iter().any(|t| t.starts_with("app/")),
            "client id {id} read {seen:?}"
        );
    }
    let seen = victim.drain_until("app/victim/data").await;
    assert!(!seen.iter().any(|t| t == "app/victim/cmd"), "{seen:?}");
}

/// Publish rules apply to AMQP publishes to `amq.topic` (routing key `denied.x` is the
/// MQTT topic `denied/x`): 403, and an MQTT subscriber never gets it.
async fn amqp_publish_to_amq_topic_obeys_the_topic_acl(b: Backend) {
    let env = start(
        b,
        vec![rule(Access::Publish, "denied/#", false)],
        AclDefault::Allow,
    )
    .await;
    let (mut s, code) = Mq::connect(&env, Version::V5, "reader", Some(("alice", "pw"))).await;
    assert_eq!(code, reason::SUCCESS);
    assert_eq!(s.subscribe(1, &["#"]).await, vec![1]);

    let conn = env.amqp("alice", "pw").await;
    let ch = confirmed(&conn).await;
    let r = publish_amqp(&ch, "denied.x").await;
    assert_eq!(
        r.as_ref().err().map(amqp_code),
        Some(403),
        "publish to amq.topic with a denied key: {r:?}"
    );
    // Other exchanges and other keys are not affected.
    let ch = confirmed(&conn).await;
    publish_amqp(&ch, "ok.x").await.expect("allowed key");
    let seen = s.drain_until("ok/x").await;
    assert!(!seen.iter().any(|t| t.starts_with("denied")), "{seen:?}");
}

/// Read rules apply to AMQP bindings from `amq.topic`: binding with a key that can
/// match a denied topic (`denied.#`, `#`, `*.x`) is 403 (AMQP deliveries are not checked
/// one by one); `ok.#` is fine and gets MQTT publishes. Bindings into `amq.topic` (an
/// exchange-to-exchange binding) need the right to publish everywhere.
async fn amqp_bindings_with_amq_topic_obey_the_topic_acl(b: Backend) {
    let env = start(
        b,
        vec![rule(Access::All, "denied/#", false)],
        AclDefault::Allow,
    )
    .await;
    let conn = env.amqp("alice", "pw").await;
    let ch = conn.create_channel().await.expect("channel");
    let q = mqgate_conformance::amqp::exclusive_queue(&ch).await;
    for key in ["denied.#", "#", "*.x", "denied.x"] {
        let ch = conn.create_channel().await.expect("channel");
        let r = ch
            .queue_bind(
                q.as_str().into(),
                "amq.topic".into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_eq!(
            r.as_ref().err().map(amqp_code),
            Some(403),
            "queue.bind to amq.topic with {key}: {r:?}"
        );
    }
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_bind(
        q.as_str().into(),
        "amq.topic".into(),
        "ok.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind ok.#");
    // An exchange bound from amq.topic with `#`, or into it: refused too.
    ch.exchange_declare(
        "mine".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare mine");
    for (dest, src) in [("mine", "amq.topic"), ("amq.topic", "mine")] {
        let ch = conn.create_channel().await.expect("channel");
        let r = ch
            .exchange_bind(
                dest.into(),
                src.into(),
                "#".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_eq!(
            r.as_ref().err().map(amqp_code),
            Some(403),
            "exchange.bind {src} -> {dest}: {r:?}"
        );
    }
    // The allowed binding works across protocols.
    let (mut p, code) = Mq::connect(&env, Version::V5, "pub", None).await;
    assert_eq!(code, reason::SUCCESS);
    assert_eq!(p.publish("ok/1", QoS::AtLeastOnce, false, 1).await, Some(0));
    let ch = conn.create_channel().await.expect("channel");
    let mut got = None;
    for _ in 0..50 {
        if let Some(m) = ch
            .basic_get(
                q.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get")
        {
            got = Some(m.delivery.routing_key.as_str().to_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got.as_deref(), Some("ok.1"));
}

/// MQTT lives in vhost `/`: a user with no permission there is refused at CONNECT (5.0
/// 0x87, 3.1.1 code 5); users with one, and anonymous clients, are not.
async fn mqtt_user_without_vhost_permission_is_refused(b: Backend) {
    let env = start(b, Vec::new(), AclDefault::Allow).await;
    let (mut c, code) = Mq::connect(&env, Version::V5, "o5", Some(("outsider", "pw"))).await;
    assert_eq!(code, reason::NOT_AUTHORIZED, "5.0 outsider");
    assert!(c.recv(WAIT).await.is_none(), "closed after the refusal");
    let (_, code) = Mq::connect(&env, Version::V311, "o3", Some(("outsider", "pw"))).await;
    assert_eq!(code, 5, "3.1.1 outsider");
    // It can still use the vhost it has a permission on over AMQP.
    let conn = Connection::connect(
        &format!("amqp://outsider:pw@127.0.0.1:{}/other", env.amqp_port),
        lapin::ConnectionProperties::default(),
    )
    .await;
    assert!(conn.is_ok(), "outsider on vhost other over AMQP");
    let (_, code) = Mq::connect(&env, Version::V5, "a5", Some(("alice", "pw"))).await;
    assert_eq!(code, reason::SUCCESS, "alice has a permission on /");
    let (_, code) = Mq::connect(&env, Version::V311, "anon", None).await;
    assert_eq!(code, 0, "anonymous (allow_anonymous)");
}

/// ACL rules are not subscriptions: a catch-all `#` deny covers `$foo/bar`; so does
/// `acl_default = "deny"` (only what a rule allows, for both doors).
async fn catch_all_deny_and_deny_by_default_cover_dollar_topics(b: Backend) {
    let env = start(
        b,
        vec![
            rule(Access::All, "ok/#", true),
            rule(Access::All, "#", false),
        ],
        AclDefault::Allow,
    )
    .await;
    let (mut c, code) = Mq::connect(&env, Version::V5, "c", None).await;
    assert_eq!(code, reason::SUCCESS);
    assert_eq!(
        c.publish("$foo/bar", QoS::AtLeastOnce, false, 1).await,
        Some(reason::NOT_AUTHORIZED),
        "catch-all deny, publish $foo/bar"
    );
    assert_eq!(
        c.subscribe(1, &["$foo/#", "+/bar"]).await,
        vec![reason::NOT_AUTHORIZED; 2],
        "catch-all deny, subscribe $foo/#"
    );
    assert_eq!(c.publish("ok/1", QoS::AtLeastOnce, false, 2).await, Some(0));
    drop(env);

    let env = start(b, vec![rule(Access::All, "ok/#", true)], AclDefault::Deny).await;
    let (mut c, code) = Mq::connect(&env, Version::V5, "c", None).await;
    assert_eq!(code, reason::SUCCESS);
    for (i, t) in ["$foo/bar", "other/x"].into_iter().enumerate() {
        assert_eq!(
            c.publish(t, QoS::AtLeastOnce, false, 10 + i as u16).await,
            Some(reason::NOT_AUTHORIZED),
            "deny by default, publish {t}"
        );
    }
    assert_eq!(
        c.subscribe(1, &["$foo/bar", "#", "other/+"]).await,
        vec![reason::NOT_AUTHORIZED; 3],
        "deny by default, subscribe"
    );
    assert_eq!(c.subscribe(2, &["ok/#"]).await, vec![1]);
    assert_eq!(c.publish("ok/1", QoS::AtLeastOnce, false, 3).await, Some(0));
    c.drain_until("ok/1").await;
    // The same default on the AMQP door.
    let conn = env.amqp("guest", "guest").await;
    let ch = confirmed(&conn).await;
    let r = publish_amqp(&ch, "other.x").await;
    assert_eq!(r.as_ref().err().map(amqp_code), Some(403), "{r:?}");
    let ch = confirmed(&conn).await;
    publish_amqp(&ch, "ok.2").await.expect("an allowed key");
}

// ---------------------------------------------------------------------------------------
// AMQP helpers.

async fn confirmed(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel.open");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    ch
}

/// Publish to `amq.topic` and wait for the confirm (an exception is the error).
async fn publish_amqp(ch: &Channel, key: &str) -> lapin::Result<()> {
    let confirm = ch
        .basic_publish(
            "amq.topic".into(),
            key.into(),
            BasicPublishOptions::default(),
            b"from amqp",
            BasicProperties::default(),
        )
        .await?;
    let c = tokio::time::timeout(WAIT, confirm)
        .await
        .expect("a confirm or an exception in time")?;
    assert!(!c.is_nack(), "nacked");
    Ok(())
}

fn amqp_code(e: &lapin::Error) -> u16 {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_id(),
        other => panic!("expected an AMQP exception, got {other:?}"),
    }
}
