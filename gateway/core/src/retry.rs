//! Retry and dead-letter topics (RocketMQ's `%RETRY%<group>` and `%DLQ%<group>`).
//!
//! A failed consumption stores a copy of the message as a timer, due after the delay of
//! level `retry_first_level + reconsume_times` (10s, 30s, 1m, 2m, ... 2h), routed to the
//! group's retry topic, which the group consumes along with its own topics. The copy's
//! reconsume count is one higher. Once a message has failed `max_reconsume_times` times
//! it is appended to the group's DLQ topic instead, where it keeps its original topic,
//! properties and failure count, and can be listed and resent.

use bytes::Bytes;
use mqgate_store::{GroupName, Message, Millis, QueueOffset, QueueRef, TopicName, WriteBatch};

use crate::broker::ShardCore;
use crate::delay::{encode_timer, Route};
use std::sync::atomic::Ordering;

use crate::error::{CoreError, Result};
use crate::publish::{Outgoing, PublishBatch, Published};

/// The property naming the topic a retried or dead-lettered message was first consumed from.
pub const PROP_ORIGIN_QUEUE: &str = "ORIGIN_QUEUE";
/// The property holding the id of the message whose consumption failed first.
pub const PROP_ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";
/// The property counting failures when a message was dead-lettered.
pub const PROP_DLQ_FAILURES: &str = "DLQ_FAILURES";

/// `%RETRY%<group>`.
pub fn retry_topic(group: &GroupName) -> Result<TopicName> {
    Ok(TopicName::new(format!("%RETRY%{group}"))?)
}

/// Whether a reset of `group` to `to` moves `queue`: a replay moves the group on the
/// topics it consumes, not on its retry topic, whose messages are failures waiting for
/// their retry, not part of the timeline being replayed (RocketMQ resets the topic it is
/// asked to; `%RETRY%` is another). A reset to `Last` (AMQP's queue.purge, and
/// `x-stream-offset: next`: skip what is waiting) moves it too: what is due again is
/// ready, and goes with the rest.
pub(crate) fn reset_moves(group: &GroupName, to: &crate::StartPosition, queue: &QueueRef) -> bool {
    matches!(to, crate::StartPosition::Last)
        || retry_topic(group).map_or(true, |r| queue.topic != r)
}

/// `%DLQ%<group>`.
pub fn dlq_topic(group: &GroupName) -> Result<TopicName> {
    Ok(TopicName::new(format!("%DLQ%{group}"))?)
}

/// Whether a topic is a retry or dead-letter topic (one queue, created on demand).
pub fn is_system_topic(t: &TopicName) -> bool {
    t.as_str().starts_with("%RETRY%") || t.as_str().starts_with("%DLQ%")
}

fn set_property(m: &mut Message, name: &'static str, value: Bytes) {
    match m.properties.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => *v = value,
        None => m.properties.push((name.into(), value)),
    }
}

fn tagged(original: &Message, queue: &QueueRef) -> Message {
    let mut m = original.clone();
    if m.property(PROP_ORIGIN_QUEUE).is_none() {
        set_property(&mut m, PROP_ORIGIN_QUEUE, Bytes::from(queue.to_string()));
    }
    m
}

/// A consumption of `original` (read from `queue`) failed and is retried: add to
/// `batch` a timer for the copy with one more failure, due after the next step of the
/// ladder, routed to the group's retry topic. Returns the due time.
pub(crate) fn stage_retry(
    inner: &ShardCore,
    group: &GroupName,
    original: &Message,
    queue: &QueueRef,
    batch: &mut WriteBatch,
) -> Result<Millis> {
    let failures = original.reconsume_times + 1;
    let mut m = tagged(original, queue);
    m.reconsume_times = failures;
    let delay = inner.config.retry_delay(original.reconsume_times);
    let due = inner.clock.now() + delay.as_millis() as u64;
    let route = Route::Topic {
        topic: retry_topic(group)?,
        queue: Some(0),
        sharding_key: None,
    };
    tracing::debug!(group = %group, failures, ?delay, "core: consumption failed; retry scheduled");
    batch.timer_put(due, encode_timer(&route, &m)?);
    Ok(due)
}

/// Add to `batch` the append of `original` to the group's DLQ topic (created on demand).
/// Returns the DLQ topic.
pub(crate) async fn stage_dlq(
    inner: &ShardCore,
    group: &GroupName,
    original: &Message,
    queue: &QueueRef,
    failures: u32,
    batch: &mut WriteBatch,
) -> Result<TopicName> {
    let topic = dlq_topic(group)?;
    inner.topic_handle(&topic).await?;
    let mut m = tagged(original, queue);
    m.reconsume_times = failures;
    set_property(&mut m, PROP_DLQ_FAILURES, Bytes::from(failures.to_string()));
    tracing::info!(group = %group, failures, "core: message moved to the DLQ");
    batch.append(m, vec![QueueRef::new(topic.clone(), 0)]);
    Ok(topic)
}

/// The message as it was first published, for a resend from the DLQ.
pub(crate) fn restore_original(m: &Message) -> Message {
    let mut out = m.clone();
    out.reconsume_times = 0;
    out.properties.retain(|(k, _)| {
        k != PROP_ORIGIN_QUEUE && k != PROP_DLQ_FAILURES && k != PROP_ORIGIN_MESSAGE_ID
    });
    out
}

impl crate::Broker {
    /// Messages of a group's dead-letter topic, oldest first, from `from`.
    pub async fn dlq(
        &self,
        group: &GroupName,
        from: u64,
        limit: usize,
    ) -> Result<Vec<mqgate_store::QueueMessage>> {
        let q = QueueRef::new(crate::retry::dlq_topic(group)?, 0);
        if let Ok(shard) = self.inner.of_topic(&q.topic) {
            if shard.store.topic(&q.topic).is_none() {
                return Ok(Vec::new());
            }
        }
        // Where the group lives, wherever that is owned.
        match self
            .peek(
                &q,
                QueueOffset(from),
                mqgate_store::ReadLimits::count(limit),
            )
            .await
        {
            Err(CoreError::NoSuchTopic(_)) => Ok(Vec::new()),
            r => r,
        }
    }

    /// Send a dead-lettered message back to the queue it failed in (reconsume count reset).
    pub async fn resend_dlq(&self, group: &GroupName, offset: u64) -> Result<Published> {
        let msgs = self.dlq(group, offset, 1).await?;
        let m = msgs
            .into_iter()
            .find(|m| m.entry.offset.0 == offset)
            .ok_or_else(|| CoreError::Invalid(format!("no DLQ message at offset {offset}")))?;
        let mut r = self.resend_messages(vec![m]).await?;
        r.pop()
            .flatten()
            .ok_or_else(|| CoreError::Invalid("resend stored nothing".into()))
    }

    /// Resend up to `limit` DLQ messages from offset `from` in one store write (one
    /// fsync): what a bulk resend pages through. Returns how many and the last offset.
    pub async fn resend_dlq_page(
        &self,
        group: &GroupName,
        from: u64,
        limit: usize,
    ) -> Result<(usize, Option<u64>)> {
        let msgs = self.dlq(group, from, limit).await?;
        let last = msgs.last().map(|m| m.entry.offset.0);
        let n = msgs.len();
        self.resend_messages(msgs).await?;
        Ok((n, last))
    }

    /// Publish DLQ messages again, each back to the queue it failed in: its topic is the
    /// message's address for RocketMQ topics, but not for AMQP queues or MQTT sessions,
    /// whose messages keep the address they were published to.
    async fn resend_messages(
        &self,
        msgs: Vec<mqgate_store::QueueMessage>,
    ) -> Result<Vec<Option<Published>>> {
        let mut items = Vec::with_capacity(msgs.len());
        for m in msgs {
            let stored = &m.message.message;
            let origin = stored
                .property(crate::retry::PROP_ORIGIN_QUEUE)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.rsplit_once('#'))
                .and_then(|(t, _)| TopicName::new(t).ok());
            let message = crate::retry::restore_original(stored);
            let topic = origin.unwrap_or_else(|| message.topic.clone());
            self.inner.of_topic(&topic)?.topic_handle(&topic).await?;
            items.push((message, vec![topic]));
        }
        let mut batch = PublishBatch::new();
        for (message, topic) in items {
            batch.push(Outgoing::routed(message, topic));
        }
        self.publish_batch(batch).await
    }

    /// Failed consumptions scheduled for a retry so far by this process.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// Messages moved to a dead-letter queue so far by this process.
    pub fn dead_lettered(&self) -> u64 {
        self.inner.dead_lettered.load(Ordering::Relaxed)
    }
}
