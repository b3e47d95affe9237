//! Settling deliveries: acks, failures (retry, dead-letter, DLQ), expiry sweeps.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mqgate_store::{Millis, QueueOffset, QueueRef, StoredMessage, TopicName, WriteBatch};

use super::actor::{Actor, Dying, InFlight, Pending, EXPIRE_SWEEP_MAX, FAILED_WRITE_PAUSE_MS};
use super::{AckToken, OnFailure};
use crate::endpoint::{self, DeathReason, Verdict};
use crate::error::Result;

impl Actor {
    /// Remove a delivery from flight (ack or nack). Returns it if the token was current.
    pub(super) fn settle(&mut self, member: &str, token: &AckToken) -> Option<InFlight> {
        let q = self.cursor_mut(member, &token.queue)?;
        match q.in_flight.get(&token.offset) {
            Some(f) if f.token == token.token => {}
            _ => return None,
        }
        let f = q.in_flight.remove(&token.offset)?;
        if let Some(m) = self.members.get_mut(&f.member) {
            m.settled(1, &self.wake);
        }
        Some(f)
    }

    pub(super) async fn failed(
        &mut self,
        member: &str,
        queue: QueueRef,
        offset: u64,
        f: InFlight,
        requeue: bool,
    ) {
        let orderly = self.spec.orderly;
        let now = self.inner.clock.now();
        let suspend = self.inner.config.orderly_suspend.as_millis() as u64;
        let max = self.max_reconsume;
        let attempts = f.message.message.reconsume_times + f.count;
        if requeue || (orderly && attempts <= max) {
            let Some(q) = self.cursor_mut(member, &queue) else {
                return;
            };
            if orderly && !requeue {
                q.suspended_until = now + suspend;
            }
            q.redeliver.insert(
                offset,
                Pending {
                    message: f.message,
                    count: f.count,
                },
            );
            return;
        }
        // The failure's effect (a retry timer, the DLQ, the dead-letter target) and the
        // commit of the offset past the message go in one store batch.
        let mut batch = WriteBatch::new();
        let (wake, timer, dlq) = match self.stage_failure(&f, &queue, attempts, &mut batch).await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(group = %self.spec.name, error = %e, "core: failed message could not be staged; redelivering");
                self.put_back(member, &queue, vec![(offset, f.message, f.count)], now);
                return;
            }
        };
        if batch.is_empty() {
            // Discarded: nothing to store; the commit follows with the next tick.
            return;
        }
        match self.write_with_commit(member, &queue, batch).await {
            Ok(()) => {
                if let Some(due) = timer {
                    self.inner.timer_added(due);
                    self.inner.retries.fetch_add(1, Ordering::Relaxed);
                } else if dlq || !wake.is_empty() {
                    self.inner.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                for t in &wake {
                    self.inner.wake_topic(t);
                }
            }
            Err(e) => {
                // Could not store it: deliver it again rather than lose it.
                tracing::error!(group = %self.spec.name, error = %e, "core: retry/dead-letter write failed; redelivering");
                self.put_back(member, &queue, vec![(offset, f.message, f.count)], now);
            }
        }
    }

    /// Add what a failed message becomes to `batch`: the next retry (a timer), its
    /// dead-letter copy, its DLQ copy, or nothing (discarded). Returns the topics to wake,
    /// the retry's due time, and whether it went to the DLQ.
    async fn stage_failure(
        &self,
        f: &InFlight,
        queue: &QueueRef,
        attempts: u32,
        batch: &mut WriteBatch,
    ) -> Result<(Vec<TopicName>, Option<Millis>, bool)> {
        let orderly = self.spec.orderly;
        let retrying = self.spec.on_failure == OnFailure::Retry && !orderly;
        let m = &f.message.message;
        let group = &self.spec.name;
        if retrying && m.reconsume_times < self.max_reconsume {
            let due = crate::retry::stage_retry(&self.inner, group, m, queue, batch)?;
            return Ok((Vec::new(), Some(due), false));
        }
        if let Some(dl) = &self.spec.policy.dead_letter {
            let wake =
                endpoint::stage(&self.inner, dl, &f.message, DeathReason::Rejected, batch).await?;
            return Ok((wake, None, false));
        }
        if retrying || orderly {
            let failures = if orderly {
                attempts
            } else {
                m.reconsume_times + 1
            };
            let t = crate::retry::stage_dlq(&self.inner, group, m, queue, failures, batch).await?;
            return Ok((vec![t], None, true));
        }
        Ok((Vec::new(), None, false))
    }

    /// Write `batch` together with the commit of `queue`'s offset (what was settled
    /// before it is written is past the commit): both, or neither. The group's other
    /// starts not stored yet go with them ([`Actor::unstored_starts`]).
    async fn write_with_commit(
        &mut self,
        member: &str,
        queue: &QueueRef,
        mut batch: WriteBatch,
    ) -> Result<()> {
        let group = self.offsets_group(Some(member));
        let committed = self.cursor_mut(member, queue).map(|q| q.committed());
        if let Some(c) = committed {
            batch.commit_offset(group.clone(), queue.clone(), QueueOffset(c));
        }
        // A message held below a reset's floor is settled by its record, which goes in
        // the same write (a dead-lettered one must not come back after a crash).
        let held = self
            .cursor_mut(member, queue)
            .and_then(|q| super::actor::held_settled(q))
            .filter(|_| self.topic_lives(queue));
        if let Some((value, _)) = &held {
            batch.kv_put(
                super::marks::DELIVERED_NS,
                super::marks::delivered_key(&group, queue),
                value.clone(),
            );
        }
        let mut starts = self.unstored_starts(member);
        starts.retain(|(q, _)| q != queue);
        for (q, start) in &starts {
            batch.commit_offset(group.clone(), q.clone(), QueueOffset(*start));
        }
        self.inner.store.write(batch).await?;
        if let (Some(c), Some(q)) = (committed, self.cursor_mut(member, queue)) {
            q.persisted = Some(c);
            q.unstored = false;
            if let Some((_, n)) = held {
                q.held_stored = n;
            }
        }
        self.starts_stored(member, &starts);
        Ok(())
    }

    /// Messages whose settlement could not be stored go back to be delivered again,
    /// after a pause (a store that fails now would fail again at once).
    /// A delivery that never reached its member's client: delivered again, the
    /// delivery not counted.
    pub(super) fn released(&mut self, member: &str, queue: &QueueRef, offset: u64, f: InFlight) {
        if let Some(q) = self.cursor_mut(member, queue) {
            q.redeliver.insert(
                offset,
                Pending {
                    message: f.message,
                    count: f.count.saturating_sub(1),
                },
            );
        }
    }

    fn put_back(
        &mut self,
        member: &str,
        queue: &QueueRef,
        msgs: Vec<(u64, Arc<StoredMessage>, u32)>,
        now: Millis,
    ) {
        if let Some(q) = self.cursor_mut(member, queue) {
            for (offset, message, count) in msgs {
                q.redeliver.insert(offset, Pending { message, count });
            }
            q.suspended_until = q.suspended_until.max(now + FAILED_WRITE_PAUSE_MS);
        }
    }

    /// Dead-letter what the policy settled at delivery, with the commit past it, in one
    /// batch.
    pub(super) async fn flush_dying(&mut self, member: &str, queue: &QueueRef, dying: Vec<Dying>) {
        let Some(dl) = self.spec.policy.dead_letter.clone() else {
            return;
        };
        if dying.is_empty() {
            return;
        }
        let mut batch = WriteBatch::new();
        let mut wake = Vec::new();
        let mut result = Ok(());
        for d in &dying {
            match endpoint::stage(&self.inner, &dl, &d.message, d.reason, &mut batch).await {
                Ok(t) => wake.extend(t),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.write_with_commit(member, queue, batch).await;
        }
        match result {
            Ok(()) => {
                self.inner
                    .dead_lettered
                    .fetch_add(dying.len() as u64, Ordering::Relaxed);
                wake.sort();
                wake.dedup();
                for t in &wake {
                    self.inner.wake_topic(t);
                }
            }
            Err(e) => {
                tracing::error!(group = %self.spec.name, error = %e, "core: dead-letter write failed; the messages stay in their queue");
                let now = self.inner.clock.now();
                let back = dying
                    .into_iter()
                    .map(|d| (d.offset, d.message, d.count))
                    .collect();
                self.put_back(member, queue, back, now);
            }
        }
    }

    /// Settle expired messages at the head of each queue's undelivered part (the sweep
    /// for endpoints with a TTL, consumed or not).
    /// Settle expired messages at the heads of the queues; whether a head left may
    /// still expire later (it carries its own expiry, or the group has a message TTL).
    pub(super) async fn expire_heads(&mut self) -> bool {
        if self.broadcast() {
            return false;
        }
        let mut pending = self.spec.policy.message_ttl.is_some();
        let now = self.inner.clock.now();
        let boot = self.inner.boot;
        let queues: Vec<QueueRef> = self.queues.keys().cloned().collect();
        for queue in queues {
            let mut dying = Vec::new();
            for _ in 0..EXPIRE_SWEEP_MAX {
                let verdict = {
                    let Some(q) = self.queues.get(&queue) else {
                        break;
                    };
                    if now < q.suspended_until {
                        pending = true;
                        break;
                    }
                    let head = match q.redeliver.first_key_value() {
                        Some((_, p)) => Some((&p.message, p.count)),
                        None => q.buffer.front().map(|m| (&m.message, 0)),
                    };
                    match head {
                        Some((m, count)) => {
                            let v = self
                                .spec
                                .policy
                                .verdict(m, count, self.retrying(), boot, now);
                            if matches!(v, Verdict::Deliver)
                                && crate::props::get(
                                    &m.message.properties,
                                    crate::props::EXPIRES_AT,
                                )
                                .is_some()
                            {
                                pending = true;
                            }
                            Some(v)
                        }
                        None => None,
                    }
                };
                match verdict {
                    None => {
                        if !self.fill("", &queue, self.inner.config.read_batch).await {
                            break;
                        }
                    }
                    Some(Verdict::Deliver) => break,
                    Some(v) => {
                        let q = self.queues.get_mut(&queue).expect("listed");
                        let (offset, message, count) = match q.redeliver.pop_first() {
                            Some((o, p)) => (o, p.message, p.count),
                            None => match q.buffer.pop_front() {
                                Some(m) => (m.entry.offset.0, m.message, 0),
                                None => break,
                            },
                        };
                        if let Verdict::Dead(reason) = v {
                            dying.push(Dying {
                                offset,
                                message,
                                count,
                                reason,
                            });
                        }
                    }
                }
            }
            self.flush_dying("", &queue, dying).await;
        }
        pending
    }

    pub(super) fn retrying(&self) -> bool {
        self.spec.on_failure == OnFailure::Retry
    }
}
