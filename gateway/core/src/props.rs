//! The names of the message properties every adapter reads and writes, so that a
//! message published through one protocol is delivered faithfully through another.
//!
//! Values are UTF-8 text unless noted. User headers (MQTT 5 user properties, AMQP
//! headers of string type) are stored as one property each, named [`USER_PREFIX`] +
//! the header name, in the producer's order; names may repeat.

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

/// The first value of property `name`.
pub fn get<'a>(props: &'a [(String, bytes::Bytes)], name: &str) -> Option<&'a bytes::Bytes> {
    props.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// A big-endian u64 property.
pub fn get_u64(props: &[(String, bytes::Bytes)], name: &str) -> Option<u64> {
    let v = get(props, name)?;
    let arr: [u8; 8] = v.as_ref().try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}
