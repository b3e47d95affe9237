//! RocketMQ features reached from plain AMQP and MQTT 5 clients, checked through the
//! admin API and the CLI of the real `mqgate` binary (RocksDB, loopback):
//!
//! - message keys (`x-keys`): found by `mqgate messages key` and `GET /api/mqgate/messages`;
//! - producer groups (`x-producer-group`, the AMQP client property `producer_group`):
//!   counted by `GET /api/mqgate/producers`, `mqgate producers` and /metrics;
//! - delayed messages: listed by `mqgate delayed list`, cancelled by key and by id (CLI
//!   and API), and still cancelled after a SIGKILL and restart.

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Node;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ConnectionProperties, ExchangeKind};
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Packet, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// `guest:guest`, base64 (HTTP basic auth).
const GUEST: &str = "Z3Vlc3Q6Z3Vlc3Q=";

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Run a CLI subcommand against `node`'s admin API: (success, stdout, stderr).
fn cli(node: &Node, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["--url", &format!("http://127.0.0.1:{}", node.admin)])
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("MQGATE_ADMIN_USER")
        .env_remove("MQGATE_ADMIN_PASSWORD")
        .env("RUST_LOG", "error")
        .output()
        .expect("run mqgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A CLI subcommand that must succeed: its stdout.
fn cli_ok(node: &Node, args: &[&str]) -> String {
    let (ok, out, err) = cli(node, args);
    assert!(ok, "mqgate {args:?} failed: {err}");
    out
}

/// An admin API call as guest that must answer 200: its JSON.
fn api(node: &Node, method: &str, path: &str) -> Value {
    let (status, body) = common::http(node.admin, method, path, Some(GUEST), None);
    assert_eq!(status, 200, "{method} {path}: {body}");
    json(&body)
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

async fn amqp(node: &Node, props: ConnectionProperties) -> lapin::Connection {
    tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(&node.amqp_url(), props),
    )
    .await
    .expect("AMQP connect within 10 s")
    .expect("AMQP connect")
}

/// A confirming channel.
async fn confirm_channel(conn: &lapin::Connection) -> lapin::Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch
}

/// A durable queue `queue` bound to `exchange` with key `queue`.
async fn bound_queue(ch: &lapin::Channel, exchange: &str, queue: &str) {
    common::durable_queue(ch, queue).await;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        queue.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Headers of string type (as AMQP clients send `x-keys`, `x-producer-group`).
fn headers(h: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in h {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn text_header(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Publish a persistent message and wait (10 s at most) for the broker's ack.
async fn publish_confirmed(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &str,
    h: Option<FieldTable>,
) {
    let mut props = BasicProperties::default().with_delivery_mode(2);
    if let Some(h) = h {
        props = props.with_headers(h);
    }
    let confirm = tokio::time::timeout(Duration::from_secs(10), async {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap()
    })
    .await
    .expect("publisher confirm within 10 s");
    assert!(confirm.is_ack(), "{body}: nacked ({confirm:?})");
}

/// An MQTT 5 client (rumqttc) whose event loop runs in a task; it never reconnects, and
/// the task ends when the client is dropped.
struct Mqtt5 {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    task: JoinHandle<()>,
}

impl Drop for Mqtt5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mqtt5 {
    /// Connect (clean start) and wait for a successful CONNACK.
    async fn connect(port: u16, id: &str) -> Self {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(opts, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(ev) => {
                        if tx.send(Ok(ev)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        let mut c = Self {
            client,
            events,
            task,
        };
        loop {
            match c.next(Duration::from_secs(10)).await {
                Some(Ok(Event::Incoming(Packet::ConnAck(a)))) => {
                    assert_eq!(a.code, ConnectReturnCode::Success, "CONNACK of {id}");
                    return c;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{id}: connection failed: {e}"),
                None => panic!("{id}: no CONNACK within 10 s"),
            }
        }
    }

    /// The next event within `within`; `None` on timeout.
    async fn next(&mut self, within: Duration) -> Option<Result<Event, String>> {
        match tokio::time::timeout(within, self.events.recv()).await {
            Ok(Some(ev)) => Some(ev),
            Ok(None) => Some(Err("event loop ended".into())),
            Err(_) => None,
        }
    }

    /// Subscribe at QoS 1 and wait for the SUBACK granting it.
    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("SUBSCRIBE queued");
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(Ok(Event::Incoming(Packet::SubAck(a)))) => {
                    assert!(
                        matches!(
                            a.return_codes.as_slice(),
                            [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
                        ),
                        "SUBACK for {filter}: {:?}",
                        a.return_codes
                    );
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("subscribing {filter}: {e}"),
                None => panic!("no SUBACK for {filter} within 10 s"),
            }
        }
    }

    /// Publish at QoS 1 with these user properties and wait for a successful PUBACK.
    async fn publish(&mut self, topic: &str, body: &str, user: &[(&str, &str)]) {
        let props = PublishProperties {
            user_properties: user
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, body.to_owned(), props)
            .await
            .expect("PUBLISH queued");
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                    assert_eq!(
                        a.reason,
                        rumqttc::v5::mqttbytes::v5::PubAckReason::Success,
                        "PUBACK for {topic}"
                    );
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("publishing to {topic}: {e}"),
                None => panic!("no PUBACK for {topic} within 10 s"),
            }
        }
    }

    /// The bodies of the PUBLISHes received until `until`.
    async fn collect_until(&mut self, until: Instant) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return got;
            }
            match self.next(left).await {
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    got.push(String::from_utf8_lossy(&p.payload).into_owned());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("connection lost while collecting: {e}"),
                None => return got,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// a. Keys
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_amqp_and_mqtt_find_their_messages() {
    let node = Node::start_temp();
    let conn = amqp(&node, ConnectionProperties::default()).await;
    let ch = confirm_channel(&conn).await;
    ch.exchange_declare(
        "orders.x".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    bound_queue(&ch, "orders.x", "orders.q").await;
    publish_confirmed(
        &ch,
        "orders.x",
        "orders.q",
        "order one for customer seven",
        Some(headers(&[("x-keys", text_header("order-1 cust-7"))])),
    )
    .await;
    publish_confirmed(&ch, "orders.x", "orders.q", "no keys here", None).await;

    // MQTT: a subscriber, so the publish is stored; then a publish with x-keys.
    let mut sub = Mqtt5::connect(node.mqtt, "keys-sub").await;
    sub.subscribe("shop/orders").await;
    let mut publisher = Mqtt5::connect(node.mqtt, "keys-pub").await;
    publisher
        .publish("shop/orders", "order two", &[("x-keys", "order-2")])
        .await;

    // The CLI finds the AMQP message under either key, by its exchange.
    for key in ["order-1", "cust-7"] {
        let table = cli_ok(&node, &["messages", "key", "orders.x", key]);
        assert!(
            table.contains("order one for customer seven"),
            "{key}: {table}"
        );
        let v = json(&cli_ok(
            &node,
            &["--json", "messages", "key", "orders.x", key],
        ));
        let found = v.as_array().expect("an array");
        assert_eq!(found.len(), 1, "{key}: {v}");
        assert_eq!(found[0]["body"], "order one for customer seven");
        assert_eq!(found[0]["topic"], "orders.x");
        let keys: Vec<&str> = found[0]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(keys, ["order-1", "cust-7"], "{v}");
    }
    let none = json(&cli_ok(
        &node,
        &["--json", "messages", "key", "orders.x", "order-2"],
    ));
    assert_eq!(none, Value::Array(Vec::new()), "order-2 is the MQTT one");

    // The API finds the MQTT message by its MQTT topic.
    let v = api(
        &node,
        "GET",
        &format!(
            "/api/mqgate/messages?topic={}&key=order-2",
            common::urlencode("shop/orders")
        ),
    );
    let found = v.as_array().expect("an array");
    assert_eq!(found.len(), 1, "{v}");
    assert_eq!(found[0]["body"], "order two");
    assert_eq!(found[0]["topic"], "shop/orders");
    assert_eq!(found[0]["keys"], serde_json::json!(["order-2"]));
    // And the subscriber got it.
    let got = sub
        .collect_until(Instant::now() + Duration::from_secs(2))
        .await;
    assert_eq!(got, ["order two"]);
    conn.close(0, "bye".into()).await.ok();
}

// ---------------------------------------------------------------------------------------
// b. Producer groups
// ---------------------------------------------------------------------------------------

/// The count of `group` on `topic` in a `GET /api/mqgate/producers` / `mqgate producers --json`
/// answer.
fn produced(v: &Value, topic: &str, group: &str) -> Option<u64> {
    v.as_array()
        .expect("an array")
        .iter()
        .find(|p| p["topic"] == topic && p["producer_group"] == group)
        .and_then(|p| p["messages"].as_u64())
}

/// What `group` published, summed over the topics of a `GET /api/mqgate/producers` answer.
fn produced_by(v: &Value, group: &str) -> u64 {
    v.as_array()
        .expect("an array")
        .iter()
        .filter(|p| p["producer_group"] == group)
        .filter_map(|p| p["messages"].as_u64())
        .sum()
}

/// The samples of metric `name`: (label set as written, value).
fn samples<'a>(metrics: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labelset, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            Some((labelset, value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include every one of `labels`, if any.
fn sample_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples(metrics, name)
        .into_iter()
        .filter(|(set, _)| {
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|kv| kv.trim() == format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

const PRODUCER_METRIC: &str = "mqgate_producer_messages_published_total";

/// Publish as three producer groups: an AMQP connection with client property
/// `producer_group` = billing sends 3 messages to direct exchange `invoices` (bound to
/// queue `invoices.q`) and one more with header `x-producer-group` = refunds; an MQTT 5
/// client sends one message to `plant/temp` with user property `x-producer-group` =
/// sensors, to which each of `subscribers` subscribes. Returns the clients (kept open).
async fn publish_as_three_groups(
    node: &Node,
    subscribers: &[&str],
) -> (lapin::Connection, Vec<Mqtt5>) {
    let props = ConnectionProperties::default()
        .with_client_property("producer_group".into(), LongString::from("billing"));
    let conn = amqp(node, props).await;
    let ch = confirm_channel(&conn).await;
    ch.exchange_declare(
        "invoices".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    bound_queue(&ch, "invoices", "invoices.q").await;
    for i in 0..3 {
        publish_confirmed(&ch, "invoices", "invoices.q", &format!("invoice {i}"), None).await;
    }
    // A message's header overrides the connection's producer group.
    publish_confirmed(
        &ch,
        "invoices",
        "invoices.q",
        "refund 0",
        Some(headers(&[("x-producer-group", text_header("refunds"))])),
    )
    .await;

    let mut clients = Vec::new();
    for id in subscribers {
        let mut sub = Mqtt5::connect(node.mqtt, id).await;
        sub.subscribe("plant/temp").await;
        clients.push(sub);
    }
    let mut publisher = Mqtt5::connect(node.mqtt, "prod-pub").await;
    publisher
        .publish("plant/temp", "21.5", &[("x-producer-group", "sensors")])
        .await;
    clients.push(publisher);
    (conn, clients)
}

/// Who published is told apart (connection property, header override, MQTT user
/// property) and counted alike by the API, the CLI, a topic's view and /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_groups_of_amqp_and_mqtt_clients_are_counted() {
    let node = Node::start_temp();
    let (conn, _mqtt) = publish_as_three_groups(&node, &["prod-sub"]).await;

    let v = api(&node, "GET", "/api/mqgate/producers");
    assert_eq!(produced_by(&v, "billing"), 3, "{v}");
    assert_eq!(produced_by(&v, "refunds"), 1, "{v}");
    assert_eq!(produced_by(&v, "sensors"), 1, "{v}");
    // Nothing was counted under the default groups.
    for p in v.as_array().unwrap() {
        assert!(
            ["billing", "refunds", "sensors"].contains(&p["producer_group"].as_str().unwrap()),
            "{p}"
        );
        assert!(p["topic"].is_string() && p["messages"].is_u64(), "{p}");
    }

    let c = json(&cli_ok(&node, &["--json", "producers"]));
    assert_eq!(c, v, "the CLI shows what the API answers");
    let table = cli_ok(&node, &["producers"]);
    for g in ["billing", "refunds", "sensors"] {
        assert!(table.contains(g), "{g}: {table}");
    }

    // A stored topic's own view lists the producer groups /api/mqgate/producers has for it
    // (here none: producers are counted under the address they wrote to, the exchange
    // and the MQTT topic, and the stored topics are the queues' and sessions').
    let topics = api(&node, "GET", "/api/mqgate/topics");
    let mut viewed = 0;
    for t in topics.as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let mut want: Vec<Value> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["topic"] == name)
            .map(|p| serde_json::json!({"producer_group": p["producer_group"], "messages": p["messages"]}))
            .collect();
        let view = api(
            &node,
            "GET",
            &format!("/api/mqgate/topics/{}", common::urlencode(name)),
        );
        let mut got = view["producers"]
            .as_array()
            .unwrap_or_else(|| panic!("no producers in {view}"))
            .clone();
        let by_group = |a: &Value, b: &Value| {
            a["producer_group"]
                .as_str()
                .cmp(&b["producer_group"].as_str())
        };
        want.sort_by(by_group);
        got.sort_by(by_group);
        assert_eq!(got, want, "{view}");
        viewed += got.len();
    }
    assert_eq!(
        viewed, 0,
        "queue and session topics were not published to: {topics}"
    );

    // /metrics (per-topic series are on by default; a scrape collects them).
    let (status, metrics) = common::http_get(node.admin, "/metrics", None);
    assert_eq!(status, 200);
    for (group, n) in [("billing", 3.0), ("refunds", 1.0), ("sensors", 1.0)] {
        assert_eq!(
            sample_sum(&metrics, PRODUCER_METRIC, &[("producer_group", group)]),
            Some(n),
            "{group}: {:?}",
            samples(&metrics, PRODUCER_METRIC)
        );
    }
    conn.close(0, "bye".into()).await.ok();
}

/// The counts are per topic published to: the AMQP exchange, the MQTT topic (once,
/// however many subscribers it reached), as `mqgate messages key` and `mqgate delayed`
/// name a message's topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_counts_are_per_topic_published_to() {
    let node = Node::start_temp();
    let (conn, _mqtt) = publish_as_three_groups(&node, &["prod-sub-1", "prod-sub-2"]).await;

    let v = api(&node, "GET", "/api/mqgate/producers");
    assert_eq!(produced(&v, "invoices", "billing"), Some(3), "{v}");
    assert_eq!(produced(&v, "invoices", "refunds"), Some(1), "{v}");
    assert_eq!(produced(&v, "plant/temp", "sensors"), Some(1), "{v}");
    assert_eq!(
        json(&cli_ok(&node, &["--json", "producers"])),
        v,
        "the CLI shows what the API answers"
    );

    let (status, metrics) = common::http_get(node.admin, "/metrics", None);
    assert_eq!(status, 200);
    for (topic, group, n) in [
        ("invoices", "billing", 3.0),
        ("invoices", "refunds", 1.0),
        ("plant/temp", "sensors", 1.0),
    ] {
        assert_eq!(
            sample_sum(
                &metrics,
                PRODUCER_METRIC,
                &[("topic", topic), ("producer_group", group)]
            ),
            Some(n),
            "{PRODUCER_METRIC}{{topic={topic},producer_group={group}}}: {:?}",
            samples(&metrics, PRODUCER_METRIC)
        );
    }
    conn.close(0, "bye".into()).await.ok();
}

// ---------------------------------------------------------------------------------------
// c. Cancelling delayed messages
// ---------------------------------------------------------------------------------------

/// The bodies delivered to `queue` (acked) until `until`.
async fn consume_until(ch: &lapin::Channel, queue: &str, until: Instant) -> Vec<String> {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                got.push(String::from_utf8_lossy(&d.data).into_owned());
                d.acker.ack(BasicAckOptions::default()).await.unwrap();
            }
            Ok(Some(Err(e))) => panic!("consuming {queue}: {e}"),
            Ok(None) => panic!("consumer of {queue} ended"),
            Err(_) => return got,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_amqp_messages_cancelled_by_key_and_id_stay_cancelled_after_a_crash() {
    const DELAY_MS: i64 = 4000;
    let mut node = Node::start_temp();
    let conn = amqp(&node, ConnectionProperties::default()).await;
    let ch = confirm_channel(&conn).await;
    ch.exchange_declare(
        "later".into(),
        ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        headers(&[("x-delayed-type", text_header("direct"))]),
    )
    .await
    .unwrap();
    bound_queue(&ch, "later", "later.q").await;

    let published_at = now_ms();
    let start = Instant::now();
    for (body, keys) in [
        ("cancel-me", Some("cancel-me")),
        ("keep-me", Some("keep-me")),
        ("no-keys", None),
    ] {
        let mut h = vec![("x-delay", AMQPValue::LongLongInt(DELAY_MS))];
        if let Some(k) = keys {
            h.push(("x-keys", text_header(k)));
        }
        publish_confirmed(&ch, "later", "later.q", body, Some(headers(&h))).await;
    }
    conn.close(0, "bye".into()).await.ok();
    // The latest time any of the three is due.
    let due_by = start + Duration::from_millis(DELAY_MS as u64);

    // All three are pending.
    let listed = json(&cli_ok(
        &node,
        &["--json", "delayed", "list", "--topic", "later"],
    ));
    let items = listed["items"].as_array().expect("items");
    assert_eq!(items.len(), 3, "{listed}");
    for it in items {
        assert_eq!(it["kind"], "delayed", "{it}");
        assert_eq!(it["topic"], "later", "{it}");
        let due = it["due"].as_u64().unwrap();
        assert!(
            due >= published_at + DELAY_MS as u64 && due <= now_ms() + DELAY_MS as u64,
            "due {due} for a {DELAY_MS} ms delay published at {published_at}: {it}"
        );
        assert_eq!(
            it["id"].as_str().unwrap().split_once('-').unwrap().0,
            due.to_string(),
            "{it}"
        );
    }
    let table = cli_ok(&node, &["delayed", "list", "--topic", "later"]);
    assert!(
        table.contains("cancel-me") && table.contains("keep-me"),
        "{table}"
    );
    // Filtered by key.
    let by_key = json(&cli_ok(
        &node,
        &[
            "--json", "delayed", "list", "--topic", "later", "--key", "keep-me",
        ],
    ));
    assert_eq!(by_key["items"].as_array().unwrap().len(), 1, "{by_key}");
    // Paging: one at a time, on with --after.
    let first = json(&cli_ok(
        &node,
        &[
            "--json", "delayed", "list", "--topic", "later", "--limit", "1",
        ],
    ));
    let next = first["next"].as_str().expect("a next page").to_owned();
    assert_eq!(first["items"][0]["id"], items[0]["id"]);
    let second = json(&cli_ok(
        &node,
        &[
            "--json", "delayed", "list", "--topic", "later", "--limit", "2", "--after", &next,
        ],
    ));
    assert_eq!(second["items"][0]["id"], items[1]["id"], "{second}");
    assert_eq!(second["items"][1]["id"], items[2]["id"], "{second}");

    // Cancel by key.
    let r = json(&cli_ok(
        &node,
        &[
            "--json",
            "delayed",
            "cancel",
            "--topic",
            "later",
            "--key",
            "cancel-me",
        ],
    ));
    assert_eq!(r["cancelled"], 1, "{r}");

    // Cancel the keyless one by the id the API lists.
    let v = api(&node, "GET", "/api/mqgate/delayed?topic=later");
    let ids: Vec<(&str, &Value)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| (it["id"].as_str().unwrap(), &it["keys"]))
        .collect();
    assert_eq!(ids.len(), 2, "the cancelled one is no longer listed: {v}");
    let keyless = ids
        .iter()
        .find(|(_, k)| k.as_array().is_some_and(|a| a.is_empty()))
        .unwrap_or_else(|| panic!("no keyless message in {v}"))
        .0
        .to_owned();
    let out = cli_ok(&node, &["delayed", "cancel", &keyless]);
    assert!(out.contains('1'), "{out}");
    // Again: it is gone (404, the CLI fails).
    let (ok, _, err) = cli(&node, &["delayed", "cancel", &keyless]);
    assert!(!ok, "cancelling {keyless} twice succeeded");
    assert!(err.contains("404"), "{err}");
    let (status, body) = common::http(
        node.admin,
        "DELETE",
        &format!("/api/mqgate/delayed/{keyless}"),
        Some(GUEST),
        None,
    );
    assert_eq!(status, 404, "{body}");
    // A malformed id is a bad request.
    let (status, body) = common::http(
        node.admin,
        "DELETE",
        "/api/mqgate/delayed/not-an-id",
        Some(GUEST),
        None,
    );
    assert_eq!(status, 400, "{body}");

    let left = json(&cli_ok(
        &node,
        &["--json", "delayed", "list", "--topic", "later"],
    ));
    let left_items = left["items"].as_array().unwrap();
    assert_eq!(left_items.len(), 1, "{left}");
    assert_eq!(left_items[0]["keys"], serde_json::json!(["keep-me"]));

    // SIGKILL and restart before they are due.
    assert!(
        Instant::now() + Duration::from_millis(500) < due_by,
        "too slow: the messages are due before the restart"
    );
    let killed_at = start.elapsed();
    node.sigkill();
    node.restart();
    eprintln!(
        "killed {killed_at:?} after publishing, listening again after {:?}; due after {DELAY_MS} ms",
        start.elapsed()
    );
    if Instant::now() + Duration::from_millis(300) < due_by {
        let after = json(&cli_ok(
            &node,
            &["--json", "delayed", "list", "--topic", "later"],
        ));
        let ids: Vec<&Value> = after["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|it| &it["keys"])
            .collect();
        assert_eq!(ids, [&serde_json::json!(["keep-me"])], "{after}");
    } else {
        eprintln!("restart took until the due time; not listing before it");
    }

    // After the due time the queue gets exactly the kept message.
    let conn = amqp(&node, ConnectionProperties::default()).await;
    let ch = conn.create_channel().await.unwrap();
    let got = consume_until(&ch, "later.q", due_by + Duration::from_secs(4)).await;
    assert_eq!(got, ["keep-me"]);
    let v = api(&node, "GET", "/api/mqgate/delayed?topic=later");
    assert_eq!(v["items"], serde_json::json!([]), "{v}");
    conn.close(0, "bye".into()).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_mqtt_publish_cancelled_by_key_is_never_delivered() {
    let node = Node::start_temp();
    let mut sub = Mqtt5::connect(node.mqtt, "delay-sub").await;
    sub.subscribe("door/alarm").await;
    let mut publisher = Mqtt5::connect(node.mqtt, "delay-pub").await;
    let start = Instant::now();
    publisher
        .publish(
            "$delayed/3/door/alarm",
            "cancelled",
            &[("x-keys", "m-cancel")],
        )
        .await;
    publisher
        .publish("$delayed/3/door/alarm", "kept", &[("x-keys", "m-keep")])
        .await;

    let topic = common::urlencode("door/alarm");
    let v = api(&node, "GET", &format!("/api/mqgate/delayed?topic={topic}"));
    let items = v["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{v}");
    assert!(
        items
            .iter()
            .all(|it| it["kind"] == "delayed" && it["topic"] == "door/alarm"),
        "{v}"
    );
    assert!(v["pending"].as_u64().unwrap() >= 2, "{v}");

    let r = api(
        &node,
        "DELETE",
        &format!("/api/mqgate/delayed?topic={topic}&key=m-cancel"),
    );
    assert_eq!(r["cancelled"], 1, "{r}");
    assert_eq!(r["topic"], "door/alarm");
    assert_eq!(r["key"], "m-cancel");
    // Nothing more to cancel under that key.
    let r = api(
        &node,
        "DELETE",
        &format!("/api/mqgate/delayed?topic={topic}&key=m-cancel"),
    );
    assert_eq!(r["cancelled"], 0, "{r}");
    // Without a key: a bad request.
    let (status, body) = common::http(
        node.admin,
        "DELETE",
        &format!("/api/mqgate/delayed?topic={topic}"),
        Some(GUEST),
        None,
    );
    assert_eq!(status, 400, "{body}");
    let v = api(&node, "GET", &format!("/api/mqgate/delayed?topic={topic}"));
    let keys: Vec<&Value> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| &it["keys"])
        .collect();
    assert_eq!(keys, [&serde_json::json!(["m-keep"])], "{v}");

    // Nothing before the delay; after it only the sibling.
    let early = sub.collect_until(start + Duration::from_millis(2500)).await;
    assert!(early.is_empty(), "delivered before the delay: {early:?}");
    let got = sub.collect_until(start + Duration::from_secs(6)).await;
    assert_eq!(got, ["kept"]);
}
