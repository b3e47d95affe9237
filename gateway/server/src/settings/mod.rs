//! mqgate's configuration: defaults < TOML file (`--config`) < environment variables
//! (`MQGATE__SECTION__KEY`) < command-line flags. Every knob is documented in the
//! example `mqgate.toml` at the top of the repository. Values are read once into typed
//! fields ([`types`]: durations, addresses, keywords, ...); a bad value is refused at
//! start with its key, its value and why.

mod load;
pub(crate) mod types;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use mqgate_amqp::{AmqpConfig, Permission, RetryPolicy};
use mqgate_core::router::DEFAULT_VHOST;
use mqgate_core::{CoreConfig, LoginThrottleConfig, Password, TopicAcl, UserAccount, Users};
use mqgate_mqtt::{Access, AclDefault, AclRule, MqttConfig};
use mqgate_store::{FsyncPolicy, Retention, RocksConfig};
use serde::Deserialize;

use types::{
    AclAccess, AclFallback, AmqpRetryPolicy, Fsync, HumanDuration, Invalid, MemoryWatermark,
    PasswordHash, Pattern,
};
pub(crate) use types::{Backend, Listener, Scheduler};

/// The whole configuration, as read.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Settings {
    /// Where each listener binds ("" turns it off).
    pub(crate) listeners: Listeners,
    /// Certificate and key for the TLS listeners.
    pub(crate) tls: Tls,
    /// The storage backend.
    pub(crate) store: StoreSettings,
    /// Users (shared by AMQP, MQTT and the admin API).
    pub(crate) users: Vec<UserSettings>,
    /// AMQP virtual hosts and who may use them.
    pub(crate) vhosts: Vec<VhostSettings>,
    /// MQTT-only settings.
    pub(crate) mqtt: MqttSettings,
    /// Protocol limits.
    pub(crate) limits: Limits,
    /// Delay levels (RocketMQ's 18 by default).
    pub(crate) delay: DelaySettings,
    /// The retry ladder.
    pub(crate) retry: RetrySettings,
    /// Metric cardinality.
    pub(crate) metrics: MetricsSettings,
    /// Shards over many gateways (with `store.backend = "jetstream"`).
    pub(crate) cluster: ClusterSettings,
    /// The async runtime's threads.
    pub(crate) runtime: RuntimeSettings,
    /// `limits.memory_high_watermark` in bytes (`None`: off), a fraction resolved
    /// against the machine's memory by [`Settings::load`]. Not a key.
    #[serde(skip)]
    memory_high_watermark_bytes: Option<u64>,
}

/// Listener addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Listeners {
    /// AMQP 0-9-1.
    pub(crate) amqp: Listener,
    /// AMQP 0-9-1 over TLS.
    pub(crate) amqps: Listener,
    /// MQTT.
    pub(crate) mqtt: Listener,
    /// MQTT over TLS.
    pub(crate) mqtts: Listener,
    /// MQTT over WebSocket.
    pub(crate) mqtt_ws: Listener,
    /// MQTT over WebSocket over TLS.
    pub(crate) mqtt_wss: Listener,
    /// The admin HTTP API and /metrics.
    pub(crate) admin: Listener,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            // Every address, IPv6 and IPv4 alike (clients that resolve `localhost` to
            // ::1 first reach it too), as RabbitMQ listens.
            amqp: Listener::on((Ipv6Addr::UNSPECIFIED, 5672)),
            amqps: Listener::OFF,
            mqtt: Listener::on((Ipv6Addr::UNSPECIFIED, 1883)),
            mqtts: Listener::OFF,
            mqtt_ws: Listener::OFF,
            mqtt_wss: Listener::OFF,
            admin: Listener::on((Ipv4Addr::LOCALHOST, 15672)),
        }
    }
}

impl Listeners {
    /// Each listener with its key under `[listeners]`.
    pub(crate) fn all(&self) -> [(&'static str, Listener); 7] {
        [
            ("amqp", self.amqp),
            ("amqps", self.amqps),
            ("mqtt", self.mqtt),
            ("mqtts", self.mqtts),
            ("mqtt_ws", self.mqtt_ws),
            ("mqtt_wss", self.mqtt_wss),
            ("admin", self.admin),
        ]
    }

    /// Whether a TLS listener (amqps, mqtts, mqtt_wss) is on.
    pub(crate) fn tls_wanted(&self) -> bool {
        [self.amqps, self.mqtts, self.mqtt_wss]
            .iter()
            .any(Listener::is_on)
    }
}

/// TLS material (PEM files).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Tls {
    /// Certificate chain.
    pub(crate) cert_file: Option<PathBuf>,
    /// Private key.
    pub(crate) key_file: Option<PathBuf>,
}

/// The store.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StoreSettings {
    /// `rocksdb` or `memory`.
    pub(crate) backend: Backend,
    /// RocksDB's data folder.
    pub(crate) path: PathBuf,
    /// `every-batch` (a confirmed write survives power loss) or `periodic`.
    pub(crate) fsync: Fsync,
    /// With `fsync = "periodic"`: how often.
    pub(crate) fsync_interval: HumanDuration,
    /// Delete messages older than this ("": keep them).
    #[serde(deserialize_with = "types::duration_or_none")]
    pub(crate) retention_max_age: Option<HumanDuration>,
    /// Delete the oldest messages while the log is larger (bytes, 0 = no limit).
    pub(crate) retention_max_bytes: u64,
    /// RocksDB block cache in bytes.
    pub(crate) block_cache_bytes: usize,
    /// RocksDB's memtables, all column families together, in bytes.
    pub(crate) write_buffer_bytes: usize,
    /// Log records of at least this many bytes go to RocksDB's blob files (0: none).
    pub(crate) blob_min_bytes: u64,
    /// Recently appended messages kept decoded for consumers at the tail, in bytes.
    pub(crate) tail_cache_bytes: usize,
    /// With `backend = "jetstream"`: the NATS servers, the stream and this node.
    pub(crate) jetstream: JetStreamSettings,
}

/// `[store.jetstream]`: the replicated log (see ARCHITECTURE.md, "Replication on NATS
/// JetStream").
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct JetStreamSettings {
    /// NATS server URLs.
    pub(crate) servers: Vec<String>,
    /// The stream holding the log (the lease bucket is `<stream>-lease`).
    pub(crate) stream: String,
    /// This gateway's name in the lease and the log ("": the host name).
    pub(crate) node_id: String,
    /// Replicas of the stream and the lease bucket.
    pub(crate) replicas: usize,
    /// How long a silent owner keeps the lease.
    pub(crate) lease_ttl: HumanDuration,
    /// NATS user and password ("": none).
    pub(crate) user: String,
    /// The password for `user`.
    pub(crate) password: String,
    /// A NATS token ("": none).
    pub(crate) token: String,
    /// A CA file to verify the servers' TLS certificates (TLS on when set).
    pub(crate) tls_ca_file: Option<PathBuf>,
}

impl Default for JetStreamSettings {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            stream: "mqgate".into(),
            node_id: String::new(),
            replicas: 3,
            lease_ttl: HumanDuration::millis(10_000),
            user: String::new(),
            password: String::new(),
            token: String::new(),
            tls_ca_file: None,
        }
    }
}

/// `[cluster]`: topics in shards spread over every live gateway (ARCHITECTURE.md,
/// "Scale-out decisions"). Off (`shards = 0`): one gateway owns the whole log, the
/// others stand by.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ClusterSettings {
    /// How many shards (each its own stream and lease); 0: no sharding. Every gateway
    /// of a cluster must have the same; it never changes for a cluster's streams.
    pub(crate) shards: u16,
    /// How long a gateway stays live after its last heartbeat.
    pub(crate) node_ttl: HumanDuration,
    /// How often each shard's state is looked at.
    pub(crate) tick: HumanDuration,
    /// A planned move waits until the successor is within this many records.
    pub(crate) move_lag: u64,
    /// A request relayed to another gateway unanswered this long fails (the client
    /// is not confirmed, and resends).
    pub(crate) relay_timeout: HumanDuration,
    /// How long a starting gateway waits for the cluster (shard 0 owned, its routing
    /// state followed) before it opens its listeners anyway.
    pub(crate) ready_timeout: HumanDuration,
    /// The host name or address other gateways reach this one at (MQTT sessions are
    /// spliced to the gateway owning their shard); default: the MQTT listener's
    /// address, or the machine's name when it listens on every interface.
    pub(crate) advertise_host: Option<String>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            shards: 0,
            node_ttl: HumanDuration::millis(3_000),
            tick: HumanDuration::millis(250),
            move_lag: 1_000,
            relay_timeout: HumanDuration::millis(5_000),
            ready_timeout: HumanDuration::millis(60_000),
            advertise_host: None,
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            backend: Backend::Rocksdb,
            path: PathBuf::from("./data"),
            fsync: Fsync::EveryBatch,
            fsync_interval: HumanDuration::millis(100),
            retention_max_age: None,
            retention_max_bytes: 0,
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 128 << 20,
            blob_min_bytes: 0,
            tail_cache_bytes: 32 << 20,
            jetstream: JetStreamSettings::default(),
        }
    }
}

/// A user.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RawUser")]
pub(crate) struct UserSettings {
    /// Its name.
    pub(crate) name: String,
    /// From `password_hash` (RabbitMQ's salted SHA-256: `mqgate hash-password`,
    /// `rabbitmqctl hash_password`) or `password` (clear text, for local tries only).
    pub(crate) password: Password,
    /// `administrator` may use the admin API.
    pub(crate) tags: Vec<String>,
}

/// A user as written: exactly one of `password_hash` and `password`.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawUser {
    name: String,
    password_hash: Option<PasswordHash>,
    password: Option<String>,
    tags: Vec<String>,
}

impl TryFrom<RawUser> for UserSettings {
    type Error = Invalid;

    fn try_from(u: RawUser) -> Result<Self, Invalid> {
        let password = match (u.password_hash, u.password) {
            (Some(h), None) => h.0,
            (None, Some(p)) => Password::Plain(p),
            _ => {
                return Err(Invalid::new(
                    &u.name,
                    "needs exactly one of password_hash and password",
                ))
            }
        };
        Ok(Self {
            name: u.name,
            password,
            tags: u.tags,
        })
    }
}

/// A vhost and its permissions.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct VhostSettings {
    /// Its name.
    pub(crate) name: String,
    /// Who may do what.
    pub(crate) permissions: Vec<PermissionSettings>,
}

/// RabbitMQ's three regular expressions.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct PermissionSettings {
    /// The user.
    pub(crate) user: String,
    /// Declare / delete matching resources.
    pub(crate) configure: Pattern,
    /// Publish to / bind to matching resources.
    pub(crate) write: Pattern,
    /// Consume from / bind from matching resources.
    pub(crate) read: Pattern,
}

impl Default for PermissionSettings {
    fn default() -> Self {
        Self {
            user: String::new(),
            configure: Pattern::any(),
            write: Pattern::any(),
            read: Pattern::any(),
        }
    }
}

impl PermissionSettings {
    /// As the AMQP adapter's permission.
    fn permission(&self) -> Permission {
        Permission {
            configure: self.configure.0.clone(),
            write: self.write.0.clone(),
            read: self.read.0.clone(),
        }
    }
}

/// MQTT.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct MqttSettings {
    /// Accept clients without a user name.
    pub(crate) allow_anonymous: bool,
    /// Topic rules, first match wins (MQTT, and AMQP's `amq.topic` of vhost "/").
    pub(crate) acl: Vec<AclSettings>,
    /// When no topic rule applies: `allow` or `deny`.
    pub(crate) acl_default: AclFallback,
    /// Retained message bodies kept in memory (the rest are read from the store).
    pub(crate) retained_cache_messages: usize,
    /// Bytes of retained message bodies kept in memory.
    pub(crate) retained_cache_bytes: usize,
}

impl Default for MqttSettings {
    fn default() -> Self {
        // Retained messages are the core's; their cache bounds are core settings.
        let core = CoreConfig::default();
        Self {
            allow_anonymous: true,
            acl: Vec::new(),
            acl_default: AclFallback::Allow,
            retained_cache_messages: core.retained_cache_messages,
            retained_cache_bytes: core.retained_cache_bytes,
        }
    }
}

/// One MQTT topic rule.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RawAcl")]
pub(crate) struct AclSettings {
    /// The user (`None`, written "" or absent: everyone).
    pub(crate) user: Option<String>,
    /// `publish`, `subscribe` or `all`.
    pub(crate) access: AclAccess,
    /// The topic filter (`%u` user name, `%c` client id).
    pub(crate) filter: String,
    /// Allow (else deny).
    pub(crate) allow: bool,
}

/// A topic rule as written: `access` and a valid `filter` required.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAcl {
    user: Option<String>,
    access: Option<AclAccess>,
    filter: String,
    allow: bool,
}

impl TryFrom<RawAcl> for AclSettings {
    type Error = Invalid;

    fn try_from(a: RawAcl) -> Result<Self, Invalid> {
        let Some(access) = a.access else {
            return Err(Invalid::new("", "must be publish, subscribe or all").at("access"));
        };
        if a.filter.is_empty() {
            return Err(Invalid::new("", "a rule needs a topic filter").at("filter"));
        }
        if !mqgate_core::acl::valid_filter(&a.filter) {
            return Err(Invalid::new(
                &a.filter,
                "not an MQTT topic filter (# only as the whole last level, + only as a whole level)",
            )
            .at("filter"));
        }
        Ok(Self {
            user: a.user.filter(|u| !u.is_empty()),
            access,
            filter: a.filter,
            allow: a.allow,
        })
    }
}

/// Limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Limits {
    /// Open connections per protocol before new ones are refused (0: no limit). Only
    /// connections past their handshake count.
    pub(crate) max_connections: usize,
    /// Connections per protocol still in their handshake at once; more are closed at
    /// accept (0: no limit).
    pub(crate) max_pending_handshakes: usize,
    /// File handles held back from client sockets for the store and the process
    /// (RocksDB's open files are bounded below it); 0: no reservation.
    pub(crate) reserved_fds: usize,
    /// Connections the kernel queues for each listener before they are accepted
    /// (`listen(2)`'s backlog; the kernel caps it at net.core.somaxconn).
    pub(crate) listen_backlog: u32,
    /// AMQP frame_max offered in connection.tune.
    pub(crate) amqp_frame_max: u32,
    /// AMQP channels per connection.
    pub(crate) amqp_channel_max: u16,
    /// AMQP heartbeat offered, in seconds.
    pub(crate) amqp_heartbeat: u16,
    /// Largest AMQP message body, in bytes.
    pub(crate) amqp_max_message_bytes: u64,
    /// Largest MQTT packet, in bytes.
    pub(crate) mqtt_max_packet_bytes: usize,
    /// Largest MQTT CONNECT (before login), in bytes.
    pub(crate) mqtt_max_connect_bytes: usize,
    /// MQTT Server Keep Alive: the longest keep alive granted, seconds (0: none); a
    /// 3.1.1 client asking for more (or none) is refused.
    pub(crate) mqtt_server_keep_alive: u16,
    /// MQTT Receive Maximum announced to clients.
    pub(crate) mqtt_receive_maximum: u16,
    /// MQTT in-flight deliveries per client.
    pub(crate) mqtt_max_inflight: u16,
    /// MQTT Topic Alias Maximum.
    pub(crate) mqtt_topic_alias_maximum: u16,
    /// Longest MQTT session expiry granted, seconds.
    pub(crate) mqtt_max_session_expiry: u32,
    /// QoS 0 messages queued for a connected MQTT client; when full, publishers wait.
    pub(crate) mqtt_qos0_queue: usize,
    /// How long a publish waits for a full QoS 0 queue before the message is dropped
    /// for that subscriber ("5s"); a subscriber full that long is marked stuck.
    pub(crate) mqtt_qos0_max_wait: HumanDuration,
    /// Bytes of QoS 0 messages queued for a connected MQTT client.
    pub(crate) mqtt_qos0_queue_bytes: usize,
    /// Subscriptions one MQTT session may hold (0: no limit).
    pub(crate) mqtt_max_subscriptions_per_session: usize,
    /// Filters one MQTT SUBSCRIBE may carry (0: no limit).
    pub(crate) mqtt_max_filters_per_subscribe: usize,
    /// Above this resident memory, publishers are blocked: bytes, or a fraction of the
    /// machine's memory below 1 ("0.4"); "" or 0: off.
    pub(crate) memory_high_watermark: MemoryWatermark,
    /// A failed login (any protocol, the admin API) is answered after this delay,
    /// doubled for each recent failure from the same address or for the same user
    /// ("200ms"; "0s": off).
    pub(crate) login_failure_delay: HumanDuration,
    /// The longest such delay ("5s").
    pub(crate) login_failure_max_delay: HumanDuration,
    /// Flow control by consumer lag: above this many unconsumed messages in a queue
    /// whose consumers are making progress, its publishers wait for them (0: off).
    pub(crate) max_consumer_lag: u64,
}

impl Default for Limits {
    fn default() -> Self {
        let a = AmqpConfig::default();
        let m = MqttConfig::default();
        Self {
            max_connections: 0,
            max_pending_handshakes: a.max_pending_handshakes,
            reserved_fds: 256,
            listen_backlog: 4096,
            amqp_frame_max: a.frame_max,
            amqp_channel_max: a.channel_max,
            amqp_heartbeat: a.heartbeat,
            amqp_max_message_bytes: a.max_message_size,
            mqtt_max_packet_bytes: m.max_packet_size,
            mqtt_max_connect_bytes: m.max_connect_size,
            mqtt_server_keep_alive: m.max_keep_alive,
            mqtt_receive_maximum: m.receive_maximum,
            mqtt_max_inflight: m.max_inflight,
            mqtt_topic_alias_maximum: m.topic_alias_maximum,
            mqtt_max_session_expiry: m.max_session_expiry,
            mqtt_qos0_queue: m.qos0_queue,
            mqtt_qos0_max_wait: HumanDuration::secs(5),
            mqtt_qos0_queue_bytes: m.qos0_queue_bytes,
            mqtt_max_subscriptions_per_session: m.max_subscriptions_per_session,
            mqtt_max_filters_per_subscribe: m.max_filters_per_subscribe,
            memory_high_watermark: MemoryWatermark::Fraction(0.4),
            login_failure_delay: HumanDuration::millis(200),
            login_failure_max_delay: HumanDuration::secs(5),
            max_consumer_lag: 0,
        }
    }
}

/// Delay levels.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct DelaySettings {
    /// Level 1, 2, ... as durations ("1s", "5m", "2h").
    pub(crate) levels: Vec<HumanDuration>,
}

impl Default for DelaySettings {
    fn default() -> Self {
        Self {
            levels: CoreConfig::default()
                .delay_levels
                .into_iter()
                .map(HumanDuration)
                .collect(),
        }
    }
}

/// The retry ladder.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RetrySettings {
    /// The delay level of the first retry (RocketMQ: 3, i.e. 10 s).
    pub(crate) first_level: usize,
    /// Failures before the dead-letter queue (RocketMQ: 16).
    pub(crate) max_reconsume_times: u32,
    /// For AMQP queues declared without `x-retry-policy`: `none` (RabbitMQ's behaviour)
    /// or `rocketmq`.
    pub(crate) amqp_default_policy: AmqpRetryPolicy,
}

impl Default for RetrySettings {
    fn default() -> Self {
        let c = CoreConfig::default();
        Self {
            first_level: c.retry_first_level,
            max_reconsume_times: c.max_reconsume_times,
            amqp_default_policy: AmqpRetryPolicy::None,
        }
    }
}

/// Metric cardinality bounds.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct MetricsSettings {
    /// Export per-topic and per-group series at all.
    pub(crate) per_topic: bool,
    /// At most this many topic series (the busiest; the rest are summed as `_other`).
    pub(crate) max_topics: usize,
    /// At most this many group series (by lag).
    pub(crate) max_groups: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            per_topic: true,
            max_topics: 200,
            max_groups: 200,
        }
    }
}

/// The async runtime.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RuntimeSettings {
    /// Threads that run the connections, groups and timers (0: one per core).
    pub(crate) workers: usize,
    /// `per-core`: each worker a runtime of its own, connections spread over them;
    /// `work-stealing`: one runtime, tasks move between its workers.
    pub(crate) scheduler: Scheduler,
    /// Whether the kernel may back the broker's memory with transparent huge pages
    /// (false: off for this process, `PR_SET_THP_DISABLE`: zeroing one on first touch
    /// stalls a worker for milliseconds; ARCHITECTURE.md, "No transparent huge pages").
    pub(crate) transparent_huge_pages: bool,
}

impl RuntimeSettings {
    /// How many worker threads to start on a machine with `cores` cores: one per core
    /// unless set. Fewer than the cores leaves the store's writer thread a core of its
    /// own, which costs less CPU per durable message (fewer hand-offs between threads,
    /// each a futex wake and a context switch) and runs less in parallel: on a 2-core
    /// machine 1 worker (work-stealing) cut MQTT QoS 1 with a window of 20 from 35 to
    /// 27 µs of broker CPU a message and cost 14 % of QoS 0 4→4 throughput
    /// (bench/RESULTS.md, "One worker on two cores").
    pub(crate) fn workers(&self, cores: usize) -> usize {
        match self.workers {
            0 => cores.max(1),
            n => n,
        }
    }
}

/// A configuration error: the key, the value, and why.
#[derive(Debug)]
pub(crate) struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: &str, value: impl std::fmt::Display, why: &str) -> ConfigError {
    ConfigError(format!("config: {key} = \"{value}\": {why}"))
}

impl Settings {
    /// What the types cannot say: TLS files for TLS listeners, ranges, names given and
    /// unique, references between sections.
    fn check(&self) -> Result<(), ConfigError> {
        if self.listeners.tls_wanted()
            && (self.tls.cert_file.is_none() || self.tls.key_file.is_none())
        {
            return Err(ConfigError(
                "config: tls.cert_file and tls.key_file are required when a TLS listener (amqps, mqtts, mqtt_wss) is on".into(),
            ));
        }
        if (1..128).contains(&self.limits.reserved_fds) {
            return Err(bad(
                "limits.reserved_fds",
                self.limits.reserved_fds,
                "must be 0 (no reservation) or at least 128 (the store needs that many)",
            ));
        }
        if self.limits.listen_backlog == 0 {
            return Err(bad(
                "limits.listen_backlog",
                0,
                "must be at least 1 (connections the kernel queues before accept)",
            ));
        }
        let j = &self.store.jetstream;
        if self.store.backend == Backend::Jetstream {
            if j.servers.is_empty() {
                return Err(bad(
                    "store.jetstream.servers",
                    "[]",
                    "list at least one NATS server URL",
                ));
            }
            if j.replicas == 0 || j.replicas > 5 {
                return Err(bad(
                    "store.jetstream.replicas",
                    j.replicas,
                    "must be 1 to 5 (JetStream's limit; 3 survives the loss of one server)",
                ));
            }
            if j.lease_ttl.get() < std::time::Duration::from_secs(1) {
                return Err(bad(
                    "store.jetstream.lease_ttl",
                    j.lease_ttl,
                    "must be at least 1s (the owner renews it every fifth of it)",
                ));
            }
        }
        let c = &self.cluster;
        if c.shards > 0 {
            if self.store.backend != Backend::Jetstream {
                return Err(bad(
                    "cluster.shards",
                    c.shards,
                    "needs store.backend = \"jetstream\" (each shard is a replicated log)",
                ));
            }
            if c.shards > mqgate_core::shard::MAX_SHARDS {
                return Err(bad(
                    "cluster.shards",
                    c.shards,
                    &format!("must be at most {}", mqgate_core::shard::MAX_SHARDS),
                ));
            }
            if c.node_ttl.get() < std::time::Duration::from_millis(500) {
                return Err(bad(
                    "cluster.node_ttl",
                    c.node_ttl,
                    "must be at least 500ms (a gateway renews its key every third of it)",
                ));
            }
            if c.tick.get().is_zero() || c.relay_timeout.get().is_zero() {
                return Err(bad(
                    "cluster.tick / cluster.relay_timeout",
                    "0s",
                    "must be more than zero",
                ));
            }
        }
        let mut names = HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let key = format!("users[{i}].name");
            if u.name.is_empty() {
                return Err(bad(&key, "", "a user needs a name"));
            }
            if !names.insert(&u.name) {
                return Err(bad(&key, &u.name, "listed twice"));
            }
        }
        for (i, v) in self.vhosts.iter().enumerate() {
            if v.name.is_empty() {
                return Err(bad(
                    &format!("vhosts[{i}].name"),
                    "",
                    "a vhost needs a name",
                ));
            }
            for (j, p) in v.permissions.iter().enumerate() {
                if !self.users.is_empty() && !names.contains(&p.user) {
                    return Err(bad(
                        &format!("vhosts[{i}].permissions[{j}].user"),
                        &p.user,
                        "no such user in [[users]]",
                    ));
                }
            }
        }
        if self.limits.amqp_frame_max < 4096 {
            return Err(bad(
                "limits.amqp_frame_max",
                self.limits.amqp_frame_max,
                "must be at least 4096",
            ));
        }
        if self.delay.levels.is_empty() {
            return Err(bad("delay.levels", "[]", "needs at least one level"));
        }
        if self.retry.first_level == 0 || self.retry.first_level > self.delay.levels.len() {
            return Err(bad(
                "retry.first_level",
                self.retry.first_level,
                "must be a delay level (1-based)",
            ));
        }
        Ok(())
    }

    /// The users (a default `guest`/`guest` administrator when none are configured).
    pub(crate) fn users(&self) -> Users {
        let mut users = Users::default();
        if self.users.is_empty() {
            users.insert_plain("guest", "guest", &["administrator"]);
            return users;
        }
        for u in &self.users {
            users.0.insert(
                u.name.clone(),
                UserAccount {
                    password: u.password.clone(),
                    tags: u.tags.clone(),
                },
            );
        }
        users
    }

    /// The core's settings.
    pub(crate) fn core(&self) -> CoreConfig {
        CoreConfig {
            delay_levels: self.delay.levels.iter().map(|l| l.get()).collect(),
            retry_first_level: self.retry.first_level,
            max_reconsume_times: self.retry.max_reconsume_times,
            memory_high_watermark: self.memory_high_watermark_bytes,
            login_throttle: LoginThrottleConfig {
                failure_delay: self.limits.login_failure_delay.get(),
                max_delay: self.limits.login_failure_max_delay.get(),
                ..LoginThrottleConfig::default()
            },
            retained_cache_messages: self.mqtt.retained_cache_messages,
            retained_cache_bytes: self.mqtt.retained_cache_bytes,
            consumer_lag_limit: (self.limits.max_consumer_lag > 0)
                .then_some(self.limits.max_consumer_lag),
            ..CoreConfig::default()
        }
    }

    /// RocksDB's settings (`path` overrides `store.path`).
    /// The edge profile (`mqgate serve --small`): caches and buffers cut so the broker
    /// stays within about 64 MiB under load, at some cost in throughput (see README).
    pub(crate) fn small(&mut self) {
        self.store.block_cache_bytes = 4 << 20;
        self.store.write_buffer_bytes = 8 << 20;
        self.store.tail_cache_bytes = 2 << 20;
        self.mqtt.retained_cache_messages = 1_000;
        self.mqtt.retained_cache_bytes = 4 << 20;
        self.limits.mqtt_qos0_queue_bytes = 2 << 20;
    }

    pub(crate) fn rocks(&self, path: &Path) -> RocksConfig {
        let mut r = RocksConfig::new(path);
        r.fsync = match self.store.fsync {
            Fsync::EveryBatch => FsyncPolicy::EveryBatch,
            Fsync::Periodic => FsyncPolicy::Periodic {
                interval: self.store.fsync_interval.get(),
            },
        };
        r.retention = Retention {
            max_age: self.store.retention_max_age.map(HumanDuration::get),
            max_bytes: (self.store.retention_max_bytes > 0)
                .then_some(self.store.retention_max_bytes),
        };
        r.block_cache_bytes = self.store.block_cache_bytes;
        r.write_buffer_bytes = self.store.write_buffer_bytes;
        r.blob_min_bytes = self.store.blob_min_bytes;
        r.tail_cache_bytes = self.store.tail_cache_bytes;
        r.max_open_files = self.rocks_max_open_files();
        r
    }

    /// The jetstream backend's settings, with `path` as this node's view.
    pub(crate) fn jetstream(&self, path: &Path) -> mqgate_store::jetstream::JetStreamConfig {
        let j = &self.store.jetstream;
        let node = if j.node_id.is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "mqgate".into())
        } else {
            j.node_id.clone()
        };
        let mut c = mqgate_store::jetstream::JetStreamConfig::new(
            j.servers.clone(),
            node,
            self.rocks(path),
        );
        c.stream = j.stream.clone();
        c.replicas = j.replicas;
        c.lease_ttl = j.lease_ttl.get();
        if !j.user.is_empty() {
            c.user = Some((j.user.clone(), j.password.clone()));
        }
        if !j.token.is_empty() {
            c.token = Some(j.token.clone());
        }
        c.tls_ca_file = j.tls_ca_file.clone();
        c
    }

    /// RocksDB's open files: within `limits.reserved_fds`, leaving 64 of them for its
    /// WAL, MANIFEST, logs, compaction outputs and the process's own handles (-1, no
    /// bound, when nothing is reserved).
    pub(crate) fn rocks_max_open_files(&self) -> i32 {
        match self.limits.reserved_fds {
            0 => -1,
            n => i32::try_from(n.saturating_sub(64).max(32)).unwrap_or(i32::MAX),
        }
    }

    /// The AMQP adapter's settings.
    pub(crate) fn amqp(&self, users: &Users) -> AmqpConfig {
        let mut a = AmqpConfig {
            users: users.clone(),
            max_connections: self.limits.max_connections,
            max_pending_handshakes: self.limits.max_pending_handshakes,
            frame_max: self.limits.amqp_frame_max,
            channel_max: self.limits.amqp_channel_max,
            heartbeat: self.limits.amqp_heartbeat,
            max_message_size: self.limits.amqp_max_message_bytes,
            default_retry_policy: match self.retry.amqp_default_policy {
                AmqpRetryPolicy::None => None,
                AmqpRetryPolicy::Rocketmq => Some(RetryPolicy::RocketMq),
            },
            topic_acl: self.topic_acl(),
            ..AmqpConfig::default()
        };
        if self.vhosts.is_empty() {
            // Every user may use vhost "/" fully (RabbitMQ's default for guest).
            a.vhosts = vec!["/".into()];
            a.permissions = users
                .0
                .keys()
                .map(|u| {
                    (
                        u.clone(),
                        HashMap::from([("/".to_owned(), Permission::all())]),
                    )
                })
                .collect();
        } else {
            a.vhosts = self.vhosts.iter().map(|v| v.name.clone()).collect();
            a.permissions = HashMap::new();
            for v in &self.vhosts {
                for p in &v.permissions {
                    a.permissions
                        .entry(p.user.clone())
                        .or_default()
                        .insert(v.name.clone(), p.permission());
                }
            }
        }
        a
    }

    /// The topic access rules, one set for MQTT and AMQP's `amq.topic`.
    pub(crate) fn topic_acl(&self) -> TopicAcl {
        let rules = self
            .mqtt
            .acl
            .iter()
            .map(|a| AclRule {
                user: a.user.clone(),
                access: match a.access {
                    AclAccess::Publish => Access::Publish,
                    AclAccess::Subscribe => Access::Subscribe,
                    AclAccess::All => Access::All,
                },
                filter: a.filter.clone(),
                allow: a.allow,
            })
            .collect();
        let default = match self.mqtt.acl_default {
            AclFallback::Allow => AclDefault::Allow,
            AclFallback::Deny => AclDefault::Deny,
        };
        TopicAcl::new(rules, default)
    }

    /// The named users who may use MQTT: those with a permission on vhost "/" (every
    /// user when no [[vhosts]] are configured; `None`, no check, without [[users]]).
    fn mqtt_vhost_users(&self) -> Option<HashSet<String>> {
        if self.users.is_empty() {
            return None;
        }
        if self.vhosts.is_empty() {
            return Some(self.users.iter().map(|u| u.name.clone()).collect());
        }
        Some(
            self.vhosts
                .iter()
                .filter(|v| v.name == DEFAULT_VHOST)
                .flat_map(|v| v.permissions.iter().map(|p| p.user.clone()))
                .collect(),
        )
    }

    /// The MQTT adapter's settings.
    pub(crate) fn mqtt(&self, users: &Users) -> MqttConfig {
        let acl = self.topic_acl();
        MqttConfig {
            allow_anonymous: self.mqtt.allow_anonymous,
            users: if self.users.is_empty() {
                Users::default()
            } else {
                users.clone()
            },
            acl: acl.rules,
            acl_default: acl.default,
            vhost_users: self.mqtt_vhost_users(),
            max_connections: self.limits.max_connections,
            max_pending_handshakes: self.limits.max_pending_handshakes,
            max_packet_size: self.limits.mqtt_max_packet_bytes,
            max_connect_size: self.limits.mqtt_max_connect_bytes,
            max_keep_alive: self.limits.mqtt_server_keep_alive,
            receive_maximum: self.limits.mqtt_receive_maximum,
            max_inflight: self.limits.mqtt_max_inflight,
            topic_alias_maximum: self.limits.mqtt_topic_alias_maximum,
            max_session_expiry: self.limits.mqtt_max_session_expiry,
            qos0_queue: self.limits.mqtt_qos0_queue.max(1),
            qos0_max_wait: self.limits.mqtt_qos0_max_wait.get(),
            qos0_queue_bytes: self.limits.mqtt_qos0_queue_bytes.max(1),
            max_subscriptions_per_session: self.limits.mqtt_max_subscriptions_per_session,
            max_filters_per_subscribe: self.limits.mqtt_max_filters_per_subscribe,
            ..MqttConfig::default()
        }
    }
}

#[cfg(test)]
mod tests;
