//! CONNECT (with its will) and CONNACK.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::properties::{decode_props, encode_props, PropCtx, Properties};
use crate::publish::check_topic_name;
use crate::wire::{finish, get_binary, get_string, get_u16, get_u8, put_binary, put_string};
use crate::{DResult, DecodeError, QoS, Version};

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

pub(crate) fn decode_connect(b: &mut Bytes) -> DResult<Connect> {
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

/// CONNACK's variable header and properties (the fixed header is checked by the caller).
pub(crate) fn decode_connack(frame: &mut Bytes, v5: bool) -> DResult<ConnAck> {
    let ack_flags = get_u8(frame)?;
    if ack_flags & 0xFE != 0 {
        return Err(DecodeError::Malformed("CONNACK reserved flags"));
    }
    let code = get_u8(frame)?;
    let properties = if v5 && frame.has_remaining() {
        decode_props(frame, PropCtx::ConnAck)?
    } else {
        Properties::default()
    };
    Ok(ConnAck {
        session_present: ack_flags & 1 == 1,
        code,
        properties,
    })
}

pub(crate) fn encode_connect(c: &Connect, out: &mut BytesMut) {
    let mut body = BytesMut::new();
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

pub(crate) fn encode_connack(c: &ConnAck, v5: bool, out: &mut BytesMut) {
    let mut body = BytesMut::new();
    body.put_u8(u8::from(c.session_present));
    body.put_u8(c.code);
    if v5 {
        encode_props(&mut body, &c.properties);
    }
    finish(out, 0x20, &body);
}
