//! mqgate-mqtt-codec: an I/O-free MQTT 3.1.1 / 5.0 codec: framing, every packet both ways, and the checks the
//! specification puts on the wire format (reserved flags, QoS 3, UTF-8, property sets,
//! packet size). Decoding never panics and never allocates more than the packet's size;
//! payloads are zero-copy slices of the frame.
//!
//! Session-level rules (CONNECT first, topic aliases, receive maximum, filter syntax)
//! live in the session, which knows the state they depend on.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol level a connection speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Version {
    /// MQTT 3.1 ("MQIsdp", level 3), handled as 3.1.1.
    V31,
    /// MQTT 3.1.1 (level 4).
    V311,
    /// MQTT 5.0 (level 5).
    V5,
}

impl Version {
    /// Whether this is MQTT 5.
    pub fn is_v5(self) -> bool {
        self == Version::V5
    }
}

/// MQTT 5 reason codes the broker uses.
#[allow(missing_docs)]
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const SUBSCRIPTION_IDS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
}

/// Why input could not be decoded. Each maps to the MQTT 5 reason code the server sends
/// in its DISCONNECT (3.1.1 connections are simply closed).
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not form a packet (bad length, bad UTF-8, reserved bits set...).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A well-formed packet that breaks a protocol rule.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// Larger than the maximum packet size.
    #[error("packet of {size} bytes is over the maximum of {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A PUBLISH topic with wildcards or other invalid content.
    #[error("invalid topic name: {0}")]
    TopicName(&'static str),
    /// More user properties in one packet than [`MAX_USER_PROPERTIES`].
    #[error("more than {MAX_USER_PROPERTIES} user properties in one packet")]
    TooManyUserProperties,
    /// CONNECT with a protocol name or level this server does not speak.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// The protocol name sent.
        name: String,
        /// The level sent.
        level: u8,
    },
}

impl DecodeError {
    /// The MQTT 5 reason code for it.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::TopicName(_) => reason::TOPIC_NAME_INVALID,
            DecodeError::TooManyUserProperties => reason::QUOTA_EXCEEDED,
            DecodeError::UnsupportedProtocol { .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
        }
    }
}

type DResult<T> = Result<T, DecodeError>;

/// Delivery quality of service.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// From its wire value.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// Every MQTT 5 property a packet may carry. Which ones a packet may carry is checked on
/// decode; absent ones are `None` / empty.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[allow(missing_docs)]
pub struct Properties {
    pub payload_format: Option<u8>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_ids: Vec<u32>,
    pub session_expiry: Option<u32>,
    pub assigned_client_id: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub auth_method: Option<String>,
    pub auth_data: Option<Bytes>,
    pub request_problem_info: Option<u8>,
    pub will_delay: Option<u32>,
    pub request_response_info: Option<u8>,
    pub response_info: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_available: Option<u8>,
    pub sub_ids_available: Option<u8>,
    pub shared_available: Option<u8>,
}

/// Which packet (or part) a property list belongs to: decides the allowed set.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PropCtx {
    Connect,
    ConnAck,
    Publish,
    Will,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    Disconnect,
    Auth,
}

const P_PAYLOAD_FORMAT: u8 = 0x01;
const P_MESSAGE_EXPIRY: u8 = 0x02;
const P_CONTENT_TYPE: u8 = 0x03;
const P_RESPONSE_TOPIC: u8 = 0x08;
const P_CORRELATION_DATA: u8 = 0x09;
const P_SUBSCRIPTION_ID: u8 = 0x0B;
const P_SESSION_EXPIRY: u8 = 0x11;
const P_ASSIGNED_CLIENT_ID: u8 = 0x12;
const P_SERVER_KEEP_ALIVE: u8 = 0x13;
const P_AUTH_METHOD: u8 = 0x15;
const P_AUTH_DATA: u8 = 0x16;
const P_REQUEST_PROBLEM_INFO: u8 = 0x17;
const P_WILL_DELAY: u8 = 0x18;
const P_REQUEST_RESPONSE_INFO: u8 = 0x19;
const P_RESPONSE_INFO: u8 = 0x1A;
const P_SERVER_REFERENCE: u8 = 0x1C;
const P_REASON_STRING: u8 = 0x1F;
const P_RECEIVE_MAXIMUM: u8 = 0x21;
const P_TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const P_TOPIC_ALIAS: u8 = 0x23;
const P_MAXIMUM_QOS: u8 = 0x24;
const P_RETAIN_AVAILABLE: u8 = 0x25;
const P_USER: u8 = 0x26;
const P_MAXIMUM_PACKET_SIZE: u8 = 0x27;
const P_WILDCARD_AVAILABLE: u8 = 0x28;
const P_SUB_IDS_AVAILABLE: u8 = 0x29;
const P_SHARED_AVAILABLE: u8 = 0x2A;

fn allowed(ctx: PropCtx, id: u8) -> bool {
    use PropCtx::*;
    match id {
        P_USER => true,
        P_PAYLOAD_FORMAT | P_MESSAGE_EXPIRY | P_CONTENT_TYPE | P_RESPONSE_TOPIC
        | P_CORRELATION_DATA => matches!(ctx, Publish | Will),
        P_SUBSCRIPTION_ID => matches!(ctx, Publish | Subscribe),
        P_SESSION_EXPIRY => matches!(ctx, Connect | ConnAck | Disconnect),
        P_ASSIGNED_CLIENT_ID | P_SERVER_KEEP_ALIVE | P_RESPONSE_INFO | P_MAXIMUM_QOS
        | P_RETAIN_AVAILABLE | P_WILDCARD_AVAILABLE | P_SUB_IDS_AVAILABLE | P_SHARED_AVAILABLE => {
            ctx == ConnAck
        }
        P_AUTH_METHOD | P_AUTH_DATA => matches!(ctx, Connect | ConnAck | Auth),
        P_REQUEST_PROBLEM_INFO | P_REQUEST_RESPONSE_INFO => ctx == Connect,
        P_WILL_DELAY => ctx == Will,
        P_SERVER_REFERENCE => matches!(ctx, ConnAck | Disconnect),
        P_REASON_STRING => {
            matches!(ctx, ConnAck | Ack | SubAck | Disconnect | Auth)
        }
        P_RECEIVE_MAXIMUM | P_TOPIC_ALIAS_MAXIMUM | P_MAXIMUM_PACKET_SIZE => {
            matches!(ctx, Connect | ConnAck)
        }
        P_TOPIC_ALIAS => ctx == Publish,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Primitive readers and writers

fn need(b: &Bytes, n: usize) -> DResult<()> {
    if b.remaining() < n {
        Err(DecodeError::Malformed("packet shorter than its fields"))
    } else {
        Ok(())
    }
}

fn get_u8(b: &mut Bytes) -> DResult<u8> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn get_u16(b: &mut Bytes) -> DResult<u16> {
    need(b, 2)?;
    Ok(b.get_u16())
}

fn get_u32(b: &mut Bytes) -> DResult<u32> {
    need(b, 4)?;
    Ok(b.get_u32())
}

fn get_binary(b: &mut Bytes) -> DResult<Bytes> {
    let n = get_u16(b)? as usize;
    need(b, n)?;
    Ok(b.split_to(n))
}

/// A UTF-8 string as MQTT defines it: valid UTF-8 with no U+0000 ([MQTT-1.5.4]).
fn get_string(b: &mut Bytes) -> DResult<String> {
    let raw = get_binary(b)?;
    let s = std::str::from_utf8(&raw).map_err(|_| DecodeError::Malformed("invalid UTF-8"))?;
    if s.contains('\0') {
        return Err(DecodeError::Malformed("U+0000 in a string"));
    }
    Ok(s.to_owned())
}

/// A variable byte integer (1..=4 bytes, minimal encoding not required by the spec).
fn get_varint(b: &mut Bytes) -> DResult<u32> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let byte = get_u8(b)?;
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::Malformed("variable byte integer over 4 bytes"))
}

fn put_varint(out: &mut BytesMut, mut v: u32) {
    loop {
        let mut byte = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if v == 0 {
            break;
        }
    }
}

fn varint_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_binary(out: &mut BytesMut, b: &[u8]) {
    let n = b.len().min(u16::MAX as usize);
    out.put_u16(n as u16);
    out.put_slice(&b[..n]);
}

fn put_string(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

// ---------------------------------------------------------------------------------------
// Properties

fn decode_props(b: &mut Bytes, ctx: PropCtx) -> DResult<Properties> {
    let len = get_varint(b)? as usize;
    need(b, len)?;
    let mut p = b.split_to(len);
    let mut out = Properties::default();
    fn once<T>(slot: &mut Option<T>, v: T) -> DResult<()> {
        if slot.is_some() {
            return Err(DecodeError::Protocol(
                "a property that may appear once appears twice",
            ));
        }
        *slot = Some(v);
        Ok(())
    }
    fn flag(v: u8) -> DResult<u8> {
        if v > 1 {
            return Err(DecodeError::Protocol("a 0/1 property has another value"));
        }
        Ok(v)
    }
    while p.has_remaining() {
        let id = get_varint(&mut p)?;
        let id = u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property"))?;
        if !allowed(ctx, id) {
            return Err(DecodeError::Malformed(
                "property not allowed in this packet",
            ));
        }
        match id {
            P_PAYLOAD_FORMAT => once(&mut out.payload_format, flag(get_u8(&mut p)?)?)?,
            P_MESSAGE_EXPIRY => once(&mut out.message_expiry, get_u32(&mut p)?)?,
            P_CONTENT_TYPE => once(&mut out.content_type, get_string(&mut p)?)?,
            P_RESPONSE_TOPIC => {
                let t = get_string(&mut p)?;
                if t.contains(['+', '#']) {
                    return Err(DecodeError::Protocol("wildcard in a response topic"));
                }
                once(&mut out.response_topic, t)?
            }
            P_CORRELATION_DATA => once(&mut out.correlation_data, get_binary(&mut p)?)?,
            P_SUBSCRIPTION_ID => {
                let v = get_varint(&mut p)?;
                if v == 0 {
                    return Err(DecodeError::Protocol("subscription identifier 0"));
                }
                if ctx == PropCtx::Subscribe && !out.subscription_ids.is_empty() {
                    return Err(DecodeError::Protocol("two subscription identifiers"));
                }
                out.subscription_ids.push(v);
            }
            P_SESSION_EXPIRY => once(&mut out.session_expiry, get_u32(&mut p)?)?,
            P_ASSIGNED_CLIENT_ID => once(&mut out.assigned_client_id, get_string(&mut p)?)?,
            P_SERVER_KEEP_ALIVE => once(&mut out.server_keep_alive, get_u16(&mut p)?)?,
            P_AUTH_METHOD => once(&mut out.auth_method, get_string(&mut p)?)?,
            P_AUTH_DATA => once(&mut out.auth_data, get_binary(&mut p)?)?,
            P_REQUEST_PROBLEM_INFO => once(&mut out.request_problem_info, flag(get_u8(&mut p)?)?)?,
            P_WILL_DELAY => once(&mut out.will_delay, get_u32(&mut p)?)?,
            P_REQUEST_RESPONSE_INFO => {
                once(&mut out.request_response_info, flag(get_u8(&mut p)?)?)?
            }
            P_RESPONSE_INFO => once(&mut out.response_info, get_string(&mut p)?)?,
            P_SERVER_REFERENCE => once(&mut out.server_reference, get_string(&mut p)?)?,
            P_REASON_STRING => once(&mut out.reason_string, get_string(&mut p)?)?,
            P_RECEIVE_MAXIMUM => {
                let v = get_u16(&mut p)?;
                if v == 0 {
                    return Err(DecodeError::Protocol("receive maximum 0"));
                }
                once(&mut out.receive_maximum, v)?
            }
            P_TOPIC_ALIAS_MAXIMUM => once(&mut out.topic_alias_maximum, get_u16(&mut p)?)?,
            P_TOPIC_ALIAS => once(&mut out.topic_alias, get_u16(&mut p)?)?,
            P_MAXIMUM_QOS => {
                let v = get_u8(&mut p)?;
                if v > 1 {
                    return Err(DecodeError::Protocol("maximum QoS over 1"));
                }
                once(&mut out.maximum_qos, v)?
            }
            P_RETAIN_AVAILABLE => once(&mut out.retain_available, flag(get_u8(&mut p)?)?)?,
            P_USER => {
                if out.user.len() >= MAX_USER_PROPERTIES {
                    return Err(DecodeError::TooManyUserProperties);
                }
                let k = get_string(&mut p)?;
                let v = get_string(&mut p)?;
                out.user.push((k, v));
            }
            P_MAXIMUM_PACKET_SIZE => {
                let v = get_u32(&mut p)?;
                if v == 0 {
                    return Err(DecodeError::Protocol("maximum packet size 0"));
                }
                once(&mut out.maximum_packet_size, v)?
            }
            P_WILDCARD_AVAILABLE => once(&mut out.wildcard_available, flag(get_u8(&mut p)?)?)?,
            P_SUB_IDS_AVAILABLE => once(&mut out.sub_ids_available, flag(get_u8(&mut p)?)?)?,
            P_SHARED_AVAILABLE => once(&mut out.shared_available, flag(get_u8(&mut p)?)?)?,
            _ => return Err(DecodeError::Malformed("unknown property")),
        }
    }
    Ok(out)
}

fn encode_props(out: &mut BytesMut, p: &Properties) {
    let mut body = BytesMut::new();
    let b = &mut body;
    let byte = |b: &mut BytesMut, id: u8, v: Option<u8>| {
        if let Some(v) = v {
            b.put_u8(id);
            b.put_u8(v);
        }
    };
    let u16p = |b: &mut BytesMut, id: u8, v: Option<u16>| {
        if let Some(v) = v {
            b.put_u8(id);
            b.put_u16(v);
        }
    };
    let u32p = |b: &mut BytesMut, id: u8, v: Option<u32>| {
        if let Some(v) = v {
            b.put_u8(id);
            b.put_u32(v);
        }
    };
    let strp = |b: &mut BytesMut, id: u8, v: &Option<String>| {
        if let Some(v) = v {
            b.put_u8(id);
            put_string(b, v);
        }
    };
    let binp = |b: &mut BytesMut, id: u8, v: &Option<Bytes>| {
        if let Some(v) = v {
            b.put_u8(id);
            put_binary(b, v);
        }
    };
    byte(b, P_PAYLOAD_FORMAT, p.payload_format);
    u32p(b, P_MESSAGE_EXPIRY, p.message_expiry);
    strp(b, P_CONTENT_TYPE, &p.content_type);
    strp(b, P_RESPONSE_TOPIC, &p.response_topic);
    binp(b, P_CORRELATION_DATA, &p.correlation_data);
    for id in &p.subscription_ids {
        b.put_u8(P_SUBSCRIPTION_ID);
        put_varint(b, *id);
    }
    u32p(b, P_SESSION_EXPIRY, p.session_expiry);
    strp(b, P_ASSIGNED_CLIENT_ID, &p.assigned_client_id);
    u16p(b, P_SERVER_KEEP_ALIVE, p.server_keep_alive);
    strp(b, P_AUTH_METHOD, &p.auth_method);
    binp(b, P_AUTH_DATA, &p.auth_data);
    byte(b, P_REQUEST_PROBLEM_INFO, p.request_problem_info);
    u32p(b, P_WILL_DELAY, p.will_delay);
    byte(b, P_REQUEST_RESPONSE_INFO, p.request_response_info);
    strp(b, P_RESPONSE_INFO, &p.response_info);
    strp(b, P_SERVER_REFERENCE, &p.server_reference);
    strp(b, P_REASON_STRING, &p.reason_string);
    u16p(b, P_RECEIVE_MAXIMUM, p.receive_maximum);
    u16p(b, P_TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    u16p(b, P_TOPIC_ALIAS, p.topic_alias);
    byte(b, P_MAXIMUM_QOS, p.maximum_qos);
    byte(b, P_RETAIN_AVAILABLE, p.retain_available);
    for (k, v) in &p.user {
        b.put_u8(P_USER);
        put_string(b, k);
        put_string(b, v);
    }
    u32p(b, P_MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    byte(b, P_WILDCARD_AVAILABLE, p.wildcard_available);
    byte(b, P_SUB_IDS_AVAILABLE, p.sub_ids_available);
    byte(b, P_SHARED_AVAILABLE, p.shared_available);
    put_varint(out, body.len() as u32);
    out.put_slice(&body);
}

// ---------------------------------------------------------------------------------------
// Packets

/// A will message announced in CONNECT.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Will {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Its QoS.
    pub qos: QoS,
    /// Whether it is retained.
    pub retain: bool,
    /// 5.0 will properties (will delay, expiry, content type...).
    pub properties: Properties,
}

/// CONNECT.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Connect {
    /// The protocol level.
    pub version: Version,
    /// Clean session (3.1.1) / clean start (5.0).
    pub clean_start: bool,
    /// Keep alive, in seconds (0: none).
    pub keep_alive: u16,
    /// 5.0 properties.
    pub properties: Properties,
    /// The client identifier (may be empty).
    pub client_id: String,
    /// The will.
    pub will: Option<Will>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
}

/// CONNACK.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ConnAck {
    /// A session was resumed.
    pub session_present: bool,
    /// The return code (3.1.1) or reason code (5.0).
    pub code: u8,
    /// 5.0 properties.
    pub properties: Properties,
}

/// PUBLISH.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Publish {
    /// Redelivery flag.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// The topic name (empty when a 5.0 topic alias stands for it).
    pub topic: String,
    /// The packet identifier (0 at QoS 0).
    pub pkid: u16,
    /// 5.0 properties.
    pub properties: Properties,
    /// The payload.
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AckKind {
    /// QoS 1 acknowledgement.
    PubAck,
    /// QoS 2, first step.
    PubRec,
    /// QoS 2, second step.
    PubRel,
    /// QoS 2, last step.
    PubComp,
}

/// One of the four publish acknowledgements.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Ack {
    /// Which one.
    pub kind: AckKind,
    /// The packet identifier.
    pub pkid: u16,
    /// 5.0 reason code.
    pub reason: u8,
    /// 5.0 properties (reason string, user properties).
    pub properties: Properties,
}

/// The options of one subscription.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SubOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// 5.0: do not receive own publishes.
    pub no_local: bool,
    /// 5.0: keep the retain flag as published.
    pub retain_as_published: bool,
    /// 5.0: 0 send retained, 1 only on a new subscription, 2 never.
    pub retain_handling: u8,
}

/// SUBSCRIBE.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Subscribe {
    /// The packet identifier.
    pub pkid: u16,
    /// 5.0 properties (subscription identifier, user properties).
    pub properties: Properties,
    /// The filters.
    pub filters: Vec<(String, SubOptions)>,
}

/// SUBACK.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SubAck {
    /// The packet identifier.
    pub pkid: u16,
    /// 5.0 properties.
    pub properties: Properties,
    /// One per filter: the granted QoS or a failure code.
    pub codes: Vec<u8>,
}

/// UNSUBSCRIBE.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Unsubscribe {
    /// The packet identifier.
    pub pkid: u16,
    /// 5.0 properties.
    pub properties: Properties,
    /// The filters.
    pub filters: Vec<String>,
}

/// UNSUBACK.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct UnsubAck {
    /// The packet identifier.
    pub pkid: u16,
    /// 5.0 properties.
    pub properties: Properties,
    /// 5.0: one reason code per filter (empty on 3.1.1).
    pub codes: Vec<u8>,
}

/// DISCONNECT (or AUTH, which has the same shape).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Disconnect {
    /// 5.0 reason code.
    pub reason: u8,
    /// 5.0 properties.
    pub properties: Properties,
}

/// An MQTT control packet.
#[derive(Clone, PartialEq, Eq, Debug)]
#[allow(missing_docs)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    Ack(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Disconnect),
}

impl Packet {
    /// The packet type's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::Ack(a) => match a.kind {
                AckKind::PubAck => "PUBACK",
                AckKind::PubRec => "PUBREC",
                AckKind::PubRel => "PUBREL",
                AckKind::PubComp => "PUBCOMP",
            },
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Framing

/// The most user properties one packet may carry. Each costs a few bytes on the wire and
/// about 60 in memory (two strings and their pair): without a bound a 1 MiB packet of
/// empty ones held 13 MiB. Refused with reason 0x97 (quota exceeded).
pub const MAX_USER_PROPERTIES: usize = 1024;

/// The most bytes a remaining length can say (268,435,455) plus the fixed header.
pub const MAX_PACKET_SIZE: usize = 268_435_455 + 5;

/// How big the next frame in `buf` is: `Ok(None)` when more bytes are needed to know,
/// `Ok(Some(total))` once the fixed header is complete. Refuses a frame over `max`
/// before its body has arrived.
pub fn frame_size(buf: &[u8], max: usize) -> DResult<Option<usize>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 1 + i + 1 + len;
            if total > max {
                return Err(DecodeError::TooLarge { size: total, max });
            }
            return Ok(Some(total));
        }
    }
    Err(DecodeError::Malformed("remaining length over 4 bytes"))
}

/// Take the next whole packet off `buf`, decoded for `version` (`None` before CONNECT:
/// only a CONNECT can be decoded then, and it tells the version). `Ok(None)`: need more.
pub fn decode(buf: &mut BytesMut, version: Option<Version>, max: usize) -> DResult<Option<Packet>> {
    let Some(total) = frame_size(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    decode_frame(frame, version).map(Some)
}

/// Decode exactly one frame (fixed header included).
pub fn decode_frame(mut frame: Bytes, version: Option<Version>) -> DResult<Packet> {
    let header = get_u8(&mut frame)?;
    let len = get_varint(&mut frame)? as usize;
    if frame.remaining() != len {
        return Err(DecodeError::Malformed(
            "remaining length does not match the frame",
        ));
    }
    let kind = header >> 4;
    let flags = header & 0x0F;
    let v5 = match (kind, version) {
        (1, _) => false,
        (_, None) => return Err(DecodeError::Protocol("first packet is not CONNECT")),
        (_, Some(v)) => v.is_v5(),
    };
    let fixed_flags = |want: u8| {
        if flags != want {
            Err(DecodeError::Malformed(
                "reserved flags of the fixed header are wrong",
            ))
        } else {
            Ok(())
        }
    };
    let pkt = match kind {
        1 => {
            fixed_flags(0)?;
            Packet::Connect(Box::new(decode_connect(&mut frame)?))
        }
        2 => {
            fixed_flags(0)?;
            let ack_flags = get_u8(&mut frame)?;
            if ack_flags & 0xFE != 0 {
                return Err(DecodeError::Malformed("CONNACK reserved flags"));
            }
            let code = get_u8(&mut frame)?;
            let properties = if v5 && frame.has_remaining() {
                decode_props(&mut frame, PropCtx::ConnAck)?
            } else {
                Properties::default()
            };
            Packet::ConnAck(ConnAck {
                session_present: ack_flags & 1 == 1,
                code,
                properties,
            })
        }
        3 => Packet::Publish(decode_publish(&mut frame, flags, v5)?),
        4..=7 => {
            let kind = match kind {
                4 => AckKind::PubAck,
                5 => AckKind::PubRec,
                6 => AckKind::PubRel,
                _ => AckKind::PubComp,
            };
            fixed_flags(if kind == AckKind::PubRel { 0b0010 } else { 0 })?;
            let pkid = get_u16(&mut frame)?;
            if pkid == 0 {
                return Err(DecodeError::Protocol("packet identifier 0"));
            }
            let (reason, properties) = if v5 {
                let r = if frame.has_remaining() {
                    get_u8(&mut frame)?
                } else {
                    0
                };
                let p = if frame.has_remaining() {
                    decode_props(&mut frame, PropCtx::Ack)?
                } else {
                    Properties::default()
                };
                (r, p)
            } else {
                (0, Properties::default())
            };
            Packet::Ack(Ack {
                kind,
                pkid,
                reason,
                properties,
            })
        }
        8 => {
            fixed_flags(0b0010)?;
            let pkid = get_u16(&mut frame)?;
            if pkid == 0 {
                return Err(DecodeError::Protocol("packet identifier 0"));
            }
            let properties = if v5 {
                decode_props(&mut frame, PropCtx::Subscribe)?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while frame.has_remaining() {
                let f = get_string(&mut frame)?;
                let o = get_u8(&mut frame)?;
                let qos = QoS::from_u8(o & 0x03).ok_or(DecodeError::Malformed("QoS 3"))?;
                let reserved = if v5 { o & 0xC0 } else { o & 0xFC };
                if reserved != 0 {
                    return Err(DecodeError::Malformed("reserved subscription option bits"));
                }
                let retain_handling = (o >> 4) & 0x03;
                if retain_handling == 3 {
                    return Err(DecodeError::Protocol("retain handling 3"));
                }
                filters.push((
                    f,
                    SubOptions {
                        qos,
                        no_local: o & 0x04 != 0,
                        retain_as_published: o & 0x08 != 0,
                        retain_handling,
                    },
                ));
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("SUBSCRIBE without filters"));
            }
            Packet::Subscribe(Subscribe {
                pkid,
                properties,
                filters,
            })
        }
        9 => {
            fixed_flags(0)?;
            let pkid = get_u16(&mut frame)?;
            let properties = if v5 {
                decode_props(&mut frame, PropCtx::SubAck)?
            } else {
                Properties::default()
            };
            let codes = frame.to_vec();
            frame.advance(codes.len());
            Packet::SubAck(SubAck {
                pkid,
                properties,
                codes,
            })
        }
        10 => {
            fixed_flags(0b0010)?;
            let pkid = get_u16(&mut frame)?;
            if pkid == 0 {
                return Err(DecodeError::Protocol("packet identifier 0"));
            }
            let properties = if v5 {
                decode_props(&mut frame, PropCtx::Unsubscribe)?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while frame.has_remaining() {
                filters.push(get_string(&mut frame)?);
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("UNSUBSCRIBE without filters"));
            }
            Packet::Unsubscribe(Unsubscribe {
                pkid,
                properties,
                filters,
            })
        }
        11 => {
            fixed_flags(0)?;
            let pkid = get_u16(&mut frame)?;
            let (properties, codes) = if v5 {
                let p = decode_props(&mut frame, PropCtx::SubAck)?;
                let c = frame.to_vec();
                frame.advance(c.len());
                (p, c)
            } else {
                (Properties::default(), Vec::new())
            };
            Packet::UnsubAck(UnsubAck {
                pkid,
                properties,
                codes,
            })
        }
        12 => {
            fixed_flags(0)?;
            Packet::PingReq
        }
        13 => {
            fixed_flags(0)?;
            Packet::PingResp
        }
        14 | 15 => {
            fixed_flags(0)?;
            if kind == 15 && !v5 {
                return Err(DecodeError::Malformed("AUTH on MQTT 3.1.1"));
            }
            let (reason, properties) = if v5 && frame.has_remaining() {
                let r = get_u8(&mut frame)?;
                let ctx = if kind == 14 {
                    PropCtx::Disconnect
                } else {
                    PropCtx::Auth
                };
                let p = if frame.has_remaining() {
                    decode_props(&mut frame, ctx)?
                } else {
                    Properties::default()
                };
                (r, p)
            } else {
                (0, Properties::default())
            };
            let d = Disconnect { reason, properties };
            if kind == 14 {
                Packet::Disconnect(d)
            } else {
                Packet::Auth(d)
            }
        }
        _ => return Err(DecodeError::Malformed("reserved packet type 0")),
    };
    if frame.has_remaining() {
        return Err(DecodeError::Malformed("bytes left over after the packet"));
    }
    Ok(pkt)
}

fn decode_connect(b: &mut Bytes) -> DResult<Connect> {
    let name = get_string(b)?;
    let level = get_u8(b)?;
    let version = match (name.as_str(), level) {
        ("MQTT", 4) => Version::V311,
        ("MQTT", 5) => Version::V5,
        ("MQIsdp", 3) => Version::V31,
        _ => return Err(DecodeError::UnsupportedProtocol { name, level }),
    };
    let v5 = version.is_v5();
    let flags = get_u8(b)?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed("will QoS or retain without a will"));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let keep_alive = get_u16(b)?;
    let properties = if v5 {
        decode_props(b, PropCtx::Connect)?
    } else {
        Properties::default()
    };
    let client_id = get_string(b)?;
    let will = if will_flag {
        let properties = if v5 {
            decode_props(b, PropCtx::Will)?
        } else {
            Properties::default()
        };
        let topic = get_string(b)?;
        check_topic_name(&topic)?;
        let payload = get_binary(b)?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(get_string(b)?)
    } else {
        None
    };
    let password = if password_flag {
        Some(get_binary(b)?)
    } else {
        None
    };
    Ok(Connect {
        version,
        clean_start,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

/// A topic name as PUBLISH carries it: no wildcards; U+0000 is refused by the string
/// reader. Emptiness is checked by the session (5.0 allows it with a topic alias).
pub fn check_topic_name(t: &str) -> DResult<()> {
    if t.contains(['+', '#']) {
        return Err(DecodeError::TopicName("wildcard in a topic name"));
    }
    Ok(())
}

fn decode_publish(b: &mut Bytes, flags: u8, v5: bool) -> DResult<Publish> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::Malformed("QoS 3"))?;
    let retain = flags & 0x01 != 0;
    if qos == QoS::AtMostOnce && dup {
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = get_string(b)?;
    check_topic_name(&topic)?;
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        let id = get_u16(b)?;
        if id == 0 {
            return Err(DecodeError::Protocol("packet identifier 0"));
        }
        id
    };
    let properties = if v5 {
        decode_props(b, PropCtx::Publish)?
    } else {
        Properties::default()
    };
    if properties.topic_alias == Some(0) {
        return Err(DecodeError::Protocol("topic alias 0"));
    }
    let payload = b.split_to(b.remaining());
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        properties,
        payload,
    })
}

// ---------------------------------------------------------------------------------------
// Encoding

fn finish(out: &mut BytesMut, header: u8, body: &[u8]) {
    out.reserve(body.len() + 5);
    out.put_u8(header);
    put_varint(out, body.len() as u32);
    out.put_slice(body);
}

/// The encoded size of a PUBLISH, without building it (for Maximum Packet Size checks).
pub fn publish_size(p: &Publish, v5: bool) -> usize {
    let mut n = 2 + p.topic.len() + p.payload.len();
    if p.qos != QoS::AtMostOnce {
        n += 2;
    }
    if v5 {
        let mut props = BytesMut::new();
        encode_props(&mut props, &p.properties);
        n += props.len();
    }
    1 + varint_len(n as u32) + n
}

/// Append the encoding of `packet` for a connection speaking `version` to `out`.
pub fn encode(packet: &Packet, version: Version, out: &mut BytesMut) {
    let v5 = version.is_v5();
    let mut body = BytesMut::new();
    match packet {
        Packet::Connect(c) => {
            let (name, level) = match c.version {
                Version::V31 => ("MQIsdp", 3),
                Version::V311 => ("MQTT", 4),
                Version::V5 => ("MQTT", 5),
            };
            let v5 = c.version.is_v5();
            put_string(&mut body, name);
            body.put_u8(level);
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0x02;
            }
            if let Some(w) = &c.will {
                flags |= 0x04 | ((w.qos as u8) << 3);
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            body.put_u8(flags);
            body.put_u16(c.keep_alive);
            if v5 {
                encode_props(&mut body, &c.properties);
            }
            put_string(&mut body, &c.client_id);
            if let Some(w) = &c.will {
                if v5 {
                    encode_props(&mut body, &w.properties);
                }
                put_string(&mut body, &w.topic);
                put_binary(&mut body, &w.payload);
            }
            if let Some(u) = &c.username {
                put_string(&mut body, u);
            }
            if let Some(p) = &c.password {
                put_binary(&mut body, p);
            }
            finish(out, 0x10, &body);
        }
        Packet::ConnAck(c) => {
            body.put_u8(u8::from(c.session_present));
            body.put_u8(c.code);
            if v5 {
                encode_props(&mut body, &c.properties);
            }
            finish(out, 0x20, &body);
        }
        Packet::Publish(p) => {
            let mut header = 0x30 | ((p.qos as u8) << 1);
            if p.dup {
                header |= 0x08;
            }
            if p.retain {
                header |= 0x01;
            }
            // Build in place: header, length, then fields; the payload is copied once.
            let mut props = BytesMut::new();
            if v5 {
                encode_props(&mut props, &p.properties);
            }
            let n = 2
                + p.topic.len()
                + if p.qos == QoS::AtMostOnce { 0 } else { 2 }
                + props.len()
                + p.payload.len();
            out.reserve(n + 5);
            out.put_u8(header);
            put_varint(out, n as u32);
            put_string(out, &p.topic);
            if p.qos != QoS::AtMostOnce {
                out.put_u16(p.pkid);
            }
            out.put_slice(&props);
            out.put_slice(&p.payload);
        }
        Packet::Ack(a) => {
            let header = match a.kind {
                AckKind::PubAck => 0x40,
                AckKind::PubRec => 0x50,
                AckKind::PubRel => 0x62,
                AckKind::PubComp => 0x70,
            };
            body.put_u16(a.pkid);
            if v5 {
                let has_props = a.properties != Properties::default();
                if a.reason != 0 || has_props {
                    body.put_u8(a.reason);
                }
                if has_props {
                    encode_props(&mut body, &a.properties);
                }
            }
            finish(out, header, &body);
        }
        Packet::Subscribe(s) => {
            body.put_u16(s.pkid);
            if v5 {
                encode_props(&mut body, &s.properties);
            }
            for (f, o) in &s.filters {
                put_string(&mut body, f);
                let mut b = o.qos as u8;
                if v5 {
                    if o.no_local {
                        b |= 0x04;
                    }
                    if o.retain_as_published {
                        b |= 0x08;
                    }
                    b |= o.retain_handling << 4;
                }
                body.put_u8(b);
            }
            finish(out, 0x82, &body);
        }
        Packet::SubAck(s) => {
            body.put_u16(s.pkid);
            if v5 {
                encode_props(&mut body, &s.properties);
            }
            body.put_slice(&s.codes);
            finish(out, 0x90, &body);
        }
        Packet::Unsubscribe(u) => {
            body.put_u16(u.pkid);
            if v5 {
                encode_props(&mut body, &u.properties);
            }
            for f in &u.filters {
                put_string(&mut body, f);
            }
            finish(out, 0xA2, &body);
        }
        Packet::UnsubAck(u) => {
            body.put_u16(u.pkid);
            if v5 {
                encode_props(&mut body, &u.properties);
                body.put_slice(&u.codes);
            }
            finish(out, 0xB0, &body);
        }
        Packet::PingReq => finish(out, 0xC0, &[]),
        Packet::PingResp => finish(out, 0xD0, &[]),
        Packet::Disconnect(d) | Packet::Auth(d) => {
            let header = if matches!(packet, Packet::Disconnect(_)) {
                0xE0
            } else {
                0xF0
            };
            if v5 {
                let has_props = d.properties != Properties::default();
                if d.reason != 0 || has_props || header == 0xF0 {
                    body.put_u8(d.reason);
                }
                if has_props {
                    encode_props(&mut body, &d.properties);
                }
            }
            finish(out, header, &body);
        }
    }
}
