//! The delay scheduler: releases due timers into their topics.
//!
//! # Delayed message state machine
//! ```text
//!  publish with delay ──> Pending (a timer in the store: due time, route, whole message)
//!  Pending ──(due; one store batch: append to the routed queues + delete the timer)──> Released
//!  crash while Pending ──> still Pending after restart, released late by at most the downtime
//! ```
//! The scheduler keeps a cursor (the last timer it released) so it never rescans released
//! ones; a timer added before the cursor (a short delay while long ones are being
//! released) rewinds it.

use std::sync::Weak;
use std::time::Duration;

use mqgate_store::TimerKey;

use crate::broker::Inner;

pub(crate) async fn run(inner: Weak<Inner>) {
    let mut cursor: Option<TimerKey> = None;
    loop {
        let Some(b) = inner.upgrade() else { return };
        if let Some(rewind) = b.delay_rewind() {
            if cursor.is_some_and(|c| rewind <= c.due) {
                cursor = None;
            }
        }
        match b.release_due(cursor).await {
            Ok((n, last)) => {
                cursor = last;
                if n >= b.config.release_batch {
                    continue;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "core: releasing delayed messages failed; retrying");
                drop(b);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let next = match b.store.timers_due(u64::MAX, cursor, 1).await {
            Ok(v) => v.first().map(|(k, _)| k.due),
            Err(e) => {
                tracing::error!(error = %e, "core: reading timers failed");
                Some(b.clock.now() + 100)
            }
        };
        let clock = std::sync::Arc::clone(&b.clock);
        tokio::select! {
            _ = clock.sleep_until(next.unwrap_or(u64::MAX)), if next.is_some() => {}
            _ = b.delay_woken() => {}
        }
    }
}
