//! The wire's primitives: fixed-size integers, variable byte integers, strings and
//! binary data, and the fixed header's framing.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{DResult, DecodeError};

// ---------------------------------------------------------------------------------------
// Primitive readers and writers

pub(crate) fn need(b: &Bytes, n: usize) -> DResult<()> {
    if b.remaining() < n {
        Err(DecodeError::Malformed("packet shorter than its fields"))
    } else {
        Ok(())
    }
}

pub(crate) fn get_u8(b: &mut Bytes) -> DResult<u8> {
    need(b, 1)?;
    Ok(b.get_u8())
}

pub(crate) fn get_u16(b: &mut Bytes) -> DResult<u16> {
    need(b, 2)?;
    Ok(b.get_u16())
}

pub(crate) fn get_u32(b: &mut Bytes) -> DResult<u32> {
    need(b, 4)?;
    Ok(b.get_u32())
}

pub(crate) fn get_binary(b: &mut Bytes) -> DResult<Bytes> {
    let n = get_u16(b)? as usize;
    need(b, n)?;
    Ok(b.split_to(n))
}

/// A UTF-8 string as MQTT defines it: valid UTF-8 with no U+0000 ([MQTT-1.5.4]).
pub(crate) fn get_string(b: &mut Bytes) -> DResult<String> {
    let raw = get_binary(b)?;
    let s = std::str::from_utf8(&raw).map_err(|_| DecodeError::Malformed("invalid UTF-8"))?;
    if s.contains('\0') {
        return Err(DecodeError::Malformed("U+0000 in a string"));
    }
    Ok(s.to_owned())
}

/// A variable byte integer (1..=4 bytes, minimal encoding not required by the spec).
pub(crate) fn get_varint(b: &mut Bytes) -> DResult<u32> {
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

pub(crate) fn put_varint(out: &mut BytesMut, mut v: u32) {
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

pub(crate) fn varint_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn put_binary(out: &mut BytesMut, b: &[u8]) {
    let n = b.len().min(u16::MAX as usize);
    out.put_u16(n as u16);
    out.put_slice(&b[..n]);
}

pub(crate) fn put_string(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

// ---------------------------------------------------------------------------------------
// Framing

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

pub(crate) fn finish(out: &mut BytesMut, header: u8, body: &[u8]) {
    out.reserve(body.len() + 5);
    out.put_u8(header);
    put_varint(out, body.len() as u32);
    out.put_slice(body);
}
