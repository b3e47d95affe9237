//! A small length-prefixed encoding for the core's own persisted values (timer payloads).

use bytes::{Buf, BufMut, Bytes};

use crate::error::{CoreError, Result};

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
