//! The core's one error type.

use mqgate_store::StoreError;

/// What a core call can fail with. Adapters map these onto protocol reply codes.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The named topic does not exist (and is not auto-created).
    #[error("topic {0} does not exist")]
    NoSuchTopic(String),
    /// The named exchange does not exist.
    #[error("exchange {0} does not exist")]
    NoSuchExchange(String),
    /// The named group does not exist.
    #[error("consumer group {0} does not exist")]
    NoSuchGroup(String),
    /// A request contradicts existing state (e.g. a group joined with another mode).
    #[error("precondition failed: {0}")]
    Conflict(String),
    /// A request is malformed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The shard holding what was asked for is owned by another gateway of the
    /// cluster (or by none, while it moves).
    #[error("shard {0} is not owned by this gateway")]
    NotOwned(u16),
    /// The broker is shutting down.
    #[error("broker is shutting down")]
    ShuttingDown,
}

/// The core's result type.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
