//! The core's knobs.

use std::time::Duration;

/// RocketMQ's 18 delay levels: 1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h.
pub const ROCKETMQ_DELAY_LEVELS: [Duration; 18] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(2 * 60),
    Duration::from_secs(3 * 60),
    Duration::from_secs(4 * 60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(6 * 60),
    Duration::from_secs(7 * 60),
    Duration::from_secs(8 * 60),
    Duration::from_secs(9 * 60),
    Duration::from_secs(10 * 60),
    Duration::from_secs(20 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(60 * 60),
    Duration::from_secs(2 * 60 * 60),
];

/// The producer group of a publish that names none, unless configured otherwise
/// (RocketMQ's `DEFAULT_PRODUCER`).
pub const DEFAULT_PRODUCER_GROUP: &str = "DEFAULT_PRODUCER";

/// How the core behaves.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Queues of a topic created without a count (RocketMQ's default is 8... per broker).
    pub default_queue_count: u32,
    /// Create a topic on its first publish or subscription.
    pub auto_create_topics: bool,
    /// The producer group of a publish that names none.
    pub default_producer_group: String,
    /// The delay levels (level 1 is the first).
    pub delay_levels: Vec<Duration>,
    /// A failed consumption's first retry uses level `retry_first_level` and each
    /// further one the next (RocketMQ: 3 + reconsume count: 10s, 30s, 1m, 2m, ... 2h).
    pub retry_first_level: usize,
    /// Failures after which a message goes to the group's DLQ (RocketMQ: 16).
    pub max_reconsume_times: u32,
    /// How long an orderly queue stays suspended after a failed message before retrying
    /// it in place.
    pub orderly_suspend: Duration,
    /// A member that has not heartbeated for this long is removed from its group.
    pub heartbeat_timeout: Duration,
    /// How often groups persist their committed offsets.
    pub offset_commit_interval: Duration,
    /// The most messages a group reads from a queue at once.
    pub read_batch: usize,
    /// The most unacked messages a member may hold when it asks for no limit.
    pub max_prefetch: usize,
    /// Timers the delay scheduler releases per store write.
    pub release_batch: usize,
    /// How often the store's retention policy is applied.
    pub retention_interval: Duration,
    /// Above this resident memory (bytes), connections that publish are no longer read
    /// (every protocol) until it falls below again; `None`: never.
    pub memory_high_watermark: Option<u64>,
    /// How often resident memory is compared with the watermark.
    pub memory_check_interval: Duration,
    /// How failed logins (every protocol, the admin API) are slowed down.
    pub login_throttle: crate::login::LoginThrottleConfig,
    /// How often endpoints with a message TTL are swept for expired messages at their
    /// head (consumed or not).
    pub expiry_interval: Duration,
    /// Retained message bodies kept in memory (the index of all is always).
    pub retained_cache_messages: usize,
    /// Bytes of retained message bodies kept in memory.
    pub retained_cache_bytes: usize,
    /// Flow control by consumer lag (`None`: off, the default). When a topic consumed by
    /// one group with members that are making progress holds more than this many
    /// unconsumed messages, a publish to it returns only once the backlog is back under
    /// half of it (or after [`FLOW_MAX_WAIT`]): the publisher's connection reads no more
    /// meanwhile, so TCP slows the client to its consumers' pace and end-to-end latency
    /// stays bounded. Consumers that make no progress for a second (stuck, or gone) do
    /// not slow anybody: the queue buffers, as without the setting.
    pub consumer_lag_limit: Option<u64>,
    /// Messages acknowledged above a running group's first unacknowledged one (on one
    /// queue) that make its next commit a checkpoint: committed past them, what is still
    /// owed below listed with the delivered mark, so that a crash does not bring them
    /// back (`QueueState::checkpoint_due`). Also needs more of them than would be listed.
    pub checkpoint_settled: u64,
}

/// The longest a publish waits for consumers to catch up (then it returns anyway; the
/// next publish waits again).
pub const FLOW_MAX_WAIT: Duration = Duration::from_secs(1);

/// The store writes one connection keeps in flight ([`crate::Pipeline`]): it reads and
/// routes its next publishes while earlier ones sync, and stops reading when this many
/// wait. Each holds what one read brought (at most the read buffer).
pub const PUBLISH_PIPELINE_DEPTH: usize = 8;

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            default_queue_count: 8,
            auto_create_topics: true,
            default_producer_group: DEFAULT_PRODUCER_GROUP.into(),
            delay_levels: ROCKETMQ_DELAY_LEVELS.to_vec(),
            retry_first_level: 3,
            max_reconsume_times: 16,
            orderly_suspend: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(30),
            offset_commit_interval: Duration::from_millis(200),
            read_batch: 256,
            max_prefetch: 2048,
            release_batch: 512,
            retention_interval: Duration::from_secs(60),
            memory_high_watermark: None,
            memory_check_interval: Duration::from_millis(250),
            login_throttle: crate::login::LoginThrottleConfig::default(),
            expiry_interval: Duration::from_millis(250),
            retained_cache_messages: 10_000,
            retained_cache_bytes: 64 << 20,
            consumer_lag_limit: None,
            checkpoint_settled: 256,
        }
    }
}

impl CoreConfig {
    /// The delay before retry number `reconsume_times + 1` (RocketMQ: level 3 + count).
    pub fn retry_delay(&self, reconsume_times: u32) -> Duration {
        let level = self.retry_first_level + reconsume_times as usize;
        self.level_delay(level as u8)
    }

    /// The delay of level `level` (1-based; past the last level, the last).
    pub fn level_delay(&self, level: u8) -> Duration {
        let i = (level.max(1) as usize - 1).min(self.delay_levels.len().saturating_sub(1));
        self.delay_levels.get(i).copied().unwrap_or(Duration::ZERO)
    }
}
