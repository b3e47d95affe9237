//! The storage trait, its atomic write batch and its configuration.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::types::{
    GroupName, Message, MessageId, Millis, OffsetRange, QueueMessage, QueueOffset, QueueRef,
    ReadLimits, StoredMessage, TimerKey, TopicConfig, TopicName,
};

/// When the store makes a write durable, and so when [`Store::write`] returns.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum FsyncPolicy {
    /// fsync every group-commit batch before any of its writers is answered: a confirmed
    /// write survives power loss.
    #[default]
    EveryBatch,
    /// Writers are answered once the batch is in the operating system (it survives a
    /// crash of the broker process); the log is fsynced every `interval` in the
    /// background, so power loss can take at most that much confirmed data.
    Periodic {
        /// How often the background fsync runs.
        interval: Duration,
    },
}

/// How long the commit log keeps messages. Deleting old messages never renumbers a queue:
/// its min offset moves up.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Retention {
    /// Delete messages stored longer ago than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest messages while the commit log holds more than this many bytes.
    pub max_bytes: Option<u64>,
}

/// What a retention pass removed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RetentionReport {
    /// Commit-log records deleted.
    pub messages_deleted: u64,
    /// Their encoded bytes.
    pub bytes_deleted: u64,
    /// Queue entries that became unreachable (summed over queues).
    pub entries_deleted: u64,
}

/// Counters the store keeps without scanning anything.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct StoreStats {
    /// Records in the commit log.
    pub messages: u64,
    /// Encoded bytes in the commit log.
    pub log_bytes: u64,
    /// Timers pending in the timer index.
    pub timers: u64,
    /// Topics.
    pub topics: u64,
    /// Consumer reads that missed the store's memory (memtables, block cache) and read
    /// its files, off the async workers (RocksDB; 0 elsewhere).
    pub cold_reads: u64,
}

/// A period in which the store could not write (a full disk, no file handles left).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Degraded {
    /// The first error of the period.
    pub reason: String,
    /// When the first write failed.
    pub since: Millis,
    /// When writes worked again (`None` while it lasts).
    pub until: Option<Millis>,
}

/// Whether the store takes writes, from [`Store::health`]. Reads keep working while it
/// is degraded; writes fail with an error (nothing is confirmed that is not stored) until
/// the store has recovered by itself.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct StoreHealth {
    /// Set while writes fail.
    pub degraded: Option<Degraded>,
    /// The last degraded period that ended.
    pub last_degraded: Option<Degraded>,
    /// Writes (and WAL syncs) that failed since the store opened.
    pub errors: u64,
}

impl StoreHealth {
    /// Whether writes work now.
    pub fn is_ok(&self) -> bool {
        self.degraded.is_none()
    }
}

/// The queues an appended message is indexed into: one is kept inline (a publish to one
/// queue allocates no list), more on the heap.
pub type QueueList = smallvec::SmallVec<[QueueRef; 1]>;

/// One operation in a [`WriteBatch`].
#[derive(Clone, Debug)]
pub enum WriteOp {
    /// Store `message` once in the commit log and add an entry for it to each of
    /// `queues` (possibly none: it can still be found by id and key).
    Append {
        /// The message.
        message: Message,
        /// The queues that index it.
        queues: QueueList,
    },
    /// Set a consumer group's committed offset on a queue.
    CommitOffset {
        /// The group.
        group: GroupName,
        /// The queue.
        queue: QueueRef,
        /// The next offset the group will consume.
        offset: QueueOffset,
    },
    /// Forget a group's committed offsets: on one topic, or on every topic.
    DeleteOffsets {
        /// The group.
        group: GroupName,
        /// Only this topic's, or all.
        topic: Option<TopicName>,
    },
    /// Drop a queue's entries below `before` (its min offset moves up; later offsets do
    /// not change). Used for purge, max-length and TTL. A `before` beyond the queue's
    /// next offset is clamped to it.
    Truncate {
        /// The queue.
        queue: QueueRef,
        /// The new min offset.
        before: QueueOffset,
    },
    /// Put a value in the keyed area adapters use for their durable state.
    KvPut {
        /// The namespace (one per adapter and kind of state).
        namespace: String,
        /// The key within the namespace.
        key: Bytes,
        /// The value.
        value: Bytes,
    },
    /// Delete a key from the keyed area (no error when absent).
    KvDelete {
        /// The namespace.
        namespace: String,
        /// The key.
        key: Bytes,
    },
    /// Add a timer due at `due`; its key is returned in [`WriteReceipt::timers`].
    TimerPut {
        /// When it is due.
        due: Millis,
        /// What the timer carries (for the delay scheduler: the whole delayed message).
        payload: Bytes,
    },
    /// Remove a timer (no error when absent).
    TimerDelete {
        /// Its key.
        key: TimerKey,
    },
}

/// One change of the keyed area ([`Store::kv_get`]) as a log record carries it (see
/// `RocksStore::kv_changes`): how a follower of a replicated log learns what changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvChange {
    /// The namespace.
    pub namespace: String,
    /// The key within it.
    pub key: Bytes,
    /// The new value; `None`: deleted.
    pub value: Option<Bytes>,
}

/// Operations applied atomically: after a crash either all of them are in the store or
/// none is. This is what lets the core move a message between a timer and a topic, or
/// from a queue to a retry topic, without losing or doubling it.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    /// The operations, applied in order.
    pub ops: Vec<WriteOp>,
    /// The batch holds only what may be lost in a crash (AMQP transient messages): the
    /// write is still atomic and ordered, but under [`FsyncPolicy::EveryBatch`] it does
    /// not wait for an fsync of its own. A group commit made only of such batches skips
    /// the sync; the next synced write (or the periodic sync) makes it durable too.
    pub no_sync: bool,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mark the batch as not needing an fsync before [`Store::write`] returns.
    pub fn no_sync(&mut self) -> &mut Self {
        self.no_sync = true;
        self
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Append `message`, indexed into `queues`.
    pub fn append(&mut self, message: Message, queues: impl Into<QueueList>) -> &mut Self {
        self.ops.push(WriteOp::Append {
            message,
            queues: queues.into(),
        });
        self
    }

    /// Commit `group`'s offset on `queue`. Left out when `queue`'s topic does not
    /// exist as the batch is applied (deleted meanwhile): no offsets outlive a topic.
    pub fn commit_offset(
        &mut self,
        group: GroupName,
        queue: QueueRef,
        offset: QueueOffset,
    ) -> &mut Self {
        self.ops.push(WriteOp::CommitOffset {
            group,
            queue,
            offset,
        });
        self
    }

    /// Forget `group`'s offsets (on `topic`, or all).
    pub fn delete_offsets(&mut self, group: GroupName, topic: Option<TopicName>) -> &mut Self {
        self.ops.push(WriteOp::DeleteOffsets { group, topic });
        self
    }

    /// Drop `queue`'s entries below `before`.
    pub fn truncate(&mut self, queue: QueueRef, before: QueueOffset) -> &mut Self {
        self.ops.push(WriteOp::Truncate { queue, before });
        self
    }

    /// Put `value` at `key` in `namespace`.
    pub fn kv_put(
        &mut self,
        namespace: impl Into<String>,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> &mut Self {
        self.ops.push(WriteOp::KvPut {
            namespace: namespace.into(),
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Delete `key` in `namespace`.
    pub fn kv_delete(&mut self, namespace: impl Into<String>, key: impl Into<Bytes>) -> &mut Self {
        self.ops.push(WriteOp::KvDelete {
            namespace: namespace.into(),
            key: key.into(),
        });
        self
    }

    /// Add a timer.
    pub fn timer_put(&mut self, due: Millis, payload: impl Into<Bytes>) -> &mut Self {
        self.ops.push(WriteOp::TimerPut {
            due,
            payload: payload.into(),
        });
        self
    }

    /// Remove a timer.
    pub fn timer_delete(&mut self, key: TimerKey) -> &mut Self {
        self.ops.push(WriteOp::TimerDelete { key });
        self
    }
}

/// Where one appended message went.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Appended {
    /// Its id.
    pub id: MessageId,
    /// When it was stored.
    pub store_timestamp: Millis,
    /// The offset it got in each queue, in the order the queues were given.
    pub offsets: Vec<(QueueRef, QueueOffset)>,
}

/// What a write did, returned once it is durable under the store's [`FsyncPolicy`].
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct WriteReceipt {
    /// One per `Append`, in batch order.
    pub appended: Vec<Appended>,
    /// One per `TimerPut`, in batch order.
    pub timers: Vec<TimerKey>,
}

/// Called once a queued batch is readable ([`Store::write_queued`]), on the store's
/// writer thread: it must be quick and must not block (waking tasks is fine). Not
/// called when the write fails.
pub type OnVisible = Box<dyn FnOnce() + Send + 'static>;

/// A write queued by [`Store::write_queued`]: completes once it is durable.
pub type QueuedWrite =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<WriteReceipt>> + Send + 'static>>;

/// The storage trait: a commit log, consume queues, group offsets, a keyed area and a
/// timer index. Backends: [`crate::MemoryStore`] and [`crate::RocksStore`].
///
/// # Invariants (every backend; the conformance suite checks each)
/// - A message is stored once in the commit log however many queues index it.
/// - Message ids are unique and increase in append order.
/// - A queue's offsets are dense: entries are numbered `min..next` with no gap, an
///   append takes `next`, and offsets are never reused, across restarts too.
/// - A queue's entry timestamps never decrease along the queue.
/// - A [`WriteBatch`] is atomic, and once [`Store::write`] returns the batch is durable
///   as the [`FsyncPolicy`] promises; it is visible to readers no later than that.
/// - Batches are applied in a single order: two batches touching the same queue give
///   offsets in the order they were applied.
/// - `min` only moves up (truncation, retention, topic deletion), `next` only moves up
///   (appends).
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Create a topic, or grow an existing topic's queue count. Returns the topic's
    /// configuration after the call. Shrinking is refused.
    async fn create_topic(&self, name: &TopicName, queue_count: u32) -> Result<TopicConfig>;

    /// Delete a topic, its queues' entries and every group's offsets on it (those go even
    /// if the topic does not exist). The commit log keeps the messages until retention
    /// removes them. Returns whether it existed. Creating a topic also clears offsets
    /// left on an earlier topic of the same name.
    async fn delete_topic(&self, name: &TopicName) -> Result<bool>;

    /// A topic's configuration.
    fn topic(&self, name: &TopicName) -> Option<TopicConfig>;

    /// Every topic, sorted by name.
    fn topics(&self) -> Vec<TopicConfig>;

    /// Apply a batch atomically; returns once it is durable under the fsync policy.
    async fn write(&self, batch: WriteBatch) -> Result<WriteReceipt>;

    /// Whether a durable write's answer waits on I/O after the batch is readable (an
    /// fsync of every batch, a replication quorum), rather than coming at once. A
    /// protocol connection then has its kernel ACK what it read before that answer
    /// (`mqgate_core::sockio`, "Answers that wait on a sync").
    fn answers_wait(&self) -> bool {
        false
    }

    /// [`Store::write`], and `visible` is sent as soon as readers can see the batch,
    /// which may be before it is durable (a store that syncs lets consumers read while
    /// the fsync runs). The returned result still means durable.
    async fn write_notify(
        &self,
        batch: WriteBatch,
        visible: tokio::sync::oneshot::Sender<()>,
    ) -> Result<WriteReceipt> {
        let r = self.write(batch).await;
        let _ = visible.send(());
        r
    }

    /// [`Store::write_notify`] in two steps: the batch is queued for writing when this
    /// returns (so batches queued one after another by one caller are written in that
    /// order), and the returned [`QueuedWrite`] completes once it is durable. A caller
    /// can queue its next batch while earlier ones sync. `visible` runs as soon as
    /// readers can see the batch, wherever the store is then (no task of the caller's
    /// is woken for it). A store without a write queue writes before returning.
    async fn write_queued(&self, batch: WriteBatch, visible: OnVisible) -> Result<QueuedWrite> {
        let r = self.write(batch).await;
        if r.is_ok() {
            visible();
        }
        Ok(Box::pin(std::future::ready(r)))
    }

    /// The offsets `queue` holds now.
    fn queue_range(&self, queue: &QueueRef) -> Result<OffsetRange>;

    /// Read `queue` from `from` (raised to the queue's min offset when below it), in
    /// offset order, within `limits`. Returns nothing at or beyond the queue's end.
    /// An entry whose message retention deletes while the read runs is left out (its
    /// offset is below the queue's new min by the time the read returns).
    async fn read(
        &self,
        queue: &QueueRef,
        from: QueueOffset,
        limits: ReadLimits,
    ) -> Result<Vec<QueueMessage>>;

    /// The offset of the first entry of `queue` written at or after `timestamp`; the
    /// queue's next offset when there is none, its min offset when all are later.
    async fn offset_for_timestamp(
        &self,
        queue: &QueueRef,
        timestamp: Millis,
    ) -> Result<QueueOffset>;

    /// A message by its id, while retention keeps it.
    async fn message(&self, id: MessageId) -> Result<Option<Arc<StoredMessage>>>;

    /// Messages published to `topic` with `key` among their keys, oldest first.
    async fn messages_by_key(
        &self,
        topic: &TopicName,
        key: &str,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>>;

    /// `group`'s committed offset on `queue`.
    async fn committed_offset(
        &self,
        group: &GroupName,
        queue: &QueueRef,
    ) -> Result<Option<QueueOffset>>;

    /// Every committed offset of `group`, sorted by queue.
    async fn committed_offsets(&self, group: &GroupName) -> Result<Vec<(QueueRef, QueueOffset)>>;

    /// Every group that has a committed offset, sorted.
    async fn groups(&self) -> Result<Vec<GroupName>>;

    /// Every group that has a committed offset on a queue of `topic`, sorted: the
    /// groups whose offsets [`Store::delete_topic`] deletes. The backends answer from
    /// an index (the cost is those groups, not all); this default asks every group.
    async fn groups_on_topic(&self, topic: &TopicName) -> Result<Vec<GroupName>> {
        let mut out = Vec::new();
        for g in self.groups().await? {
            if self
                .committed_offsets(&g)
                .await?
                .iter()
                .any(|(q, _)| q.topic == *topic)
            {
                out.push(g);
            }
        }
        Ok(out)
    }

    /// The value at `key` in `namespace`.
    async fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>>;

    /// The entries of `namespace` whose key starts with `prefix`, in key order, at most
    /// `limit`, starting after `after` when given (for paging).
    async fn kv_scan(
        &self,
        namespace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>>;

    /// Timers due at or before `until`, in (due, seq) order, strictly after `after`
    /// when given, at most `limit`.
    async fn timers_due(
        &self,
        until: Millis,
        after: Option<TimerKey>,
        limit: usize,
    ) -> Result<Vec<(TimerKey, Bytes)>>;

    /// The earliest pending timer.
    async fn next_timer(&self) -> Result<Option<TimerKey>>;

    /// Apply the retention policy as of `now`.
    async fn enforce_retention(&self, now: Millis) -> Result<RetentionReport>;

    /// Keep every message whose id is `floor` or more, whatever the retention policy
    /// says (`None`: no floor). Someone still needs them: a shard's outbox names
    /// messages not yet forwarded to their destination shards. Not persisted: the
    /// owner of the need sets it again after a restart, before retention runs.
    /// A backend that never deletes by itself may ignore it.
    fn set_retention_floor(&self, _floor: Option<MessageId>) {}

    /// Counters.
    fn stats(&self) -> StoreStats;

    /// Over a replicated log (an external log): the sequence of the last record this
    /// store wrote or replayed; everything written before a call returns is at or
    /// below it. A follower that has applied this far has seen those writes (the
    /// routing barrier of a cluster). `None` for a store without an external log.
    fn log_position(&self) -> Option<u64> {
        None
    }

    /// Whether writes work now, and the last period they did not. A backend that cannot
    /// fail transiently (memory) is always healthy.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// Make everything written so far durable (for shutdown under a periodic policy).
    async fn flush(&self) -> Result<()>;
}

/// Convenience calls built on [`Store::write`].
#[async_trait]
pub trait StoreExt: Store {
    /// Append one message into `queues`.
    async fn append(&self, message: Message, queues: Vec<QueueRef>) -> Result<super::Appended> {
        let mut batch = WriteBatch::new();
        batch.append(message, queues);
        let mut receipt = self.write(batch).await?;
        Ok(receipt.appended.remove(0))
    }
}

impl<S: Store + ?Sized> StoreExt for S {}
