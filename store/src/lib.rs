//! mqgate's log store: RocketMQ's storage model behind one narrow, asynchronous trait.
//!
//! - A **commit log** holds every message once, under an increasing [`MessageId`].
//! - **Consume queues**, one per (topic, queue id), hold dense offsets from 0; each entry
//!   points into the commit log, so one message fans out to many queues by reference.
//! - **Group offsets**, a **keyed area** for the adapters' durable state, and a
//!   **timer index** (time-ordered) on which the core builds delay and retry.
//! - Every change is a [`WriteBatch`], applied atomically and answered once durable
//!   under the [`FsyncPolicy`].
//!
//! Two backends implement [`Store`]: [`RocksStore`] (the default, on disk) and
//! [`MemoryStore`]. Nothing outside the binary names a backend.
//!
//! The invariants every backend keeps are listed on [`Store`].

// Some of the codec (queue entries, keys) serves RocksStore only.
#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
mod codec;
mod error;
#[cfg(feature = "jetstream")]
pub mod jetstream;
mod memory;
pub mod metrics;
#[cfg(feature = "rocksdb")]
mod rocks;
mod store;
mod types;
pub mod wire;

pub use error::{Result, StoreError};
pub use memory::MemoryStore;
#[cfg(feature = "rocksdb")]
pub use rocks::crc32c;
#[cfg(feature = "rocksdb")]
pub use rocks::{ApplyRecord, ExternalLog, RocksConfig, RocksStore, SharedResources};
pub use store::{
    Appended, Degraded, FsyncPolicy, KvChange, OnVisible, QueueList, QueuedWrite, Retention,
    RetentionReport, Store, StoreExt, StoreHealth, StoreStats, WriteBatch, WriteOp, WriteReceipt,
};
pub use types::{
    now_millis, tag_hash, GroupName, Message, MessageId, Millis, OffsetRange, ProducerGroup,
    PropName, QueueEntry, QueueId, QueueMessage, QueueOffset, QueueRef, ReadLimits, StoredMessage,
    TimerKey, TopicConfig, TopicName,
};

/// The most queues one topic may have.
pub const MAX_QUEUES_PER_TOPIC: u32 = 4096;

fn check_queue_count(count: u32) -> Result<()> {
    if count == 0 || count > MAX_QUEUES_PER_TOPIC {
        return Err(StoreError::Invalid(format!(
            "a topic has 1..={MAX_QUEUES_PER_TOPIC} queues, not {count}"
        )));
    }
    Ok(())
}
