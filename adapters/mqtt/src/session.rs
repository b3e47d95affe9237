//! A session's durable state: what survives a disconnect (and a restart) for clients
//! with a session expiry. Kept in the store's keyed area, namespace [`NS_SESSION`].
//! The messages themselves wait in the session's topic, not here.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqgate_store::{GroupName, Millis, TopicName};

use crate::codec::{QoS, SubOptions};

/// Keyed-area namespace of session records (key: client id).
pub const NS_SESSION: &str = "mqtt.session";
/// Keyed-area namespace of retained messages (key: topic name).
pub const NS_RETAINED: &str = "mqtt.retained";

/// Prefix of session topics and groups.
pub const SESSION_PREFIX: &str = "%MQTT%";
/// Prefix of shared-subscription topics and groups.
pub const SHARED_PREFIX: &str = "%MQTTSHARE%";

/// The topic (and group) holding a session's messages.
pub fn session_topic(client_id: &str) -> TopicName {
    TopicName::new(format!("{SESSION_PREFIX}{client_id}")).expect("client ids are bounded")
}

/// The group consuming a session's topic.
pub fn session_group(client_id: &str) -> GroupName {
    GroupName::new(format!("{SESSION_PREFIX}{client_id}")).expect("client ids are bounded")
}

/// The topic (and group) of shared subscription `$share/<name>/<filter>`.
pub fn shared_topic(name: &str, filter: &str) -> Option<(TopicName, GroupName)> {
    let s = format!("{SHARED_PREFIX}{name}/{filter}");
    Some((TopicName::new(&s).ok()?, GroupName::new(&s).ok()?))
}

/// One subscription as the session holds it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Subscription {
    /// The filter as subscribed (with `$share/<name>/` for shared ones).
    pub filter: String,
    /// Its options.
    pub options: SubOptions,
    /// Its 5.0 subscription identifier.
    pub id: Option<u32>,
}

/// A session's durable state.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct SessionRecord {
    /// Session expiry interval in seconds (`u32::MAX`: never).
    pub expiry: u32,
    /// Its subscriptions.
    pub subscriptions: Vec<Subscription>,
    /// QoS 2 packet ids received and PUBREC'd, awaiting PUBREL.
    pub inbound_qos2: Vec<u16>,
    /// QoS 2 packet ids the client PUBREC'd, awaiting PUBCOMP.
    pub pubrel: Vec<u16>,
    /// When the client disconnected (0 while connected).
    pub disconnected_at: Millis,
}

const VERSION: u8 = 1;

impl SessionRecord {
    /// Its encoding.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(VERSION);
        b.put_u32(self.expiry);
        b.put_u64(self.disconnected_at);
        b.put_u32(self.subscriptions.len() as u32);
        for s in &self.subscriptions {
            b.put_u32(s.filter.len() as u32);
            b.put_slice(s.filter.as_bytes());
            let o = &s.options;
            b.put_u8(
                o.qos as u8
                    | u8::from(o.no_local) << 2
                    | u8::from(o.retain_as_published) << 3
                    | o.retain_handling << 4,
            );
            b.put_u32(s.id.unwrap_or(0));
        }
        for ids in [&self.inbound_qos2, &self.pubrel] {
            b.put_u32(ids.len() as u32);
            for id in ids {
                b.put_u16(*id);
            }
        }
        b.freeze()
    }

    /// Decode; `None` if the bytes are not a record.
    pub fn decode(mut b: Bytes) -> Option<Self> {
        fn need(b: &Bytes, n: usize) -> Option<()> {
            (b.remaining() >= n).then_some(())
        }
        need(&b, 17)?;
        if b.get_u8() != VERSION {
            return None;
        }
        let expiry = b.get_u32();
        let disconnected_at = b.get_u64();
        let n = b.get_u32() as usize;
        let mut subscriptions = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            need(&b, 4)?;
            let len = b.get_u32() as usize;
            need(&b, len + 5)?;
            let filter = String::from_utf8(b.split_to(len).to_vec()).ok()?;
            let o = b.get_u8();
            let id = b.get_u32();
            subscriptions.push(Subscription {
                filter,
                options: SubOptions {
                    qos: QoS::from_u8(o & 3)?,
                    no_local: o & 4 != 0,
                    retain_as_published: o & 8 != 0,
                    retain_handling: (o >> 4) & 3,
                },
                id: (id != 0).then_some(id),
            });
        }
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            need(&b, 4)?;
            let n = b.get_u32() as usize;
            need(&b, n * 2)?;
            for _ in 0..n {
                list.push(b.get_u16());
            }
        }
        let [inbound_qos2, pubrel] = lists;
        Some(Self {
            expiry,
            subscriptions,
            inbound_qos2,
            pubrel,
            disconnected_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let r = SessionRecord {
            expiry: 3600,
            subscriptions: vec![Subscription {
                filter: "$share/g/a/+".into(),
                options: SubOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
                id: Some(7),
            }],
            inbound_qos2: vec![1, 2],
            pubrel: vec![9],
            disconnected_at: 123,
        };
        assert_eq!(SessionRecord::decode(r.encode()), Some(r));
        assert_eq!(SessionRecord::decode(Bytes::from_static(b"\x01")), None);
    }
}
