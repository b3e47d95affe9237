//! AMQP 0-9-1 through a second, independent client library (amqprs 2), so that the
//! broker is not only checked against lapin's reading of the protocol.
//!
//! Each scenario runs on an in-process mqgate on both backends, or, with
//! `MQGATE_AMQP_URL=amqp://guest:guest@host:port/%2f`, once against that broker.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicGetArguments, BasicNackArguments,
    BasicPublishArguments, BasicQosArguments, Channel, ConfirmSelectArguments,
    ExchangeDeclareArguments, ExchangeDeleteArguments, QueueBindArguments, QueueDeclareArguments,
    QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{
    Ack, BasicProperties, Cancel, CloseChannel, FieldArray, FieldName, FieldTable, FieldValue,
    Nack, Return,
};
use mqgate_conformance::amqp::{Backend, Target};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

use mqgate_conformance::scenario;

fn uniq(base: &str) -> String {
    static RUN: OnceLock<u64> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let n = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64;
        n ^ u64::from(std::process::id())
    });
    format!("{base}.{:x}", run & 0xff_ffff_ffff)
}

fn name(k: &str) -> FieldName {
    k.try_into().expect("field name")
}

fn table(entries: Vec<(&str, FieldValue)>) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in entries {
        t.insert(name(k), v);
    }
    t
}

async fn open(t: &Target) -> Connection {
    let mut a = OpenConnectionArguments::new(&t.host, t.port, "guest", "guest");
    a.virtual_host("/");
    Connection::open(&a).await.expect("amqprs connect")
}

/// Events the server sends on a channel outside replies: confirms, returns, cancels.
#[derive(Debug)]
#[allow(dead_code)] // Nack is read through Debug in failure messages
enum Ev {
    Ack(u64, bool),
    Nack(u64, bool),
    Return(u16, Vec<u8>),
    Cancel(String),
    Close(u16),
}

struct Events(mpsc::UnboundedSender<Ev>);

type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// ChannelCallback is an `#[async_trait]` trait; this is its desugared form (the crate
// does not depend on async-trait itself).
impl ChannelCallback for Events {
    fn close<'a, 'b, 'c>(
        &'a mut self,
        _channel: &'b Channel,
        close: CloseChannel,
    ) -> Fut<'c, Result<(), amqprs::error::Error>>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        let _ = self.0.send(Ev::Close(close.reply_code()));
        Box::pin(async { Ok(()) })
    }

    fn cancel<'a, 'b, 'c>(
        &'a mut self,
        _channel: &'b Channel,
        cancel: Cancel,
    ) -> Fut<'c, Result<(), amqprs::error::Error>>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        let _ = self.0.send(Ev::Cancel(cancel.consumer_tag().to_string()));
        Box::pin(async { Ok(()) })
    }

    fn flow<'a, 'b, 'c>(
        &'a mut self,
        _channel: &'b Channel,
        active: bool,
    ) -> Fut<'c, Result<bool, amqprs::error::Error>>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        Box::pin(async move { Ok(active) })
    }

    fn publish_ack<'a, 'b, 'c>(&'a mut self, _channel: &'b Channel, ack: Ack) -> Fut<'c, ()>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        let _ = self.0.send(Ev::Ack(ack.delivery_tag(), ack.mutiple()));
        Box::pin(async {})
    }

    fn publish_nack<'a, 'b, 'c>(&'a mut self, _channel: &'b Channel, nack: Nack) -> Fut<'c, ()>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        let _ = self.0.send(Ev::Nack(nack.delivery_tag(), nack.multiple()));
        Box::pin(async {})
    }

    fn publish_return<'a, 'b, 'c>(
        &'a mut self,
        _channel: &'b Channel,
        ret: Return,
        _basic_properties: BasicProperties,
        content: Vec<u8>,
    ) -> Fut<'c, ()>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        let _ = self.0.send(Ev::Return(ret.reply_code(), content));
        Box::pin(async {})
    }
}

async fn channel(conn: &Connection) -> (Channel, mpsc::UnboundedReceiver<Ev>) {
    let ch = conn.open_channel(None).await.expect("channel.open");
    let (tx, rx) = mpsc::unbounded_channel();
    ch.register_callback(Events(tx))
        .await
        .expect("register callback");
    (ch, rx)
}

async fn declare(ch: &Channel, q: &str) -> (String, u32, u32) {
    ch.queue_declare(QueueDeclareArguments::new(q))
        .await
        .expect("queue.declare")
        .expect("declare-ok")
}

async fn publish_with(ch: &Channel, ex: &str, key: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(props, body.to_vec(), BasicPublishArguments::new(ex, key))
        .await
        .expect("publish");
}

async fn publish(ch: &Channel, ex: &str, key: &str, body: &str) {
    publish_with(ch, ex, key, body.as_bytes(), BasicProperties::default()).await;
}

async fn get(ch: &Channel, q: &str) -> Option<(amqprs::GetOk, BasicProperties, Vec<u8>)> {
    let mut a = BasicGetArguments::new(q);
    a.no_ack = true;
    ch.basic_get(a).await.expect("basic.get")
}

/// Wait (up to 5 s) until `q` has `n` ready messages (publishes without confirms are
/// asynchronous).
async fn wait_count(ch: &Channel, q: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut a = QueueDeclareArguments::new(q);
        a.passive(true);
        let (_, c, _) = ch
            .queue_declare(a)
            .await
            .expect("passive declare")
            .expect("declare-ok");
        if c == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{q}: {c} messages, waiting for {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next(
    rx: &mut mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
    what: &str,
) -> (amqprs::Deliver, BasicProperties, Vec<u8>) {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(m)) => (
            m.deliver.expect("deliver"),
            m.basic_properties.expect("properties"),
            m.content.expect("content"),
        ),
        Ok(None) => panic!("{what}: consumer ended"),
        Err(_) => panic!("{what}: nothing within 5 s"),
    }
}

async fn delete(ch: &Channel, q: &str) {
    let _ = ch.queue_delete(QueueDeleteArguments::new(q)).await;
}

// ---------------------------------------------------------------------------------------

/// Connect; the negotiated values and server capabilities amqprs reads.
async fn connect_and_capabilities(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    assert!(conn.is_open());
    assert!(conn.frame_max() >= 4096, "frame_max {}", conn.frame_max());
    let caps = conn.server_properties().capabilities();
    assert!(caps.publisher_confirms(), "publisher_confirms");
    assert!(caps.basic_nack(), "basic.nack");
    assert!(caps.consumer_cancel_notify(), "consumer_cancel_notify");
    assert!(
        caps.exchange_exchange_bindings(),
        "exchange_exchange_bindings"
    );
    assert!(caps.per_consumer_qos(), "per_consumer_qos");
    assert!(caps.connection_blocked(), "connection.blocked");
    assert!(
        caps.authentication_failure_close(),
        "authentication_failure_close"
    );
    let (ch, _ev) = channel(&conn).await;
    ch.close().await.expect("channel.close");
    conn.close().await.expect("connection.close");
}

/// Declare, publish, consume with manual acks, in order.
async fn publish_consume_ack(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    let (ch, _ev) = channel(&conn).await;
    let q = uniq("rs.pca");
    declare(&ch, &q).await;
    for i in 0..5 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let (cch, _cev) = channel(&conn).await;
    let (_tag, mut rx) = cch
        .basic_consume_rx(
            BasicConsumeArguments::new(&q, "rs-pca")
                .manual_ack(true)
                .finish(),
        )
        .await
        .expect("consume");
    for i in 0..5 {
        let (d, _, body) = next(&mut rx, "consumed").await;
        assert_eq!(body, format!("m{i}").as_bytes());
        assert!(!d.redelivered());
        cch.basic_ack(BasicAckArguments::new(d.delivery_tag(), false))
            .await
            .expect("ack");
    }
    assert!(
        tokio::time::timeout(QUIET, rx.recv()).await.is_err(),
        "more than was published"
    );
    cch.close().await.expect("close");
    wait_count(&ch, &q, 0).await;
    delete(&ch, &q).await;
}

/// Publisher confirms: every publish acked (tags 1..=n, maybe with multiple); a
/// mandatory publish with no route is returned with 312.
async fn confirms_and_returns(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    let (ch, mut ev) = channel(&conn).await;
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .expect("confirm.select");
    let q = uniq("rs.confirms");
    declare(&ch, &q).await;
    let n = 50u64;
    for i in 0..n {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let mut acked = 0u64;
    while acked < n {
        match tokio::time::timeout(WAIT, ev.recv()).await {
            Ok(Some(Ev::Ack(tag, multiple))) => {
                assert!(tag > acked, "ack {tag} after {acked}");
                if !multiple {
                    assert_eq!(tag, acked + 1, "single ack out of order");
                }
                acked = tag;
            }
            other => panic!("waiting for confirms ({acked}/{n}): {other:?}"),
        }
    }
    let mut a = BasicPublishArguments::new("", &uniq("rs.nowhere"));
    a.mandatory = true;
    ch.basic_publish(BasicProperties::default(), b"lost".to_vec(), a)
        .await
        .expect("publish");
    let mut returned = false;
    let mut confirmed = false;
    while !(returned && confirmed) {
        match tokio::time::timeout(WAIT, ev.recv()).await {
            Ok(Some(Ev::Return(code, body))) => {
                assert_eq!((code, body.as_slice()), (312, &b"lost"[..]));
                assert!(!confirmed, "basic.return must come before the ack");
                returned = true;
            }
            Ok(Some(Ev::Ack(tag, _))) => {
                assert_eq!(tag, n + 1);
                confirmed = true;
            }
            other => panic!("waiting for return and ack: {other:?}"),
        }
    }
    wait_count(&ch, &q, n as u32).await;
    delete(&ch, &q).await;
}

/// Every property and a headers table with nested values round-trip.
async fn properties_and_headers(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    let (ch, _ev) = channel(&conn).await;
    let q = uniq("rs.props");
    declare(&ch, &q).await;
    let arr: FieldArray = vec![FieldValue::from("x"), FieldValue::I(3), FieldValue::t(true)]
        .try_into()
        .expect("array");
    let headers = table(vec![
        ("s", FieldValue::from("text")),
        ("i", FieldValue::I(-42)),
        ("l", FieldValue::l(1 << 40)),
        ("b", FieldValue::t(true)),
        ("d", FieldValue::d(0.5)),
        ("ts", FieldValue::T(1_700_000_000)),
        ("a", FieldValue::A(arr)),
        (
            "nested",
            FieldValue::F(table(vec![("inner", FieldValue::from("v"))])),
        ),
    ]);
    let props = BasicProperties::default()
        .with_content_type("text/plain")
        .with_content_encoding("utf-8")
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(3)
        .with_correlation_id("c-1")
        .with_reply_to("r-1")
        .with_expiration("60000")
        .with_message_id("id-1")
        .with_timestamp(1_700_000_001)
        .with_message_type("kind")
        .with_user_id("guest")
        .with_app_id("rs")
        .with_cluster_id("cl")
        .finish();
    publish_with(&ch, "", &q, b"payload", props.clone()).await;
    wait_count(&ch, &q, 1).await;
    let (_, got, body) = get(&ch, &q).await.expect("get-ok");
    assert_eq!(body, b"payload");
    assert_eq!(got.content_type(), props.content_type());
    assert_eq!(got.content_encoding(), props.content_encoding());
    assert_eq!(got.headers(), props.headers(), "headers");
    assert_eq!(got.delivery_mode(), props.delivery_mode());
    assert_eq!(got.priority(), props.priority());
    assert_eq!(got.correlation_id(), props.correlation_id());
    assert_eq!(got.reply_to(), props.reply_to());
    assert_eq!(got.expiration(), props.expiration());
    assert_eq!(got.message_id(), props.message_id());
    assert_eq!(got.timestamp(), props.timestamp());
    assert_eq!(got.message_type(), props.message_type());
    assert_eq!(got.user_id(), props.user_id());
    assert_eq!(got.app_id(), props.app_id());
    assert_eq!(got.cluster_id(), props.cluster_id());
    delete(&ch, &q).await;
}

/// basic.get: message_count in get-ok, then get-empty.
async fn get_and_empty(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    let (ch, _ev) = channel(&conn).await;
    let q = uniq("rs.get");
    declare(&ch, &q).await;
    assert!(get(&ch, &q).await.is_none(), "get-empty on an empty queue");
    for i in 0..3 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    wait_count(&ch, &q, 3).await;
    for i in 0..3u32 {
        let (ok, _, body) = get(&ch, &q).await.expect("get-ok");
        assert_eq!(body, format!("m{i}").as_bytes());
        assert_eq!(ok.message_count(), 2 - i, "message_count after m{i}");
    }
    assert!(get(&ch, &q).await.is_none(), "get-empty");
    delete(&ch, &q).await;
}

/// nack with requeue: delivered again with the redelivered flag.
async fn nack_requeue_redelivered(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    let (ch, _ev) = channel(&conn).await;
    let q = uniq("rs.nack");
    declare(&ch, &q).await;
    publish(&ch, "", &q, "again").await;
    let (cch, _cev) = channel(&conn).await;
    cch.basic_qos(BasicQosArguments::new(0, 1, false))
        .await
        .expect("qos");
    let (_tag, mut rx) = cch
        .basic_consume_rx(
            BasicConsumeArguments::new(&q, "rs-nack")
                .manual_ack(true)
                .finish(),
        )
        .await
        .expect("consume");
    let (d, _, _) = next(&mut rx, "first").await;
    assert!(!d.redelivered());
    cch.basic_nack(BasicNackArguments::new(d.delivery_tag(), false, true))
        .await
        .expect("nack");
    let (d, _, body) = next(&mut rx, "after nack").await;
    assert_eq!(body, b"again");
    assert!(d.redelivered(), "redelivered flag");
    cch.basic_ack(BasicAckArguments::new(d.delivery_tag(), false))
        .await
        .expect("ack");
    cch.close().await.expect("close");
    wait_count(&ch, &q, 0).await;
    delete(&ch, &q).await;
}

/// Topic exchange routing with `*` and `#`.
async fn topic_routing(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    let (ch, _ev) = channel(&conn).await;
    let ex = uniq("rs.topic");
    ch.exchange_declare(ExchangeDeclareArguments::new(&ex, "topic"))
        .await
        .expect("exchange.declare");
    let (qs, qh) = (uniq("rs.star"), uniq("rs.hash"));
    declare(&ch, &qs).await;
    declare(&ch, &qh).await;
    ch.queue_bind(QueueBindArguments::new(&qs, &ex, "log.*"))
        .await
        .expect("bind");
    ch.queue_bind(QueueBindArguments::new(&qh, &ex, "log.#"))
        .await
        .expect("bind");
    for k in ["log.a", "log.a.b", "log", "other.a"] {
        publish(&ch, &ex, k, k).await;
    }
    wait_count(&ch, &qh, 3).await;
    let mut star = Vec::new();
    while let Some((_, _, b)) = get(&ch, &qs).await {
        star.push(String::from_utf8(b).expect("utf8"));
    }
    let mut hash = Vec::new();
    while let Some((_, _, b)) = get(&ch, &qh).await {
        hash.push(String::from_utf8(b).expect("utf8"));
    }
    assert_eq!(star, ["log.a"]);
    assert_eq!(hash, ["log.a", "log.a.b", "log"]);
    delete(&ch, &qs).await;
    delete(&ch, &qh).await;
    let _ = ch.exchange_delete(ExchangeDeleteArguments::new(&ex)).await;
}

/// declare-ok counts: ready messages and consumers.
async fn queue_declare_counts(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    let (ch, _ev) = channel(&conn).await;
    let q = uniq("rs.counts");
    let (n, m, c) = declare(&ch, &q).await;
    assert_eq!((n.as_str(), m, c), (q.as_str(), 0, 0));
    for i in 0..4 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    wait_count(&ch, &q, 4).await;
    let (_, m, c) = declare(&ch, &q).await;
    assert_eq!((m, c), (4, 0));
    let (cch, _cev) = channel(&conn).await;
    cch.basic_qos(BasicQosArguments::new(0, 1, false))
        .await
        .expect("qos");
    let (_tag, mut rx) = cch
        .basic_consume_rx(
            BasicConsumeArguments::new(&q, "rs-counts")
                .manual_ack(true)
                .finish(),
        )
        .await
        .expect("consume");
    let _ = next(&mut rx, "one").await;
    let (_, m, c) = declare(&ch, &q).await;
    assert_eq!((m, c), (3, 1), "ready messages and consumers");
    // Server-named.
    let (gen, _, _) = ch
        .queue_declare(QueueDeclareArguments::exclusive_server_named())
        .await
        .expect("declare")
        .expect("declare-ok");
    assert!(gen.starts_with("amq.gen-"), "{gen}");
    cch.close().await.expect("close");
    delete(&ch, &q).await;
}

/// A channel exception (passive declare of a missing queue) closes that channel with
/// 404; the connection and other channels keep working.
async fn channel_error_then_recovery(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    let (bad, mut bad_ev) = channel(&conn).await;
    let mut a = QueueDeclareArguments::new(&uniq("rs.missing"));
    a.passive(true);
    assert!(
        bad.queue_declare(a).await.is_err(),
        "passive declare of a missing queue"
    );
    match tokio::time::timeout(WAIT, bad_ev.recv()).await {
        Ok(Some(Ev::Close(code))) => assert_eq!(code, 404),
        other => panic!("expected channel.close 404, got {other:?}"),
    }
    let (ch, _ev) = channel(&conn).await;
    let q = uniq("rs.after");
    declare(&ch, &q).await;
    publish(&ch, "", &q, "ok").await;
    wait_count(&ch, &q, 1).await;
    delete(&ch, &q).await;
    assert!(conn.is_open());
}

/// The server cancels a consumer when its queue is deleted (basic.cancel to the client).
async fn server_cancel_on_delete(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = open(&t).await;
    let (ch, _ev) = channel(&conn).await;
    let q = uniq("rs.cancel");
    declare(&ch, &q).await;
    let (cch, mut cev) = channel(&conn).await;
    let (tag, _rx) = cch
        .basic_consume_rx(BasicConsumeArguments::new(&q, "").finish())
        .await
        .expect("consume");
    assert!(tag.starts_with("amq.ctag-"), "{tag}");
    ch.queue_delete(QueueDeleteArguments::new(&q))
        .await
        .expect("delete");
    match tokio::time::timeout(WAIT, cev.recv()).await {
        Ok(Some(Ev::Cancel(got))) => assert_eq!(got, tag),
        other => panic!("expected basic.cancel, got {other:?}"),
    }
}

scenario!(
    connect_and_capabilities,
    publish_consume_ack,
    confirms_and_returns,
    properties_and_headers,
    get_and_empty,
    nack_requeue_redelivered,
    topic_routing,
    queue_declare_counts,
    channel_error_then_recovery,
    server_cancel_on_delete,
);
