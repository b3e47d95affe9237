//! MQTT 5 properties: which packet may carry which, their encoding, and the bound on
//! user properties.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::wire::{
    get_binary, get_string, get_u16, get_u32, get_u8, get_varint, need, put_binary, put_string,
    put_varint,
};
use crate::{DResult, DecodeError};

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
pub(crate) enum PropCtx {
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
// Properties

pub(crate) fn decode_props(b: &mut Bytes, ctx: PropCtx) -> DResult<Properties> {
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

pub(crate) fn encode_props(out: &mut BytesMut, p: &Properties) {
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

/// The most user properties one packet may carry. Each costs a few bytes on the wire and
/// about 60 in memory (two strings and their pair): without a bound a 1 MiB packet of
/// empty ones held 13 MiB. Refused with reason 0x97 (quota exceeded).
pub const MAX_USER_PROPERTIES: usize = 1024;
