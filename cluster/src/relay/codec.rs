//! The relays' shared encoding: big-endian integers, strings and byte strings as a u32
//! length and the bytes, an optional value as u8 0/1 and the value. Reading anything
//! short or malformed is an error, never a panic.

use bytes::{Buf, BufMut, Bytes};
use mqgate_core::{CoreError, Result, StartPosition};
use mqgate_store::{StoreError, TopicName};

fn invalid(what: impl Into<String>) -> CoreError {
    CoreError::Invalid(format!("relay: {}", what.into()))
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.extend_from_slice(b);
}

pub(crate) fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.put_u8(1);
            put_bytes(out, s.as_bytes());
        }
        None => out.put_u8(0),
    }
}

pub(crate) fn put_topics(out: &mut Vec<u8>, ts: &[TopicName]) {
    out.put_u32(ts.len() as u32);
    for t in ts {
        put_bytes(out, t.as_str().as_bytes());
    }
}

/// Reads what the `put_*` functions wrote; anything short or malformed is an error.
pub(crate) struct Reader(pub(crate) Bytes);

impl Reader {
    pub(crate) fn need(&self, n: usize) -> Result<()> {
        if self.0.remaining() < n {
            return Err(invalid(format!(
                "{n} bytes needed, {} left",
                self.0.remaining()
            )));
        }
        Ok(())
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }

    pub(crate) fn bytes(&mut self) -> Result<Bytes> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.0.split_to(n))
    }

    pub(crate) fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| invalid("a string is not UTF-8"))
    }

    pub(crate) fn opt_string(&mut self) -> Result<Option<String>> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            k => Err(invalid(format!("option tag {k}"))),
        }
    }

    pub(crate) fn topic(&mut self) -> Result<TopicName> {
        TopicName::new(self.string()?).map_err(|e| invalid(e.to_string()))
    }

    /// A count of things each at least `min` bytes long (so a forged count cannot
    /// make the reader reserve more than the request holds).
    pub(crate) fn count(&mut self, min: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        self.need(n.saturating_mul(min))?;
        Ok(n)
    }

    pub(crate) fn topics(&mut self) -> Result<Vec<TopicName>> {
        let n = self.count(4)?;
        (0..n).map(|_| self.topic()).collect()
    }

    pub(crate) fn end(&self) -> Result<()> {
        if self.0.has_remaining() {
            return Err(invalid(format!("{} trailing bytes", self.0.remaining())));
        }
        Ok(())
    }
}

/// An error as the caller should see it (kinds kept, text carried).
pub(crate) fn encode_error(out: &mut Vec<u8>, e: &CoreError) {
    let (kind, text) = match e {
        CoreError::NotOwned(s) => {
            out.put_u8(1);
            out.put_u16(*s);
            return;
        }
        CoreError::NoSuchExchange(n) => (2, n.clone()),
        CoreError::NoSuchTopic(n) => (3, n.clone()),
        CoreError::Conflict(m) => (4, m.clone()),
        CoreError::ShuttingDown => (5, String::new()),
        CoreError::Store(e) => (6, e.to_string()),
        other => (0, other.to_string()),
    };
    out.put_u8(kind);
    put_bytes(out, text.as_bytes());
}

/// What [`encode_error`] wrote.
pub(crate) fn decode_error(r: &mut Reader) -> Result<CoreError> {
    let kind = r.u8()?;
    if kind == 1 {
        return Ok(CoreError::NotOwned(r.u16()?));
    }
    let text = r.string()?;
    Ok(match kind {
        2 => CoreError::NoSuchExchange(text),
        3 => CoreError::NoSuchTopic(text),
        4 => CoreError::Conflict(text),
        5 => CoreError::ShuttingDown,
        6 => CoreError::Store(StoreError::Backend(format!("on the shard's owner: {text}"))),
        _ => CoreError::Invalid(format!("on the shard's owner: {text}")),
    })
}

/// A start position: tag u8 (0 first, 1 last, 2 timestamp, 3 offset, 4 last stored),
/// value u64.
pub(crate) fn put_start(out: &mut Vec<u8>, s: StartPosition) {
    let (tag, v) = match s {
        StartPosition::First => (0, 0),
        StartPosition::Last => (1, 0),
        StartPosition::Timestamp(t) => (2, t),
        StartPosition::Offset(o) => (3, o),
        StartPosition::LastStored => (4, 0),
    };
    out.put_u8(tag);
    out.put_u64(v);
}

/// What [`put_start`] wrote.
pub(crate) fn start(r: &mut Reader) -> Result<StartPosition> {
    let tag = r.u8()?;
    let v = r.u64()?;
    Ok(match tag {
        0 => StartPosition::First,
        1 => StartPosition::Last,
        2 => StartPosition::Timestamp(v),
        3 => StartPosition::Offset(v),
        4 => StartPosition::LastStored,
        k => return Err(invalid(format!("start {k}"))),
    })
}
