//! The on-disk encodings: commit-log records, queue entries and keys.
//!
//! A commit-log record (little-endian numbers; the message id is the record's key):
//! ```text
//! u8  version (1)       u8  flags (bit 0: deliver_at, bit 1: tags)
//! u64 store_timestamp   u64 born_timestamp   u32 reconsume_times   u8 delay_level
//! [u64 deliver_at]      str16 topic          str16 producer_group  [str16 tags]
//! u16 key count, str16 each
//! u32 property count, each: str16 name, bytes32 value
//! bytes32 body
//! ```
//! `str16` is a u16 length and UTF-8 bytes; `bytes32` a u32 length and bytes.
//! A queue entry is 28 bytes: u64 message id, u32 size, u64 tag hash, u64 timestamp.

use bytes::{Buf, BufMut, Bytes};

use crate::error::{Result, StoreError};
use crate::types::{Message, MessageId, Millis, QueueEntry, QueueOffset, StoredMessage, TopicName};

const VERSION: u8 = 1;
const FLAG_DELIVER_AT: u8 = 1;
const FLAG_TAGS: u8 = 2;
const FIXED_HEADER: usize = 1 + 1 + 8 + 8 + 4 + 1;

/// Size of an encoded queue entry.
pub(crate) const ENTRY_LEN: usize = 28;

/// Refuse a message the record format cannot hold.
pub(crate) fn validate(m: &Message) -> Result<()> {
    let short = |what: &str, s: &str| {
        if s.len() > u16::MAX as usize {
            Err(StoreError::Invalid(format!(
                "{what} is {} bytes, at most {} allowed",
                s.len(),
                u16::MAX
            )))
        } else {
            Ok(())
        }
    };
    short("producer group", &m.producer_group)?;
    if let Some(t) = &m.tags {
        short("tags", t)?;
    }
    if m.keys.len() > u16::MAX as usize {
        return Err(StoreError::Invalid("too many keys".into()));
    }
    for k in &m.keys {
        short("key", k)?;
        if k.contains('\0') {
            return Err(StoreError::Invalid("a key may not contain NUL".into()));
        }
    }
    for (name, value) in &m.properties {
        short("property name", name)?;
        if value.len() > u32::MAX as usize {
            return Err(StoreError::Invalid("property value too large".into()));
        }
    }
    if m.body.len() > u32::MAX as usize {
        return Err(StoreError::Invalid("body too large".into()));
    }
    Ok(())
}

/// The encoded size of a record for `m`.
pub(crate) fn encoded_len(m: &Message) -> usize {
    FIXED_HEADER
        + m.deliver_at.map_or(0, |_| 8)
        + 2
        + m.topic.as_str().len()
        + 2
        + m.producer_group.len()
        + m.tags.as_ref().map_or(0, |t| 2 + t.len())
        + 2
        + m.keys.iter().map(|k| 2 + k.len()).sum::<usize>()
        + 4
        + m.properties
            .iter()
            .map(|(k, v)| 2 + k.len() + 4 + v.len())
            .sum::<usize>()
        + 4
        + m.body.len()
}

/// Encode a record for `m` stored at `store_timestamp` into `out`.
pub(crate) fn encode_message(m: &Message, store_timestamp: Millis, out: &mut Vec<u8>) {
    out.reserve(encoded_len(m));
    encode_head(m, store_timestamp, out);
    out.put_slice(&m.body);
}

/// [`encode_message`] up to the body: the record is this followed by `m.body` (the
/// RocksDB writer hands the two to its batch as parts, without joining them).
pub(crate) fn encode_head(m: &Message, store_timestamp: Millis, out: &mut Vec<u8>) {
    let mut flags = 0;
    if m.deliver_at.is_some() {
        flags |= FLAG_DELIVER_AT;
    }
    if m.tags.is_some() {
        flags |= FLAG_TAGS;
    }
    out.put_u8(VERSION);
    out.put_u8(flags);
    out.put_u64_le(store_timestamp);
    out.put_u64_le(m.born_timestamp);
    out.put_u32_le(m.reconsume_times);
    out.put_u8(m.delay_level);
    if let Some(at) = m.deliver_at {
        out.put_u64_le(at);
    }
    put_str16(out, m.topic.as_str());
    put_str16(out, &m.producer_group);
    if let Some(t) = &m.tags {
        put_str16(out, t);
    }
    out.put_u16_le(m.keys.len() as u16);
    for k in &m.keys {
        put_str16(out, k);
    }
    out.put_u32_le(m.properties.len() as u32);
    for (k, v) in &m.properties {
        put_str16(out, k);
        out.put_u32_le(v.len() as u32);
        out.put_slice(v);
    }
    out.put_u32_le(m.body.len() as u32);
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn corrupt(detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: "commit-log record",
        detail: detail.into(),
    }
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize) -> Result<()> {
        if self.buf.remaining() < n {
            Err(corrupt(format!(
                "truncated: needed {n} more bytes, {} left",
                self.buf.remaining()
            )))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16> {
        self.need(2)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn str16(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| corrupt("string is not UTF-8"))
    }
}

/// Decode the record stored under `id`. Body and property values share `buf`.
pub(crate) fn decode_message(id: MessageId, buf: Bytes) -> Result<StoredMessage> {
    let size = buf.len() as u32;
    let mut r = Reader { buf };
    let version = r.u8()?;
    if version != VERSION {
        return Err(corrupt(format!("unknown record version {version}")));
    }
    let flags = r.u8()?;
    let store_timestamp = r.u64()?;
    let born_timestamp = r.u64()?;
    let reconsume_times = r.u32()?;
    let delay_level = r.u8()?;
    let deliver_at = if flags & FLAG_DELIVER_AT != 0 {
        Some(r.u64()?)
    } else {
        None
    };
    let topic = TopicName::new(r.str16()?).map_err(|e| corrupt(e.to_string()))?;
    let producer_group = r.str16()?.into();
    let tags = if flags & FLAG_TAGS != 0 {
        Some(r.str16()?)
    } else {
        None
    };
    let nkeys = r.u16()? as usize;
    let mut keys = Vec::with_capacity(nkeys);
    for _ in 0..nkeys {
        keys.push(r.str16()?);
    }
    let nprops = r.u32()? as usize;
    let mut properties = Vec::with_capacity(nprops.min(1024));
    for _ in 0..nprops {
        let k = r.str16()?;
        let n = r.u32()? as usize;
        properties.push((k.into(), r.bytes(n)?));
    }
    let n = r.u32()? as usize;
    let body = r.bytes(n)?;
    if r.buf.has_remaining() {
        return Err(corrupt(format!("{} trailing bytes", r.buf.remaining())));
    }
    Ok(StoredMessage {
        id,
        store_timestamp,
        size,
        message: Message {
            topic,
            producer_group,
            keys,
            tags,
            properties,
            body,
            born_timestamp,
            reconsume_times,
            delay_level,
            deliver_at,
        },
    })
}

/// Encode a queue entry's value (its offset is in the key).
pub(crate) fn encode_entry(e: &QueueEntry) -> [u8; ENTRY_LEN] {
    let mut out = [0u8; ENTRY_LEN];
    let mut w = &mut out[..];
    w.put_u64_le(e.id.0);
    w.put_u32_le(e.size);
    w.put_u64_le(e.tag_hash);
    w.put_u64_le(e.timestamp);
    out
}

/// Decode a queue entry's value.
pub(crate) fn decode_entry(offset: QueueOffset, mut v: &[u8]) -> Result<QueueEntry> {
    if v.len() != ENTRY_LEN {
        return Err(StoreError::Corrupt {
            what: "queue entry",
            detail: format!("{} bytes, expected {ENTRY_LEN}", v.len()),
        });
    }
    Ok(QueueEntry {
        offset,
        id: MessageId(v.get_u64_le()),
        size: v.get_u32_le(),
        tag_hash: v.get_u64_le(),
        timestamp: v.get_u64_le(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn arb_message() -> impl Strategy<Value = Message> {
        (
            "[a-z/%#.]{1,40}",
            ".{0,20}",
            proptest::collection::vec("[^\0]{0,12}", 0..4),
            proptest::option::of(".{0,12}"),
            proptest::collection::vec(
                (".{0,10}", proptest::collection::vec(any::<u8>(), 0..32)),
                0..5,
            ),
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<u64>(),
            any::<u32>(),
            any::<u8>(),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(topic, group, keys, tags, props, body, born, rc, lvl, at)| Message {
                    topic: TopicName::new(topic).unwrap(),
                    producer_group: group.into(),
                    keys,
                    tags,
                    properties: props
                        .into_iter()
                        .map(|(k, v)| (k.into(), Bytes::from(v)))
                        .collect(),
                    body: Bytes::from(body),
                    born_timestamp: born,
                    reconsume_times: rc,
                    delay_level: lvl,
                    deliver_at: at,
                },
            )
    }

    proptest! {
        #[test]
        fn record_round_trips(m in arb_message(), ts in any::<u64>(), id in any::<u64>()) {
            validate(&m).unwrap();
            let mut buf = Vec::new();
            encode_message(&m, ts, &mut buf);
            prop_assert_eq!(buf.len(), encoded_len(&m));
            let back = decode_message(MessageId(id), Bytes::from(buf.clone())).unwrap();
            prop_assert_eq!(back.id, MessageId(id));
            prop_assert_eq!(back.store_timestamp, ts);
            prop_assert_eq!(back.size as usize, buf.len());
            prop_assert_eq!(back.message, m);
        }

        #[test]
        fn truncated_or_garbage_records_are_errors_not_panics(
            m in arb_message(), cut in any::<prop::sample::Index>(), junk in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            let mut buf = Vec::new();
            encode_message(&m, 1, &mut buf);
            let cut = cut.index(buf.len());
            prop_assert!(decode_message(MessageId(0), Bytes::copy_from_slice(&buf[..cut])).is_err());
            let _ = decode_message(MessageId(0), Bytes::from(junk));
        }

        #[test]
        fn entry_round_trips(id in any::<u64>(), size in any::<u32>(), th in any::<u64>(), ts in any::<u64>(), off in any::<u64>()) {
            let e = QueueEntry { offset: QueueOffset(off), id: MessageId(id), size, tag_hash: th, timestamp: ts };
            prop_assert_eq!(decode_entry(QueueOffset(off), &encode_entry(&e)).unwrap(), e);
        }
    }
}
