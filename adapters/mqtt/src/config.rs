//! The MQTT listener's settings, users and topic access rules.

use std::time::Duration;

use crate::topic;

/// What an access rule governs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// PUBLISH (and will messages).
    Publish,
    /// SUBSCRIBE.
    Subscribe,
    /// Both.
    All,
}

/// One topic access rule. Rules are read in order; the first whose user, access and
/// filter apply decides. `%u` and `%c` in the filter stand for the user name and client
/// id (Mosquitto's pattern rules). No rule applying means allowed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AclRule {
    /// The user it applies to (`None`: everyone, anonymous included).
    pub user: Option<String>,
    /// What it governs.
    pub access: Access,
    /// The topics it covers.
    pub filter: String,
    /// Allow or deny.
    pub allow: bool,
}

/// The MQTT adapter's settings.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    /// Accept connections without a user name.
    pub allow_anonymous: bool,
    /// Refuse new connections beyond this many open ones (0: no limit).
    pub max_connections: usize,
    /// Users (shared with the other protocols).
    pub users: mqgate_core::Users,
    /// Topic access rules.
    pub acl: Vec<AclRule>,
    /// The largest packet accepted (announced as Maximum Packet Size on 5.0).
    pub max_packet_size: usize,
    /// Clients asking for a longer keep alive (or none) get this one (0: no maximum);
    /// announced as Server Keep Alive on 5.0.
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
    /// How long a publish may wait for full QoS 0 queues before the message is dropped
    /// for those subscribers (slow-consumer protection).
    pub qos0_max_wait: Duration,
    /// How long a CONNECT may take to arrive after the TCP connection opens.
    pub connect_timeout: Duration,
    /// How often expired sessions are looked for.
    pub expiry_check_interval: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            max_connections: 0,
            users: mqgate_core::Users::default(),
            acl: Vec::new(),
            max_packet_size: 1 << 20,
            max_keep_alive: 0,
            receive_maximum: 1024,
            max_inflight: 1024,
            topic_alias_maximum: 1024,
            max_session_expiry: u32::MAX,
            max_client_id_len: 512,
            qos0_queue: 10_000,
            qos0_max_wait: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            expiry_check_interval: Duration::from_secs(1),
        }
    }
}

impl MqttConfig {
    /// Whether `user` may do `access` on `topic_or_filter` (a topic name for publish, a
    /// filter for subscribe).
    pub fn allowed(&self, user: Option<&str>, client_id: &str, access: Access, what: &str) -> bool {
        for rule in &self.acl {
            if let Some(u) = &rule.user {
                if Some(u.as_str()) != user {
                    continue;
                }
            }
            if rule.access != Access::All && rule.access != access {
                continue;
            }
            let filter = rule
                .filter
                .replace("%u", user.unwrap_or(""))
                .replace("%c", client_id);
            let applies = match access {
                Access::Publish => topic::matches(&filter, what),
                _ => topic::covers(&filter, what),
            };
            if applies {
                return rule.allow;
            }
        }
        true
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
}
