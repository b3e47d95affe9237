//! Length limits of endpoints (`x-max-length`, `x-max-length-bytes`, `x-overflow`),
//! applied on the publish path ([`crate::publish`]): a publish routed to a limited
//! endpoint is stored on its own, after what was published before it, so the count it
//! is checked against is exact. `reject-publish` leaves the full endpoint out (the
//! publisher is told); `drop-head` stores, then moves the endpoint's group past its
//! oldest ready messages until it is within its limits.
//!
//! An endpoint with a limit has one topic with one queue (an AMQP queue).

use mqgate_store::{QueueOffset, QueueRef, ReadLimits};

use std::sync::Arc;

use crate::broker::Inner;
use crate::group::GroupSpec;

impl Inner {
    fn limited_queue(spec: &GroupSpec) -> Option<QueueRef> {
        spec.topics.first().map(|t| QueueRef::new(t.clone(), 0))
    }

    /// Whether one more message of `size` bytes would put the endpoint over its limits.
    pub(crate) async fn is_full(&self, spec: &GroupSpec, size: u64) -> bool {
        let Ok(info) = self.group_info(&spec.name).await else {
            return false;
        };
        let ready: u64 = info.queues.iter().map(|i| i.ready).sum();
        if spec.policy.max_length.is_some_and(|max| ready >= max) {
            return true;
        }
        match spec.policy.max_length_bytes {
            Some(max) => self.tail_bytes(spec, u64::MAX).await.0 + size > max,
            None => false,
        }
    }

    /// Bytes of the endpoint's ready messages, walking back from its end while within
    /// `keep_bytes`: (bytes of all, first offset to keep).
    async fn tail_bytes(&self, spec: &GroupSpec, keep_bytes: u64) -> (u64, u64) {
        let Some(queue) = Self::limited_queue(spec) else {
            return (0, 0);
        };
        let committed = match self.group_info(&spec.name).await {
            Ok(i) => i.queues.first().map(|x| x.committed).unwrap_or(0),
            Err(_) => 0,
        };
        let mut sizes = Vec::new();
        let mut from = committed;
        loop {
            let Ok(batch) = self
                .store
                .read(&queue, QueueOffset(from), ReadLimits::count(1024))
                .await
            else {
                break;
            };
            let Some(last) = batch.last() else { break };
            from = last.entry.offset.0 + 1;
            sizes.extend(
                batch
                    .iter()
                    .map(|m| (m.entry.offset.0, m.message.message.body.len() as u64)),
            );
        }
        let total = sizes.iter().map(|s| s.1).sum();
        let mut kept = 0u64;
        let mut first = from;
        for (o, s) in sizes.iter().rev() {
            if kept + s > keep_bytes {
                break;
            }
            kept += s;
            first = *o;
        }
        (total, first)
    }

    /// Drop the oldest ready messages of a `drop-head` endpoint until it is within its
    /// limits: its group (started for the purpose when it has no members) drops them,
    /// dead-lettering them (`maxlen`) when the endpoint has a target; messages in flight
    /// stay.
    pub(crate) async fn trim(self: &Arc<Self>, spec: &GroupSpec) {
        let Ok(info) = self.group_info(&spec.name).await else {
            return;
        };
        let Some(i) = info.queues.first() else { return };
        let mut target = i.committed;
        if let Some(max) = spec.policy.max_length {
            if i.ready > max {
                target = target.max(i.next - max);
            }
        }
        if let Some(max) = spec.policy.max_length_bytes {
            let (total, first) = self.tail_bytes(spec, max).await;
            if total > max {
                target = target.max(first);
            }
        }
        if target > i.committed {
            let Some(queue) = Self::limited_queue(spec) else {
                return;
            };
            match self.live_group(spec).await {
                Ok(g) => g.drop_below(queue, target).await,
                Err(e) => {
                    tracing::warn!(group = %spec.name, error = %e, "core: length limit: dropping the head failed")
                }
            }
        }
    }
}
