//! Endpoint policies: what the core does on its own with the messages of a consumable
//! thing (an AMQP queue, an MQTT session, a shared subscription) before and instead of
//! delivering them.
//!
//! A [`Policy`] travels with the endpoint's [`GroupSpec`](crate::GroupSpec) and is applied by
//! the group's actor:
//! - **at delivery**: a transient message stored before this broker started is skipped;
//!   an expired message (the endpoint's TTL, or the message's own `expires-at`) and a
//!   message delivered more often than the delivery limit are settled, and dead-lettered
//!   when the endpoint has a dead-letter target;
//! - **on failure** (a nack without requeue): the retry ladder, then the dead-letter
//!   target or the DLQ; or discard, or the dead-letter target;
//! - **on a sweep** ([`Broker::expire_endpoints`](crate::Broker)): expired messages at the
//!   head of an endpoint nobody consumes, as RabbitMQ expires them on time.
//!
//! A dead-lettered message's copy and the group's offset commit past it are one store
//! batch: after a crash it is in its queue or in the dead-letter target, never in
//! neither; a failed write leaves it in its queue, delivered again after a pause.

use std::sync::Arc;

use mqgate_store::{Message, Millis, QueueRef, StoredMessage, TopicName, WriteBatch};

use crate::broker::ShardCore;
use crate::error::{CoreError, Result};
use crate::props;

/// Why a message left its endpoint for a dead-letter target (RabbitMQ's reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathReason {
    /// Rejected or nacked without requeue (or out of retries).
    Rejected,
    /// Its TTL passed.
    Expired,
    /// Dropped from the head of a full queue.
    MaxLen,
    /// Delivered more often than the endpoint's delivery limit.
    DeliveryLimit,
}

impl DeathReason {
    /// RabbitMQ's name (`x-death` `reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::MaxLen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Builds the copy a dead-letter exchange receives, with the protocol's own record of the
/// death (AMQP: the `x-death` header): pure translation, supplied by the adapter that
/// declared the endpoint. Returns the copy and the routing key to publish it with.
pub trait DeadLetterFormat: Send + Sync + std::fmt::Debug {
    /// The copy of `original` for `target`.
    fn copy(
        &self,
        original: &StoredMessage,
        target: &DeadLetter,
        reason: DeathReason,
        now: Millis,
    ) -> (Message, String);

    /// Whether `copy` (made by [`DeadLetterFormat::copy`] for `reason`) routed to `topic`
    /// would close a cycle of dead-lettering with no rejection in it: that topic is left
    /// out, as RabbitMQ drops the message for such a queue (else it would go round for
    /// ever). Default: never.
    fn cycles(
        &self,
        _copy: &Message,
        _target: &DeadLetter,
        _reason: DeathReason,
        _topic: &TopicName,
    ) -> bool {
        false
    }
}

/// Where an endpoint's dead messages go: an exchange of a virtual host.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The virtual host of the exchange.
    pub vhost: String,
    /// The exchange.
    pub exchange: String,
    /// Replaces the message's routing key (`x-dead-letter-routing-key`).
    pub routing_key: Option<String>,
    /// The endpoint's name as its protocol knows it (`x-death` `queue`).
    pub endpoint: String,
    /// How the copy is made.
    pub format: Arc<dyn DeadLetterFormat>,
}

/// What the core does with an endpoint's messages before delivering them.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Messages older than this (ms since stored) are not delivered.
    pub message_ttl: Option<u64>,
    /// Deliveries after the first beyond which a message is not delivered again
    /// (RabbitMQ's `x-delivery-limit`: `limit + 1` deliveries in all). Groups with a
    /// retry ladder count failures with `max_reconsume_times` instead.
    pub delivery_limit: Option<u32>,
    /// Where dead messages go (none: they are dropped, or go to the DLQ after the retry
    /// ladder). Boxed: most endpoints have none, and every group's spec holds a policy
    /// (an idle MQTT session's group among them).
    pub dead_letter: Option<Box<DeadLetter>>,
    /// The most messages ready for delivery (`x-max-length`).
    pub max_length: Option<u64>,
    /// The most bytes of message bodies ready for delivery (`x-max-length-bytes`).
    pub max_length_bytes: Option<u64>,
    /// What a publish to a full endpoint does.
    pub overflow: Overflow,
}

/// What a publish to an endpoint at its length limit does (RabbitMQ's `x-overflow`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Store it, then drop the oldest ready messages until within the limits (dead-lettered,
    /// reason `maxlen`, when the endpoint has a target).
    #[default]
    DropHead,
    /// Leave this endpoint out of the publish; the publisher is told
    /// ([`Published::Stored`](crate::Published)'s `refused`, or `Refused`).
    RejectPublish,
    /// The same, and the refused message is dead-lettered (`maxlen`) when the endpoint
    /// has a target.
    RejectPublishDlx,
}

impl Policy {
    /// Whether the endpoint has a length limit.
    pub fn limited(&self) -> bool {
        self.max_length.is_some() || self.max_length_bytes.is_some()
    }
}

/// How long after its storing a message whose time to live was already over then
/// (TTL 0) may still go to a consumer: "at once" ([`Policy::verdict`]).
pub const IMMEDIATE_MS: Millis = 100;

/// What happens to a message about to be delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Deliver,
    /// Settled silently (a transient message from before this broker started).
    Skip,
    /// Settled, and dead-lettered when the endpoint has a target.
    Dead(DeathReason),
}

impl Policy {
    /// Whether there is anything to check at delivery (the hot path skips it otherwise,
    /// apart from the transient and `expires-at` checks every message gets).
    pub(crate) fn verdict(
        &self,
        m: &StoredMessage,
        deliveries_before: u32,
        retrying: bool,
        boot: Millis,
        now: Millis,
    ) -> Verdict {
        let p = &m.message.properties;
        if m.store_timestamp < boot && props::get(p, props::TRANSIENT).is_some() {
            return Verdict::Skip;
        }
        // A message whose time to live ran out as it was stored (AMQP's expiration "0",
        // x-message-ttl 0: "deliver now or never") goes to a consumer that can take it at
        // once, as RabbitMQ does: within IMMEDIATE_MS of its storing, the time a group
        // with credit takes to be woken and send it. One that had expired well before it
        // was stored (written again: forwarded to another shard, released late) gets no
        // such grace.
        let ts = m.store_timestamp;
        let expires = |at: Millis| {
            if at <= ts && ts - at <= IMMEDIATE_MS {
                ts.saturating_add(IMMEDIATE_MS)
            } else {
                at
            }
        };
        let expired = props::get_u64(p, props::EXPIRES_AT).is_some_and(|at| expires(at) <= now)
            || self
                .message_ttl
                .is_some_and(|ttl| expires(m.store_timestamp.saturating_add(ttl)) <= now);
        if expired {
            return Verdict::Dead(DeathReason::Expired);
        }
        if !retrying && self.delivery_limit.is_some_and(|l| deliveries_before > l) {
            return Verdict::Dead(DeathReason::DeliveryLimit);
        }
        Verdict::Deliver
    }
}

/// Add the dead-letter copy of `original` to `batch`: routed now through the target
/// exchange (a target exchange that does not exist drops it, as RabbitMQ does). Returns
/// the topics to wake once written.
pub(crate) async fn stage(
    inner: &ShardCore,
    target: &DeadLetter,
    original: &StoredMessage,
    reason: DeathReason,
    batch: &mut WriteBatch,
) -> Result<Vec<TopicName>> {
    let now = inner.clock.now();
    let (mut copy, key) = target.format.copy(original, target, reason, now);
    inner.stamp(&mut copy);
    let mut routed = match inner
        .router
        .route(&target.vhost, &target.exchange, &key, &[])
    {
        Ok(r) => r,
        Err(CoreError::NoSuchExchange(_)) => {
            tracing::info!(endpoint = %target.endpoint, exchange = %target.exchange, "core: dead-letter exchange does not exist; message dropped");
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    routed.topics.retain(|t| {
        let cycle = target.format.cycles(&copy, target, reason, t);
        if cycle {
            tracing::warn!(endpoint = %target.endpoint, topic = %t, reason = reason.as_str(), "core: dead-letter cycle without a rejection; the message is dropped for that queue");
        }
        !cycle
    });
    // Queues of other shards get it through this shard's outboxes (woken: forwarded).
    let (local, remote) = inner.split_topics(routed.topics.clone());
    let mut queues = Vec::with_capacity(local.len());
    for t in &local {
        let h = inner.topic_handle(t).await?;
        queues.push(QueueRef::new(t.clone(), h.select_for(&copy)?));
    }
    if !queues.is_empty() || !remote.is_empty() {
        crate::outbox::stage(batch, copy, queues, &remote);
    }
    Ok(routed.topics)
}

impl crate::Broker {
    /// Create an endpoint's storage: its topic with `queues` queues, and `group`'s
    /// offsets at the topic's end (a new endpoint starts empty even if a topic of that
    /// name held messages) written in one batch with the endpoint's `records`.
    pub async fn declare_endpoint(
        &self,
        topic: &TopicName,
        queues: u32,
        group: &mqgate_store::GroupName,
        records: crate::Records,
    ) -> Result<()> {
        self.create_topic(topic, Some(queues)).await?;
        let shard = self.inner.of_topic(topic)?;
        self.inner.placement.group_is_in(group, shard.id);
        let mut batch = WriteBatch::new();
        for q in 0..queues {
            let queue = QueueRef::new(topic.clone(), q);
            let start = shard.store.queue_range(&queue)?.next;
            batch.commit_offset(group.clone(), queue, start);
        }
        // The records live with the topic, in the same write; a key some other shard
        // already holds stays there (written after this batch).
        let mut here = crate::Records::new();
        let mut elsewhere = crate::Records::new();
        for (ns, key, value) in records.into_ops() {
            match self.record_shard(&ns, &key).await? {
                Some(at) if at != shard.id => elsewhere.push_op(ns, key, value),
                _ => here.push_op(ns, key, value),
            }
        }
        here.apply(&mut batch);
        shard.store.write(batch).await?;
        if !elsewhere.is_empty() {
            self.write_records(elsewhere).await?;
        }
        Ok(())
    }

    /// Delete an endpoint: its bindings in `vhost`, its group (members are told by their
    /// consumer ending), its topic and its `records`. Each step is logged and the next
    /// one still runs when one fails.
    pub async fn delete_endpoint(
        &self,
        vhost: &str,
        topic: &TopicName,
        group: &mqgate_store::GroupName,
        records: crate::Records,
    ) -> Result<()> {
        // In a cluster it runs where the endpoint's topic (and its records) are.
        let id = self.inner.placement.topic(topic);
        if let (None, Some(link)) = (self.inner.local(id), &self.inner.link) {
            let op = crate::shard::AdminOp::DeleteEndpoint {
                vhost: vhost.to_owned(),
                topic: topic.clone(),
                group: group.clone(),
                records,
            };
            return match link.admin(id, op).await? {
                crate::shard::AdminAnswer::Done => Ok(()),
                other => Err(CoreError::Store(mqgate_store::StoreError::Backend(
                    format!("the admin relay answered an endpoint's deletion with {other:?}"),
                ))),
            };
        }
        let mut first_error = None;
        let mut note = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                tracing::error!(topic = %topic, error = %e, "core: deleting an endpoint: {what}");
                first_error.get_or_insert(e);
            }
        };
        note("bindings", self.unbind_topic(vhost, topic).await);
        note("group", self.delete_group(group).await);
        note("topic", self.delete_topic(topic).await.map(|_| ()));
        note("records", self.write_endpoint_records(topic, records).await);
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(ts: Millis, expires_at: Option<Millis>) -> StoredMessage {
        let mut message = Message::new(TopicName::new("t").unwrap(), "b");
        if let Some(at) = expires_at {
            message.properties.push((
                props::EXPIRES_AT.into(),
                bytes::Bytes::copy_from_slice(&at.to_be_bytes()),
            ));
        }
        StoredMessage {
            id: mqgate_store::MessageId(1),
            store_timestamp: ts,
            size: 1,
            message,
        }
    }

    fn verdict(p: &Policy, m: &StoredMessage, now: Millis) -> Verdict {
        p.verdict(m, 0, false, 0, now)
    }

    /// A TTL that ran out as the message was stored (0, or a publish a few ms before
    /// the store) leaves IMMEDIATE_MS to deliver it; one that ran out well before its
    /// storing (a message written again, late) leaves none.
    #[test]
    fn ttl_zero_has_an_instant_and_older_expiries_none() {
        let (ts, none) = (10_000, Policy::default());
        let zero_queue = Policy {
            message_ttl: Some(0),
            ..Default::default()
        };
        for (p, m) in [
            (&none, stored(ts, Some(ts - 3))),
            (&zero_queue, stored(ts, None)),
        ] {
            assert_eq!(verdict(p, &m, ts + 50), Verdict::Deliver);
            assert_eq!(
                verdict(p, &m, ts + IMMEDIATE_MS),
                Verdict::Dead(DeathReason::Expired)
            );
        }
        let long_gone = stored(ts, Some(ts - 2_000));
        assert_eq!(
            verdict(&none, &long_gone, ts),
            Verdict::Dead(DeathReason::Expired)
        );
        let later = stored(ts, Some(ts + 500));
        assert_eq!(verdict(&none, &later, ts + 499), Verdict::Deliver);
        assert_eq!(
            verdict(&none, &later, ts + 500),
            Verdict::Dead(DeathReason::Expired)
        );
    }
}
