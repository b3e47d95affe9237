//! Where a client's state lives in a cluster (issue 16), and what an adapter on another
//! gateway reads from there.
//!
//! - Each gateway advertises the address of its services ([`Broker::advertise`]: the
//!   MQTT adapter's listener). [`Broker::locate`] names the gateway owning a topic's
//!   shard by the address it advertises: the MQTT adapter hands a connection whose
//!   session topic lives elsewhere to that gateway, so a session, its takeover, its
//!   will and its QoS 2 state have one place.
//! - [`Broker::shard_events`] tells adapters when a shard comes or goes here (the MQTT
//!   adapter closes the sessions of a shard that left, and their clients reconnect to
//!   its next owner).
//! - [`Broker::retained_next`] reads retained messages wherever shard 0 is owned (its
//!   index is there): a page at a time over the admin relay from another gateway.

use std::collections::VecDeque;
use std::sync::Arc;

use mqgate_store::{Message, TopicName};

use crate::error::{CoreError, Result};
use crate::retained::RetainedCursor;
use crate::shard::{AdminAnswer, AdminOp, ShardId};

/// Where [`Broker::locate`] found a topic's shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    /// Owned by this gateway (or the broker is not clustered).
    Here,
    /// Owned by the gateway advertising this address for the service.
    At(String),
    /// Owned by a gateway that advertises no address for the service.
    Unadvertised,
}

/// A shard came to this gateway or left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardEvent {
    /// Attached: owned here from now on.
    Attached(ShardId),
    /// Detached: owned elsewhere (or nowhere yet) from now on.
    Detached(ShardId),
}

/// A page of retained messages read for another gateway holds at most this many bytes
/// of bodies (and at least one message): the admin relay's answer is one NATS message.
const RETAINED_PAGE_BYTES: usize = 256 << 10;
/// ... and at most this many messages.
const RETAINED_PAGE_MESSAGES: usize = 256;

impl crate::Broker {
    /// Advertise `address` for `service` ("mqtt"): what [`Broker::locate`] answers on
    /// other gateways for the shards owned here.
    pub fn advertise(&self, service: &str, address: String) {
        self.inner
            .services
            .write()
            .insert(service.to_owned(), address);
    }

    /// The address advertised here for `service`.
    pub fn advertised(&self, service: &str) -> Option<String> {
        self.inner.services.read().get(service).cloned()
    }

    /// Whether `topic`'s shard is owned here (always, in a broker of its own).
    pub fn owns_topic(&self, topic: &TopicName) -> bool {
        let shard = self.inner.placement.topic(topic);
        self.inner.link.is_none() || self.inner.local(shard).is_some()
    }

    /// Which gateway owns `topic`'s shard, by the address it advertises for `service`
    /// (asked over the admin relay). An error when nobody answers for the shard (it is
    /// moving, or its owner is gone and not yet replaced).
    pub async fn locate(&self, topic: &TopicName, service: &str) -> Result<Located> {
        if self.owns_topic(topic) {
            return Ok(Located::Here);
        }
        let op = AdminOp::Locate {
            topic: topic.clone(),
            service: service.to_owned(),
        };
        match self.admin(op).await? {
            AdminAnswer::Located(Some(a)) => Ok(Located::At(a)),
            AdminAnswer::Located(None) => Ok(Located::Unadvertised),
            other => Err(CoreError::Invalid(format!(
                "the admin relay answered a location with {other:?}"
            ))),
        }
    }

    /// Shards coming to and leaving this gateway, from now on.
    pub fn shard_events(&self) -> tokio::sync::broadcast::Receiver<ShardEvent> {
        self.inner.shard_events.subscribe()
    }

    /// The next retained message matching `cursor`'s filter (`None`: all read): from
    /// the index here when shard 0 is owned here, else a page at a time from its owner.
    pub async fn retained_next(
        &self,
        cursor: &mut RetainedCursor,
    ) -> Option<(String, Arc<Message>)> {
        let now = self.now();
        // Read from shard 0's owner before it came here: those first.
        if let Some(x) = cursor.fetched.pop_front() {
            return Some(x);
        }
        if self.inner.link.is_none() || self.inner.local(0).is_some() {
            let r = self.retained();
            loop {
                let (topic, entry) = cursor.next(&r, now)?;
                if let Some(m) = r.body(&topic, entry).await {
                    return Some((topic, m));
                }
            }
        }
        loop {
            if let Some(x) = cursor.fetched.pop_front() {
                return Some(x);
            }
            if cursor.done {
                return None;
            }
            let op = AdminOp::RetainedPage {
                filter: cursor.filter.clone(),
                after: cursor.after.clone(),
            };
            match self.admin(op).await {
                Ok(AdminAnswer::Retained { messages, next }) => {
                    cursor.fetched = messages
                        .into_iter()
                        .map(|(t, m)| (t, Arc::new(m)))
                        .collect::<VecDeque<_>>();
                    cursor.done = next.is_none();
                    cursor.after = next;
                }
                other => {
                    tracing::warn!(filter = %cursor.filter, answer = ?other.map(|_| ()), "core: retained messages could not be read from shard 0's owner; the subscription gets none");
                    cursor.done = true;
                    return None;
                }
            }
        }
    }

    /// On shard 0's owner: retained messages matching `filter` after `after`, a page
    /// bounded for the admin relay, and where the next page starts (`None`: done).
    pub(crate) async fn retained_page(
        &self,
        filter: &str,
        after: Option<String>,
    ) -> Result<(Vec<(String, Message)>, Option<String>)> {
        let Some(meta) = self.inner.local(0) else {
            return Err(CoreError::NotOwned(0));
        };
        let r = &meta.retained;
        let now = self.now();
        let mut cursor = RetainedCursor::after(filter, after);
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        loop {
            if out.len() >= RETAINED_PAGE_MESSAGES {
                let next = out.last().map(|(t, _): &(String, Message)| t.clone());
                return Ok((out, next));
            }
            let Some((topic, entry)) = cursor.next(r, now) else {
                return Ok((out, None));
            };
            if let Some(m) = r.body(&topic, entry).await {
                let size = mqgate_store::wire::encoded_len(&m) + topic.len() + 16;
                if !out.is_empty() && bytes + size > RETAINED_PAGE_BYTES {
                    // The next page starts after the last one sent: this one comes first.
                    let next = out.last().map(|(t, _)| t.clone());
                    return Ok((out, next));
                }
                bytes += size;
                out.push((topic, Message::clone(&m)));
            }
        }
    }
}
