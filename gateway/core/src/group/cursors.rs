//! The queues a group reads: a cursor opened per queue (from the committed offset or
//! the start position), the queues of the topics it watches picked up as they appear,
//! and let go of when a topic is deleted under it.

use std::sync::Arc;

use mqgate_store::{GroupName, QueueOffset, QueueRef, ReadLimits, TopicName, WriteBatch};

use super::actor::{Actor, MemberId, Pending, QueueState};
use super::marks::{delivered_key, parse_mark_record, DELIVERED_NS};
use super::StartPosition;
use crate::broker::TopicHandle;
use crate::error::Result;

/// A topic a group consumes, and the generation of it the group's state is of: a
/// deleted topic moves it ([`TopicHandle::generation`]).
pub(super) struct Watched {
    pub(super) topic: Arc<TopicHandle>,
    pub(super) generation: u32,
    /// Deleted under the group: the queues of the topic created again start at its
    /// first offset, whatever the group's start position (`open_cursor`).
    pub(super) fresh: bool,
}

impl Watched {
    pub(super) fn new(topic: Arc<TopicHandle>) -> Self {
        let generation = topic.generation();
        Self {
            topic,
            generation,
            fresh: false,
        }
    }
}

impl std::ops::Deref for Watched {
    type Target = TopicHandle;

    fn deref(&self) -> &TopicHandle {
        &self.topic
    }
}

impl Actor {
    pub(super) fn all_queues(&self) -> Vec<QueueRef> {
        let mut out = Vec::new();
        for t in &self.watched {
            for q in 0..t.queue_count() {
                out.push(QueueRef::new(t.name.clone(), q));
            }
        }
        out
    }

    /// A fresh cursor for `queue`: the committed offset, or the start position.
    pub(super) async fn open_cursor(
        &self,
        queue: &QueueRef,
        member: Option<&str>,
    ) -> Result<QueueState> {
        let group = self.offsets_group(member);
        let key = delivered_key(&group, queue);
        if self
            .watched
            .iter()
            .any(|w| w.fresh && w.name == queue.topic)
        {
            // Its topic was created again under this actor: all of it is new to the
            // group, and an offset or mark the actor's old state wrote on it after the
            // deletion (a commit racing it) is not the group's. It starts at the first
            // offset, stored by the caller (`persisted` is none), the mark deleted.
            self.delete_stale_mark(&group, queue, key).await;
            let read = self.inner.position(queue, &StartPosition::First).await?;
            return Ok(QueueState {
                read,
                ..QueueState::default()
            });
        }
        // Not read: the cursor does not open (its record may list messages owed below
        // the committed offset, which the next mark written would drop).
        let record = match self.inner.store.kv_get(DELIVERED_NS, &key).await? {
            Some(v) => {
                let parsed = parse_mark_record(&v);
                if parsed.is_none() {
                    tracing::warn!(group = %group, queue = %queue, len = v.len(), "core: a group's delivered mark record is malformed; ignored (nothing flagged redelivered, none held)");
                }
                parsed
            }
            None => None,
        };
        let (mark, held) = record.map_or((None, Vec::new()), |(m, h)| (Some(m), h));
        let (read, persisted, seen, unstored) =
            match self.inner.store.committed_offset(&group, queue).await? {
                Some(o) => (o.0, Some(o.0), mark.unwrap_or(0), false),
                None => {
                    if mark.is_some() {
                        // A mark without offsets: left by a group of this name deleted
                        // since (or its topic): not this group's.
                        self.delete_stale_mark(&group, queue, key).await;
                    }
                    let start = self.inner.position(queue, &self.spec.start).await?;
                    // Stored now (`load_queues`, `refresh_queues`: `Last` moves, and a
                    // group is known to the store from its start), unless a `First`
                    // start may wait for the first delivery (`GroupSpec::lazy_start`).
                    let lazy =
                        self.spec.lazy_start && matches!(self.spec.start, StartPosition::First);
                    (start, lazy.then_some(start), 0, lazy)
                }
            };
        let mut state = QueueState {
            read,
            persisted,
            unstored,
            seen,
            marked: seen,
            ..QueueState::default()
        };
        if persisted.is_some() && !unstored && !held.is_empty() {
            self.load_held(queue, &mut state, &held).await?;
        }
        Ok(state)
    }

    /// Messages held below the committed offset, unacknowledged when the group's last
    /// actor ended or the broker stopped ([`QueueState::held`]: left by a reset, or by
    /// the last commit, [`QueueState::close`]): they are delivered again (flagged), and
    /// the committed offset stays where it is while they wait (`floor`). Those retention
    /// has deleted since are gone. Read a run of consecutive offsets at a time (what a
    /// consumer held is mostly consecutive), as many reads as the store's byte limit
    /// takes. A read that fails fails the cursor's opening (what it did not read would
    /// be dropped from the record at the next commit).
    async fn load_held(
        &self,
        queue: &QueueRef,
        state: &mut QueueState,
        held: &[u64],
    ) -> Result<()> {
        state.floor = state.read;
        state.held_stored = super::marks::held_count(held);
        let mut held: Vec<u64> = held.iter().copied().filter(|o| *o < state.read).collect();
        held.sort_unstable();
        held.dedup();
        let mut rest = held.as_slice();
        while let Some(&first) = rest.first() {
            let run = rest
                .iter()
                .zip(first..)
                .take_while(|(o, want)| **o == *want)
                .count();
            let (this, next) = rest.split_at(run);
            rest = next;
            let last = this[run - 1];
            let mut from = first;
            // A read stops at its byte limit: on from the last message it returned.
            while from <= last {
                let want = usize::try_from(last - from + 1).unwrap_or(usize::MAX);
                let read = self
                    .inner
                    .store
                    .read(queue, QueueOffset(from), ReadLimits::count(want))
                    .await
                    .inspect_err(|e| {
                        tracing::warn!(group = %self.spec.name, queue = %queue, offset = from, count = want, error = %e, "core: messages held unacknowledged could not be read");
                    })?;
                let Some(end) = read.last().map(|m| m.entry.offset.0) else {
                    break;
                };
                for m in read {
                    let o = m.entry.offset.0;
                    if this.binary_search(&o).is_ok() {
                        state.redeliver.insert(
                            o,
                            Pending {
                                message: m.message,
                                count: 0,
                            },
                        );
                    }
                }
                from = end + 1;
            }
        }
        Ok(())
    }

    /// Delete `group`'s delivered mark on `queue` (at `key`): not the group's (a hint:
    /// logged when it stays).
    async fn delete_stale_mark(&self, group: &GroupName, queue: &QueueRef, key: Vec<u8>) {
        let mut batch = WriteBatch::new();
        batch.no_sync().kv_delete(DELIVERED_NS, key);
        if let Err(e) = self.inner.store.write(batch).await {
            tracing::warn!(group = %group, queue = %queue, error = %e, "core: a stale delivered mark stays");
        }
    }

    pub(super) async fn load_queues(&mut self) -> Result<()> {
        if self.broadcast() {
            return Ok(());
        }
        for q in self.all_queues() {
            let state = self.open_cursor(&q, None).await?;
            self.queues.insert(q, state);
        }
        // New groups persist their start so a restart resumes there, not at "last"
        // (a lazy start at `First` waits for the first delivery: `QueueState::unstored`).
        self.commit().await;
        Ok(())
    }

    /// Let go of the state on watched topics deleted since it was taken, and pick up
    /// queues added to watched topics since the group started (a topic created again
    /// among them: its queues start afresh from the group's start position).
    pub(super) async fn refresh_queues(&mut self) -> Result<()> {
        for i in 0..self.watched.len() {
            let now = self.watched[i].topic.generation();
            if now != self.watched[i].generation {
                self.watched[i].generation = now;
                self.watched[i].fresh = true;
                let name = self.watched[i].topic.name.clone();
                self.forget_topic(&name);
            }
        }
        let all = self.all_queues();
        let mut changed = false;
        if self.broadcast() {
            let ids: Vec<MemberId> = self.members.keys().cloned().collect();
            for id in ids {
                for q in &all {
                    if !self.members[&id].cursors.contains_key(q) {
                        let c = self.open_cursor(q, Some(&id)).await?;
                        if let Some(m) = self.members.get_mut(&id) {
                            m.cursors.insert(q.clone(), c);
                            changed = true;
                        }
                    }
                }
            }
            if changed {
                // Their start stored before any delivery (see below; a lazy one at
                // `First` with the first delivered mark).
                self.commit().await;
            }
            self.opened_fresh();
            return Ok(());
        }
        for q in all {
            if !self.queues.contains_key(&q) {
                let c = self.open_cursor(&q, None).await?;
                self.queues.insert(q, c);
                changed = true;
            }
        }
        if changed {
            self.rebalance();
            // Their start is stored before anything is delivered from them (a lazy
            // one at `First` with the first delivered mark): a delivered mark without a committed
            // offset is taken for a stale one.
            self.commit().await;
        }
        self.opened_fresh();
        Ok(())
    }

    /// The queues of topics created again under the group are open: later ones (a
    /// topic grown) start as any other.
    fn opened_fresh(&mut self) {
        for w in &mut self.watched {
            w.fresh &= w.topic.queue_count() == 0;
        }
    }

    /// Topic `name` was deleted (its offsets and delivered marks with it): its queues'
    /// states go, what was read ahead and what waits for redelivery with them, and the
    /// members get back the credit of what they held from it unacknowledged (an ack
    /// of it now finds nothing to settle). Nothing is committed or marked for it.
    fn forget_topic(&mut self, name: &TopicName) {
        let of = |q: &QueueRef| q.topic == *name;
        if self.broadcast() {
            for m in self.members.values_mut() {
                let gone: Vec<QueueRef> = m.cursors.keys().filter(|q| of(q)).cloned().collect();
                let mut held = 0;
                for q in gone {
                    held += m.cursors.remove(&q).map_or(0, |c| c.in_flight.len());
                }
                m.settled(held, &self.wake);
            }
            return;
        }
        let gone: Vec<QueueRef> = self.queues.keys().filter(|q| of(q)).cloned().collect();
        if gone.is_empty() {
            return;
        }
        for q in gone {
            let Some(c) = self.queues.remove(&q) else {
                continue;
            };
            for f in c.in_flight.values() {
                if let Some(m) = self.members.get_mut(&f.member) {
                    m.settled(1, &self.wake);
                }
            }
        }
        self.rebalance();
    }
}
