//! The layout's keys and values: column family names, key encodings, the header's
//! encoding, and the key ranges iterators are bounded to.

use bytes::BufMut;
use rocksdb::ReadOptions;

use crate::error::{Result, StoreError};
use crate::types::{GroupName, QueueOffset, QueueRef, TimerKey, TopicName};

pub(super) const CF_LOG: &str = "log";
pub(super) const CF_CQ: &str = "cq";
pub(super) const CF_KEYS: &str = "keys";
pub(super) const CF_OFFSETS: &str = "offsets";
/// (topic, 0, group) for every group with an offset on a topic: deleting a topic finds
/// its offsets without scanning every group's.
pub(super) const CF_OFFSET_TOPICS: &str = "offset_topics";
pub(super) const CF_KV: &str = "kv";
pub(super) const CF_TIMERS: &str = "timers";
pub(super) const CF_META: &str = "meta";
pub(super) const HEADER_KEY: &[u8] = b"hdr";
/// With an external log: the sequence of the last log record this view has applied
/// (u64 BE), written in the same RocksDB batch as the record itself.
pub(super) const LOG_SEQ_KEY: &[u8] = b"extlog";
/// With an external log: `extlog/<first message id BE>` -> the sequence (u64 BE) of the
/// record whose first append took that id, for each record with appends: retention
/// finds there the oldest record it must keep.
pub(super) const LOG_INDEX_PREFIX: &[u8] = b"extlog/";

pub(super) fn log_index_key(first_id: u64) -> Vec<u8> {
    let mut k = LOG_INDEX_PREFIX.to_vec();
    k.extend_from_slice(&first_id.to_be_bytes());
    k
}

pub(super) fn cq_key(uid: u64, queue: u32, offset: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..8].copy_from_slice(&uid.to_be_bytes());
    k[8..12].copy_from_slice(&queue.to_be_bytes());
    k[12..].copy_from_slice(&offset.to_be_bytes());
    k
}

pub(super) fn key_index_prefix(topic: &TopicName, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.as_str().len() + key.len() + 10);
    k.extend_from_slice(topic.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k
}

pub(super) fn offsets_key(group: &GroupName, queue: &QueueRef) -> Vec<u8> {
    let mut k = offsets_prefix(group, Some(&queue.topic));
    k.put_u32(queue.queue.0);
    k
}

pub(super) fn offset_topic_key(topic: &str, group: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + group.len() + 1);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(group);
    k
}

/// The topic of an offsets key (group, 0, topic, 0, queue as 4 bytes).
pub(super) fn offsets_key_topic(k: &[u8]) -> Option<&[u8]> {
    let sep = k.iter().position(|b| *b == 0)?;
    (k.len() >= sep + 6).then(|| &k[sep + 1..k.len() - 5])
}

pub(super) fn offsets_prefix(group: &GroupName, topic: Option<&TopicName>) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(group.as_str().as_bytes());
    k.push(0);
    if let Some(t) = topic {
        k.extend_from_slice(t.as_str().as_bytes());
        k.push(0);
    }
    k
}

pub(super) fn kv_key(namespace: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(namespace.len() + 1 + key.len());
    k.extend_from_slice(namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

pub(super) fn timer_key(k: &TimerKey) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&k.due.to_be_bytes());
    out[8..].copy_from_slice(&k.seq.to_be_bytes());
    out
}

pub(super) fn decode_timer_key(k: &[u8]) -> Result<TimerKey> {
    if k.len() != 16 {
        return Err(StoreError::Corrupt {
            what: "timer key",
            detail: format!("{} bytes", k.len()),
        });
    }
    Ok(TimerKey {
        due: u64::from_be_bytes(k[..8].try_into().expect("8 bytes")),
        seq: u64::from_be_bytes(k[8..].try_into().expect("8 bytes")),
    })
}

pub(super) fn topic_meta_key(name: &TopicName) -> Vec<u8> {
    let mut k = b"t/".to_vec();
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

pub(super) fn queue_meta_key(uid: u64, queue: u32) -> Vec<u8> {
    let mut k = b"q/".to_vec();
    k.put_u64(uid);
    k.put_u32(queue);
    k
}

pub(super) fn be_u64(v: &[u8]) -> Result<u64> {
    v.get(..8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| StoreError::Corrupt {
            what: "meta",
            detail: format!("{} bytes where 8 were expected", v.len()),
        })
}

/// The counters persisted with every batch.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Header {
    pub(super) next_seq: u64,
    pub(super) log_bytes: u64,
    pub(super) messages: u64,
    pub(super) timers: u64,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..8].copy_from_slice(&self.next_seq.to_be_bytes());
        out[8..16].copy_from_slice(&self.log_bytes.to_be_bytes());
        out[16..24].copy_from_slice(&self.messages.to_be_bytes());
        out[24..].copy_from_slice(&self.timers.to_be_bytes());
        out
    }

    pub(super) fn decode(v: &[u8]) -> Result<Self> {
        if v.len() != 32 {
            return Err(StoreError::Corrupt {
                what: "header",
                detail: format!("{} bytes", v.len()),
            });
        }
        Ok(Self {
            next_seq: be_u64(&v[..8])?,
            log_bytes: be_u64(&v[8..16])?,
            messages: be_u64(&v[16..24])?,
            timers: be_u64(&v[24..])?,
        })
    }
}

pub(super) fn decode_offset(v: &[u8]) -> Result<QueueOffset> {
    v.try_into()
        .map(|b| QueueOffset(u64::from_le_bytes(b)))
        .map_err(|_| StoreError::Corrupt {
            what: "offset",
            detail: format!("{} bytes", v.len()),
        })
}

/// The end of the key range of a prefix that ends in its NUL separator: the same bytes
/// with the NUL raised to 1, so every key `prefix ++ anything` sorts below it.
pub(super) fn nul_prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    *end.last_mut().expect("prefix ends in NUL") = 1;
    end
}

/// Read options bounding an iterator to the keys under a NUL-terminated prefix.
pub(super) fn prefix_range(prefix: &[u8]) -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(prefix.to_vec());
    ro.set_iterate_upper_bound(nul_prefix_end(prefix));
    ro
}

/// The smallest key greater than every key starting with `prefix`.
pub(super) fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut v = prefix.to_vec();
    while let Some(last) = v.pop() {
        if last < u8::MAX {
            v.push(last + 1);
            return Some(v);
        }
    }
    None
}
