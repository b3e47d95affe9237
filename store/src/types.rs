//! The store's record, offset and id types.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::error::{Result, StoreError};

/// Milliseconds since the Unix epoch: every timestamp in the store.
pub type Millis = u64;

/// Now, in [`Millis`].
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// The name of a topic (a set of message queues). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    /// The longest topic name the store accepts, in bytes.
    pub const MAX_LEN: usize = 1024;

    /// A topic name: 1 to [`Self::MAX_LEN`] bytes with no NUL (NUL separates key parts on disk).
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        if name.is_empty() || name.len() > Self::MAX_LEN || name.contains('\0') {
            return Err(StoreError::Invalid(format!(
                "topic name must be 1..={} bytes without NUL, got {:?}",
                Self::MAX_LEN,
                name
            )));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The index of a message queue within its topic: `0..queue_count`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct QueueId(pub u32);

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One message queue: a topic and a queue id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct QueueRef {
    /// The topic the queue belongs to.
    pub topic: TopicName,
    /// Which of the topic's queues.
    pub queue: QueueId,
}

impl QueueRef {
    /// Queue `queue` of `topic`.
    pub fn new(topic: TopicName, queue: u32) -> Self {
        Self {
            topic,
            queue: QueueId(queue),
        }
    }
}

impl fmt::Display for QueueRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.topic, self.queue)
    }
}

/// A position in a message queue. Dense: a queue's entries are numbered 0, 1, 2, ...
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct QueueOffset(pub u64);

impl fmt::Display for QueueOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A message's id: its position in the commit log. Unique in the store and increasing
/// in append order (not dense: timers draw from the same sequence).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl std::str::FromStr for MessageId {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        u64::from_str_radix(s, 16)
            .map(MessageId)
            .map_err(|_| StoreError::Invalid(format!("not a message id: {s:?}")))
    }
}

/// The name of a consumer group.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName(Arc<str>);

impl GroupName {
    /// A group name: 1 to 1024 bytes with no NUL.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        if name.is_empty() || name.len() > TopicName::MAX_LEN || name.contains('\0') {
            return Err(StoreError::Invalid(format!(
                "group name must be 1..=1024 bytes without NUL, got {name:?}"
            )));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A property's name: the protocols' own names are `&'static str` (no allocation per
/// message); a name read back from the log or set by a client is owned.
pub type PropName = std::borrow::Cow<'static, str>;

/// A producer group's name: the protocols' defaults are `&'static str` (no allocation
/// per message); a name a client set or read back from the log is owned.
pub type ProducerGroup = std::borrow::Cow<'static, str>;

/// A message as a producer hands it to the store.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Message {
    /// The address it was published to (RocketMQ topic, MQTT topic name, AMQP exchange).
    pub topic: TopicName,
    /// The producer group it came from (empty when unknown).
    pub producer_group: ProducerGroup,
    /// Business keys, indexed for look-up ([`crate::Store::messages_by_key`]).
    pub keys: Vec<String>,
    /// RocketMQ's tag (one per message), hashed into every queue entry for filtering.
    pub tags: Option<String>,
    /// Named properties, in the producer's order. Adapters keep their protocol's
    /// headers here (for example the encoded AMQP content header).
    pub properties: Vec<(PropName, Bytes)>,
    /// The payload. Stored once however many queues index the message. Readers share
    /// it (the store's tail cache keeps recent messages decoded), so a producer that
    /// slices it out of a larger network buffer should copy it first, or that buffer
    /// stays alive with it.
    pub body: Bytes,
    /// When the producer created it.
    pub born_timestamp: Millis,
    /// How many times consumption has failed and the message was re-sent for retry.
    pub reconsume_times: u32,
    /// The delay it was published with: a RocketMQ level (1..=18), 0 for none.
    pub delay_level: u8,
    /// The time it was due for delivery, when it was delayed.
    pub deliver_at: Option<Millis>,
}

impl Message {
    /// A message with a body and nothing else set.
    pub fn new(topic: TopicName, body: impl Into<Bytes>) -> Self {
        Self::born_at(topic, body, now_millis())
    }

    /// [`Message::new`] born at `at`, for a caller that has read the clock already (a
    /// clock read per message showed in the publish path's profile).
    pub fn born_at(topic: TopicName, body: impl Into<Bytes>, at: Millis) -> Self {
        Self {
            topic,
            producer_group: ProducerGroup::Borrowed(""),
            keys: Vec::new(),
            tags: None,
            properties: Vec::new(),
            body: body.into(),
            born_timestamp: at,
            reconsume_times: 0,
            delay_level: 0,
            deliver_at: None,
        }
    }

    /// The first property with this name.
    pub fn property(&self, name: &str) -> Option<&Bytes> {
        self.properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// A message as the commit log holds it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredMessage {
    /// Its id (its commit-log position).
    pub id: MessageId,
    /// When the store appended it.
    pub store_timestamp: Millis,
    /// Its encoded size in the commit log, in bytes.
    pub size: u32,
    /// The message itself.
    pub message: Message,
}

/// One consume-queue entry: a pointer into the commit log.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct QueueEntry {
    /// Its position in the queue.
    pub offset: QueueOffset,
    /// The commit-log record it points to.
    pub id: MessageId,
    /// The record's size in bytes.
    pub size: u32,
    /// [`tag_hash`] of the message's tag (0 when it has none).
    pub tag_hash: u64,
    /// When the entry was written: non-decreasing along the queue, which is what
    /// [`crate::Store::offset_for_timestamp`] searches.
    pub timestamp: Millis,
}

/// A message read from a queue: the entry and the shared message it points to.
#[derive(Clone, Debug)]
pub struct QueueMessage {
    /// The queue entry.
    pub entry: QueueEntry,
    /// The message (shared, not copied, between readers).
    pub message: Arc<StoredMessage>,
}

/// The offsets a queue holds: `min..next`. Empty when `min == next`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct OffsetRange {
    /// The oldest offset still stored (moves up with retention and truncation).
    pub min: QueueOffset,
    /// The offset the next entry will get.
    pub next: QueueOffset,
}

impl OffsetRange {
    /// How many entries the queue holds.
    pub fn len(&self) -> u64 {
        self.next.0 - self.min.0
    }

    /// Whether the queue holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A topic's configuration.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TopicConfig {
    /// Its name.
    pub name: TopicName,
    /// How many message queues it has (at least 1). Can grow, never shrink.
    pub queue_count: u32,
}

/// Bounds on one read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReadLimits {
    /// At most this many messages.
    pub max_count: usize,
    /// At most about this many bytes of encoded messages (the first message is always
    /// returned, however large).
    pub max_bytes: usize,
}

impl ReadLimits {
    /// At most `max_count` messages and 4 MiB.
    pub fn count(max_count: usize) -> Self {
        Self {
            max_count,
            max_bytes: 4 << 20,
        }
    }
}

/// A key in the store's time-ordered timer index: due time first, then a sequence
/// number that makes it unique.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TimerKey {
    /// When the timer is due.
    pub due: Millis,
    /// Unique among timers (drawn from the commit-log sequence).
    pub seq: u64,
}

/// RocketMQ's tag hash for queue entries: FNV-1a over the tag's bytes, 0 for no tag.
pub fn tag_hash(tags: Option<&str>) -> u64 {
    match tags {
        None => 0,
        Some(t) => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in t.as_bytes() {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            h.max(1)
        }
    }
}

impl Message {
    /// The message in the commit log's record format (with `store_timestamp` 0), for
    /// callers that keep whole messages elsewhere (the core's timer payloads).
    pub fn encode(&self) -> Result<Vec<u8>> {
        crate::codec::validate(self)?;
        let mut out = Vec::with_capacity(crate::codec::encoded_len(self));
        crate::codec::encode_message(self, 0, &mut out);
        Ok(out)
    }

    /// Decode what [`Message::encode`] produced. Shares `bytes` for body and properties.
    pub fn decode(bytes: Bytes) -> Result<Self> {
        Ok(crate::codec::decode_message(MessageId(0), bytes)?.message)
    }
}
