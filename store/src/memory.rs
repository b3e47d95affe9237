//! [`MemoryStore`]: the whole store in process memory, for tests and ephemeral brokers.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::codec;
use crate::error::{Result, StoreError};
use crate::store::{
    Appended, Retention, RetentionReport, Store, StoreStats, WriteBatch, WriteOp, WriteReceipt,
};
use crate::types::{
    now_millis, tag_hash, GroupName, MessageId, Millis, OffsetRange, QueueEntry, QueueMessage,
    QueueOffset, QueueRef, ReadLimits, StoredMessage, TimerKey, TopicConfig, TopicName,
};

/// The store held in memory: the same behaviour as [`crate::RocksStore`], nothing on disk.
///
/// One mutex guards everything; every operation holds it briefly and never across an
/// `.await`. Writes are "durable" as soon as they are applied.
#[derive(Debug)]
pub struct MemoryStore {
    /// All state, behind one lock: a batch is atomic because it is applied under it.
    inner: Mutex<Inner>,
    /// What [`Store::enforce_retention`] removes.
    retention: Retention,
    /// Retention keeps ids from this one on ([`Store::set_retention_floor`]; `u64::MAX`:
    /// no floor).
    floor: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            retention: Retention::default(),
            floor: AtomicU64::new(u64::MAX),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// The next id (shared by messages and timers).
    next_seq: u64,
    /// The timestamp of the last batch: store timestamps never go back.
    last_timestamp: Millis,
    /// The commit log.
    log: BTreeMap<u64, Arc<StoredMessage>>,
    /// Encoded bytes in `log`.
    log_bytes: u64,
    topics: BTreeMap<TopicName, MemTopic>,
    /// (message topic, key, id): the key index.
    keys: BTreeSet<(TopicName, String, u64)>,
    /// Committed offsets, by group (a group's offsets are found without a scan).
    offsets: BTreeMap<GroupName, BTreeMap<QueueRef, QueueOffset>>,
    /// The groups with offsets on each topic (so deleting a topic touches only those).
    offset_groups: HashMap<TopicName, BTreeSet<GroupName>>,
    kv: BTreeMap<(String, Bytes), Bytes>,
    timers: BTreeMap<TimerKey, Bytes>,
}

#[derive(Debug)]
struct MemTopic {
    queue_count: u32,
    queues: Vec<MemQueue>,
}

/// One queue: `entries[i]` has offset `min + i`.
#[derive(Debug, Default)]
struct MemQueue {
    min: u64,
    entries: VecDeque<QueueEntry>,
}

impl MemQueue {
    fn next(&self) -> u64 {
        self.min + self.entries.len() as u64
    }

    fn truncate(&mut self, before: u64) -> u64 {
        let before = before.clamp(self.min, self.next());
        let n = before - self.min;
        self.entries.drain(..n as usize);
        self.min = before;
        n
    }
}

impl MemoryStore {
    /// An empty store that never deletes by itself.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with a retention policy.
    pub fn with_retention(retention: Retention) -> Self {
        Self {
            retention,
            ..Self::default()
        }
    }

    /// Start ids (messages and timers) at `base` rather than 0, as a shard's store does
    /// (see `RocksConfig::id_base`).
    pub fn with_id_base(self, base: u64) -> Self {
        {
            let mut inner = self.inner.lock();
            inner.next_seq = inner.next_seq.max(base);
        }
        self
    }
}

impl Inner {
    fn queue(&self, q: &QueueRef) -> Result<&MemQueue> {
        self.topics
            .get(&q.topic)
            .and_then(|t| t.queues.get(q.queue.0 as usize))
            .ok_or_else(|| StoreError::UnknownQueue(q.clone()))
    }

    fn queue_mut(&mut self, q: &QueueRef) -> Result<&mut MemQueue> {
        self.topics
            .get_mut(&q.topic)
            .and_then(|t| t.queues.get_mut(q.queue.0 as usize))
            .ok_or_else(|| StoreError::UnknownQueue(q.clone()))
    }

    /// Refuse the batch before changing anything if any part of it cannot apply.
    fn check(&self, batch: &WriteBatch) -> Result<()> {
        for op in &batch.ops {
            match op {
                WriteOp::Append { message, queues } => {
                    codec::validate(message)?;
                    for q in queues {
                        self.queue(q)?;
                    }
                }
                WriteOp::Truncate { queue, .. } => {
                    self.queue(queue)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<WriteReceipt> {
        self.check(&batch)?;
        let now = now_millis().max(self.last_timestamp);
        self.last_timestamp = now;
        let mut receipt = WriteReceipt::default();
        for op in batch.ops {
            match op {
                WriteOp::Append { message, queues } => {
                    let id = self.next_seq;
                    self.next_seq += 1;
                    let size = codec::encoded_len(&message) as u32;
                    let th = tag_hash(message.tags.as_deref());
                    for k in &message.keys {
                        self.keys.insert((message.topic.clone(), k.clone(), id));
                    }
                    let mut offsets = Vec::with_capacity(queues.len());
                    for q in queues {
                        let queue = self.queue_mut(&q)?;
                        let offset = QueueOffset(queue.next());
                        queue.entries.push_back(QueueEntry {
                            offset,
                            id: MessageId(id),
                            size,
                            tag_hash: th,
                            timestamp: now,
                        });
                        offsets.push((q, offset));
                    }
                    self.log.insert(
                        id,
                        Arc::new(StoredMessage {
                            id: MessageId(id),
                            store_timestamp: now,
                            size,
                            message,
                        }),
                    );
                    self.log_bytes += u64::from(size);
                    receipt.appended.push(Appended {
                        id: MessageId(id),
                        store_timestamp: now,
                        offsets,
                    });
                }
                WriteOp::CommitOffset {
                    group,
                    queue,
                    offset,
                } => {
                    // No offsets outlive their topic (as RocksStore).
                    if !self.topics.contains_key(&queue.topic) {
                        continue;
                    }
                    self.offset_groups
                        .entry(queue.topic.clone())
                        .or_default()
                        .insert(group.clone());
                    self.offsets.entry(group).or_default().insert(queue, offset);
                }
                WriteOp::DeleteOffsets { group, topic } => {
                    if let Some(m) = self.offsets.get_mut(&group) {
                        let gone: BTreeSet<TopicName> = m
                            .keys()
                            .filter(|q| topic.as_ref().is_none_or(|t| *t == q.topic))
                            .map(|q| q.topic.clone())
                            .collect();
                        m.retain(|q, _| !gone.contains(&q.topic));
                        if m.is_empty() {
                            self.offsets.remove(&group);
                        }
                        for t in gone {
                            if let Some(gs) = self.offset_groups.get_mut(&t) {
                                gs.remove(&group);
                                if gs.is_empty() {
                                    self.offset_groups.remove(&t);
                                }
                            }
                        }
                    }
                }
                WriteOp::Truncate { queue, before } => {
                    self.queue_mut(&queue)?.truncate(before.0);
                }
                WriteOp::KvPut {
                    namespace,
                    key,
                    value,
                } => {
                    self.kv.insert((namespace, key), value);
                }
                WriteOp::KvDelete { namespace, key } => {
                    self.kv.remove(&(namespace, key));
                }
                WriteOp::TimerPut { due, payload } => {
                    let key = TimerKey {
                        due,
                        seq: self.next_seq,
                    };
                    self.next_seq += 1;
                    self.timers.insert(key, payload);
                    receipt.timers.push(key);
                }
                WriteOp::TimerDelete { key } => {
                    self.timers.remove(&key);
                }
            }
        }
        Ok(receipt)
    }

    /// Delete the oldest commit-log records while `doomed` says so, then the queue
    /// entries and key-index entries that pointed at them.
    fn trim_log(&mut self, mut doomed: impl FnMut(&StoredMessage, u64) -> bool) -> RetentionReport {
        let mut report = RetentionReport::default();
        while let Some(entry) = self.log.first_entry() {
            if !doomed(entry.get(), self.log_bytes) {
                break;
            }
            let m = entry.remove();
            self.log_bytes -= u64::from(m.size);
            report.messages_deleted += 1;
            report.bytes_deleted += u64::from(m.size);
            for k in &m.message.keys {
                self.keys
                    .remove(&(m.message.topic.clone(), k.clone(), m.id.0));
            }
        }
        let first_kept = self.log.keys().next().copied().unwrap_or(self.next_seq);
        for topic in self.topics.values_mut() {
            for q in &mut topic.queues {
                let dead = q.entries.partition_point(|e| e.id.0 < first_kept) as u64;
                report.entries_deleted += q.truncate(q.min + dead);
            }
        }
        report
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_topic(&self, name: &TopicName, queue_count: u32) -> Result<TopicConfig> {
        crate::check_queue_count(queue_count)?;
        let mut inner = self.inner.lock();
        let topic = inner
            .topics
            .entry(name.clone())
            .or_insert_with(|| MemTopic {
                queue_count: 0,
                queues: Vec::new(),
            });
        if queue_count < topic.queue_count {
            return Err(StoreError::Invalid(format!(
                "topic {name} has {} queues; the count can grow but not shrink to {queue_count}",
                topic.queue_count
            )));
        }
        topic.queue_count = queue_count;
        topic
            .queues
            .resize_with(queue_count as usize, MemQueue::default);
        Ok(TopicConfig {
            name: name.clone(),
            queue_count,
        })
    }

    async fn delete_topic(&self, name: &TopicName) -> Result<bool> {
        let mut inner = self.inner.lock();
        let existed = inner.topics.remove(name).is_some();
        for g in inner.offset_groups.remove(name).unwrap_or_default() {
            if let Some(m) = inner.offsets.get_mut(&g) {
                m.retain(|q, _| q.topic != *name);
                if m.is_empty() {
                    inner.offsets.remove(&g);
                }
            }
        }
        Ok(existed)
    }

    fn topic(&self, name: &TopicName) -> Option<TopicConfig> {
        self.inner.lock().topics.get(name).map(|t| TopicConfig {
            name: name.clone(),
            queue_count: t.queue_count,
        })
    }

    fn topics(&self) -> Vec<TopicConfig> {
        self.inner
            .lock()
            .topics
            .iter()
            .map(|(n, t)| TopicConfig {
                name: n.clone(),
                queue_count: t.queue_count,
            })
            .collect()
    }

    async fn write(&self, batch: WriteBatch) -> Result<WriteReceipt> {
        let started = std::time::Instant::now();
        let r = self.inner.lock().apply(batch);
        metrics::histogram!(crate::metrics::APPEND_SECONDS).record(started.elapsed());
        r
    }

    fn queue_range(&self, queue: &QueueRef) -> Result<OffsetRange> {
        let inner = self.inner.lock();
        let q = inner.queue(queue)?;
        Ok(OffsetRange {
            min: QueueOffset(q.min),
            next: QueueOffset(q.next()),
        })
    }

    async fn read(
        &self,
        queue: &QueueRef,
        from: QueueOffset,
        limits: ReadLimits,
    ) -> Result<Vec<QueueMessage>> {
        let inner = self.inner.lock();
        let q = inner.queue(queue)?;
        let start = from.0.max(q.min) - q.min;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for e in q.entries.iter().skip(start as usize) {
            if out.len() >= limits.max_count
                || (!out.is_empty() && bytes + e.size as usize > limits.max_bytes)
            {
                break;
            }
            if let Some(m) = inner.log.get(&e.id.0) {
                bytes += e.size as usize;
                out.push(QueueMessage {
                    entry: *e,
                    message: Arc::clone(m),
                });
            }
        }
        Ok(out)
    }

    async fn offset_for_timestamp(
        &self,
        queue: &QueueRef,
        timestamp: Millis,
    ) -> Result<QueueOffset> {
        let inner = self.inner.lock();
        let q = inner.queue(queue)?;
        let i = q.entries.partition_point(|e| e.timestamp < timestamp);
        Ok(QueueOffset(q.min + i as u64))
    }

    async fn message(&self, id: MessageId) -> Result<Option<Arc<StoredMessage>>> {
        Ok(self.inner.lock().log.get(&id.0).cloned())
    }

    async fn messages_by_key(
        &self,
        topic: &TopicName,
        key: &str,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>> {
        let inner = self.inner.lock();
        let from = (topic.clone(), key.to_owned(), 0);
        let to = (topic.clone(), key.to_owned(), u64::MAX);
        Ok(inner
            .keys
            .range(from..=to)
            .filter_map(|(_, _, id)| inner.log.get(id).cloned())
            .take(limit)
            .collect())
    }

    async fn committed_offset(
        &self,
        group: &GroupName,
        queue: &QueueRef,
    ) -> Result<Option<QueueOffset>> {
        Ok(self
            .inner
            .lock()
            .offsets
            .get(group)
            .and_then(|m| m.get(queue))
            .copied())
    }

    async fn committed_offsets(&self, group: &GroupName) -> Result<Vec<(QueueRef, QueueOffset)>> {
        Ok(self
            .inner
            .lock()
            .offsets
            .get(group)
            .map(|m| m.iter().map(|(q, o)| (q.clone(), *o)).collect())
            .unwrap_or_default())
    }

    async fn groups(&self) -> Result<Vec<GroupName>> {
        let inner = self.inner.lock();
        Ok(inner.offsets.keys().cloned().collect())
    }

    async fn groups_on_topic(&self, topic: &TopicName) -> Result<Vec<GroupName>> {
        let inner = self.inner.lock();
        Ok(inner
            .offset_groups
            .get(topic)
            .map(|gs| gs.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self
            .inner
            .lock()
            .kv
            .get(&(namespace.to_owned(), Bytes::copy_from_slice(key)))
            .cloned())
    }

    async fn kv_scan(
        &self,
        namespace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let inner = self.inner.lock();
        let ns = namespace.to_owned();
        let lower = match after {
            Some(a) if a >= prefix => Bound::Excluded((ns.clone(), Bytes::copy_from_slice(a))),
            _ => Bound::Included((ns.clone(), Bytes::copy_from_slice(prefix))),
        };
        Ok(inner
            .kv
            .range((lower, Bound::Unbounded))
            .take_while(|((n, k), _)| *n == ns && k.starts_with(prefix))
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn timers_due(
        &self,
        until: Millis,
        after: Option<TimerKey>,
        limit: usize,
    ) -> Result<Vec<(TimerKey, Bytes)>> {
        let inner = self.inner.lock();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(inner
            .timers
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.due <= until)
            .take(limit)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    async fn next_timer(&self) -> Result<Option<TimerKey>> {
        Ok(self.inner.lock().timers.keys().next().copied())
    }

    async fn enforce_retention(&self, now: Millis) -> Result<RetentionReport> {
        let Retention { max_age, max_bytes } = self.retention;
        let cutoff = max_age.map(|a| now.saturating_sub(a.as_millis() as u64));
        let floor = self.floor.load(Ordering::Acquire);
        let mut inner = self.inner.lock();
        Ok(inner.trim_log(|m, log_bytes| {
            m.id.0 < floor
                && (cutoff.is_some_and(|c| m.store_timestamp < c)
                    || max_bytes.is_some_and(|b| log_bytes > b))
        }))
    }

    fn set_retention_floor(&self, floor: Option<MessageId>) {
        self.floor
            .store(floor.map_or(u64::MAX, |f| f.0), Ordering::Release);
    }

    fn stats(&self) -> StoreStats {
        let inner = self.inner.lock();
        StoreStats {
            messages: inner.log.len() as u64,
            log_bytes: inner.log_bytes,
            timers: inner.timers.len() as u64,
            topics: inner.topics.len() as u64,
            cold_reads: 0,
        }
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}
