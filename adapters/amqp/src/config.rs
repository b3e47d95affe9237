//! The AMQP adapter's settings: users, virtual hosts and permissions, limits.

use std::collections::HashMap;
use std::time::Duration;

/// What a user may do in one vhost: three regular expressions over resource names, as
/// RabbitMQ's `set_permissions` takes them (configure, write, read).
#[derive(Clone, Debug)]
pub struct Permission {
    /// Declare and delete queues and exchanges whose name matches.
    pub configure: regex::Regex,
    /// Publish to exchanges, bind queues (the queue side) whose name matches.
    pub write: regex::Regex,
    /// Consume from queues, bind from exchanges whose name matches.
    pub read: regex::Regex,
}

impl Permission {
    /// Every resource (`.*` three times).
    pub fn all() -> Self {
        Self::new(".*", ".*", ".*").expect("valid")
    }

    /// From three patterns (anchored as RabbitMQ anchors them: a match anywhere counts,
    /// so use `^` and `$`).
    pub fn new(configure: &str, write: &str, read: &str) -> Result<Self, regex::Error> {
        Ok(Self {
            configure: regex::Regex::new(configure)?,
            write: regex::Regex::new(write)?,
            read: regex::Regex::new(read)?,
        })
    }
}

/// The AMQP adapter's settings.
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    /// Users (shared with the other protocols; PLAIN and AMQPLAIN check against them).
    pub users: mqgate_core::Users,
    /// User → vhost → permission (no entry: no access to that vhost).
    pub permissions: HashMap<String, HashMap<String, Permission>>,
    /// The virtual hosts (each gets the standard exchanges).
    pub vhosts: Vec<String>,
    /// Refuse new connections beyond this many open ones (0: no limit).
    pub max_connections: usize,
    /// Connections still in their handshake (before connection.open) at once; more are
    /// closed at accept (0: no limit). They do not count against `max_connections`.
    pub max_pending_handshakes: usize,
    /// The largest frame (announced in connection.tune; clients may ask for less).
    pub frame_max: u32,
    /// The most channels per connection.
    pub channel_max: u16,
    /// The heartbeat interval proposed in connection.tune, in seconds (0: none).
    pub heartbeat: u16,
    /// The largest message body accepted.
    pub max_message_size: u64,
    /// How long the handshake (protocol header to connection.open) may take.
    pub handshake_timeout: Duration,
    /// Prefetch of a consumer that set no limit (and of no-ack consumers).
    pub default_prefetch: usize,
    /// Queues declared without `x-retry-policy` use this (`None`: RabbitMQ's behaviour,
    /// a reject without requeue drops or dead-letters the message).
    pub default_retry_policy: Option<RetryPolicy>,
    /// The topic access rules (one set with MQTT's), applied to `amq.topic` of vhost `/`,
    /// the exchange MQTT publishes through: basic.publish checks the routing key read as
    /// an MQTT topic, bindings from it (and into it) are checked for every topic their
    /// key can match.
    pub topic_acl: mqgate_core::TopicAcl,
}

/// How a failed consumption (reject / nack without requeue) is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryPolicy {
    /// RocketMQ's retry ladder: redelivered after a growing delay, then dead-lettered.
    RocketMq,
}

impl RetryPolicy {
    /// From the `x-retry-policy` argument.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "rocketmq" | "ladder" => Some(RetryPolicy::RocketMq),
            _ => None,
        }
    }
}

impl Default for AmqpConfig {
    /// RabbitMQ's defaults: user `guest`/`guest` with every permission on vhost `/`.
    fn default() -> Self {
        let mut users = mqgate_core::Users::default();
        users.insert_plain("guest", "guest", &["administrator"]);
        let permissions = HashMap::from([(
            "guest".to_owned(),
            HashMap::from([("/".to_owned(), Permission::all())]),
        )]);
        Self {
            users,
            permissions,
            vhosts: vec!["/".into()],
            max_connections: 0,
            max_pending_handshakes: 1024,
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            max_message_size: 128 << 20,
            handshake_timeout: Duration::from_secs(10),
            default_prefetch: 1024,
            default_retry_policy: None,
            topic_acl: mqgate_core::TopicAcl::default(),
        }
    }
}

impl AmqpConfig {
    /// Whether `password` is right for `user`.
    pub fn authenticate(&self, user: &str, password: &str) -> bool {
        self.users.authenticate(user, password).is_some()
    }

    /// What `user` may do in `vhost` (`None`: no access).
    pub fn permission(&self, user: &str, vhost: &str) -> Option<&Permission> {
        self.permissions.get(user)?.get(vhost)
    }
}
