//! The store's one error type.

use crate::types::{QueueRef, TopicName};

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An append, read or truncate named a queue whose topic does not exist,
    /// or a queue id at or beyond the topic's queue count.
    #[error("unknown queue {0}")]
    UnknownQueue(QueueRef),
    /// A topic operation named a topic that does not exist.
    #[error("unknown topic {0}")]
    UnknownTopic(TopicName),
    /// A request is malformed (for example a topic that would shrink its queue count).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Stored bytes could not be decoded: the store is damaged.
    #[error("corrupt record in {what}: {detail}")]
    Corrupt {
        /// Which kind of record.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// The backend failed (I/O, RocksDB).
    #[error("backend: {0}")]
    Backend(String),
    /// The store is closed or its writer has stopped; nothing more can be written.
    #[error("store is closed")]
    Closed,
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
