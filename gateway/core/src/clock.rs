//! Time, injected: the broker reads the clock through [`Clock`] so tests can drive delays
//! and retry ladders with a [`ManualClock`] instead of sleeping.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqgate_store::Millis;
use tokio::sync::Notify;

/// A source of wall-clock milliseconds that can also wait until a moment.
#[async_trait::async_trait]
pub trait Clock: Send + Sync + Debug + 'static {
    /// Now, in ms since the Unix epoch.
    fn now(&self) -> Millis;

    /// Return at `deadline` or later (early returns are allowed: callers re-check).
    async fn sleep_until(&self, deadline: Millis);
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

#[async_trait::async_trait]
impl Clock for SystemClock {
    fn now(&self) -> Millis {
        mqgate_store::now_millis()
    }

    async fn sleep_until(&self, deadline: Millis) {
        let now = self.now();
        if deadline > now {
            tokio::time::sleep(Duration::from_millis(deadline - now)).await;
        }
    }
}

/// A clock that moves only when told to ([`ManualClock::advance`]), waking sleepers.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
    moved: Arc<Notify>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Millis) -> Self {
        Self {
            now: Arc::new(AtomicU64::new(start)),
            moved: Arc::new(Notify::new()),
        }
    }

    /// Move the clock forward.
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_millis() as u64, Ordering::AcqRel);
        self.moved.notify_waiters();
    }
}

#[async_trait::async_trait]
impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.now.load(Ordering::Acquire)
    }

    async fn sleep_until(&self, deadline: Millis) {
        loop {
            let moved = self.moved.notified();
            if self.now() >= deadline {
                return;
            }
            moved.await;
        }
    }
}
