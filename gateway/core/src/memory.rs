//! The memory watermark: one periodic check of the process's resident memory sets a
//! flag that every protocol adapter watches. While it is set, connections that have
//! published are no longer read (AMQP tells them with connection.blocked first; MQTT
//! has no such packet, so TCP pushes back on the client); consumer-only connections go
//! on, since their acknowledgements are what frees memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Weak;

use tokio::sync::watch;

use crate::broker::{Broker, Common};

/// The watermark's state, owned by the core.
#[derive(Debug)]
pub(crate) struct MemoryWatermark {
    /// The limit in bytes (0: off).
    limit: AtomicU64,
    /// Resident memory was above the limit at the last check.
    over: AtomicBool,
    /// Publishers blocked by hand (an operator, a test), whatever the memory.
    forced: AtomicBool,
    /// What adapters watch: `over || forced`.
    blocked: watch::Sender<bool>,
}

impl MemoryWatermark {
    pub(crate) fn new(limit: Option<u64>) -> Self {
        Self {
            limit: AtomicU64::new(limit.unwrap_or(0)),
            over: AtomicBool::new(false),
            forced: AtomicBool::new(false),
            blocked: watch::channel(false).0,
        }
    }

    /// Compare resident memory with the limit; log only when it crosses.
    pub(crate) fn check(&self) {
        let limit = self.limit.load(Ordering::Acquire);
        let (over, rss) = match limit {
            0 => (false, 0),
            _ => {
                let rss = process_rss();
                (rss > limit, rss)
            }
        };
        if self.over.swap(over, Ordering::AcqRel) != over {
            if over {
                tracing::warn!(
                    rss,
                    limit,
                    "memory above the high watermark: publishers blocked"
                );
            } else {
                tracing::info!(
                    rss,
                    limit,
                    "memory back below the high watermark: publishers unblocked"
                );
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let v = self.over.load(Ordering::Acquire) || self.forced.load(Ordering::Acquire);
        // Whether or not anyone watches (a watch with no receiver refuses `send`).
        self.blocked
            .send_if_modified(|b| std::mem::replace(b, v) != v);
    }
}

/// Check the watermark every `memory_check_interval` until the core stops.
pub(crate) async fn run(inner: Weak<Common>) {
    let Some(interval) = inner.upgrade().map(|i| i.config.memory_check_interval) else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(i) = inner.upgrade() else { return };
        i.memory.check();
    }
}

/// Resident memory of this process in bytes (0 where /proc is missing).
fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

impl Broker {
    /// Whether publishers are blocked now (memory above the watermark, or by hand).
    pub fn is_memory_blocked(&self) -> bool {
        *self.inner.memory.blocked.borrow()
    }

    /// A watch of [`Broker::is_memory_blocked`]: adapters stop reading from connections
    /// that publish while it is `true`.
    pub fn memory_blocked(&self) -> watch::Receiver<bool> {
        self.inner.memory.blocked.subscribe()
    }

    /// Block publishers by hand (`true`) whatever the memory, or stop doing so (`false`:
    /// the watermark alone decides again). For operators and tests.
    pub fn set_publishers_blocked(&self, blocked: bool) {
        self.inner.memory.forced.store(blocked, Ordering::Release);
        self.inner.memory.publish();
    }

    /// The memory high watermark in bytes (`None`: off).
    pub fn memory_high_watermark(&self) -> Option<u64> {
        match self.inner.memory.limit.load(Ordering::Acquire) {
            0 => None,
            l => Some(l),
        }
    }

    /// Change the memory high watermark (`None`: off); checked at once.
    pub fn set_memory_high_watermark(&self, limit: Option<u64>) {
        self.inner
            .memory
            .limit
            .store(limit.unwrap_or(0), Ordering::Release);
        self.inner.memory.check();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_sticks_without_watchers_and_forcing_adds_to_it() {
        // Nobody watches (no client connected): the state must still change once, not
        // be refused and "crossed" again at every check.
        let w = MemoryWatermark::new(Some(1));
        w.check();
        assert!(*w.blocked.borrow() && w.over.load(Ordering::Acquire));
        w.check();
        assert!(*w.blocked.borrow());
        w.limit.store(u64::MAX, Ordering::Release);
        w.check();
        assert!(!*w.blocked.borrow());
        w.forced.store(true, Ordering::Release);
        w.check();
        assert!(*w.blocked.borrow(), "blocked by hand whatever the memory");
        w.limit.store(0, Ordering::Release);
        w.forced.store(false, Ordering::Release);
        w.check();
        assert!(!*w.blocked.borrow());
    }
}
