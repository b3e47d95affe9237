//! Delivered marks (ARCHITECTURE.md, "Delivered marks"): per group and queue, an offset
//! below which messages may have been delivered, so that what was delivered and not
//! acknowledged comes again flagged redelivered after a restart, a crash or a move.

use mqgate_store::{GroupName, QueueRef, Store, TopicName, WriteBatch};
use tokio::sync::oneshot;

use super::actor::{Actor, QueueState};

/// The key-value namespace of the groups' delivered marks: per group (a broadcast
/// member's own offsets group) and queue, an offset below which messages may have
/// been delivered. Written ahead of the deliveries, [`DELIVERED_STRIDE`] at a time,
/// and exactly when the group's actor ends, so that after a crash or a restart what
/// was delivered and not acknowledged comes again flagged redelivered (AMQP's
/// `redelivered`, MQTT's DUP), as RabbitMQ flags it.
pub(crate) const DELIVERED_NS: &str = "core.delivered";
/// How far ahead of the deliveries the delivered mark is written: one small write per
/// this many messages of a queue; after a crash, at most this many messages past the
/// last one delivered are flagged redelivered without having been delivered.
pub(super) const DELIVERED_STRIDE: u64 = 256;

/// The key of `group`'s delivered mark on `queue`.
pub(super) fn delivered_key(group: &GroupName, queue: &QueueRef) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.as_str().len() + queue.topic.as_str().len() + 6);
    k.extend_from_slice(group.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(queue.topic.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&queue.queue.0.to_be_bytes());
    k
}

/// Topic `topic` is being deleted: the delivered marks of `groups` (those with offsets
/// on it, [`Store::groups_on_topic`], asked before the deletion) on its `queue_count`
/// queues go too. A group that lives on never reads those queues again; a mark left
/// would only be deleted as stale once a topic of that name is read by the group again.
/// Logged, not returned, when it fails: the topic is gone either way.
pub(crate) async fn delete_topic_marks(
    store: &dyn Store,
    topic: &TopicName,
    queue_count: u32,
    groups: &[GroupName],
) {
    if groups.is_empty() {
        return;
    }
    let mut batch = WriteBatch::new();
    batch.no_sync();
    for g in groups {
        for q in 0..queue_count {
            batch.kv_delete(
                DELIVERED_NS,
                delivered_key(g, &QueueRef::new(topic.clone(), q)),
            );
        }
    }
    if let Err(e) = store.write(batch).await {
        tracing::warn!(topic = %topic, error = %e, "core: the delivered marks of a deleted topic stay");
    }
}

impl QueueState {
    /// Where the delivered mark belongs once nothing more is delivered: one past what
    /// this actor delivered, or what a crash before left, whichever is further.
    pub(super) fn mark_end(&self) -> u64 {
        self.delivered_end.max(self.seen)
    }
}

impl Actor {
    /// The starts not stored yet ([`QueueState::unstored`]) of the cursors whose
    /// offsets `owner` keeps (a broadcast member's own; the group's for a shared one),
    /// written with whatever the group writes first (a mark, a commit) so that the
    /// store knows all of the group or none of it. Not those of a topic deleted since
    /// the cursor opened: it is let go of at the next refresh, and a topic of that name
    /// created meanwhile starts afresh (`Watched::fresh`).
    pub(super) fn unstored_starts(&self, owner: &str) -> Vec<(QueueRef, u64)> {
        let unstored = |(q, c): (&QueueRef, &QueueState)| {
            let current = self
                .watched
                .iter()
                .find(|w| w.name == q.topic)
                .is_some_and(|w| w.topic.generation() == w.generation);
            c.persisted
                .filter(|_| c.unstored && current)
                .map(|s| (q.clone(), s))
        };
        if self.broadcast() {
            self.members
                .get(owner)
                .map(|m| m.cursors.iter().filter_map(unstored).collect())
                .unwrap_or_default()
        } else {
            self.queues.iter().filter_map(unstored).collect()
        }
    }

    /// `owner`'s starts in `starts` ([`Actor::unstored_starts`]) are written.
    pub(super) fn starts_stored(&mut self, owner: &str, starts: &[(QueueRef, u64)]) {
        for (q, _) in starts {
            if let Some(c) = self.cursor_mut(owner, q) {
                c.unstored = false;
            }
        }
    }

    /// Store `group`'s delivered mark on `queue`, with the group's `starts` not stored
    /// yet ([`QueueState::unstored`], [`Actor::unstored_starts`]): a mark without offsets
    /// is taken for a stale one. Returns once it is written (readable, in the log: a killed
    /// process keeps it), without waiting for a sync it may share with publishes (a
    /// `no_sync` batch grouped with synced ones is answered after their fsync): `true`;
    /// or once it has failed (logged: the mark is a hint): `false`.
    pub(super) async fn write_delivered_mark(
        &self,
        group: &GroupName,
        queue: &QueueRef,
        mark: u64,
        starts: &[(QueueRef, u64)],
    ) -> bool {
        if !self.topic_lives(queue) {
            // Deleted with its marks: none written again.
            return false;
        }
        let mut batch = WriteBatch::new();
        batch.no_sync().kv_put(
            DELIVERED_NS,
            delivered_key(group, queue),
            bytes::Bytes::copy_from_slice(&mark.to_be_bytes()),
        );
        for (q, start) in starts {
            batch.commit_offset(group.clone(), q.clone(), mqgate_store::QueueOffset(*start));
        }
        let (seen, written) = oneshot::channel();
        let visible: mqgate_store::OnVisible = Box::new(move || {
            let _ = seen.send(());
        });
        match self.inner.store.write_queued(batch, visible).await {
            Ok(done) => {
                let (group, queue) = (group.clone(), queue.clone());
                tokio::spawn(async move {
                    if let Err(e) = done.await {
                        tracing::warn!(group = %group, queue = %queue, error = %e, "core: a group's delivered mark was not stored");
                    }
                });
                // Dropped unsent when the write failed.
                written.await.is_ok()
            }
            Err(e) => {
                tracing::warn!(group = %group, queue = %queue, error = %e, "core: a group's delivered mark was not stored");
                false
            }
        }
    }

    /// Whether `queue`'s topic is still in the store: a deleted one took its marks
    /// ([`delete_topic_marks`]), which are not written again.
    pub(super) fn topic_lives(&self, queue: &QueueRef) -> bool {
        self.inner.store.topic(&queue.topic).is_some()
    }

    /// The actor ends: each queue's delivered mark comes down from where it was
    /// written ahead to what was delivered (or what a crash before left).
    pub(super) async fn settle_delivered_marks(&mut self) {
        let mut exact = Vec::new();
        if self.broadcast() {
            for (id, m) in &self.members {
                for (q, c) in &m.cursors {
                    let end = c.mark_end();
                    if end < c.marked && self.topic_lives(q) {
                        exact.push((self.offsets_group(Some(id)), q.clone(), end));
                    }
                }
            }
        } else {
            for (q, c) in &self.queues {
                let end = c.mark_end();
                if end < c.marked && self.topic_lives(q) {
                    exact.push((self.spec.name.clone(), q.clone(), end));
                }
            }
        }
        if exact.is_empty() {
            return;
        }
        let mut batch = WriteBatch::new();
        batch.no_sync();
        for (group, q, end) in exact {
            batch.kv_put(
                DELIVERED_NS,
                delivered_key(&group, &q),
                bytes::Bytes::copy_from_slice(&end.to_be_bytes()),
            );
        }
        if let Err(e) = self.inner.store.write(batch).await {
            // Left where they were written ahead: more flagged than delivered.
            tracing::warn!(group = %self.spec.name, error = %e, "core: a group's delivered marks were not lowered");
            return;
        }
        // Written: not again (the loop's exit settles once more).
        let lower = |c: &mut QueueState| c.marked = c.marked.min(c.mark_end());
        if self.broadcast() {
            self.members
                .values_mut()
                .flat_map(|m| m.cursors.values_mut())
                .for_each(lower);
        } else {
            self.queues.values_mut().for_each(lower);
        }
    }
}
