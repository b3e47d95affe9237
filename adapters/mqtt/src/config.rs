//! The MQTT listener's settings, users and topic access rules.

use std::collections::HashSet;
use std::time::Duration;

pub use mqgate_core::acl::{Access, AclDefault, AclRule};
use mqgate_core::acl::{Subject, TopicAcl};

/// The MQTT adapter's settings.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    /// Accept connections without a user name.
    pub allow_anonymous: bool,
    /// Refuse new connections beyond this many open ones (0: no limit).
    pub max_connections: usize,
    /// Connections still in their handshake (no CONNECT accepted yet) at once; more are
    /// closed at accept (0: no limit). They do not count against `max_connections`.
    pub max_pending_handshakes: usize,
    /// Users (shared with the other protocols).
    pub users: mqgate_core::Users,
    /// Topic access rules (the core's, shared with AMQP's `amq.topic`), first match
    /// wins; checked on PUBLISH, SUBSCRIBE and every delivery.
    pub acl: Vec<AclRule>,
    /// What is decided when no access rule applies.
    pub acl_default: AclDefault,
    /// The named users who may connect: those with a permission on vhost `/`, where MQTT
    /// lives (RabbitMQ's MQTT plugin refuses the others). `None`: every authenticated
    /// user. Anonymous clients are governed by `allow_anonymous` alone.
    pub vhost_users: Option<HashSet<String>>,
    /// The largest packet accepted (announced as Maximum Packet Size on 5.0).
    pub max_packet_size: usize,
    /// The largest CONNECT accepted (will included): what a client that has not logged
    /// in can make the broker buffer. Larger ones close the connection.
    pub max_connect_size: usize,
    /// 5.0 clients asking for a longer keep alive (or none) get this one, announced as
    /// Server Keep Alive; 3.1.1 clients asking for more (or none), who cannot be told,
    /// are refused with CONNACK 2, as Mosquitto's `max_keepalive` after 2.0.11 (0: no
    /// maximum).
    pub max_keep_alive: u16,
    /// QoS 1/2 publishes a client may have unacknowledged (Receive Maximum, 5.0).
    pub receive_maximum: u16,
    /// QoS 1/2 deliveries in flight to a client (capped by the client's Receive Maximum).
    pub max_inflight: u16,
    /// Topic aliases a 5.0 client may use towards the broker.
    pub topic_alias_maximum: u16,
    /// The longest session expiry granted, in seconds.
    pub max_session_expiry: u32,
    /// Longest client id accepted, in bytes.
    pub max_client_id_len: usize,
    /// QoS 0 messages queued for a connected client; when it is full the publisher waits.
    pub qos0_queue: usize,
    /// Slow-consumer protection: a publish waits for a subscriber's full QoS 0 queue
    /// while the subscriber keeps taking messages (at least 1/64 of its queue per this
    /// window); one that takes nothing for this long (at least 250 ms) is marked stuck:
    /// its QoS 0 messages are dropped and counted at once, nobody waits for it, until it
    /// has drained its queue below half.
    pub qos0_max_wait: Duration,
    /// Bytes of QoS 0 messages queued for a connected client (besides `qos0_queue`
    /// messages); a message bigger than this still goes into an empty queue.
    pub qos0_queue_bytes: usize,
    /// Subscriptions one session may hold; filters beyond it are refused (SUBACK 0x97
    /// Quota exceeded on 5.0, 0x80 on 3.1.1).
    pub max_subscriptions_per_session: usize,
    /// Filters one SUBSCRIBE may carry; a packet with more is refused whole (every
    /// filter 0x97 / 0x80, none subscribed).
    pub max_filters_per_subscribe: usize,
    /// How long a CONNECT may take to arrive after the TCP connection opens.
    pub connect_timeout: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            max_connections: 0,
            max_pending_handshakes: 1024,
            users: mqgate_core::Users::default(),
            acl: Vec::new(),
            acl_default: AclDefault::Allow,
            vhost_users: None,
            max_packet_size: 1 << 20,
            max_connect_size: 64 << 10,
            max_keep_alive: 0,
            receive_maximum: 1024,
            max_inflight: 1024,
            topic_alias_maximum: 1024,
            max_session_expiry: u32::MAX,
            max_client_id_len: 512,
            qos0_queue: 10_000,
            qos0_max_wait: Duration::from_secs(5),
            qos0_queue_bytes: 16 << 20,
            max_subscriptions_per_session: 100_000,
            max_filters_per_subscribe: 10_000,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl MqttConfig {
    /// The access rules as the core checks them.
    pub fn topic_acl(&self) -> TopicAcl {
        TopicAcl::new(self.acl.clone(), self.acl_default)
    }

    /// Whether `user` may do `access` on `topic_or_filter` (a topic name for publish, a
    /// filter for subscribe). A convenience over [`MqttConfig::topic_acl`] for one check.
    pub fn allowed(&self, user: Option<&str>, client_id: &str, access: Access, what: &str) -> bool {
        let acl = self.topic_acl();
        let who = Subject {
            user,
            client_id: Some(client_id),
        };
        match access {
            Access::Publish => acl.check_topic(who, access, what),
            _ => acl.check_filter(who, access, what),
        }
    }

    /// Whether a named user may use the MQTT vhost (see [`MqttConfig::vhost_users`]).
    pub fn vhost_allowed(&self, user: &str) -> bool {
        match &self.vhost_users {
            Some(set) => !self.users.0.contains_key(user) || set.contains(user),
            None => true,
        }
    }

    /// Check a user name and password. `Ok(())`, or `Err(true)` for bad credentials and
    /// `Err(false)` for "not authorized" (anonymous refused).
    pub fn authenticate(&self, user: Option<&str>, password: Option<&[u8]>) -> Result<(), bool> {
        match user {
            None if self.allow_anonymous && password.is_none() => Ok(()),
            None => Err(password.is_some()),
            Some(u) => match self.users.0.get(u) {
                Some(acct)
                    if password
                        .and_then(|p| std::str::from_utf8(p).ok())
                        .is_some_and(|p| acct.password.verify(p)) =>
                {
                    Ok(())
                }
                Some(_) => Err(true),
                None if self.users.0.is_empty() && self.allow_anonymous => Ok(()),
                None => Err(true),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_first_match_wins_with_patterns() {
        let cfg = MqttConfig {
            acl: vec![
                AclRule {
                    user: None,
                    access: Access::All,
                    filter: "users/%u/#".into(),
                    allow: true,
                },
                AclRule {
                    user: None,
                    access: Access::Subscribe,
                    filter: "users/#".into(),
                    allow: false,
                },
                AclRule {
                    user: Some("ro".into()),
                    access: Access::Publish,
                    filter: "#".into(),
                    allow: false,
                },
            ],
            ..Default::default()
        };
        assert!(cfg.allowed(Some("ann"), "c", Access::Subscribe, "users/ann/+"));
        assert!(!cfg.allowed(Some("ann"), "c", Access::Subscribe, "users/bob/x"));
        assert!(!cfg.allowed(Some("ann"), "c", Access::Subscribe, "users/#"));
        assert!(!cfg.allowed(Some("ro"), "c", Access::Publish, "a/b"));
        assert!(cfg.allowed(Some("ro"), "c", Access::Subscribe, "a/b"));
    }

    #[test]
    fn authentication() {
        let mut cfg = MqttConfig::default();
        assert_eq!(cfg.authenticate(None, None), Ok(()));
        cfg.users.insert_plain("u", "p", &[]);
        cfg.allow_anonymous = false;
        assert_eq!(cfg.authenticate(None, None), Err(false));
        assert_eq!(cfg.authenticate(Some("u"), Some(b"p")), Ok(()));
        assert_eq!(cfg.authenticate(Some("u"), Some(b"x")), Err(true));
        assert_eq!(cfg.authenticate(Some("v"), Some(b"p")), Err(true));
    }

    #[test]
    fn vhost_users() {
        let mut cfg = MqttConfig::default();
        cfg.users.insert_plain("in", "p", &[]);
        cfg.users.insert_plain("out", "p", &[]);
        assert!(cfg.vhost_allowed("out"), "no vhost list: everyone");
        cfg.vhost_users = Some(HashSet::from(["in".to_owned()]));
        assert!(cfg.vhost_allowed("in"));
        assert!(!cfg.vhost_allowed("out"));
    }
}
