//! The names of the message properties every adapter reads and writes, so that a
//! message published through one protocol is delivered faithfully through another.
//!
//! Values are UTF-8 text unless noted. User headers (MQTT 5 user properties, AMQP
//! headers of string type) are stored as one property each, named [`USER_PREFIX`] +
//! the header name, in the producer's order; names may repeat.

use mqgate_store::PropName;

/// The MIME type of the body (MQTT 5 content type, AMQP content-type).
pub const CONTENT_TYPE: &str = "content-type";
/// Correlation data (MQTT 5 correlation data, AMQP correlation-id); raw bytes.
pub const CORRELATION_ID: &str = "correlation-id";
/// Where replies go (MQTT 5 response topic, AMQP reply-to).
pub const REPLY_TO: &str = "reply-to";
/// When the message expires: a big-endian u64 of ms since the epoch (MQTT 5 message
/// expiry interval, AMQP expiration).
pub const EXPIRES_AT: &str = "expires-at";
/// `1` when the body is UTF-8 text (MQTT 5 payload format indicator).
pub const PAYLOAD_FORMAT: &str = "payload-format";
/// Prefix of user headers.
pub const USER_PREFIX: &str = "h:";

/// The QoS an MQTT client published with: one byte 0, 1 or 2.
pub const MQTT_QOS: &str = "mqtt.qos";
/// Present (one byte, 1) when an MQTT publish had the retain flag.
pub const MQTT_RETAIN: &str = "mqtt.retain";
/// The MQTT client id that published it (for no-local subscriptions).
pub const MQTT_FROM: &str = "mqtt.from";

/// Present when the message may be lost in a crash (AMQP delivery mode 1): one
/// stored before this broker started is skipped at delivery.
pub const TRANSIENT: &str = "amqp.transient";

/// The AMQP exchange it was published to.
pub const AMQP_EXCHANGE: &str = "amqp.exchange";
/// The AMQP routing key it was published with (MQTT delivers it on
/// `amqp_to_mqtt(routing key)`).
pub const AMQP_ROUTING_KEY: &str = "amqp.routing-key";

/// RocketMQ features every protocol reaches through a user header (an AMQP header of
/// string type, an MQTT 5 user property), stored as [`USER_PREFIX`] + the name:
///
/// `x-keys`: the message's business keys (RocketMQ `KEYS`), separated by spaces;
/// indexed, so `mqgate messages key TOPIC KEY` and the admin API find the message, and a
/// delayed message can be cancelled by key.
pub const KEYS_HEADER: &str = "h:x-keys";
/// `x-producer-group`: the producer group it was sent by (overrides the connection's).
pub const PRODUCER_GROUP_HEADER: &str = "h:x-producer-group";
/// `x-sharding-key`: the ordering key. Messages with one key go to one queue of every
/// topic they reach (RocketMQ's sharding key), so an orderly group delivers them in
/// publish order, one at a time.
pub const SHARDING_KEY_HEADER: &str = "h:x-sharding-key";

/// A producer group's name as given (`x-producer-group`, a connection property):
/// trimmed; `None` when empty or longer than 255 bytes.
pub fn producer_group_name(v: &str) -> Option<String> {
    let g = v.trim();
    (!g.is_empty() && g.len() <= 255).then(|| g.to_owned())
}

/// The most keys one message is indexed under, and the longest key (bytes).
pub const MAX_KEYS: usize = 32;
/// The longest key indexed.
pub const MAX_KEY_LEN: usize = 256;

/// The keys of an `x-keys` header value: split on whitespace, empty and over-long ones
/// dropped, duplicates removed, at most [`MAX_KEYS`].
pub fn split_keys(v: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in String::from_utf8_lossy(v).split_whitespace() {
        if k.len() <= MAX_KEY_LEN && !out.iter().any(|o| o == k) {
            out.push(k.to_owned());
            if out.len() == MAX_KEYS {
                break;
            }
        }
    }
    out
}

/// The first value of property `name`.
pub fn get<'a>(props: &'a [(PropName, bytes::Bytes)], name: &str) -> Option<&'a bytes::Bytes> {
    props.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// A big-endian u64 property.
pub fn get_u64(props: &[(PropName, bytes::Bytes)], name: &str) -> Option<u64> {
    let v = get(props, name)?;
    let arr: [u8; 8] = v.as_ref().try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}

/// Change the big-endian u64 property `name` with `f`, if it is set (as [`get_u64`]
/// reads it): an expiry moved by a delay.
pub fn update_u64(props: &mut [(PropName, bytes::Bytes)], name: &str, f: impl FnOnce(u64) -> u64) {
    if let Some((_, v)) = props.iter_mut().find(|(k, _)| k == name) {
        if let Ok(arr) = <[u8; 8]>::try_from(v.as_ref()) {
            *v = bytes::Bytes::copy_from_slice(&f(u64::from_be_bytes(arr)).to_be_bytes());
        }
    }
}
