//! Parking an idle group actor.
//!
//! A group whose actor has nothing to do and no timer to wait for (no offsets to persist,
//! no member heartbeats, no suspended queue, members present) waits only for a command
//! in its mailbox or a new message on a topic it watches. Such an actor *parks*: its
//! task ends and its state waits here, boxed, until one of the two comes; then a new task
//! is spawned to run it. An idle MQTT session holds one group, so a parked actor is what
//! an idle connection's group costs: its state, without a task (about 1 KiB less).
//!
//! No wake-up is lost: the actor parks under the slot's lock after checking, under the
//! same lock, that no message was announced since its last pass (`pending`) and that its
//! mailbox is empty (the mailbox then keeps this [`GroupWake`] as its waker). A publisher
//! sets `pending` and then, if the actor may be parking (`parking`, set before the
//! check), takes the lock to resume it; a sender queues before it wakes the mailbox's
//! waker: either the actor sees the news while parking, or the news finds it parked and
//! resumes it. A publish to a running group costs two atomics more than a `notify_one`.
//!
//! A parked actor holds its shard weakly ([`CoreRef`]): the shard's topics hold the
//! actor's [`GroupWake`], so a strong reference would keep a dropped shard (and its
//! store) alive. A shard stopped normally resumes and stops its groups first.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::Waker;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::actor::Actor;
use crate::broker::ShardCore;

/// What wakes a group's actor, and where it waits while parked.
pub(crate) struct GroupWake {
    /// Wakes the running actor after an append to a watched topic.
    pub(super) notify: Notify,
    /// An append was announced since the actor last tried to park.
    pending: AtomicBool,
    /// The actor may be parked: set by an actor about to park before it checks
    /// `pending`, cleared when it does not park or when it resumes. A publisher reads it
    /// after setting `pending` (both sequentially consistent), so one of the two sees
    /// the other's write; the publish path takes the slot's lock only when it is set.
    parking: AtomicBool,
    /// The parked actor.
    parked: Mutex<Option<Box<Actor>>>,
    /// Where a resumed actor runs (publishers may call from the store's threads).
    rt: tokio::runtime::Handle,
}

impl fmt::Debug for GroupWake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupWake")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What trying to park found.
pub(super) enum Park {
    /// Parked: the task ends.
    Parked,
    /// An append was announced: go round once more without waiting.
    Again(Box<Actor>),
    /// A command is queued or the mailbox closed: wait as usual (it returns at once).
    Wait(Box<Actor>),
}

impl GroupWake {
    /// For an actor about to start (inside the runtime).
    pub(super) fn new() -> Self {
        Self {
            notify: Notify::new(),
            pending: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            parked: Mutex::new(None),
            rt: tokio::runtime::Handle::current(),
        }
    }

    /// A watched topic has a new message.
    pub(crate) fn notify(&self) {
        self.pending.store(true, Ordering::SeqCst);
        self.notify.notify_one();
        if self.parking.load(Ordering::SeqCst) {
            self.resume();
        }
    }

    /// Run the parked actor again, if it is parked.
    fn resume(&self) {
        let parked = {
            let mut slot = self.parked.lock();
            let parked = slot.take();
            if parked.is_some() {
                self.parking.store(false, Ordering::SeqCst);
            }
            parked
        };
        let Some(mut actor) = parked else {
            return;
        };
        // Its shard is gone (dropped without stopping): so is the group.
        if actor.inner.reacquire() {
            actor.inner.groups_parked.fetch_sub(1, Ordering::Relaxed);
            self.rt.spawn(actor.serve());
        }
    }

    /// Park `actor` unless something is waiting for it.
    pub(super) fn park(self: &Arc<Self>, mut actor: Box<Actor>) -> Park {
        let mut slot = self.parked.lock();
        self.parking.store(true, Ordering::SeqCst);
        if self.pending.swap(false, Ordering::SeqCst) {
            self.parking.store(false, Ordering::SeqCst);
            return Park::Again(actor);
        }
        if !actor.rx.park(Waker::from(Arc::clone(self))) {
            self.parking.store(false, Ordering::SeqCst);
            return Park::Wait(actor);
        }
        actor.inner.groups_parked.fetch_add(1, Ordering::Relaxed);
        actor.inner.release();
        *slot = Some(actor);
        Park::Parked
    }
}

impl std::task::Wake for GroupWake {
    /// The mailbox's waker while parked: a command came, or the last sender went.
    fn wake(self: Arc<Self>) {
        self.resume();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.resume();
    }
}

/// The actor's shard: held strongly while the actor runs, weakly while it is parked.
pub(super) struct CoreRef {
    strong: Option<Arc<ShardCore>>,
    weak: Weak<ShardCore>,
}

impl CoreRef {
    pub(super) fn new(core: Arc<ShardCore>) -> Self {
        Self {
            weak: Arc::downgrade(&core),
            strong: Some(core),
        }
    }

    fn release(&mut self) {
        self.strong = None;
    }

    fn reacquire(&mut self) -> bool {
        self.strong = self.weak.upgrade();
        self.strong.is_some()
    }
}

impl Deref for CoreRef {
    type Target = Arc<ShardCore>;

    fn deref(&self) -> &Arc<ShardCore> {
        self.strong
            .as_ref()
            .expect("a running group actor holds its shard")
    }
}
