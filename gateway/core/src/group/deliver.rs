//! Delivery: reading queues into members' credit.

use std::sync::Arc;

use mqgate_store::{QueueOffset, QueueRef, ReadLimits};

use super::actor::{Actor, Dying, InFlight, Member, MemberId, Pending, Target};
use super::marks::DELIVERED_STRIDE;
use super::Delivery;
use crate::endpoint::Verdict;

/// The fewest messages a read asks for, whatever the credit.
const READ_AHEAD: usize = 64;
/// About the most bytes one read takes (the first message always comes).
const READ_AHEAD_BYTES: usize = 1 << 20;

impl Actor {
    /// Deliver as much as members have credit for.
    pub(super) async fn pump(&mut self) {
        loop {
            let mut progress = false;
            if self.broadcast() {
                let ids: Vec<MemberId> = self.members.keys().cloned().collect();
                for id in ids {
                    let queues: Vec<QueueRef> = self.members[&id].cursors.keys().cloned().collect();
                    for q in queues {
                        progress |= self.pump_queue(&q, Target::Member(id.clone())).await;
                    }
                }
            } else {
                let queues: Vec<QueueRef> = self.queues.keys().cloned().collect();
                for q in queues {
                    let target = match (self.owned(), &self.queues[&q].owner) {
                        (true, Some(o)) => Target::Owner(o.clone()),
                        (true, None) => continue,
                        (false, _) => Target::AnyWithCredit,
                    };
                    progress |= self.pump_queue(&q, target).await;
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// The member the next message goes to, and for round robin its position. It does
    /// not move the round robin: only a message actually sent does (`pump_queue`), so
    /// looking for work in an empty queue (or the retry queue) never skips a member.
    fn pick(&self, target: &Target) -> Option<(MemberId, Option<usize>)> {
        match target {
            Target::Owner(id) | Target::Member(id) => self
                .members
                .get(id)
                .filter(|m| m.credit() > 0)
                .map(|_| (id.clone(), None)),
            Target::AnyWithCredit => {
                let n = self.members.len();
                (0..n).find_map(|k| {
                    let i = (self.rr + k) % n;
                    let (id, m) = self.members.iter().nth(i).expect("in range");
                    (m.credit() > 0).then(|| (id.clone(), Some(i)))
                })
            }
        }
    }

    /// Deliver from one queue (at most one read batch per call, for fairness).
    async fn pump_queue(&mut self, queue: &QueueRef, target: Target) -> bool {
        // Broadcast: the member whose cursor is read (clustering: none).
        let owner = match &target {
            Target::Member(id) => Some(MemberId::clone(id)),
            _ => None,
        };
        let owner_key = owner.as_deref().unwrap_or("");
        let mut dying = Vec::new();
        let delivered = self
            .pump_queue_into(queue, target, owner_key, &mut dying)
            .await;
        let progress = delivered || !dying.is_empty();
        self.flush_dying(owner_key, queue, dying).await;
        progress
    }

    async fn pump_queue_into(
        &mut self,
        queue: &QueueRef,
        target: Target,
        owner_key: &str,
        dying: &mut Vec<Dying>,
    ) -> bool {
        let orderly = self.spec.orderly;
        let now = self.inner.clock.now();
        let boot = self.inner.boot;
        let retrying = self.retrying();
        let mut delivered = false;
        // Read ahead but deleted by retention since: skipped, as if never read.
        if let Ok(range) = self.inner.store.queue_range(queue) {
            let mut dropped = 0u64;
            if let Some(q) = self.cursor_mut(owner_key, queue) {
                while q
                    .buffer
                    .front()
                    .is_some_and(|m| m.entry.offset.0 < range.min.0)
                {
                    q.buffer.pop_front();
                    dropped += 1;
                }
            }
            if dropped > 0 {
                self.skipped += dropped;
                tracing::warn!(group = %self.spec.name, queue = %queue, lost = dropped, "core: group fell behind retention");
            }
        }
        for _ in 0..self.inner.config.read_batch {
            {
                let Some(q) = self.cursor_mut(owner_key, queue) else {
                    return delivered;
                };
                if now < q.suspended_until || (orderly && !q.in_flight.is_empty()) {
                    break;
                }
            }
            let Some((member, position)) = self.pick(&target) else {
                break;
            };
            // Next message: redeliveries first (offset order), then the read-ahead (its
            // entry kept, to put it back if a shared credit pool has run dry).
            let next = {
                let q = self.cursor_mut(owner_key, queue).expect("checked");
                let seen = q.seen;
                match q.redeliver.pop_first() {
                    Some((offset, p)) => Some((offset, p.message, p.count, true, None)),
                    // Below the delivered mark of before this actor: delivered then,
                    // perhaps (a restart, a crash, the shard moved).
                    None => q.buffer.pop_front().map(|m| {
                        let offset = m.entry.offset.0;
                        (offset, m.message, 0, offset < seen, Some(m.entry))
                    }),
                }
            };
            let (offset, message, count, redelivered, entry) = match next {
                Some((offset, message, count, redelivered, entry)) => {
                    match self
                        .spec
                        .policy
                        .verdict(&message, count, retrying, boot, now)
                    {
                        Verdict::Deliver => (offset, message, count, redelivered, entry),
                        Verdict::Skip => {
                            delivered = true;
                            continue;
                        }
                        Verdict::Dead(reason) => {
                            if self.spec.policy.dead_letter.is_some() {
                                dying.push(Dying {
                                    offset,
                                    message,
                                    count,
                                    reason,
                                });
                            } else {
                                delivered = true;
                            }
                            continue;
                        }
                    }
                }
                None => {
                    // Read only what members can take now: the backlog stays in the store.
                    let credit = match &target {
                        Target::Owner(id) | Target::Member(id) => {
                            self.members.get(id).map_or(0, Member::credit)
                        }
                        Target::AnyWithCredit => self.members.values().map(Member::credit).sum(),
                    };
                    if !self.fill(owner_key, queue, credit).await {
                        break;
                    }
                    continue;
                }
            };
            // The delivered mark goes ahead of what is delivered, a stride at a time, so a
            // restart knows what may have been delivered (`DELIVERED_NS`).
            let (marked, unstored) = self
                .cursor_mut(owner_key, queue)
                .map_or((u64::MAX, false), |q| (q.marked, q.unstored));
            if offset >= marked {
                let mark = offset + DELIVERED_STRIDE;
                let group = self.offsets_group(self.broadcast().then_some(owner_key));
                // The first delivery stores every start not stored yet, this queue's
                // and its siblings'.
                let starts = if unstored {
                    self.unstored_starts(owner_key)
                } else {
                    Vec::new()
                };
                // What is held below the floor goes with every mark, dead messages whose
                // dead-letter copy is not written yet (`flush_dying`, after this loop)
                // among them: still owed until it is.
                let held = self
                    .cursor_mut(owner_key, queue)
                    .map_or_else(Vec::new, |q| {
                        let mut held = q.held();
                        let before = held.len();
                        held.extend(dying.iter().map(|d| d.offset).filter(|o| *o < q.floor));
                        if held.len() > before {
                            held.sort_unstable();
                        }
                        held
                    });
                // A mark that cannot be written (a full disk) does not hold deliveries
                // back: consumers drain a degraded store; this stride goes unmarked.
                let written = self
                    .write_delivered_mark(&group, queue, mark, &held, &starts)
                    .await;
                if written {
                    self.starts_stored(owner_key, &starts);
                }
                let q = self.cursor_mut(owner_key, queue).expect("checked");
                q.marked = mark;
                if written {
                    q.held_stored = super::marks::held_count(&held);
                }
            }
            // A unit of a shared credit pool (AMQP's global prefetch), taken only now, when
            // the message is going out: the pool is shared with groups whose actors run on
            // other threads, and a unit taken and given back would wake them all for
            // nothing. None left (another group took the last one since `pick`): the
            // message goes back where it was and the next `pick` sees the pool empty (so
            // another member may take it); this group is woken when units return.
            if !self.take_pool_unit(&member) {
                let q = self.cursor_mut(owner_key, queue).expect("checked");
                q.put_back(offset, message, count, entry);
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            let delivery = Delivery {
                queue: queue.clone(),
                offset: QueueOffset(offset),
                message: Arc::clone(&message),
                redelivered,
                delivery_count: count + 1,
                token,
            };
            let m = self.members.get_mut(&member).expect("picked");
            if m.tx.send(delivery).is_err() {
                // The consumer is being dropped: the message goes back as it was, and
                // nothing more goes to the member. It leaves with the leave its
                // consumer sends after giving back what its mailbox held (a leave
                // sent from here went ahead of those, and they came back counted as
                // deliveries).
                if let Some(p) = &m.pool {
                    p.release(1, Some(&self.wake));
                }
                m.closed.get_or_insert_with(std::time::Instant::now);
                let q = self.cursor_mut(owner_key, queue).expect("checked");
                q.redeliver.insert(offset, Pending { message, count });
                continue;
            }
            m.delivered();
            if let Some(i) = position {
                self.rr = i + 1;
            }
            let q = self.cursor_mut(owner_key, queue).expect("checked");
            q.delivered_end = q.delivered_end.max(offset + 1);
            q.in_flight.insert(
                offset,
                InFlight {
                    token,
                    member,
                    count: count + 1,
                    message,
                },
            );
            delivered = true;
        }
        delivered
    }

    /// Take a unit of `member`'s credit pool, if it has one; false if none is free.
    fn take_pool_unit(&self, member: &str) -> bool {
        self.members
            .get(member)
            .and_then(|m| m.pool.as_ref())
            .is_none_or(|p| p.try_take())
    }

    /// Read the next messages of `queue` into its buffer: `want`, but at least
    /// [`READ_AHEAD`] (at most `read_batch`, and about [`READ_AHEAD_BYTES`] beyond the
    /// first), so a consumer acking one message at a time does not cost one store read
    /// (an iterator) per message. Returns whether anything changed.
    pub(super) async fn fill(&mut self, member: &str, queue: &QueueRef, want: usize) -> bool {
        let limits = ReadLimits {
            max_count: self
                .inner
                .config
                .read_batch
                .min(want.max(READ_AHEAD))
                .max(1),
            max_bytes: READ_AHEAD_BYTES,
        };
        let store = Arc::clone(&self.inner.store);
        let Ok(range) = store.queue_range(queue) else {
            return false;
        };
        let Some(q) = self.cursor_mut(member, queue) else {
            return false;
        };
        if q.read < range.min.0 {
            // Retention deleted what this group had not read yet: continue from the new
            // start, and count the loss.
            let lost = range.min.0 - q.read;
            q.read = range.min.0;
            self.skipped += lost;
            tracing::warn!(group = %self.spec.name, queue = %queue, lost, "core: group fell behind retention");
            return true;
        }
        if q.read >= range.next.0 {
            return false;
        }
        let from = QueueOffset(q.read);
        match store.read(queue, from, limits).await {
            Ok(msgs) if !msgs.is_empty() => {
                let q = self.cursor_mut(member, queue).expect("exists");
                q.read = msgs.last().map_or(q.read, |m| m.entry.offset.0 + 1);
                q.buffer.extend(msgs);
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::error!(group = %self.spec.name, queue = %queue, error = %e, "core: read failed");
                false
            }
        }
    }
}
