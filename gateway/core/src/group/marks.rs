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

/// The value of a delivered mark's record: the mark, then the offsets held below the
/// queue's floor ([`QueueState::held`]), each 8 bytes big-endian.
pub(super) fn mark_record(mark: u64, held: &[u64]) -> bytes::Bytes {
    let mut v = Vec::with_capacity(8 * (1 + held.len()));
    v.extend_from_slice(&mark.to_be_bytes());
    for o in held {
        v.extend_from_slice(&o.to_be_bytes());
    }
    bytes::Bytes::from(v)
}

/// A delivered mark's record read back: (mark, held offsets); `None` when malformed.
pub(super) fn parse_mark_record(v: &[u8]) -> Option<(u64, Vec<u64>)> {
    if v.len() < 8 || !v.len().is_multiple_of(8) {
        return None;
    }
    let mut words = v
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")));
    let mark = words.next()?;
    Some((mark, words.collect()))
}

/// The key of `group`'s delivered mark on `queue`.
pub(crate) fn delivered_key(group: &GroupName, queue: &QueueRef) -> Vec<u8> {
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
        held: &[u64],
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
            mark_record(mark, held),
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
    /// written ahead to what was delivered (or what a crash before left), with the
    /// offsets it still holds below its floor ([`QueueState::held`]).
    pub(super) async fn settle_delivered_marks(&mut self) {
        let mut exact = Vec::new();
        if self.broadcast() {
            for (id, m) in &self.members {
                for (q, c) in &m.cursors {
                    if let Some(value) = self.settled_mark(q, c) {
                        exact.push((self.offsets_group(Some(id)), q.clone(), value));
                    }
                }
            }
        } else {
            for (q, c) in &self.queues {
                if let Some(value) = self.settled_mark(q, c) {
                    exact.push((self.spec.name.clone(), q.clone(), value));
                }
            }
        }
        if exact.is_empty() {
            return;
        }
        let mut batch = WriteBatch::new();
        batch.no_sync();
        for (group, q, value) in exact {
            batch.kv_put(DELIVERED_NS, delivered_key(&group, &q), value);
        }
        if let Err(e) = self.inner.store.write(batch).await {
            // Left where they were written ahead: more flagged than delivered.
            tracing::warn!(group = %self.spec.name, error = %e, "core: a group's delivered marks were not lowered");
            return;
        }
        // Written: not again (the loop's exit settles once more).
        let lower = |c: &mut QueueState| {
            c.marked = c.marked.min(c.mark_end());
            c.held_stored = held_count(&c.held());
        };
        if self.broadcast() {
            self.members
                .values_mut()
                .flat_map(|m| m.cursors.values_mut())
                .for_each(lower);
        } else {
            self.queues.values_mut().for_each(lower);
        }
    }

    /// The record of `queue`'s delivered mark once nothing more is delivered: lowered
    /// to what was delivered, with what is held below the floor; `None` when the
    /// stored one already says so (or the topic is gone, with its marks).
    pub(super) fn settled_mark(&self, queue: &QueueRef, c: &QueueState) -> Option<bytes::Bytes> {
        let end = c.mark_end();
        let held = c.held();
        let changed = end < c.marked || held_count(&held) != c.held_stored;
        (changed && self.topic_lives(queue)).then(|| mark_record(end.min(c.marked), &held))
    }
}

/// [`QueueState::held_stored`] of `held`.
pub(super) fn held_count(held: &[u64]) -> u32 {
    u32::try_from(held.len()).unwrap_or(u32::MAX)
}

/// `group`'s delivered mark record on `queue` without the offsets it holds below a
/// reset's floor, if it lists any (an offline reset drops them: they wait like the
/// queue's other messages).
pub(crate) async fn unheld_mark(
    store: &dyn Store,
    group: &GroupName,
    queue: &QueueRef,
) -> mqgate_store::Result<Option<bytes::Bytes>> {
    let Some(v) = store
        .kv_get(DELIVERED_NS, &delivered_key(group, queue))
        .await?
    else {
        return Ok(None);
    };
    Ok(parse_mark_record(&v)
        .filter(|(_, held)| !held.is_empty())
        .map(|(mark, _)| mark_record(mark, &[])))
}

/// How many messages `group`'s delivered mark record on `queue` lists as held below
/// `committed` that retention has not deleted: what a live actor would deliver again.
pub(crate) async fn held_at_rest(
    store: &dyn Store,
    group: &GroupName,
    queue: &QueueRef,
    committed: u64,
) -> u64 {
    let Ok(Some(v)) = store
        .kv_get(DELIVERED_NS, &delivered_key(group, queue))
        .await
    else {
        return 0;
    };
    let min = store.queue_range(queue).map_or(0, |r| r.min.0);
    parse_mark_record(&v).map_or(0, |(_, held)| {
        held.iter()
            .filter(|o| (min..committed).contains(*o))
            .count() as u64
    })
}

#[cfg(test)]
mod tests {
    use super::{mark_record, parse_mark_record};
    use proptest::prelude::*;

    #[test]
    fn a_bare_mark_is_the_record_of_earlier_versions() {
        assert_eq!(
            parse_mark_record(&7u64.to_be_bytes()),
            Some((7, Vec::new()))
        );
        assert_eq!(&mark_record(7, &[])[..], &7u64.to_be_bytes());
        assert_eq!(parse_mark_record(&[]), None);
        assert_eq!(parse_mark_record(&[0; 12]), None);
    }

    proptest! {
        #[test]
        fn records_round_trip(mark in any::<u64>(), held in proptest::collection::vec(any::<u64>(), 0..40)) {
            prop_assert_eq!(parse_mark_record(&mark_record(mark, &held)), Some((mark, held)));
        }

        #[test]
        fn garbage_is_refused_or_read_whole(v in proptest::collection::vec(any::<u8>(), 0..100)) {
            match parse_mark_record(&v) {
                Some((mark, held)) => prop_assert_eq!(&mark_record(mark, &held)[..], &v[..]),
                None => prop_assert!(v.len() < 8 || v.len() % 8 != 0),
            }
        }
    }
}
