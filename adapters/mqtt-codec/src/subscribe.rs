//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::properties::{decode_props, encode_props, PropCtx, Properties};
use crate::wire::{finish, get_string, get_u16, get_u8, put_string};
use crate::{DResult, DecodeError, QoS};

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

/// SUBSCRIBE's variable header and payload (the fixed header is checked by the caller).
pub(crate) fn decode_subscribe(frame: &mut Bytes, v5: bool) -> DResult<Subscribe> {
    let pkid = get_u16(frame)?;
    if pkid == 0 {
        return Err(DecodeError::Protocol("packet identifier 0"));
    }
    let properties = if v5 {
        decode_props(frame, PropCtx::Subscribe)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while frame.has_remaining() {
        let f = get_string(frame)?;
        let o = get_u8(frame)?;
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
    Ok(Subscribe {
        pkid,
        properties,
        filters,
    })
}

/// SUBACK's variable header and payload (the fixed header is checked by the caller).
pub(crate) fn decode_suback(frame: &mut Bytes, v5: bool) -> DResult<SubAck> {
    let pkid = get_u16(frame)?;
    let properties = if v5 {
        decode_props(frame, PropCtx::SubAck)?
    } else {
        Properties::default()
    };
    let codes = frame.to_vec();
    frame.advance(codes.len());
    Ok(SubAck {
        pkid,
        properties,
        codes,
    })
}

/// UNSUBSCRIBE's variable header and payload (the fixed header is checked by the caller).
pub(crate) fn decode_unsubscribe(frame: &mut Bytes, v5: bool) -> DResult<Unsubscribe> {
    let pkid = get_u16(frame)?;
    if pkid == 0 {
        return Err(DecodeError::Protocol("packet identifier 0"));
    }
    let properties = if v5 {
        decode_props(frame, PropCtx::Unsubscribe)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while frame.has_remaining() {
        filters.push(get_string(frame)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without filters"));
    }
    Ok(Unsubscribe {
        pkid,
        properties,
        filters,
    })
}

/// UNSUBACK's variable header and payload (the fixed header is checked by the caller).
pub(crate) fn decode_unsuback(frame: &mut Bytes, v5: bool) -> DResult<UnsubAck> {
    let pkid = get_u16(frame)?;
    let (properties, codes) = if v5 {
        let p = decode_props(frame, PropCtx::SubAck)?;
        let c = frame.to_vec();
        frame.advance(c.len());
        (p, c)
    } else {
        (Properties::default(), Vec::new())
    };
    Ok(UnsubAck {
        pkid,
        properties,
        codes,
    })
}

pub(crate) fn encode_subscribe(s: &Subscribe, v5: bool, out: &mut BytesMut) {
    let mut body = BytesMut::new();
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

pub(crate) fn encode_suback(s: &SubAck, v5: bool, out: &mut BytesMut) {
    let mut body = BytesMut::new();
    body.put_u16(s.pkid);
    if v5 {
        encode_props(&mut body, &s.properties);
    }
    body.put_slice(&s.codes);
    finish(out, 0x90, &body);
}

pub(crate) fn encode_unsubscribe(u: &Unsubscribe, v5: bool, out: &mut BytesMut) {
    let mut body = BytesMut::new();
    body.put_u16(u.pkid);
    if v5 {
        encode_props(&mut body, &u.properties);
    }
    for f in &u.filters {
        put_string(&mut body, f);
    }
    finish(out, 0xA2, &body);
}

pub(crate) fn encode_unsuback(u: &UnsubAck, v5: bool, out: &mut BytesMut) {
    let mut body = BytesMut::new();
    body.put_u16(u.pkid);
    if v5 {
        encode_props(&mut body, &u.properties);
        body.put_slice(&u.codes);
    }
    finish(out, 0xB0, &body);
}
