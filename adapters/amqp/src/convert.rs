//! Between AMQP content and core messages.
//!
//! A message published through AMQP keeps its content-header property bytes exactly as
//! they came ([`PROPS`]), so an AMQP consumer gets every property and header as sent; the
//! properties other protocols understand (content type, correlation id, reply-to,
//! expiry, string headers) are also stored under the core's cross-protocol names
//! ([`mqgate_core::props`]). A message from MQTT has no AMQP bytes: its AMQP properties
//! are built from those names.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use bytes::Bytes;
use mqgate_core::router::{mqtt_to_amqp, HeaderValue};
use mqgate_core::{props, TopicList};
use mqgate_store::{Message, Millis, StoredMessage, TopicName};

use crate::frame::{encode_properties, parse_raw_properties};

/// The content-header property bytes as the publisher sent them.
pub const PROPS: &str = "amqp.props";
/// Present when the publisher asked for a transient message (delivery mode 1): the core
/// does not deliver it after a restart.
pub const TRANSIENT: &str = props::TRANSIENT;
/// The topic (message address) of messages published to the default exchange.
pub const DEFAULT_EXCHANGE_TOPIC: &str = "amq.default";

/// The exchange and routing key of a connection's last publish, as the message
/// carries them (its topic, and the two names as properties), kept for the next: a
/// publisher mostly sends to one exchange with few routing keys, and each name was an
/// allocation and a copy per message. With them, where they last routed to: the
/// router's answer and its checks (write permission, topic rules, not internal) are
/// taken again only when a name or the router's tables changed.
#[derive(Debug, Default)]
pub struct PublishNames {
    topic: Option<TopicName>,
    exchange: Bytes,
    routing_key: Bytes,
    /// The router's generation when these names were last routed and checked, and the
    /// topics they routed to; cleared when a name changes.
    routed: Option<(u64, TopicList)>,
}

impl PublishNames {
    fn get(&mut self, exchange: &str, routing_key: &str) -> (TopicName, Bytes, Bytes) {
        let topic = match &self.topic {
            Some(t) if self.exchange == exchange.as_bytes() => t.clone(),
            _ => {
                let t = TopicName::new(if exchange.is_empty() {
                    DEFAULT_EXCHANGE_TOPIC
                } else {
                    exchange
                })
                .expect("exchange names are short strings");
                self.exchange = Bytes::copy_from_slice(exchange.as_bytes());
                self.topic = Some(t.clone());
                self.routed = None;
                t
            }
        };
        if self.routing_key != routing_key.as_bytes() {
            self.routing_key = Bytes::copy_from_slice(routing_key.as_bytes());
            self.routed = None;
        }
        (topic, self.exchange.clone(), self.routing_key.clone())
    }

    /// The topics the last names (those of the message [`to_message`] built last)
    /// routed to, if they were routed and checked under this `generation` of the router.
    pub fn routed(&self, generation: u64) -> Option<TopicList> {
        match &self.routed {
            Some((g, topics)) if *g == generation => Some(topics.clone()),
            _ => None,
        }
    }

    /// The last names passed their checks and routed to `topics` under `generation` (a
    /// stable answer: [`mqgate_core::router::Router::route_stable`]).
    pub fn remember(&mut self, generation: u64, topics: &[TopicName]) {
        self.routed = Some((generation, topics.iter().cloned().collect()));
    }
}

/// Build the core message for a publish; `names`: the connection's last publish's, reused
/// while they repeat.
pub fn to_message(
    names: &mut PublishNames,
    exchange: &str,
    routing_key: &str,
    properties: &AMQPProperties,
    raw_properties: Bytes,
    body: Bytes,
    now: Millis,
) -> Message {
    let (topic, exchange, routing_key) = names.get(exchange, routing_key);
    let mut m = Message::born_at(topic, body, now);
    let p = &mut m.properties;
    // Sized once (by doubling, a message with a content type, a correlation id and a
    // reply-to, as Celery's, was reallocated twice): the exchange, routing key and raw
    // properties, then what follows.
    p.reserve_exact(
        3 + usize::from(properties.delivery_mode() != &Some(2))
            + usize::from(properties.content_type().is_some())
            + usize::from(properties.correlation_id().is_some())
            + usize::from(properties.reply_to().is_some())
            + usize::from(properties.expiration().is_some())
            + properties.headers().as_ref().map_or(0, |h| h.inner().len()),
    );
    p.push((props::AMQP_EXCHANGE.into(), exchange));
    p.push((props::AMQP_ROUTING_KEY.into(), routing_key));
    p.push((PROPS.into(), raw_properties));
    if properties.delivery_mode() != &Some(2) {
        p.push((TRANSIENT.into(), Bytes::from_static(&[1])));
    }
    if let Some(ct) = properties.content_type() {
        p.push((props::CONTENT_TYPE.into(), str_bytes(ct.as_str())));
    }
    if let Some(c) = properties.correlation_id() {
        p.push((props::CORRELATION_ID.into(), str_bytes(c.as_str())));
    }
    if let Some(r) = properties.reply_to() {
        p.push((props::REPLY_TO.into(), str_bytes(r.as_str())));
    }
    if let Some(ttl) = properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok())
    {
        p.push((
            props::EXPIRES_AT.into(),
            Bytes::copy_from_slice(&now.saturating_add(ttl).to_be_bytes()),
        ));
    }
    if let Some(h) = properties.headers() {
        for (k, v) in h {
            let text = match v {
                AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
                AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
                _ => None,
            };
            if let Some(t) = text {
                p.push((
                    format!("{}{}", props::USER_PREFIX, k.as_str()).into(),
                    Bytes::from(t),
                ));
            }
        }
    }
    m
}

fn str_bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The exchange and routing key a message is delivered with: as published through
/// AMQP, or `amq.topic` and the MQTT topic turned into a routing key.
pub fn exchange_and_key(m: &Message) -> (String, String) {
    match (
        props::get(&m.properties, props::AMQP_EXCHANGE),
        props::get(&m.properties, props::AMQP_ROUTING_KEY),
    ) {
        (Some(e), Some(k)) => (
            String::from_utf8_lossy(e).into_owned(),
            String::from_utf8_lossy(k).into_owned(),
        ),
        _ => ("amq.topic".into(), mqtt_to_amqp(m.topic.as_str())),
    }
}

/// The content-header property bytes to deliver a message with.
pub fn delivery_properties(m: &Message) -> Bytes {
    if let Some(raw) = props::get(&m.properties, PROPS) {
        return raw.clone();
    }
    encode_properties(&foreign_properties(m))
}

/// The properties of a redelivery tried `count` times before: `raw` with the header
/// `x-delivery-count` set to `count` (RabbitMQ's quorum queues name it so; a long-long
/// as RabbitMQ sends it).
pub fn with_delivery_count(raw: &Bytes, count: u32) -> Bytes {
    let Some(p) = parse_raw_properties(raw) else {
        return raw.clone();
    };
    let mut headers = p.headers().clone().unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongLongInt(i64::from(count)),
    );
    encode_properties(&p.with_headers(headers))
}

/// AMQP properties for a message that did not come through AMQP (MQTT).
fn foreign_properties(m: &Message) -> AMQPProperties {
    let mut p = AMQPProperties::default();
    let mut headers = FieldTable::default();
    for (k, v) in &m.properties {
        let text = || String::from_utf8_lossy(v).into_owned();
        match k.as_ref() {
            props::CONTENT_TYPE => p = p.with_content_type(ShortString::from(text())),
            props::CORRELATION_ID => p = p.with_correlation_id(ShortString::from(text())),
            props::REPLY_TO => p = p.with_reply_to(ShortString::from(text())),
            props::MQTT_QOS => {
                p = p.with_delivery_mode(if v.first().copied().unwrap_or(0) > 0 {
                    2
                } else {
                    1
                });
                headers.insert(
                    "x-mqtt-publish-qos".into(),
                    AMQPValue::ShortShortUInt(v.first().copied().unwrap_or(0)),
                );
            }
            k if k.starts_with(props::USER_PREFIX) => {
                headers.insert(
                    ShortString::from(k[props::USER_PREFIX.len()..].to_owned()),
                    AMQPValue::LongString(LongString::from(v.to_vec())),
                );
            }
            _ => {}
        }
    }
    if !headers.inner().is_empty() {
        p = p.with_headers(headers);
    }
    p
}

/// A message's headers as a headers exchange compares them.
pub fn header_values(properties: &AMQPProperties) -> Vec<(String, HeaderValue)> {
    let Some(h) = properties.headers() else {
        return Vec::new();
    };
    h.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), header_value(v)))
        .collect()
}

/// One AMQP value as the router compares it.
pub fn header_value(v: &AMQPValue) -> HeaderValue {
    match v {
        AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_owned()),
        AMQPValue::LongString(s) => HeaderValue::Str(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::ShortInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::ShortUInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::LongInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::LongUInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Timestamp(i) => HeaderValue::Int(*i as i64),
        AMQPValue::Float(f) => HeaderValue::Float(*f as f64),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::Void => HeaderValue::Void,
        other => HeaderValue::Other(Bytes::from(format!("{other:?}"))),
    }
}

/// An integer argument or header of any integer type.
pub fn int_value(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(i) => *i as i64,
        AMQPValue::ShortShortUInt(i) => *i as i64,
        AMQPValue::ShortInt(i) => *i as i64,
        AMQPValue::ShortUInt(i) => *i as i64,
        AMQPValue::LongInt(i) => *i as i64,
        AMQPValue::LongUInt(i) => *i as i64,
        AMQPValue::LongLongInt(i) => *i,
        AMQPValue::Timestamp(i) => *i as i64,
        AMQPValue::Float(f) if f.fract() == 0.0 => *f as i64,
        AMQPValue::Double(f) if f.fract() == 0.0 => *f as i64,
        AMQPValue::ShortString(s) => s.as_str().parse().ok()?,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok()?,
        _ => return None,
    })
}

/// A string argument.
pub fn str_value(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Why a message was dead-lettered (the core's reasons, RabbitMQ's names).
pub use mqgate_core::DeathReason;

/// AMQP's dead-letter copy for the core: RabbitMQ's `x-death` bookkeeping
/// ([`dead_letter`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct AmqpDeadLetter;

impl mqgate_core::DeadLetterFormat for AmqpDeadLetter {
    fn copy(
        &self,
        original: &StoredMessage,
        target: &mqgate_core::DeadLetter,
        reason: DeathReason,
        now: Millis,
    ) -> (Message, String) {
        dead_letter(
            original,
            &target.endpoint,
            reason,
            &target.exchange,
            target.routing_key.as_deref(),
            now,
        )
    }

    /// RabbitMQ's cycle check (`rabbit_dead_letter:is_cycle`): not for a rejection;
    /// otherwise the copy's `x-death` (newest first, this death at its head) is walked
    /// to the entry of the target queue: a cycle if none on the way, that one included,
    /// was a rejection.
    fn cycles(
        &self,
        copy: &Message,
        target: &mqgate_core::DeadLetter,
        reason: DeathReason,
        topic: &TopicName,
    ) -> bool {
        if reason == DeathReason::Rejected {
            return false;
        }
        let Some(props) =
            props::get(&copy.properties, PROPS).and_then(|raw| parse_raw_properties(raw))
        else {
            return false;
        };
        let Some(AMQPValue::FieldArray(deaths)) = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-death"))
        else {
            return false;
        };
        for d in deaths.as_slice() {
            let AMQPValue::FieldTable(d) = d else {
                continue;
            };
            if d.inner().get("reason").and_then(str_value).as_deref() == Some("rejected") {
                return false;
            }
            if let Some(q) = d.inner().get("queue").and_then(str_value) {
                if crate::queue::queue_topic(&target.vhost, &q).0 == *topic {
                    return true;
                }
            }
        }
        false
    }
}

/// The message to republish to a dead-letter exchange: RabbitMQ's `x-death` header
/// (one entry per queue and reason, with a count, newest first), `x-first-death-*`, and
/// the dead-letter routing key if the queue sets one (the original routing keys are kept
/// in the entry). Per-message expiration is removed, as RabbitMQ does.
pub fn dead_letter(
    stored: &StoredMessage,
    queue: &str,
    reason: DeathReason,
    dl_exchange: &str,
    dl_routing_key: Option<&str>,
    now: Millis,
) -> (Message, String) {
    let m = &stored.message;
    let (exchange, key) = exchange_and_key(m);
    let props = props::get(&m.properties, PROPS)
        .and_then(|raw| parse_raw_properties(raw))
        .unwrap_or_else(|| foreign_properties(m));
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |t: &FieldTable| {
        t.inner().get("queue").and_then(str_value).as_deref() == Some(queue)
            && t.inner().get("reason").and_then(str_value).as_deref() == Some(reason.as_str())
    };
    let mut count = 1i64;
    if let Some(i) = deaths
        .iter()
        .position(|d| matches!(d, AMQPValue::FieldTable(t) if same(t)))
    {
        if let AMQPValue::FieldTable(t) = deaths.remove(i) {
            count += t.inner().get("count").and_then(int_value).unwrap_or(0);
        }
    }
    let mut entry = FieldTable::default();
    entry.insert("count".into(), AMQPValue::LongLongInt(count));
    entry.insert(
        "reason".into(),
        AMQPValue::LongString(reason.as_str().into()),
    );
    entry.insert("queue".into(), AMQPValue::LongString(queue.into()));
    entry.insert("time".into(), AMQPValue::Timestamp(now / 1000));
    entry.insert(
        "exchange".into(),
        AMQPValue::LongString(exchange.as_str().into()),
    );
    entry.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
            key.as_str().into(),
        )])),
    );
    if let Some(e) = props.expiration() {
        entry.insert(
            "original-expiration".into(),
            AMQPValue::LongString(e.as_str().into()),
        );
    }
    deaths.insert(0, AMQPValue::FieldTable(entry));
    if !headers.contains_key("x-first-death-queue") {
        headers.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString(queue.into()),
        );
        headers.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString(reason.as_str().into()),
        );
        headers.insert(
            "x-first-death-exchange".into(),
            AMQPValue::LongString(exchange.as_str().into()),
        );
    }
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    let mut new_props = props.clone().with_headers(headers);
    new_props = strip_expiration(new_props);
    let routing_key = dl_routing_key.map(str::to_owned).unwrap_or(key);
    let raw = encode_properties(&new_props);
    let mut out = to_message(
        &mut PublishNames::default(),
        dl_exchange,
        &routing_key,
        &new_props,
        raw,
        m.body.clone(),
        now,
    );
    out.producer_group = m.producer_group.clone();
    (out, routing_key)
}

/// The same properties without an expiration (AMQPProperties has no clearing setter).
fn strip_expiration(p: AMQPProperties) -> AMQPProperties {
    if p.expiration().is_none() {
        return p;
    }
    let mut q = AMQPProperties::default();
    if let Some(v) = p.content_type() {
        q = q.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        q = q.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        q = q.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        q = q.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        q = q.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        q = q.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        q = q.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        q = q.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        q = q.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        q = q.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        q = q.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        q = q.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        q = q.with_cluster_id(v.clone());
    }
    q
}
