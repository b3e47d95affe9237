//! Keep alive: one sweep over every connection, instead of a timer per connection.
//!
//! A connection publishes, in its [`Done`](crate::server::Done), its keep-alive
//! allowance (1.5 times what the client asked, or the server's maximum) and when it last
//! read, as milliseconds since the server started. Every [`SWEEP`] one task looks at
//! every registered connection and kicks, with reason 0x8D (keep alive timeout), those
//! that have read nothing for their allowance. The kick is a hint: the connection
//! checks its own clock (a read may have raced the sweep; a publisher held at the memory
//! watermark is not timed out) and ends only if it is overdue. A connection is kicked at
//! most once per allowance. This is what Mosquitto does (one keep-alive check for all
//! clients): an idle connection holds no timer (a boxed `Sleep`, ~110 bytes, and a
//! registration in the runtime's timer wheel each), and a connection closes at most
//! [`SWEEP`] after its deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::codec::reason;
use crate::server::Shared;

/// How often the sweep looks at every connection.
pub(crate) const SWEEP: Duration = Duration::from_millis(250);

/// A connection's keep-alive clock as the sweep sees it (in its `Done`).
#[derive(Debug, Default)]
pub(crate) struct Clock {
    /// The allowance in ms (0: no keep alive).
    allowance: AtomicU64,
    /// When the connection last read (ms since the server started).
    last_read: AtomicU64,
}

impl Clock {
    /// Time the connection with `allowance` (`None`: never), from `now`.
    pub(crate) fn start(&self, allowance: Option<Duration>, now: u64) {
        self.last_read.store(now, Ordering::Relaxed);
        let ms = allowance.map_or(0, |a| (a.as_millis() as u64).max(1));
        self.allowance.store(ms, Ordering::Relaxed);
    }

    /// The connection read (or its clock restarts) at `at`.
    pub(crate) fn touch(&self, at: u64) {
        self.last_read.store(at, Ordering::Relaxed);
    }

    /// Whether it has read nothing for its allowance at `now`; if so its clock restarts
    /// at `now` (kicked once per allowance).
    fn overdue(&self, now: u64) -> bool {
        let allowance = self.allowance.load(Ordering::Relaxed);
        if allowance == 0 || now.saturating_sub(self.last_read.load(Ordering::Relaxed)) < allowance
        {
            return false;
        }
        self.last_read.store(now, Ordering::Relaxed);
        true
    }
}

/// Start the sweep (its timer is the core's, `net::sweep_every`); it ends with the
/// server (shutdown, or the last reference gone).
pub(crate) fn spawn_sweep(shared: &Arc<Shared>) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    mqgate_core::net::sweep_every(SWEEP, shared.shutdown.subscribe(), move || {
        let Some(shared) = weak.upgrade() else {
            return false;
        };
        let now = shared.millis(Instant::now());
        for slot in shared.clients.lock().values() {
            if slot.done.keep_alive().overdue(now) {
                let _ = slot.kick.send(reason::KEEP_ALIVE_TIMEOUT);
            }
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overdue_once_per_allowance() {
        let c = Clock::default();
        assert!(!c.overdue(1_000_000), "not started: no keep alive");
        c.start(Some(Duration::from_millis(1_500)), 1_000);
        assert!(!c.overdue(2_499));
        assert!(c.overdue(2_500));
        // Kicked: not again before another allowance.
        assert!(!c.overdue(2_750));
        assert!(c.overdue(4_000));
        // A read moves it on.
        c.touch(4_500);
        assert!(!c.overdue(5_999));
        assert!(c.overdue(6_000));
        c.start(None, 0);
        assert!(!c.overdue(u64::MAX));
    }
}
