//! Retry and dead-letter topics (RocketMQ's `%RETRY%<group>` and `%DLQ%<group>`).
//!
//! A failed consumption stores a copy of the message as a timer, due after the delay of
//! level `retry_first_level + reconsume_times` (10s, 30s, 1m, 2m, ... 2h), routed to the
//! group's retry topic, which the group consumes along with its own topics. The copy's
//! reconsume count is one higher. Once a message has failed `max_reconsume_times` times
//! it is appended to the group's DLQ topic instead, where it keeps its original topic,
//! properties and failure count, and can be listed and resent.

use bytes::Bytes;
use mqgate_store::{GroupName, Message, Millis, QueueRef, TopicName, WriteBatch};

use crate::broker::{encode_timer, Inner, Route};
use crate::error::Result;

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

/// `%DLQ%<group>`.
pub fn dlq_topic(group: &GroupName) -> Result<TopicName> {
    Ok(TopicName::new(format!("%DLQ%{group}"))?)
}

/// Whether a topic is a retry or dead-letter topic (one queue, created on demand).
pub fn is_system_topic(t: &TopicName) -> bool {
    t.as_str().starts_with("%RETRY%") || t.as_str().starts_with("%DLQ%")
}

fn set_property(m: &mut Message, name: &str, value: Bytes) {
    match m.properties.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => *v = value,
        None => m.properties.push((name.to_owned(), value)),
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
    inner: &Inner,
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
    inner: &Inner,
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
