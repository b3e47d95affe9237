//! Credit shared by members of several groups: AMQP's `basic.qos` with `global` set
//! (RabbitMQ 3's semantics: one limit for all the consumers of a channel, whatever
//! queue each reads). Each member keeps its own prefetch too; a delivery needs a unit
//! of both. Units are taken by the actor that sends (compare-and-swap: never more than
//! the limit in flight, even with actors on different threads) and given back when the
//! delivery is settled or its member leaves; the groups that ran out are woken when
//! units come back or the limit is raised.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::park::GroupWake;

/// Unacknowledged deliveries allowed across every member given this pool (0: no limit).
pub struct CreditPool {
    limit: AtomicUsize,
    used: AtomicUsize,
    /// The groups with members drawing on it, to wake when units come back.
    groups: Mutex<Vec<Weak<GroupWake>>>,
}

impl fmt::Debug for CreditPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreditPool")
            .field("limit", &self.limit())
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl CreditPool {
    /// A pool of `limit` units (0: no limit, deliveries are only counted).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
            groups: Mutex::new(Vec::new()),
        })
    }

    /// The limit (0: none).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Deliveries holding a unit now.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Change the limit: members already joined follow it (a lower one holds back new
    /// deliveries until enough are settled; a higher one wakes the groups waiting).
    pub fn set_limit(&self, limit: usize) {
        let before = self.limit.swap(limit, Ordering::AcqRel);
        if limit == 0 || (before != 0 && limit > before) {
            self.wake_groups(None);
        }
    }

    /// `prefetch` capped by the limit (for a member that cannot draw on the pool: one
    /// in another process).
    pub fn capped(&self, prefetch: usize) -> usize {
        match self.limit() {
            0 => prefetch,
            l => prefetch.min(l),
        }
    }

    /// Units free now.
    pub(super) fn available(&self) -> usize {
        match self.limit() {
            0 => usize::MAX,
            l => l.saturating_sub(self.in_use()),
        }
    }

    /// Take a unit for one delivery; false if none is free.
    pub(super) fn try_take(&self) -> bool {
        let limit = self.limit();
        if limit == 0 {
            self.used.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < limit).then_some(u + 1)
            })
            .is_ok()
    }

    /// Give back `n` units; the groups are woken if the pool was full, but `by`, the
    /// group giving them back from its actor (it pumps after settling anyway).
    pub(super) fn release(&self, n: usize, by: Option<&Arc<GroupWake>>) {
        if n == 0 {
            return;
        }
        let before = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            })
            .unwrap_or_else(|u| u);
        let limit = self.limit();
        if limit != 0 && before >= limit && before.saturating_sub(n) < limit {
            self.wake_groups(by);
        }
    }

    /// A group whose members draw on the pool.
    pub(super) fn register(&self, wake: &Arc<GroupWake>) {
        let mut groups = self.groups.lock();
        groups.retain(|w| w.strong_count() > 0);
        if !groups.iter().any(|w| w.as_ptr() == Arc::as_ptr(wake)) {
            groups.push(Arc::downgrade(wake));
        }
    }

    fn wake_groups(&self, but: Option<&Arc<GroupWake>>) {
        let live: Vec<Arc<GroupWake>> = {
            let mut groups = self.groups.lock();
            groups.retain(|w| w.strong_count() > 0);
            groups
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|g| but.is_none_or(|b| !Arc::ptr_eq(g, b)))
                .collect()
        };
        for g in live {
            g.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_taken_up_to_the_limit_and_given_back() {
        let p = CreditPool::new(2);
        assert_eq!(p.available(), 2);
        assert!(p.try_take());
        assert!(p.try_take());
        assert!(!p.try_take(), "full");
        assert_eq!(p.available(), 0);
        p.release(1, None);
        assert!(p.try_take());
        p.set_limit(3);
        assert_eq!(p.available(), 1);
        p.set_limit(1);
        assert_eq!(p.available(), 0, "over a lowered limit: nothing free");
        assert!(!p.try_take());
        p.release(5, None);
        assert_eq!(p.in_use(), 0, "never below zero");
        p.set_limit(0);
        assert_eq!(p.available(), usize::MAX);
        assert!(p.try_take());
        assert_eq!(p.in_use(), 1, "counted without a limit");
        assert_eq!(p.capped(10), 10);
        p.set_limit(4);
        assert_eq!(p.capped(10), 4);
    }

    #[test]
    fn concurrent_takers_never_pass_the_limit() {
        let p = CreditPool::new(100);
        let taken = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        if p.try_take() {
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(taken.load(Ordering::Relaxed), 100);
        assert_eq!(p.in_use(), 100);
    }
}
