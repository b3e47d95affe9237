//! PUBLISH and its acknowledgements: PUBACK, PUBREC, PUBREL and PUBCOMP.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::properties::{decode_props, encode_props, PropCtx, Properties};
use crate::wire::{finish, get_string, get_u16, get_u8, put_string, put_varint, varint_len};
use crate::{DResult, DecodeError, QoS};

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

/// A topic name as PUBLISH carries it: no wildcards; U+0000 is refused by the string
/// reader. Emptiness is checked by the session (5.0 allows it with a topic alias).
pub fn check_topic_name(t: &str) -> DResult<()> {
    if t.contains(['+', '#']) {
        return Err(DecodeError::TopicName("wildcard in a topic name"));
    }
    Ok(())
}

pub(crate) fn decode_publish(b: &mut Bytes, flags: u8, v5: bool) -> DResult<Publish> {
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

/// A publish acknowledgement's variable header and properties (the caller has read its
/// kind from the fixed header and checked the fixed header's flags).
pub(crate) fn decode_ack(frame: &mut Bytes, kind: AckKind, v5: bool) -> DResult<Ack> {
    let pkid = get_u16(frame)?;
    if pkid == 0 {
        return Err(DecodeError::Protocol("packet identifier 0"));
    }
    let (reason, properties) = if v5 {
        let r = if frame.has_remaining() {
            get_u8(frame)?
        } else {
            0
        };
        let p = if frame.has_remaining() {
            decode_props(frame, PropCtx::Ack)?
        } else {
            Properties::default()
        };
        (r, p)
    } else {
        (0, Properties::default())
    };
    Ok(Ack {
        kind,
        pkid,
        reason,
        properties,
    })
}

/// A PUBLISH to encode from borrowed parts: a delivery is written from the stored
/// message's topic and body, without a packet of its own that owns copies of them.
#[derive(Clone, Copy, Debug)]
pub struct PublishRef<'a> {
    /// Redelivery flag.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// The topic name (empty when a 5.0 topic alias stands for it).
    pub topic: &'a str,
    /// The packet identifier (0 at QoS 0).
    pub pkid: u16,
    /// 5.0 properties.
    pub properties: &'a Properties,
    /// The payload.
    pub payload: &'a [u8],
}

impl Publish {
    /// This packet's parts, borrowed.
    pub fn as_parts(&self) -> PublishRef<'_> {
        PublishRef {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: &self.topic,
            pkid: self.pkid,
            properties: &self.properties,
            payload: &self.payload,
        }
    }
}

/// The 5.0 property block of a PUBLISH, length included: `None` when it is the one
/// byte of an empty block (no buffer for the common case) or the packet is 3.1.1.
fn publish_props(p: &PublishRef<'_>, v5: bool) -> (usize, Option<BytesMut>) {
    if !v5 {
        return (0, None);
    }
    if *p.properties == Properties::default() {
        return (1, None);
    }
    let mut props = BytesMut::new();
    encode_props(&mut props, p.properties);
    (props.len(), Some(props))
}

fn packet_len(remaining: usize) -> usize {
    1 + varint_len(remaining as u32) + remaining
}

fn remaining_len(p: &PublishRef<'_>, props: usize) -> usize {
    2 + p.topic.len() + if p.qos == QoS::AtMostOnce { 0 } else { 2 } + props + p.payload.len()
}

pub(crate) fn encode_publish(p: &Publish, v5: bool, out: &mut BytesMut) {
    encode_publish_within(&p.as_parts(), v5, usize::MAX, out);
}

/// Encode a PUBLISH from borrowed parts into `out`, unless it would be larger than `max`
/// bytes (a client's Maximum Packet Size): then nothing is written and the answer is
/// false. Its properties are encoded once for both.
pub fn encode_publish_within(p: &PublishRef<'_>, v5: bool, max: usize, out: &mut BytesMut) -> bool {
    let mut header = 0x30 | ((p.qos as u8) << 1);
    if p.dup {
        header |= 0x08;
    }
    if p.retain {
        header |= 0x01;
    }
    // Build in place: header, length, then fields; the payload is copied once.
    let (props_len, props) = publish_props(p, v5);
    let n = remaining_len(p, props_len);
    if packet_len(n) > max {
        return false;
    }
    out.reserve(n + 5);
    out.put_u8(header);
    put_varint(out, n as u32);
    put_string(out, p.topic);
    if p.qos != QoS::AtMostOnce {
        out.put_u16(p.pkid);
    }
    match props {
        Some(b) => out.put_slice(&b),
        // An empty property block is its length, 0.
        None if v5 => out.put_u8(0),
        None => {}
    }
    out.put_slice(p.payload);
    true
}

pub(crate) fn encode_ack(a: &Ack, v5: bool, out: &mut BytesMut) {
    let header = match a.kind {
        AckKind::PubAck => 0x40,
        AckKind::PubRec => 0x50,
        AckKind::PubRel => 0x62,
        AckKind::PubComp => 0x70,
    };
    let has_props = v5 && a.properties != Properties::default();
    if !has_props {
        // The common case, written in place: the packet id, and a 5.0 reason other
        // than success.
        let with_reason = v5 && a.reason != 0;
        out.reserve(5);
        out.put_u8(header);
        out.put_u8(2 + u8::from(with_reason));
        out.put_u16(a.pkid);
        if with_reason {
            out.put_u8(a.reason);
        }
        return;
    }
    let mut body = BytesMut::new();
    body.put_u16(a.pkid);
    body.put_u8(a.reason);
    encode_props(&mut body, &a.properties);
    finish(out, header, &body);
}
