//! Reads: queue ranges and entries, messages from the tail cache or the log, the key
//! index, committed offsets, kv and timers; and the scan that finds retention's cutoff.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use rocksdb::{Direction, IteratorMode, ReadOptions, ReadTier};

use super::keys::{
    be_u64, cq_key, decode_offset, decode_timer_key, key_index_prefix, kv_key, offsets_key,
    offsets_prefix, prefix_range, prefix_successor, timer_key, CF_CQ, CF_KEYS, CF_KV, CF_LOG,
    CF_OFFSETS, CF_OFFSET_TOPICS, CF_TIMERS,
};
use super::{backend, RocksStore, Shared};
use crate::codec;
use crate::error::{Result, StoreError};
use crate::store::Retention;
use crate::types::{
    GroupName, MessageId, Millis, OffsetRange, QueueEntry, QueueId, QueueMessage, QueueOffset,
    QueueRef, ReadLimits, StoredMessage, TimerKey, TopicName,
};

/// Where a read may look. `Cached` never reads a file: the memtables and the block cache
/// only, and RocksDB answers `Incomplete` where it would have had to. A consumer's read
/// runs `Cached` on the async worker first and, only for the part that misses (the queue
/// entries and their messages, or just the messages), `Any` on tokio's blocking pool
/// (`RocksStore::read`), so a consumer replaying from a slow disk never holds a worker
/// that every other connection needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Tier {
    Cached,
    Any,
}

impl Tier {
    fn options(self) -> ReadOptions {
        let mut ro = ReadOptions::default();
        if self == Tier::Cached {
            ro.set_read_tier(ReadTier::BlockCache);
        }
        ro
    }
}

/// `Ok(None)` where a `Cached` read would have had to read a file.
fn cold<T>(tier: Tier, e: rocksdb::Error) -> Result<Option<T>> {
    if tier == Tier::Cached && e.kind() == rocksdb::ErrorKind::Incomplete {
        Ok(None)
    } else {
        Err(backend(e))
    }
}

/// The most entries a queue keeps in memory for consumers at its tail: past that they
/// have fallen behind, and the queue stops keeping them until one is back at the tail.
pub(super) const RECENT_MAX: usize = 256;

/// The entries of one queue that its fastest consumer has not read yet, kept in memory
/// while that consumer reads at the tail: a read then takes them from here instead of
/// creating a RocksDB iterator (3 % of the broker's CPU on 4 KiB AMQP messages: the
/// iterator's creation, over every memtable and level-0 file, and a seek, for a read
/// of a few dozen entries the writer had just written).
///
/// A consumer reading up to the queue's end arms it; the writer then appends each group's
/// new entries before it moves the queue's end on (so a read sees them no later than
/// the end that covers them), first dropping what the fastest reader has read; more
/// than [`RECENT_MAX`] unread and the queue stops keeping them. The entries are always
/// one contiguous run, each put there by the writer with its offset; a read served only
/// when the run covers it, RocksDB otherwise. So nothing here can be stale: an offset's
/// entry never changes once written, and retention's truncation moves only the queue's
/// start, below which no read asks.
#[derive(Debug)]
pub(super) struct Recent {
    /// The offset of `entries[0]` (of the next entry while it is empty).
    first: u64,
    entries: VecDeque<QueueEntry>,
    /// The end of the furthest read served.
    read_to: u64,
}

/// A queue's [`Recent`], while armed; `armed` mirrors it for the writer's staging
/// (checked once per queue per group, not locked per message).
#[derive(Debug, Default)]
pub(super) struct RecentSlot {
    armed: std::sync::atomic::AtomicBool,
    recent: parking_lot::Mutex<Option<Box<Recent>>>,
}

impl RecentSlot {
    /// Whether the writer should hand this queue its new entries.
    pub(super) fn armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// The writer: `entries`, contiguous, were written (called before the queue's end
    /// moves past them).
    pub(super) fn append(&self, entries: &[QueueEntry]) {
        let Some(start) = entries.first().map(|e| e.offset.0) else {
            return;
        };
        let mut slot = self.recent.lock();
        let Some(r) = slot.as_mut() else {
            return;
        };
        while r.first < r.read_to && r.entries.pop_front().is_some() {
            r.first += 1;
        }
        if r.first + r.entries.len() as u64 != start {
            // Armed at an end this run does not continue (a group the writer wrote
            // while it was not armed): start again here.
            r.entries.clear();
            r.first = start;
        }
        r.entries.extend(entries.iter().copied());
        if r.entries.len() > RECENT_MAX {
            *slot = None;
            self.armed.store(false, Ordering::Relaxed);
        }
    }

    /// A read of `[start, end)` served from memory (at most `max_bytes`, at least one
    /// entry), if the run covers it.
    fn read(&self, start: u64, end: u64, max_bytes: usize) -> Option<Vec<QueueEntry>> {
        let mut slot = self.recent.lock();
        let r = slot.as_mut()?;
        let from = usize::try_from(start.checked_sub(r.first)?).ok()?;
        let to = usize::try_from(end - r.first).ok()?;
        if to > r.entries.len() {
            return None;
        }
        let mut out = Vec::with_capacity(to - from);
        let mut bytes = 0usize;
        for e in r.entries.range(from..to) {
            if !out.is_empty() && bytes + e.size as usize > max_bytes {
                break;
            }
            bytes += e.size as usize;
            out.push(*e);
        }
        r.read_to = r.read_to.max(start + out.len() as u64);
        Some(out)
    }

    /// A read from RocksDB reached `end`, the queue's end when it began: keep what the
    /// writer appends from there.
    fn arm(&self, end: u64) {
        let mut slot = self.recent.lock();
        match slot.as_mut() {
            Some(r) => r.read_to = r.read_to.max(end),
            None => {
                *slot = Some(Box::new(Recent {
                    first: end,
                    entries: VecDeque::new(),
                    read_to: end,
                }));
                self.armed.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct TailCache {
    pub(super) messages: VecDeque<Arc<StoredMessage>>,
    pub(super) bytes: usize,
}

impl TailCache {
    fn get(&self, id: u64) -> Option<Arc<StoredMessage>> {
        // Ids are appended in order and mostly without gaps: the message is usually at
        // its distance from the first, found without a binary search whose every step
        // follows a pointer (2 % of the broker's CPU with 100,000 small messages cached).
        let first = self.messages.front()?.id.0;
        let at = usize::try_from(id.checked_sub(first)?).ok()?;
        if let Some(m) = self.messages.get(at).filter(|m| m.id.0 == id) {
            return Some(Arc::clone(m));
        }
        let i = self.messages.partition_point(|m| m.id.0 < id);
        self.messages.get(i).filter(|m| m.id.0 == id).cloned()
    }
}

impl Shared {
    pub(super) fn entry_at(&self, uid: u64, queue: u32, offset: u64) -> Result<Option<QueueEntry>> {
        let db = self.db()?;
        let entry = db
            .get_pinned_cf(db.cf(CF_CQ), cq_key(uid, queue, offset))
            .map_err(backend)?
            .map(|v| codec::decode_entry(QueueOffset(offset), &v))
            .transpose();
        entry
    }

    /// Messages by id, from the tail cache or the log, `None` where retention took them.
    pub(super) fn messages(&self, ids: &[u64]) -> Result<Vec<Option<Arc<StoredMessage>>>> {
        Ok(self
            .messages_in(ids, Tier::Any)?
            .expect("a read of any tier is never cold"))
    }

    /// [`Shared::messages`], `Ok(None)` if `tier` is `Cached` and one had to be read
    /// from a file.
    pub(super) fn messages_in(
        &self,
        ids: &[u64],
        tier: Tier,
    ) -> Result<Option<Vec<Option<Arc<StoredMessage>>>>> {
        let mut out: Vec<Option<Arc<StoredMessage>>> = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        {
            let tail = self.tail.read();
            for (i, id) in ids.iter().enumerate() {
                let m = tail.get(*id);
                if m.is_none() {
                    missing.push(i);
                }
                out.push(m);
            }
        }
        if missing.is_empty() {
            return Ok(Some(out));
        }
        let db = self.db()?;
        let log = db.cf(CF_LOG);
        let keys: Vec<[u8; 8]> = missing.iter().map(|&i| ids[i].to_be_bytes()).collect();
        // Batched and pinned: RocksDB hands each value over without copying it into a
        // string of its own (and the C API into another, and the crate into a `Vec`:
        // three copies and two mallocs of each body; this read went from 13.5 to 9.2 %
        // of the broker's samples for a consumer of 4 KiB messages behind the tail
        // cache). A queue's ids increase, so its reads are sorted and RocksDB can skip
        // sorting them.
        let sorted = keys.windows(2).all(|w| w[0] < w[1]);
        for (&i, got) in missing.iter().zip(db.batched_multi_get_cf_opt(
            log,
            keys.iter(),
            sorted,
            &tier.options(),
        )) {
            let got = match got {
                Ok(got) => got,
                Err(e) => return cold(tier, e),
            };
            if let Some(v) = got {
                out[i] = Some(Arc::new(codec::decode_message(
                    MessageId(ids[i]),
                    Bytes::copy_from_slice(&v),
                )?));
            }
        }
        Ok(Some(out))
    }

    /// A consumer's read, whole (any tier): the entries, then their messages.
    pub(super) fn read_queue(
        &self,
        queue: &QueueRef,
        from: QueueOffset,
        limits: ReadLimits,
    ) -> Result<Vec<QueueMessage>> {
        let entries = self
            .queue_entries(queue, from, limits, Tier::Any)?
            .expect("a read of any tier is never cold");
        let ids: Vec<u64> = entries.iter().map(|e| e.id.0).collect();
        Ok(joined(entries, self.messages(&ids)?))
    }

    /// The queue entries of a consumer's read: up to `limits` from `from` (clamped to
    /// the queue's range), `Ok(None)` if `tier` is `Cached` and a file had to be read.
    pub(super) fn queue_entries(
        &self,
        queue: &QueueRef,
        from: QueueOffset,
        limits: ReadLimits,
        tier: Tier,
    ) -> Result<Option<Vec<QueueEntry>>> {
        let db = self.db()?;
        let (uid, q) = self.queue_state(queue)?;
        let next = q.next.load(Ordering::Acquire);
        let start = from.0.max(q.min.load(Ordering::Acquire));
        if start >= next || limits.max_count == 0 {
            if start == next {
                // At the tail: the next entries can come from memory.
                q.recent.arm(next);
            }
            return Ok(Some(Vec::new()));
        }
        let qid = queue.queue.0;
        let end = next.min(start.saturating_add(limits.max_count as u64));
        if let Some(entries) = q.recent.read(start, end, limits.max_bytes) {
            return Ok(Some(entries));
        }
        let mut ro = tier.options();
        ro.set_iterate_lower_bound(cq_key(uid, qid, start).to_vec());
        ro.set_iterate_upper_bound(cq_key(uid, qid, end).to_vec());
        let mut entries = Vec::with_capacity((end - start) as usize);
        let mut bytes = 0usize;
        // The raw iterator lends each key and value (the crate's iterator boxes both).
        let mut it = db.raw_iterator_cf_opt(db.cf(CF_CQ), ro);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let e = codec::decode_entry(QueueOffset(be_u64(&k[12..])?), v)?;
            if !entries.is_empty() && bytes + e.size as usize > limits.max_bytes {
                return Ok(Some(entries));
            }
            bytes += e.size as usize;
            entries.push(e);
            it.next();
        }
        if let Err(e) = it.status() {
            return cold(tier, e);
        }
        if entries.last().map(|e| e.offset.0 + 1) == Some(next) {
            // Read to the tail: the next entries can come from memory.
            q.recent.arm(next);
        }
        Ok(Some(entries))
    }
}

/// Entries with their messages, in order, leaving out those retention took.
pub(super) fn joined(
    entries: Vec<QueueEntry>,
    messages: Vec<Option<Arc<StoredMessage>>>,
) -> Vec<QueueMessage> {
    entries
        .into_iter()
        .zip(messages)
        .filter_map(|(entry, m)| m.map(|message| QueueMessage { entry, message }))
        .collect()
}

impl RocksStore {
    /// The first id at or after which the log must be kept under `retention` at `now`,
    /// found by walking the oldest records (their sizes and store timestamps).
    pub(super) fn retention_cutoff(&self, now: Millis) -> Result<Option<u64>> {
        let Retention { max_age, max_bytes } = self.shared.config.retention;
        let age_cutoff = max_age.map(|a| now.saturating_sub(a.as_millis() as u64));
        let mut excess = max_bytes.map_or(0, |b| {
            self.shared
                .log_bytes
                .load(Ordering::Acquire)
                .saturating_sub(b)
        });
        if age_cutoff.is_none() && excess == 0 {
            return Ok(None);
        }
        let floor = self.shared.retention_floor.load(Ordering::Acquire);
        let mut cutoff = None;
        let db = self.shared.db()?;
        let it = db.iterator_cf(db.cf(CF_LOG), IteratorMode::Start);
        // Bounded per pass so a huge backlog is trimmed in steps, not in one long stall.
        for item in it.take(1_000_000) {
            let (k, v) = item.map_err(backend)?;
            let ts = v
                .get(2..10)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            let old = age_cutoff.is_some_and(|c| ts < c);
            let id = be_u64(&k)?;
            if (!old && excess == 0) || id >= floor {
                return Ok(Some(id));
            }
            excess = excess.saturating_sub(v.len() as u64);
            cutoff = Some(id + 1);
        }
        Ok(cutoff)
    }
}

impl RocksStore {
    pub(super) fn read_queue_range(&self, queue: &QueueRef) -> Result<OffsetRange> {
        let (_, q) = self.shared.queue_state(queue)?;
        // Read next first: min can only catch up to it, never pass it.
        let next = q.next.load(Ordering::Acquire);
        let min = q.min.load(Ordering::Acquire).min(next);
        Ok(OffsetRange {
            min: QueueOffset(min),
            next: QueueOffset(next),
        })
    }

    pub(super) fn read_offset_for_timestamp(
        &self,
        queue: &QueueRef,
        timestamp: Millis,
    ) -> Result<QueueOffset> {
        let s = &self.shared;
        let (uid, q) = s.queue_state(queue)?;
        let (mut lo, mut hi) = (
            q.min.load(Ordering::Acquire),
            q.next.load(Ordering::Acquire),
        );
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match s.entry_at(uid, queue.queue.0, mid)? {
                Some(e) if e.timestamp >= timestamp => hi = mid,
                // Missing: truncated under us; everything at or below it is gone too.
                _ => lo = mid + 1,
            }
        }
        Ok(QueueOffset(lo))
    }

    pub(super) fn read_messages_by_key(
        &self,
        topic: &TopicName,
        key: &str,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>> {
        let s = &self.shared;
        let db = s.db()?;
        let prefix = key_index_prefix(topic, key);
        let ro = prefix_range(&prefix);
        let log_min = s.log_min.load(Ordering::Acquire);
        let mut out = Vec::new();
        let mut it = db.iterator_cf_opt(db.cf(CF_KEYS), ro, IteratorMode::Start);
        while out.len() < limit {
            let mut ids = Vec::new();
            for item in it.by_ref() {
                let (k, _) = item.map_err(backend)?;
                let id = be_u64(&k[prefix.len()..])?;
                if id >= log_min {
                    ids.push(id);
                }
                if ids.len() >= limit - out.len() {
                    break;
                }
            }
            if ids.is_empty() {
                break;
            }
            out.extend(s.messages(&ids)?.into_iter().flatten());
        }
        Ok(out)
    }

    pub(super) fn read_committed_offset(
        &self,
        group: &GroupName,
        queue: &QueueRef,
    ) -> Result<Option<QueueOffset>> {
        let s = &self.shared;
        let db = s.db()?;
        let offset = db
            .get_pinned_cf(db.cf(CF_OFFSETS), offsets_key(group, queue))
            .map_err(backend)?
            .map(|v| decode_offset(&v))
            .transpose();
        offset
    }

    pub(super) fn read_committed_offsets(
        &self,
        group: &GroupName,
    ) -> Result<Vec<(QueueRef, QueueOffset)>> {
        let s = &self.shared;
        let db = s.db()?;
        let prefix = offsets_prefix(group, None);
        let ro = prefix_range(&prefix);
        let mut out = Vec::new();
        for item in db.iterator_cf_opt(db.cf(CF_OFFSETS), ro, IteratorMode::Start) {
            let (k, v) = item.map_err(backend)?;
            let rest = &k[prefix.len()..];
            let corrupt = || StoreError::Corrupt {
                what: "offset key",
                detail: format!("{k:?}"),
            };
            if rest.len() < 5 {
                return Err(corrupt());
            }
            let topic = std::str::from_utf8(&rest[..rest.len() - 5]).map_err(|_| corrupt())?;
            let queue = u32::from_be_bytes(rest[rest.len() - 4..].try_into().expect("4 bytes"));
            out.push((
                QueueRef {
                    topic: TopicName::new(topic)?,
                    queue: QueueId(queue),
                },
                decode_offset(&v)?,
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    pub(super) fn read_groups(&self) -> Result<Vec<GroupName>> {
        let s = &self.shared;
        let db = s.db()?;
        let mut out = Vec::new();
        let mut it = db.raw_iterator_cf(db.cf(CF_OFFSETS));
        it.seek_to_first();
        while let Some(k) = it.key() {
            let sep = k.iter().position(|b| *b == 0).unwrap_or(k.len());
            let name = std::str::from_utf8(&k[..sep]).map_err(|_| StoreError::Corrupt {
                what: "offset key",
                detail: "group is not UTF-8".into(),
            })?;
            let group = GroupName::new(name)?;
            let mut skip = k[..sep].to_vec();
            skip.push(1);
            out.push(group);
            it.seek(&skip);
        }
        it.status().map_err(backend)?;
        Ok(out)
    }

    /// The groups with offsets on `topic`, from the reverse entries (topic, 0, group).
    pub(super) fn read_groups_on_topic(&self, topic: &TopicName) -> Result<Vec<GroupName>> {
        let db = self.shared.db()?;
        let mut prefix = topic.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        let it = db.prefix_iter(CF_OFFSET_TOPICS, &prefix);
        for item in it {
            let (k, _) = item.map_err(backend)?;
            let name =
                std::str::from_utf8(&k[prefix.len()..]).map_err(|_| StoreError::Corrupt {
                    what: "offset topic key",
                    detail: "group is not UTF-8".into(),
                })?;
            out.push(GroupName::new(name)?);
        }
        Ok(out)
    }

    pub(super) fn read_kv(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        let s = &self.shared;
        let db = s.db()?;
        Ok(db
            .get_cf(db.cf(CF_KV), kv_key(namespace, key))
            .map_err(backend)?
            .map(Bytes::from))
    }

    pub(super) fn read_kv_scan(
        &self,
        namespace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let s = &self.shared;
        let db = s.db()?;
        let full_prefix = kv_key(namespace, prefix);
        let ns_len = namespace.len() + 1;
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(full_prefix.clone());
        if let Some(upper) = prefix_successor(&full_prefix) {
            ro.set_iterate_upper_bound(upper);
        }
        let mut it = db.raw_iterator_cf_opt(db.cf(CF_KV), ro);
        match after {
            Some(a) if a >= prefix => {
                let k = kv_key(namespace, a);
                it.seek(&k);
                if it.key() == Some(&k[..]) {
                    it.next();
                }
            }
            _ => it.seek(&full_prefix),
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            out.push((
                Bytes::copy_from_slice(&k[ns_len..]),
                Bytes::copy_from_slice(v),
            ));
            it.next();
        }
        it.status().map_err(backend)?;
        Ok(out)
    }

    pub(super) fn read_timers_due(
        &self,
        until: Millis,
        after: Option<TimerKey>,
        limit: usize,
    ) -> Result<Vec<(TimerKey, Bytes)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let s = &self.shared;
        let db = s.db()?;
        let mut ro = ReadOptions::default();
        if let Some(a) = after {
            ro.set_iterate_lower_bound(timer_key(&a).to_vec());
        }
        if let Some(end) = until.checked_add(1) {
            ro.set_iterate_upper_bound(end.to_be_bytes().to_vec());
        }
        let mut out = Vec::new();
        for item in db.iterator_cf_opt(db.cf(CF_TIMERS), ro, IteratorMode::Start) {
            let (k, v) = item.map_err(backend)?;
            let key = decode_timer_key(&k)?;
            if after.is_some_and(|a| key <= a) {
                continue;
            }
            out.push((key, Bytes::from(v.into_vec())));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    pub(super) fn read_next_timer(&self) -> Result<Option<TimerKey>> {
        let s = &self.shared;
        let db = s.db()?;
        let first = db
            .iterator_cf(
                db.cf(CF_TIMERS),
                IteratorMode::From(&[], Direction::Forward),
            )
            .next()
            .transpose()
            .map_err(backend)?
            .map(|(k, _)| decode_timer_key(&k))
            .transpose();
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{MessageId, QueueEntry, QueueOffset};

    fn entries(from: u64, to: u64) -> Vec<QueueEntry> {
        (from..to)
            .map(|o| QueueEntry {
                offset: QueueOffset(o),
                id: MessageId(1000 + o),
                size: 10,
                tag_hash: 0,
                timestamp: o,
            })
            .collect()
    }

    fn offsets(v: Option<Vec<QueueEntry>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.offset.0).collect())
    }

    fn cached(ids: &[u64]) -> TailCache {
        let topic = crate::types::TopicName::new("t").unwrap();
        TailCache {
            messages: ids
                .iter()
                .map(|&id| {
                    Arc::new(StoredMessage {
                        id: MessageId(id),
                        store_timestamp: 0,
                        size: 1,
                        message: crate::types::Message::new(topic.clone(), "b"),
                    })
                })
                .collect(),
            bytes: ids.len(),
        }
    }

    /// Found at its distance from the first when ids run without gaps, by search when
    /// they do not; ids below, between and past the cached ones are not found.
    #[test]
    fn tail_cache_finds_ids_with_and_without_gaps() {
        let got = |c: &TailCache, id| c.get(id).map(|m| m.id.0);
        assert_eq!(got(&cached(&[]), 5), None);
        let run = cached(&[10, 11, 12, 13]);
        for id in 10..14 {
            assert_eq!(got(&run, id), Some(id));
        }
        assert_eq!(got(&run, 9), None);
        assert_eq!(got(&run, 14), None);
        assert_eq!(got(&run, u64::MAX), None);
        let gaps = cached(&[10, 12, 13, 20, 21]);
        for id in [10, 12, 13, 20, 21] {
            assert_eq!(got(&gaps, id), Some(id));
        }
        for id in [0, 9, 11, 14, 15, 19, 22] {
            assert_eq!(got(&gaps, id), None, "{id}");
        }
    }

    /// Unarmed, nothing is kept; armed at the end, appends are served, read ones are
    /// dropped at the next append, a gap restarts the run, too many unread disarm it.
    #[test]
    fn the_run_serves_what_it_covers_and_nothing_else() {
        let s = RecentSlot::default();
        s.append(&entries(0, 5));
        assert!(!s.armed());
        assert_eq!(offsets(s.read(0, 5, usize::MAX)), None);
        s.arm(5);
        assert!(s.armed());
        s.append(&entries(5, 9));
        assert_eq!(offsets(s.read(4, 9, usize::MAX)), None, "below the run");
        assert_eq!(offsets(s.read(5, 10, usize::MAX)), None, "past the run");
        assert_eq!(offsets(s.read(5, 7, usize::MAX)), Some(vec![5, 6]));
        // Bytes: the first entry always, then within the limit.
        assert_eq!(offsets(s.read(7, 9, 5)), Some(vec![7]));
        assert_eq!(offsets(s.read(8, 9, 10)), Some(vec![8]));
        // Read to 9: the next append drops 5..9.
        s.append(&entries(9, 11));
        assert_eq!(
            offsets(s.read(8, 11, usize::MAX)),
            None,
            "dropped once read"
        );
        assert_eq!(offsets(s.read(9, 11, 20)), Some(vec![9, 10]));
        // A gap (a group written while it was not armed): the run starts again.
        s.append(&entries(20, 22));
        assert_eq!(offsets(s.read(11, 22, usize::MAX)), None);
        assert_eq!(offsets(s.read(20, 22, usize::MAX)), Some(vec![20, 21]));
        // More unread than it keeps: disarmed, and armed again at a read's end.
        s.append(&entries(22, 22 + RECENT_MAX as u64 + 1));
        assert!(!s.armed());
        assert_eq!(offsets(s.read(22, 23, usize::MAX)), None);
        let end = 22 + RECENT_MAX as u64 + 1;
        s.arm(end);
        s.append(&entries(end, end + 1));
        assert_eq!(offsets(s.read(end, end + 1, usize::MAX)), Some(vec![end]));
    }
}
