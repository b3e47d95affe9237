//! DISCONNECT and AUTH (one shape); PINGREQ and PINGRESP have no fields and are
//! decoded and encoded by the dispatch in the crate root.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::properties::{decode_props, encode_props, PropCtx, Properties};
use crate::wire::{finish, get_u8};
use crate::{DResult, DecodeError};

/// DISCONNECT (or AUTH, which has the same shape).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Disconnect {
    /// 5.0 reason code.
    pub reason: u8,
    /// 5.0 properties.
    pub properties: Properties,
}

/// DISCONNECT's (`kind` 14) or AUTH's (`kind` 15) reason code and properties (the fixed
/// header is checked by the caller).
pub(crate) fn decode_disconnect(frame: &mut Bytes, kind: u8, v5: bool) -> DResult<Disconnect> {
    if kind == 15 && !v5 {
        return Err(DecodeError::Malformed("AUTH on MQTT 3.1.1"));
    }
    let (reason, properties) = if v5 && frame.has_remaining() {
        let r = get_u8(frame)?;
        let ctx = if kind == 14 {
            PropCtx::Disconnect
        } else {
            PropCtx::Auth
        };
        let p = if frame.has_remaining() {
            decode_props(frame, ctx)?
        } else {
            Properties::default()
        };
        (r, p)
    } else {
        (0, Properties::default())
    };
    Ok(Disconnect { reason, properties })
}

/// DISCONNECT (`header` 0xE0) or AUTH (0xF0).
pub(crate) fn encode_disconnect(d: &Disconnect, header: u8, v5: bool, out: &mut BytesMut) {
    let mut body = BytesMut::new();
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
