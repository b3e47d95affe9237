//! A group's state of one queue (a broadcast member's cursor, or the group's own): what
//! it read and has not delivered, what is in flight and what waits to be delivered
//! again, and where its committed offset is: the first unsettled offset while the
//! actor runs, and above what it still owes once it closes (`floor`, `held`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use mqgate_store::{Millis, QueueMessage, StoredMessage};

use super::actor::MemberId;
use super::marks::held_count;

pub(super) struct InFlight {
    pub(super) token: u64,
    pub(super) member: MemberId,
    pub(super) count: u32,
    pub(super) message: Arc<StoredMessage>,
}

pub(super) struct Pending {
    pub(super) message: Arc<StoredMessage>,
    pub(super) count: u32,
}

#[derive(Default)]
pub(super) struct QueueState {
    /// Clustering / orderly: the member that reads this queue.
    pub(super) owner: Option<MemberId>,
    /// The next offset to read from the store.
    pub(super) read: u64,
    /// Read, not yet delivered.
    pub(super) buffer: VecDeque<QueueMessage>,
    /// Delivered before, to be delivered again (offset order).
    pub(super) redeliver: BTreeMap<u64, Pending>,
    pub(super) in_flight: BTreeMap<u64, InFlight>,
    /// The committed offset last written to the store.
    pub(super) persisted: Option<u64>,
    /// `persisted` is the group's start at `First`, not written yet
    /// ([`GroupSpec::lazy_start`](super::GroupSpec::lazy_start)): where a restart
    /// without it would start too. It is written with the group's first delivered mark
    /// or commit, whichever queue's (a mark never goes without offsets: see
    /// `open_cursor`), so a group that never delivers stores nothing (an idle MQTT
    /// clean session's connect writes none).
    pub(super) unstored: bool,
    /// Orderly: no delivery before this time (after a failure).
    pub(super) suspended_until: Millis,
    /// Where the last reset put the queue: the committed offset never goes below it,
    /// though deliveries in flight from before it (kept by [`QueueState::reset_to`]) are
    /// still settled or redelivered ([`QueueState::held`]). Committing their offset would
    /// bring back everything the reset skipped (a purge's messages) after a restart;
    /// the delivered mark's record lists them instead.
    pub(super) floor: u64,
    /// Offsets below this may have been delivered before this actor started (its
    /// delivered mark as stored, [`super::marks::DELIVERED_NS`]): delivered from the store, they are
    /// flagged redelivered.
    pub(super) seen: u64,
    /// The delivered mark stored in this actor's life: offsets below it are delivered
    /// without another write.
    pub(super) marked: u64,
    /// One past the highest offset this actor delivered.
    pub(super) delivered_end: u64,
    /// How many offsets below `floor` the stored delivered mark record lists as held
    /// ([`QueueState::held`]): it is written again when fewer are (they only go).
    pub(super) held_stored: u32,
}

impl QueueState {
    /// A message taken for delivery and not sent goes back where it came from: the
    /// read-ahead (`entry`: its index entry) or the redeliveries.
    pub(super) fn put_back(
        &mut self,
        offset: u64,
        message: Arc<StoredMessage>,
        count: u32,
        entry: Option<mqgate_store::QueueEntry>,
    ) {
        match entry {
            Some(entry) => self.buffer.push_front(QueueMessage { entry, message }),
            None => {
                self.redeliver.insert(offset, Pending { message, count });
            }
        }
    }

    /// Move to `target` (a reset: a purge, a replay): what was read and not delivered
    /// and what waits for redelivery go. Deliveries in flight below `target` stay in
    /// flight (a purge keeps unacknowledged messages, as RabbitMQ does: an ack settles
    /// them, a requeue brings them back instead of losing them); the committed offset
    /// is `target` all the same, so a restart does not bring back what the reset
    /// skipped, and the delivered mark's record lists them so that a restart delivers
    /// them again ([`QueueState::held`]). Those at or above `target` are read again from
    /// there, so they are let go (returned, for the members' counts).
    pub(super) fn reset_to(&mut self, target: u64) -> Vec<InFlight> {
        let again = self.in_flight.split_off(&target);
        self.buffer.clear();
        self.redeliver.clear();
        self.suspended_until = 0;
        self.read = target;
        self.floor = target;
        again.into_values().collect()
    }

    /// Offsets below `floor` still owed to consumers: delivered before the last reset
    /// and not settled (in flight, or given back to be delivered again). A purge keeps
    /// them, as RabbitMQ keeps a purged queue's unacknowledged messages; the delivered
    /// mark's record lists them ([`super::marks::mark_record`]) so that a restart
    /// delivers them again instead of losing them below the committed offset. After a
    /// reset they only go.
    pub(super) fn held(&self) -> Vec<u64> {
        if self.floor == 0 {
            return Vec::new();
        }
        let mut held: Vec<u64> = self
            .in_flight
            .range(..self.floor)
            .map(|(o, _)| *o)
            .chain(self.redeliver.range(..self.floor).map(|(o, _)| *o))
            .collect();
        held.sort_unstable();
        held
    }

    /// The cursor's last commit (the actor ends, or a broadcast member leaves), or a
    /// checkpoint while it runs ([`QueueState::checkpoint_due`]): the floor comes up to
    /// the first offset never delivered, so the commit is there and what is still owed
    /// below it (in flight, given back) is listed in the delivered mark's record
    /// ([`QueueState::held`]), written in the same batch because the stored list is
    /// marked unknown. Committing at the first unsettled offset instead would bring
    /// back, at the next start, every message acknowledged above it: with acks out of
    /// order (several consumers, a slow one holding an old message) a clean restart
    /// delivered again what had been acknowledged, which RabbitMQ does not.
    pub(super) fn close(&mut self) {
        let first_new = self.first_new();
        if first_new <= self.floor {
            return;
        }
        self.floor = first_new;
        if self.held_stored > 0 || !self.held().is_empty() {
            self.held_stored = HELD_UNKNOWN;
        }
    }

    /// The first offset never delivered: the read-ahead's first, or the read position.
    fn first_new(&self) -> u64 {
        match self.buffer.front() {
            Some(m) => self.read.min(m.entry.offset.0),
            None => self.read,
        }
    }

    /// While the actor runs, its commits are at the first unsettled offset, and a crash
    /// brings back every message acknowledged above it. When at least `threshold`
    /// ([`crate::CoreConfig::checkpoint_settled`]) of them are, and more than would be
    /// held, the next commit is a checkpoint: [`QueueState::close`], the floor up to the
    /// first offset never delivered and what is owed below it held (a consumer on a long
    /// task while others acknowledge thousands after it: a crash then redelivers what it
    /// holds, not the thousands). The held list's size is bounded by what it saves;
    /// consumers that acknowledge in order, or nearly, never need one. A bound that
    /// costs no walk of the maps: more than twice what is owed in all (held or not)
    /// above the threshold means at least the threshold, and at least what is owed,
    /// settled.
    pub(super) fn checkpoint_due(&self, threshold: u64) -> bool {
        self.checkpoint_due_at(self.committed(), threshold)
    }

    /// [`QueueState::checkpoint_due`] with [`QueueState::committed`] computed already.
    pub(super) fn checkpoint_due_at(&self, committed: u64, threshold: u64) -> bool {
        let owed = (self.in_flight.len() + self.redeliver.len()) as u64;
        let gap = self.first_new().saturating_sub(committed);
        gap >= threshold.max(1) + 2 * owed
    }

    /// The offset to commit: the first not settled at or above the floor (what is held
    /// below it, [`QueueState::held`], is kept in the delivered mark's record).
    pub(super) fn committed(&self) -> u64 {
        let mut c = self.read;
        if let Some(m) = self.buffer.front() {
            c = c.min(m.entry.offset.0);
        }
        if let Some(o) = first_from(&self.redeliver, self.floor) {
            c = c.min(o);
        }
        if let Some(o) = first_from(&self.in_flight, self.floor) {
            c = c.min(o);
        }
        c.max(self.floor)
    }
}

/// The first key of `m` at or above `floor`.
fn first_from<V>(m: &BTreeMap<u64, V>, floor: u64) -> Option<u64> {
    if floor == 0 {
        m.keys().next().copied()
    } else {
        m.range(floor..).next().map(|(o, _)| *o)
    }
}

/// The delivered mark record of `c` right after a reset ([`QueueState::held`]: what
/// it still holds below its new floor), and how many it lists; `None` when there is
/// nothing held now or before (the stored record says so already).
pub(super) fn held_record(c: &QueueState) -> Option<(bytes::Bytes, u32)> {
    let held = c.held();
    (!held.is_empty() || c.held_stored > 0).then(|| {
        (
            super::marks::mark_record(c.marked, &held),
            held_count(&held),
        )
    })
}

/// [`QueueState::held_stored`] when the stored record may not list what is held (a
/// reset whose write failed): the next commit writes it.
pub(super) const HELD_UNKNOWN: u32 = u32::MAX;

/// The delivered mark record of `c` when fewer offsets are held below its floor than
/// the stored record lists (settled since), and how many it lists now.
pub(super) fn held_settled(c: &QueueState) -> Option<(bytes::Bytes, u32)> {
    if c.held_stored == 0 {
        return None;
    }
    let held = c.held();
    let n = held_count(&held);
    (n != c.held_stored).then(|| (super::marks::mark_record(c.marked, &held), n))
}
