//! A member of a group in a shard this gateway owns, in a cluster: when the shard moves
//! to another gateway, the member follows it (joins the group there, over the consume
//! relay) instead of ending. The client never sees the move; what it held and had not
//! acknowledged is delivered again by the new owner (from the committed offsets), as
//! after any move, flagged redelivered below the group's delivered mark, which the
//! shard's store carries to the new owner (`marks::DELIVERED_NS`).
//!
//! ```text
//!  Broker::subscribe (cluster, local shard)
//!    inner: a local member ──deliveries──> pump ──> the consumer's mailbox
//!    acks, nacks, prefetch ──> Migrating ──> inner
//!  the inner member ends:
//!    shard still owned here (group deleted, member cut off, shutdown) ──> consumer ends
//!    shard gone (released, lost) ──> join the group wherever it is now (the relay, or
//!                                   here again), the same member id and prefetch,
//!                                   and go on pumping from the new inner member
//! ```
//! A broker of its own never wraps its consumers: the hop costs a task switch per
//! delivery, paid only by gateways of a cluster.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{AckToken, Consumer, Control, GroupSpec, Left, MemberOptions, RemoteControl};
use crate::error::CoreError;
use crate::mailbox;

/// How long a member whose shard moved tries to join its next owner (a takeover after
/// a crash takes the lease's time to live) before its consumer ends.
const FOLLOW_FOR: Duration = Duration::from_secs(60);

/// The outer consumer's control: whatever the member is now.
struct Migrating {
    inner: Mutex<Option<Consumer>>,
    prefetch: Mutex<usize>,
    /// The consumer was dropped: the pump closes the member's mailbox, then lets the
    /// member go (a group's actor ignores a leave while the mailbox is open).
    leaving: tokio::sync::Notify,
    /// Set once the pump has let the member go (its leave sent to a group actor here,
    /// whose next command sees it gone; or a relayed member's leave answered): what
    /// [`RemoteControl::left`] waits for.
    gone: tokio::sync::watch::Sender<bool>,
}

/// Sets [`Migrating::gone`] when the pump ends, however it ends.
struct GoneOnExit(Arc<Migrating>);

impl Drop for GoneOnExit {
    fn drop(&mut self) {
        self.0.gone.send_replace(true);
    }
}

impl RemoteControl for Migrating {
    fn ack(&self, token: AckToken) {
        if let Some(c) = &*self.inner.lock() {
            c.ack(token);
        }
    }
    fn nack(&self, token: AckToken, requeue: bool) {
        if let Some(c) = &*self.inner.lock() {
            c.nack(token, requeue);
        }
    }
    fn release(&self, token: AckToken) {
        if let Some(c) = &*self.inner.lock() {
            c.release(token);
        }
    }
    fn heartbeat(&self) {
        if let Some(c) = &*self.inner.lock() {
            c.heartbeat();
        }
    }
    fn set_prefetch(&self, prefetch: usize) {
        *self.prefetch.lock() = prefetch;
        if let Some(c) = &*self.inner.lock() {
            c.set_prefetch(prefetch);
        }
    }
    fn leave(&self) {
        self.leaving.notify_one();
    }
    fn left(&self) -> Left {
        // Not at once for a member here: the pump lets it go after the consumer is
        // dropped, and an auto-delete queue's last consumer asks the group right
        // after whether any member is left (it found this one still there).
        let mut gone = self.gone.subscribe();
        Box::pin(async move {
            let _ = gone.wait_for(|g| *g).await;
        })
    }
}

impl crate::Broker {
    /// `inner`, a member of `spec` in shard `shard` owned here, as a consumer that
    /// follows the shard wherever it moves (see the module's notes).
    pub(crate) fn following(
        &self,
        mut inner: Consumer,
        spec: GroupSpec,
        member: MemberOptions,
        shard: crate::shard::ShardId,
    ) -> Consumer {
        let rx = inner.take_rx();
        let ctl = Arc::new(Migrating {
            inner: Mutex::new(Some(inner)),
            prefetch: Mutex::new(member.prefetch),
            leaving: tokio::sync::Notify::new(),
            gone: tokio::sync::watch::channel(false).0,
        });
        // An unbounded member's counts are the outer consumer's: the group (here, or
        // over the relay) counts what it put in, the client's consumer what it took.
        let drain = member.drain.clone().filter(|_| member.unbounded);
        let (outer, out) =
            Consumer::remote_drained(&member.id, spec.name.clone(), ctl.clone(), drain);
        tokio::spawn(pump(self.clone(), ctl, rx, out, spec, member, shard));
        outer
    }
}

async fn pump(
    broker: crate::Broker,
    ctl: Arc<Migrating>,
    mut rx: mailbox::Receiver<super::Delivery>,
    out: mailbox::Sender<super::Delivery>,
    spec: GroupSpec,
    mut member: MemberOptions,
    mut shard: crate::shard::ShardId,
) {
    // Whether the member is in this process now (a member over the relay follows its
    // group's moves by itself, and ends for good when it ends).
    let mut local = true;
    let _gone = GoneOnExit(Arc::clone(&ctl));
    loop {
        let next = tokio::select! {
            biased;
            () = ctl.leaving.notified() => {
                let_go(&ctl, &mut rx).await;
                return;
            }
            d = rx.recv() => d,
        };
        if let Some(d) = next {
            if let Err(d) = out.send(d) {
                // The consumer is being dropped (it closes its mailbox, gives back what
                // the mailbox held through `ctl`, then leaves): this delivery never
                // reached the client either. The member goes once the leave comes, so
                // those releases still find it; `let_go` closes the member's mailbox.
                if let Some(c) = &*ctl.inner.lock() {
                    c.release(d.ack_token());
                }
                ctl.leaving.notified().await;
                let_go(&ctl, &mut rx).await;
                return;
            }
            continue;
        }
        let closed = broker
            .inner
            .closed
            .load(std::sync::atomic::Ordering::Acquire);
        if out.is_closed() || closed || !local || broker.inner.local(shard).is_some() {
            // Ended for good: the group deleted, the member cut off, the broker
            // stopping, or a relayed member that ended. The consumer ends too.
            return;
        }
        member.prefetch = *ctl.prefetch.lock();
        let Some((mut next, at)) = follow(&broker, &spec, &member, &out).await else {
            return;
        };
        shard = at;
        local = matches!(next.cmd, Control::Local(_));
        rx = next.take_rx();
        if member.unbounded {
            // Its group may have found the mailbox full of what the member before put
            // there, and the consumer have taken it all since, asking the member
            // before for more: ask this one.
            next.heartbeat();
        }
        let mut inner = ctl.inner.lock();
        *inner = Some(next);
    }
}

/// The consumer was dropped: the member goes, after what is still on its way to the
/// consumer is released (it never reached the client: not counted as a delivery, as a
/// consumer's own mailbox is).
async fn let_go(ctl: &Migrating, rx: &mut mailbox::Receiver<super::Delivery>) {
    rx.close();
    let inner = ctl.inner.lock().take();
    if let Some(c) = inner {
        while let Some(d) = rx.try_recv() {
            c.release(d.ack_token());
        }
        // Sends the leave (a relayed member's: and waits for its answer).
        c.leave().await;
    }
}

/// Join `spec` again wherever its shard is now, for as long as the consumer lives (up
/// to [`FOLLOW_FOR`]): the new member and its shard.
async fn follow(
    broker: &crate::Broker,
    spec: &GroupSpec,
    member: &MemberOptions,
    out: &mailbox::Sender<super::Delivery>,
) -> Option<(Consumer, crate::shard::ShardId)> {
    let since = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        if out.is_closed() {
            return None;
        }
        match broker.subscribe_direct(spec.clone(), member.clone()).await {
            Ok(c) => {
                let at = broker.inner.placement.group(&spec.name);
                tracing::info!(group = %spec.name, member = %member.id, shard = at, "cluster: a member followed its group's shard to its next owner");
                return Some((c, at));
            }
            Err(e @ (CoreError::NotOwned(_) | CoreError::Store(_) | CoreError::Invalid(_)))
                if since.elapsed() < FOLLOW_FOR =>
            {
                tracing::debug!(group = %spec.name, error = %e, "cluster: following a moved group; again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::warn!(group = %spec.name, error = %e, "cluster: a member could not follow its group's shard; its consumer ends");
                return None;
            }
        }
    }
}
