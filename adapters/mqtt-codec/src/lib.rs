//! mqgate-mqtt-codec: an I/O-free MQTT 3.1.1 / 5.0 codec: framing, every packet both ways, and the checks the
//! specification puts on the wire format (reserved flags, QoS 3, UTF-8, property sets,
//! packet size). Decoding never panics and never allocates more than the packet's size;
//! payloads are zero-copy slices of the frame.
//!
//! Session-level rules (CONNECT first, topic aliases, receive maximum, filter syntax)
//! live in the session, which knows the state they depend on.

mod connect;
mod control;
mod properties;
mod publish;
mod subscribe;
mod wire;

pub use connect::{ConnAck, Connect, Will};
pub use control::Disconnect;
pub use properties::{Properties, MAX_USER_PROPERTIES};
pub use publish::{check_topic_name, encode_publish_within, Ack, AckKind, Publish, PublishRef};
pub use subscribe::{SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe};
pub use wire::{frame_size, MAX_PACKET_SIZE};

use bytes::{Buf, Bytes, BytesMut};

use wire::{finish, get_u8, get_varint};

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

// ---------------------------------------------------------------------------------------
// Packets

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
            Packet::Connect(Box::new(connect::decode_connect(&mut frame)?))
        }
        2 => {
            fixed_flags(0)?;
            Packet::ConnAck(connect::decode_connack(&mut frame, v5)?)
        }
        3 => Packet::Publish(publish::decode_publish(&mut frame, flags, v5)?),
        4..=7 => {
            let kind = match kind {
                4 => AckKind::PubAck,
                5 => AckKind::PubRec,
                6 => AckKind::PubRel,
                _ => AckKind::PubComp,
            };
            fixed_flags(if kind == AckKind::PubRel { 0b0010 } else { 0 })?;
            Packet::Ack(publish::decode_ack(&mut frame, kind, v5)?)
        }
        8 => {
            fixed_flags(0b0010)?;
            Packet::Subscribe(subscribe::decode_subscribe(&mut frame, v5)?)
        }
        9 => {
            fixed_flags(0)?;
            Packet::SubAck(subscribe::decode_suback(&mut frame, v5)?)
        }
        10 => {
            fixed_flags(0b0010)?;
            Packet::Unsubscribe(subscribe::decode_unsubscribe(&mut frame, v5)?)
        }
        11 => {
            fixed_flags(0)?;
            Packet::UnsubAck(subscribe::decode_unsuback(&mut frame, v5)?)
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
            let d = control::decode_disconnect(&mut frame, kind, v5)?;
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

// ---------------------------------------------------------------------------------------
// Encoding

/// Append the encoding of `packet` for a connection speaking `version` to `out`.
pub fn encode(packet: &Packet, version: Version, out: &mut BytesMut) {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => connect::encode_connect(c, out),
        Packet::ConnAck(c) => connect::encode_connack(c, v5, out),
        Packet::Publish(p) => publish::encode_publish(p, v5, out),
        Packet::Ack(a) => publish::encode_ack(a, v5, out),
        Packet::Subscribe(s) => subscribe::encode_subscribe(s, v5, out),
        Packet::SubAck(s) => subscribe::encode_suback(s, v5, out),
        Packet::Unsubscribe(u) => subscribe::encode_unsubscribe(u, v5, out),
        Packet::UnsubAck(u) => subscribe::encode_unsuback(u, v5, out),
        Packet::PingReq => finish(out, 0xC0, &[]),
        Packet::PingResp => finish(out, 0xD0, &[]),
        Packet::Disconnect(d) | Packet::Auth(d) => {
            let header = if matches!(packet, Packet::Disconnect(_)) {
                0xE0
            } else {
                0xF0
            };
            control::encode_disconnect(d, header, v5, out);
        }
    }
}
