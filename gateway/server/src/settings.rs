//! mqgate's configuration: defaults < TOML file (`--config`) < environment variables
//! (`MQGATE__SECTION__KEY`) < command-line flags. Every knob is documented in the
//! example `mqgate.toml` at the top of the repository. A bad value is refused at start
//! with its key, its value and why.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mqgate_amqp::{AmqpConfig, Permission, RetryPolicy};
use mqgate_core::router::DEFAULT_VHOST;
use mqgate_core::{CoreConfig, LoginThrottleConfig, Password, TopicAcl, UserAccount, Users};
use mqgate_mqtt::{Access, AclDefault, AclRule, MqttConfig};
use mqgate_store::{FsyncPolicy, Retention, RocksConfig};
use serde::Deserialize;

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
}

/// Listener addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Listeners {
    /// AMQP 0-9-1.
    pub(crate) amqp: String,
    /// AMQP 0-9-1 over TLS.
    pub(crate) amqps: String,
    /// MQTT.
    pub(crate) mqtt: String,
    /// MQTT over TLS.
    pub(crate) mqtts: String,
    /// MQTT over WebSocket.
    pub(crate) mqtt_ws: String,
    /// MQTT over WebSocket over TLS.
    pub(crate) mqtt_wss: String,
    /// The admin HTTP API and /metrics.
    pub(crate) admin: String,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            amqp: "0.0.0.0:5672".into(),
            amqps: String::new(),
            mqtt: "0.0.0.0:1883".into(),
            mqtts: String::new(),
            mqtt_ws: String::new(),
            mqtt_wss: String::new(),
            admin: "127.0.0.1:15672".into(),
        }
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
    pub(crate) backend: String,
    /// RocksDB's data folder.
    pub(crate) path: PathBuf,
    /// `every-batch` (a confirmed write survives power loss) or `periodic`.
    pub(crate) fsync: String,
    /// With `fsync = "periodic"`: how often.
    pub(crate) fsync_interval: String,
    /// Delete messages older than this ("" keeps them).
    pub(crate) retention_max_age: String,
    /// Delete the oldest messages while the log is larger (bytes, 0 = no limit).
    pub(crate) retention_max_bytes: u64,
    /// RocksDB block cache in bytes.
    pub(crate) block_cache_bytes: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            backend: "rocksdb".into(),
            path: PathBuf::from("./data"),
            fsync: "every-batch".into(),
            fsync_interval: "100ms".into(),
            retention_max_age: String::new(),
            retention_max_bytes: 0,
            block_cache_bytes: 128 << 20,
        }
    }
}

/// A user.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct UserSettings {
    /// Its name.
    pub(crate) name: String,
    /// RabbitMQ's salted SHA-256 (`mqgate hash-password`, `rabbitmqctl hash_password`).
    pub(crate) password_hash: Option<String>,
    /// Clear text (for local tries only).
    pub(crate) password: Option<String>,
    /// `administrator` may use the admin API.
    pub(crate) tags: Vec<String>,
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
    pub(crate) configure: String,
    /// Publish to / bind to matching resources.
    pub(crate) write: String,
    /// Consume from / bind from matching resources.
    pub(crate) read: String,
}

impl Default for PermissionSettings {
    fn default() -> Self {
        Self {
            user: String::new(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
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
    pub(crate) acl_default: String,
    /// Retained message bodies kept in memory (the rest are read from the store).
    pub(crate) retained_cache_messages: usize,
    /// Bytes of retained message bodies kept in memory.
    pub(crate) retained_cache_bytes: usize,
}

impl Default for MqttSettings {
    fn default() -> Self {
        let m = MqttConfig::default();
        Self {
            allow_anonymous: true,
            acl: Vec::new(),
            acl_default: "allow".into(),
            retained_cache_messages: m.retained_cache_messages,
            retained_cache_bytes: m.retained_cache_bytes,
        }
    }
}

/// One MQTT topic rule.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct AclSettings {
    /// The user ("" or absent: everyone).
    pub(crate) user: Option<String>,
    /// `publish`, `subscribe` or `all`.
    pub(crate) access: String,
    /// The topic filter (`%u` user name, `%c` client id).
    pub(crate) filter: String,
    /// Allow (else deny).
    pub(crate) allow: bool,
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
    /// MQTT Server Keep Alive: the longest keep alive granted, seconds (0: none).
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
    pub(crate) mqtt_qos0_max_wait: String,
    /// Bytes of QoS 0 messages queued for a connected MQTT client.
    pub(crate) mqtt_qos0_queue_bytes: usize,
    /// Subscriptions one MQTT session may hold (0: no limit).
    pub(crate) mqtt_max_subscriptions_per_session: usize,
    /// Filters one MQTT SUBSCRIBE may carry (0: no limit).
    pub(crate) mqtt_max_filters_per_subscribe: usize,
    /// Above this resident memory, publishers are blocked: bytes, or a fraction of the
    /// machine's memory below 1 ("0.4"); "" or 0: off.
    pub(crate) memory_high_watermark: String,
    /// A failed login (any protocol, the admin API) is answered after this delay,
    /// doubled for each recent failure from the same address or for the same user
    /// ("200ms"; "0s": off).
    pub(crate) login_failure_delay: String,
    /// The longest such delay ("5s").
    pub(crate) login_failure_max_delay: String,
}

impl Default for Limits {
    fn default() -> Self {
        let a = AmqpConfig::default();
        let m = MqttConfig::default();
        Self {
            max_connections: 0,
            max_pending_handshakes: a.max_pending_handshakes,
            reserved_fds: 256,
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
            mqtt_qos0_max_wait: "5s".into(),
            mqtt_qos0_queue_bytes: m.qos0_queue_bytes,
            mqtt_max_subscriptions_per_session: m.max_subscriptions_per_session,
            mqtt_max_filters_per_subscribe: m.max_filters_per_subscribe,
            memory_high_watermark: "0.4".into(),
            login_failure_delay: "200ms".into(),
            login_failure_max_delay: "5s".into(),
        }
    }
}

/// Delay levels.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct DelaySettings {
    /// Level 1, 2, ... as durations ("1s", "5m", "2h").
    pub(crate) levels: Vec<String>,
}

impl Default for DelaySettings {
    fn default() -> Self {
        Self {
            levels: CoreConfig::default()
                .delay_levels
                .iter()
                .map(|d| format_duration(*d))
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
    pub(crate) amqp_default_policy: String,
}

impl Default for RetrySettings {
    fn default() -> Self {
        let c = CoreConfig::default();
        Self {
            first_level: c.retry_first_level,
            max_reconsume_times: c.max_reconsume_times,
            amqp_default_policy: "none".into(),
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

/// Parse "250ms", "10s", "5m", "2h", "1d".
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => return None,
    })
}

/// The inverse of [`parse_duration`], in the largest exact unit.
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl Settings {
    /// Read defaults, then `file` (if any), then `MQGATE__SECTION__KEY` variables.
    pub(crate) fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut b = config::Config::builder();
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError(format!(
                    "config: file {} does not exist",
                    f.display()
                )));
            }
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        b = b.add_source(
            config::Environment::with_prefix("MQGATE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let c = b
            .build()
            .map_err(|e| ConfigError(format!("config: {}", one_line(&e.to_string()))))?;
        let s: Settings = c
            .try_deserialize()
            .map_err(|e| ConfigError(format!("config: {}", one_line(&e.to_string()))))?;
        s.check()?;
        Ok(s)
    }

    /// Checks beyond types: addresses, durations, names, patterns.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        let l = &self.listeners;
        for (k, v) in [
            ("listeners.amqp", &l.amqp),
            ("listeners.amqps", &l.amqps),
            ("listeners.mqtt", &l.mqtt),
            ("listeners.mqtts", &l.mqtts),
            ("listeners.mqtt_ws", &l.mqtt_ws),
            ("listeners.mqtt_wss", &l.mqtt_wss),
            ("listeners.admin", &l.admin),
        ] {
            if !v.is_empty() && v.parse::<SocketAddr>().is_err() {
                return Err(bad(
                    k,
                    v,
                    "must be host:port (an IP address and a port), or \"\" to turn it off",
                ));
            }
        }
        let tls_wanted = [&l.amqps, &l.mqtts, &l.mqtt_wss]
            .iter()
            .any(|v| !v.is_empty());
        if tls_wanted && (self.tls.cert_file.is_none() || self.tls.key_file.is_none()) {
            return Err(ConfigError(
                "config: tls.cert_file and tls.key_file are required when a TLS listener (amqps, mqtts, mqtt_wss) is on".into(),
            ));
        }
        match self.store.backend.as_str() {
            "rocksdb" | "memory" => {}
            v => return Err(bad("store.backend", v, "must be rocksdb or memory")),
        }
        match self.store.fsync.as_str() {
            "every-batch" => {}
            "periodic" => {
                parse_duration(&self.store.fsync_interval).ok_or_else(|| {
                    bad(
                        "store.fsync_interval",
                        &self.store.fsync_interval,
                        "must be a duration such as 100ms",
                    )
                })?;
            }
            v => return Err(bad("store.fsync", v, "must be every-batch or periodic")),
        }
        for (key, v) in [
            (
                "limits.login_failure_delay",
                &self.limits.login_failure_delay,
            ),
            (
                "limits.login_failure_max_delay",
                &self.limits.login_failure_max_delay,
            ),
        ] {
            if parse_duration(v).is_none() {
                return Err(bad(key, v, "must be a duration such as 200ms"));
            }
        }
        if (1..128).contains(&self.limits.reserved_fds) {
            return Err(bad(
                "limits.reserved_fds",
                self.limits.reserved_fds,
                "must be 0 (no reservation) or at least 128 (the store needs that many)",
            ));
        }
        if parse_duration(&self.limits.mqtt_qos0_max_wait).is_none() {
            return Err(bad(
                "limits.mqtt_qos0_max_wait",
                &self.limits.mqtt_qos0_max_wait,
                "must be a duration such as 5s",
            ));
        }
        if !self.store.retention_max_age.is_empty()
            && parse_duration(&self.store.retention_max_age).is_none()
        {
            return Err(bad(
                "store.retention_max_age",
                &self.store.retention_max_age,
                "must be a duration such as 72h, or \"\"",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let key = format!("users[{i}]");
            if u.name.is_empty() {
                return Err(bad(&format!("{key}.name"), "", "a user needs a name"));
            }
            if !names.insert(&u.name) {
                return Err(bad(&format!("{key}.name"), &u.name, "listed twice"));
            }
            match (&u.password_hash, &u.password) {
                (Some(h), None) => {
                    Password::from_hash(h).ok_or_else(|| {
                        bad(
                            &format!("{key}.password_hash"),
                            h,
                            "not a salted SHA-256 hash (see mqgate hash-password)",
                        )
                    })?;
                }
                (None, Some(_)) => {}
                _ => {
                    return Err(bad(
                        &key,
                        &u.name,
                        "needs exactly one of password_hash and password",
                    ))
                }
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
                let key = format!("vhosts[{i}].permissions[{j}]");
                if !self.users.is_empty() && !names.contains(&p.user) {
                    return Err(bad(
                        &format!("{key}.user"),
                        &p.user,
                        "no such user in [[users]]",
                    ));
                }
                for (k, re) in [
                    ("configure", &p.configure),
                    ("write", &p.write),
                    ("read", &p.read),
                ] {
                    if let Err(e) = regex::Regex::new(re) {
                        return Err(bad(
                            &format!("{key}.{k}"),
                            re,
                            &format!("not a regular expression: {e}"),
                        ));
                    }
                }
            }
        }
        for (i, a) in self.mqtt.acl.iter().enumerate() {
            let key = format!("mqtt.acl[{i}]");
            if !matches!(a.access.as_str(), "publish" | "subscribe" | "all") {
                return Err(bad(
                    &format!("{key}.access"),
                    &a.access,
                    "must be publish, subscribe or all",
                ));
            }
            if a.filter.is_empty() {
                return Err(bad(
                    &format!("{key}.filter"),
                    "",
                    "a rule needs a topic filter",
                ));
            }
            if !mqgate_core::acl::valid_filter(&a.filter) {
                return Err(bad(
                    &format!("{key}.filter"),
                    &a.filter,
                    "not an MQTT topic filter (# only as the whole last level, + only as a whole level)",
                ));
            }
        }
        if !matches!(self.mqtt.acl_default.as_str(), "allow" | "deny") {
            return Err(bad(
                "mqtt.acl_default",
                &self.mqtt.acl_default,
                "must be allow or deny",
            ));
        }
        if self.limits.amqp_frame_max < 4096 {
            return Err(bad(
                "limits.amqp_frame_max",
                self.limits.amqp_frame_max,
                "must be at least 4096",
            ));
        }
        self.memory_high_watermark()?;
        if self.delay.levels.is_empty() {
            return Err(bad("delay.levels", "[]", "needs at least one level"));
        }
        for (i, l) in self.delay.levels.iter().enumerate() {
            parse_duration(l).ok_or_else(|| {
                bad(
                    &format!("delay.levels[{i}]"),
                    l,
                    "must be a duration such as 5s",
                )
            })?;
        }
        if self.retry.first_level == 0 || self.retry.first_level > self.delay.levels.len() {
            return Err(bad(
                "retry.first_level",
                self.retry.first_level,
                "must be a delay level (1-based)",
            ));
        }
        match self.retry.amqp_default_policy.as_str() {
            "none" | "rocketmq" => {}
            v => {
                return Err(bad(
                    "retry.amqp_default_policy",
                    v,
                    "must be none or rocketmq",
                ))
            }
        }
        Ok(())
    }

    /// The memory watermark in bytes (`None`: off).
    pub(crate) fn memory_high_watermark(&self) -> Result<Option<u64>, ConfigError> {
        let v = self.limits.memory_high_watermark.trim();
        if v.is_empty() || v == "0" {
            return Ok(None);
        }
        let err = || {
            bad(
                "limits.memory_high_watermark",
                v,
                "must be bytes, or a fraction of memory below 1 such as 0.4",
            )
        };
        let f: f64 = v.parse().map_err(|_| err())?;
        if f <= 0.0 {
            return Err(err());
        }
        if f < 1.0 {
            let total = total_memory().ok_or_else(err)?;
            return Ok(Some((total as f64 * f) as u64));
        }
        Ok(Some(f as u64))
    }

    /// The users (a default `guest`/`guest` administrator when none are configured).
    pub(crate) fn users(&self) -> Users {
        let mut users = Users::default();
        if self.users.is_empty() {
            users.insert_plain("guest", "guest", &["administrator"]);
            return users;
        }
        for u in &self.users {
            let password = match (&u.password_hash, &u.password) {
                (Some(h), _) => Password::from_hash(h).expect("checked"),
                (None, Some(p)) => Password::Plain(p.clone()),
                (None, None) => continue,
            };
            users.0.insert(
                u.name.clone(),
                UserAccount {
                    password,
                    tags: u.tags.clone(),
                },
            );
        }
        users
    }

    /// The core's settings.
    pub(crate) fn core(&self) -> CoreConfig {
        CoreConfig {
            delay_levels: self
                .delay
                .levels
                .iter()
                .map(|l| parse_duration(l).expect("checked"))
                .collect(),
            retry_first_level: self.retry.first_level,
            max_reconsume_times: self.retry.max_reconsume_times,
            memory_high_watermark: self.memory_high_watermark().expect("checked"),
            login_throttle: LoginThrottleConfig {
                failure_delay: parse_duration(&self.limits.login_failure_delay).expect("checked"),
                max_delay: parse_duration(&self.limits.login_failure_max_delay).expect("checked"),
                ..LoginThrottleConfig::default()
            },
            ..CoreConfig::default()
        }
    }

    /// RocksDB's settings (`path` overrides `store.path`).
    pub(crate) fn rocks(&self, path: &Path) -> RocksConfig {
        let mut r = RocksConfig::new(path);
        if self.store.fsync == "periodic" {
            r.fsync = FsyncPolicy::Periodic {
                interval: parse_duration(&self.store.fsync_interval).expect("checked"),
            };
        }
        r.retention = Retention {
            max_age: parse_duration(&self.store.retention_max_age),
            max_bytes: (self.store.retention_max_bytes > 0)
                .then_some(self.store.retention_max_bytes),
        };
        r.block_cache_bytes = self.store.block_cache_bytes;
        r.max_open_files = self.rocks_max_open_files();
        r
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
            default_retry_policy: (self.retry.amqp_default_policy == "rocketmq")
                .then_some(RetryPolicy::RocketMq),
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
                    let perm = Permission::new(&p.configure, &p.write, &p.read).expect("checked");
                    a.permissions
                        .entry(p.user.clone())
                        .or_default()
                        .insert(v.name.clone(), perm);
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
                user: a.user.clone().filter(|u| !u.is_empty()),
                access: match a.access.as_str() {
                    "publish" => Access::Publish,
                    "subscribe" => Access::Subscribe,
                    _ => Access::All,
                },
                filter: a.filter.clone(),
                allow: a.allow,
            })
            .collect();
        let default = if self.mqtt.acl_default == "deny" {
            AclDefault::Deny
        } else {
            AclDefault::Allow
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
            qos0_max_wait: parse_duration(&self.limits.mqtt_qos0_max_wait).expect("checked"),
            qos0_queue_bytes: self.limits.mqtt_qos0_queue_bytes.max(1),
            max_subscriptions_per_session: self.limits.mqtt_max_subscriptions_per_session,
            max_filters_per_subscribe: self.limits.mqtt_max_filters_per_subscribe,
            retained_cache_messages: self.mqtt.retained_cache_messages,
            retained_cache_bytes: self.mqtt.retained_cache_bytes,
            ..MqttConfig::default()
        }
    }
}

/// A parser's multi-line message (a TOML error quotes the line with a caret under it)
/// as one line.
fn one_line(msg: &str) -> String {
    msg.lines()
        .map(|l| l.trim().trim_start_matches('|').trim())
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

fn total_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(s: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        std::fs::write(&p, s).unwrap();
        Settings::load(Some(&p))
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mqgate.toml");
        let s = Settings::load(Some(&p)).expect("mqgate.toml loads");
        assert_eq!(s.listeners.amqp, "0.0.0.0:5672");
    }

    #[test]
    fn defaults_without_a_file() {
        let s = Settings::load(None).unwrap();
        assert_eq!(s.store.backend, "rocksdb");
        assert!(s.users().authenticate("guest", "guest").is_some());
        assert_eq!(s.core().delay_levels.len(), 18);
    }

    #[test]
    fn bad_values_name_key_value_and_reason() {
        let e = from_toml("[store]\nbackend = \"rockdb\"\n").unwrap_err().0;
        assert_eq!(
            e,
            "config: store.backend = \"rockdb\": must be rocksdb or memory"
        );
        let e = from_toml("[listeners]\nmqtt = \"localhost\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("listeners.mqtt = \"localhost\""), "{e}");
        let e = from_toml("[store]\nbakend = \"memory\"\n").unwrap_err().0;
        assert!(e.contains("bakend"), "{e}");
        let e = from_toml("[limits]\namqp_frame_max = \"big\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("amqp_frame_max"), "{e}");
        let e = from_toml("[[users]]\nname = \"a\"\npassword_hash = \"nope\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("users[0].password_hash"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("2 hours"), None);
        for d in CoreConfig::default().delay_levels {
            assert_eq!(parse_duration(&format_duration(d)), Some(d));
        }
    }

    #[test]
    fn users_vhosts_and_acls_map_onto_the_adapters() {
        let s = from_toml(
            r#"
[[users]]
name = "ops"
password_hash = "XXXX"
tags = ["administrator"]
"#
            .replace("XXXX", &Password::hash("pw").to_hash_string())
            .as_str(),
        )
        .unwrap();
        let users = s.users();
        assert!(users.authenticate("ops", "pw").unwrap().is_admin());
        assert!(users.authenticate("guest", "guest").is_none());
        let a = s.amqp(&users);
        assert!(a.permission("ops", "/").is_some());
        let s = from_toml(
            r#"
[[users]]
name = "app"
password = "pw"
[[vhosts]]
name = "prod"
permissions = [{ user = "app", configure = "^app\\.", write = ".*", read = ".*" }]
[mqtt]
allow_anonymous = false
acl = [{ user = "app", access = "publish", filter = "app/#", allow = true }]
"#,
        )
        .unwrap();
        let users = s.users();
        let a = s.amqp(&users);
        assert_eq!(a.vhosts, ["prod"]);
        assert!(a
            .permission("app", "prod")
            .unwrap()
            .configure
            .is_match("app.q"));
        assert!(a.permission("app", "/").is_none());
        let m = s.mqtt(&users);
        assert!(!m.allow_anonymous);
        assert_eq!(m.acl.len(), 1);
        // "app" has no permission on "/", where MQTT lives.
        assert!(!m.vhost_allowed("app"));
    }

    #[test]
    fn topic_acl_is_one_rule_set_for_both_doors() {
        let s = Settings::load(None).unwrap();
        assert_eq!(s.mqtt(&s.users()).acl_default, AclDefault::Allow);
        assert!(s.amqp(&s.users()).topic_acl.is_open());
        let s = from_toml(
            r#"
[[users]]
name = "app"
password = "pw"
[[users]]
name = "other"
password = "pw"
[[vhosts]]
name = "/"
permissions = [{ user = "app" }]
[mqtt]
acl_default = "deny"
acl = [{ access = "all", filter = "app/%c/#", allow = true }]
"#,
        )
        .unwrap();
        let users = s.users();
        let (m, a) = (s.mqtt(&users), s.amqp(&users));
        assert_eq!(m.acl_default, AclDefault::Deny);
        assert_eq!(m.topic_acl(), a.topic_acl);
        assert!(m.vhost_allowed("app"));
        assert!(!m.vhost_allowed("other"));
        let e = from_toml("[mqtt]\nacl_default = \"maybe\"\n")
            .unwrap_err()
            .0;
        assert_eq!(
            e,
            "config: mqtt.acl_default = \"maybe\": must be allow or deny"
        );
        let e = from_toml("[mqtt]\nacl = [{ access = \"all\", filter = \"a/#/b\" }]\n")
            .unwrap_err()
            .0;
        assert!(e.contains("mqtt.acl[0].filter = \"a/#/b\""), "{e}");
    }
}
