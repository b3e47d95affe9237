//! Length limits as the group sees them: what is *ready* (redeliveries, the read-ahead,
//! unread messages; never what is in flight, as RabbitMQ counts) and dropping the oldest
//! ready messages of a `drop-head` endpoint.

use mqgate_store::{QueueOffset, QueueRef, ReadLimits};

use super::actor::{Actor, Dying};
use crate::endpoint::DeathReason;

/// The most messages one trim drops (a trim follows each publish to a full endpoint, so
/// it usually drops one).
const MAX_DROP: usize = 10_000;

impl Actor {
    /// Ready messages over the group's queues and, when `with_bytes`, their body bytes
    /// (unread ones read from the store: an endpoint with a byte limit holds little).
    pub(super) async fn ready(&mut self, with_bytes: bool) -> (u64, u64) {
        let queues: Vec<QueueRef> = self.queues.keys().cloned().collect();
        let (mut count, mut bytes) = (0, 0);
        for q in queues {
            let (c, b) = self.queue_ready(&q, with_bytes).await;
            count += c;
            bytes += b;
        }
        (count, bytes)
    }

    async fn queue_ready(&mut self, queue: &QueueRef, with_bytes: bool) -> (u64, u64) {
        let next = self
            .inner
            .store
            .queue_range(queue)
            .map(|r| r.next.0)
            .unwrap_or(0);
        let Some(q) = self.queues.get(queue) else {
            return (0, 0);
        };
        let count = next.saturating_sub(q.read) + (q.buffer.len() + q.redeliver.len()) as u64;
        if !with_bytes {
            return (count, 0);
        }
        let mut bytes: u64 = q
            .redeliver
            .values()
            .map(|p| p.message.message.body.len() as u64)
            .chain(q.buffer.iter().map(|m| m.message.message.body.len() as u64))
            .sum();
        let mut from = q.read;
        while from < next {
            match self
                .inner
                .store
                .read(queue, QueueOffset(from), ReadLimits::count(1024))
                .await
            {
                Ok(page) if !page.is_empty() => {
                    from = page.last().map_or(next, |m| m.entry.offset.0 + 1);
                    bytes += page
                        .iter()
                        .map(|m| m.message.message.body.len() as u64)
                        .sum::<u64>();
                }
                _ => break,
            }
        }
        (count, bytes)
    }

    /// Drop the oldest ready messages (lowest offsets first) until at most `max_len`
    /// messages and `max_bytes` body bytes are ready. With a dead-letter target they are
    /// dead-lettered (`maxlen`) in one batch with the commit past them, else the commit
    /// is written at once.
    pub(super) async fn trim(&mut self, max_len: Option<u64>, max_bytes: Option<u64>) {
        if self.broadcast() || (max_len.is_none() && max_bytes.is_none()) {
            return;
        }
        let dead = self.spec.policy.dead_letter.is_some();
        let queues: Vec<QueueRef> = self.queues.keys().cloned().collect();
        for queue in queues {
            let (mut count, mut bytes) = self.queue_ready(&queue, max_bytes.is_some()).await;
            let over =
                |c: u64, b: u64| max_len.is_some_and(|m| c > m) || max_bytes.is_some_and(|m| b > m);
            let mut dying = Vec::new();
            let mut dropped = 0usize;
            while over(count, bytes) && dropped < MAX_DROP {
                let Some(q) = self.queues.get_mut(&queue) else {
                    break;
                };
                let redeliver_first = match (q.redeliver.first_key_value(), q.buffer.front()) {
                    (Some((o, _)), Some(m)) => *o < m.entry.offset.0,
                    (Some(_), None) => true,
                    _ => false,
                };
                let head = if redeliver_first {
                    q.redeliver
                        .pop_first()
                        .map(|(o, p)| (o, p.message, p.count))
                } else {
                    q.buffer
                        .pop_front()
                        .map(|m| (m.entry.offset.0, m.message, 0))
                };
                let Some((offset, message, count_before)) = head else {
                    let want = self.inner.config.read_batch;
                    if !self.fill("", &queue, want).await {
                        break;
                    }
                    continue;
                };
                count = count.saturating_sub(1);
                bytes = bytes.saturating_sub(message.message.body.len() as u64);
                dropped += 1;
                if dead {
                    dying.push(Dying {
                        offset,
                        message,
                        count: count_before,
                        reason: DeathReason::MaxLen,
                    });
                }
            }
            if dropped == 0 {
                continue;
            }
            tracing::debug!(group = %self.spec.name, queue = %queue, dropped, "core: length limit: head dropped");
            if dead {
                self.flush_dying("", &queue, dying).await;
            } else {
                self.commit().await;
            }
        }
    }
}
