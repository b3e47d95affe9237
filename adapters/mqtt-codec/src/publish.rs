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

pub(crate) fn encode_publish(p: &Publish, v5: bool, out: &mut BytesMut) {
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

pub(crate) fn encode_ack(a: &Ack, v5: bool, out: &mut BytesMut) {
    let mut body = BytesMut::new();
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
