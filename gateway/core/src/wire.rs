//! A small length-prefixed encoding for the core's own persisted values (timer payloads).

use bytes::{Buf, BufMut, Bytes};

use crate::error::{CoreError, Result};
use crate::router::HeaderValue;

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u32_le(b.len() as u32);
    out.put_slice(b);
}

/// Reads what the `put_` functions wrote; every short read is an error, never a panic.
#[derive(Debug)]
pub(crate) struct Reader(pub(crate) Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<()> {
        if self.0.remaining() < n {
            return Err(CoreError::Invalid(format!(
                "truncated record: {n} bytes needed, {} left",
                self.0.remaining()
            )));
        }
        Ok(())
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        self.need(4)?;
        Ok(self.0.get_u32_le())
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        self.need(8)?;
        Ok(self.0.get_u64_le())
    }

    pub(crate) fn bytes(&mut self) -> Result<Bytes> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.0.split_to(n))
    }

    pub(crate) fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| CoreError::Invalid("string is not UTF-8".into()))
    }

    pub(crate) fn rest(self) -> Bytes {
        self.0
    }
}

/// Headers as a headers exchange compares them: name, type tag, value.
pub(crate) fn put_headers(out: &mut Vec<u8>, headers: &[(String, HeaderValue)]) {
    out.put_u32_le(headers.len() as u32);
    for (k, v) in headers {
        put_str(out, k);
        match v {
            HeaderValue::Str(s) => {
                out.put_u8(1);
                put_str(out, s);
            }
            HeaderValue::Int(i) => {
                out.put_u8(2);
                out.put_u64_le(*i as u64);
            }
            HeaderValue::Float(f) => {
                out.put_u8(3);
                out.put_u64_le(f.to_bits());
            }
            HeaderValue::Bool(b) => {
                out.put_u8(4);
                out.put_u8(u8::from(*b));
            }
            HeaderValue::Void => out.put_u8(5),
            HeaderValue::Other(b) => {
                out.put_u8(6);
                put_bytes(out, b);
            }
        }
    }
}

/// What [`put_headers`] wrote.
pub(crate) fn get_headers(r: &mut Reader) -> Result<Vec<(String, HeaderValue)>> {
    let n = r.u32()?;
    let mut headers = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        let k = r.string()?;
        let v = match r.u8()? {
            1 => HeaderValue::Str(r.string()?),
            2 => HeaderValue::Int(r.u64()? as i64),
            3 => HeaderValue::Float(f64::from_bits(r.u64()?)),
            4 => HeaderValue::Bool(r.u8()? == 1),
            5 => HeaderValue::Void,
            6 => HeaderValue::Other(r.bytes()?),
            t => return Err(CoreError::Invalid(format!("unknown header type {t}"))),
        };
        headers.push((k, v));
    }
    Ok(headers)
}
