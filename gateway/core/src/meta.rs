//! The routing state of a cluster (`docs/design/sharding.md` section 3, "Meta"): shard
//! 0's owner is its one writer, and every other gateway follows shard 0's log into its
//! own router.
//!
//! ```text
//!  bind/declare/... on a gateway without shard 0
//!     ──admin relay (RoutingOp)──> shard 0's owner: its router, then one write of the
//!                                  change (transient ones too) to shard 0's log
//!     <──(per-change results, log position after the write)──
//!     wait until this gateway's follower applied that position (the barrier), return
//!
//!  follower (cluster crate) ──each record of shard 0's log──> apply_followed_routing:
//!     shard 0 owned here:   skipped (the router is the writer's own)
//!     shard 0 being let go: held until the detach says from where the log goes on
//!     otherwise:            each routing change applied to the router
//! ```
//! Taking shard 0 rebuilds the router from the store and swaps it in; letting it go
//! rebuilds it from the stopped store again (what the log has up to this gateway's
//! last write) and records that position, so the follower skips what this gateway
//! wrote itself; records another gateway wrote meanwhile (one that fenced this one)
//! are applied after it. On the owner, routing changes take turns, so the log has
//! them in the order the router took them. Until its follower has reached the log's end as it was at
//! start ([`crate::Broker::routing_caught_up`]), a gateway sends exchange publishes to
//! shard 0's owner rather than routing them with a router still filling.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mqgate_store::KvChange;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::durable::RoutingOp;
use crate::error::{CoreError, Result};
use crate::shard::{AdminAnswer, AdminOp};

/// How long a relayed routing change waits for this gateway's follower to apply it;
/// after that it returns anyway (the change is durable; this router catches up later).
const BARRIER: Duration = Duration::from_secs(10);

/// What a gateway knows about how far it followed the routing log.
#[derive(Debug)]
pub(crate) struct MetaFollow {
    /// Held while the router is swapped (shard 0 taken or let go) and while a followed
    /// record is applied, so neither sees the other half-done.
    lock: Mutex<Followed>,
    /// The last record of shard 0's log applied (or skipped as already known).
    applied: watch::Sender<u64>,
    /// Whether the follower has reached the log's end as it was at start.
    ready: AtomicBool,
    /// Records at or below this one were written by this gateway as shard 0's owner.
    floor: AtomicU64,
    /// Routing changes on the owner run one at a time, so the log has them in the
    /// order the router took them (a cluster only).
    writes: tokio::sync::Mutex<()>,
}

/// A record's routing changes, by sequence.
type Changes = Vec<(u64, Vec<KvChange>)>;

#[derive(Debug, Default)]
struct Followed {
    /// While shard 0 is owned here: records beyond this gateway's own log position
    /// (another gateway that fenced this one wrote them): applied if the shard is let
    /// go, dropped once the position passes them (they were this gateway's own).
    foreign: Changes,
    /// Shard 0 is being let go: records arriving now wait here (and the last sequence
    /// seen) until the detach has set the floor.
    held: Option<(Changes, u64)>,
}

impl Default for MetaFollow {
    fn default() -> Self {
        Self {
            lock: Mutex::default(),
            applied: watch::channel(0).0,
            ready: AtomicBool::new(false),
            floor: AtomicU64::new(0),
            writes: tokio::sync::Mutex::new(()),
        }
    }
}

impl MetaFollow {
    pub(crate) fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn advance(&self, seq: u64) {
        self.applied.send_if_modified(|a| {
            let newer = seq > *a;
            *a = (*a).max(seq);
            newer
        });
    }
}

/// The routing changes among `changes`, in the order they apply within one record.
fn routing_only(changes: Vec<KvChange>) -> Vec<KvChange> {
    let mut out: Vec<(u8, KvChange)> = changes
        .into_iter()
        .filter_map(|c| crate::durable::apply_rank(&c).map(|r| (r, c)))
        .collect();
    out.sort_by_key(|(r, _)| *r);
    out.into_iter().map(|(_, c)| c).collect()
}

fn apply_all(router: &crate::Router, seq: u64, changes: &[KvChange]) {
    for c in changes {
        if let Err(e) = crate::durable::apply_change(router, c) {
            tracing::warn!(seq, error = %e, "cluster: a followed routing change could not be decoded; skipped");
        }
    }
}

impl crate::Broker {
    /// Apply record `seq` of shard 0's log, with its keyed-area changes, to this
    /// gateway's router (what a follower of the routing log calls for each record, in
    /// order; `changes` may be empty). Skipped while shard 0 is owned here, and for
    /// records this gateway wrote as its owner.
    pub fn apply_followed_routing(&self, seq: u64, changes: Vec<KvChange>) {
        let m = &self.inner.meta_follow;
        let changes = routing_only(changes);
        let mut f = m.lock.lock();
        if let Some((held, last)) = f.held.as_mut() {
            if !changes.is_empty() {
                held.push((seq, changes));
            }
            *last = (*last).max(seq);
            return;
        }
        match self.inner.local(0) {
            Some(meta) => {
                let pos = meta.store.log_position().unwrap_or(0);
                f.foreign.retain(|(s, _)| *s > pos);
                if seq > pos && !changes.is_empty() {
                    f.foreign.push((seq, changes));
                }
            }
            None => {
                if seq > m.floor.load(Ordering::Acquire) {
                    apply_all(&self.inner.router, seq, &changes);
                }
            }
        }
        m.advance(seq);
    }

    /// The follower of the routing log has reached the log's end as it was when it
    /// started: this gateway routes exchange publishes itself from now on.
    pub fn routing_caught_up(&self) {
        if !self.inner.meta_follow.ready.swap(true, Ordering::AcqRel) {
            tracing::info!(
                applied = *self.inner.meta_follow.applied.borrow(),
                "cluster: the routing state is followed; exchange publishes are routed here"
            );
        }
    }

    /// Whether this gateway routes with the cluster's routing state: it owns shard 0,
    /// or its follower has caught up once (a broker of its own always does).
    pub fn routing_followed(&self) -> bool {
        self.inner.link.is_none()
            || self.inner.local(0).is_some()
            || self.inner.meta_follow.ready.load(Ordering::Acquire)
    }

    /// The last record of the routing log this gateway has applied.
    pub fn routing_applied(&self) -> u64 {
        *self.inner.meta_follow.applied.borrow()
    }

    /// On shard 0's owner in a cluster: the turn of one routing change (router and
    /// log in the same order). `None` elsewhere.
    pub(crate) async fn routing_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.inner.link.as_ref()?;
        Some(self.inner.meta_follow.writes.lock().await)
    }

    /// Shard 0 is attached here: swap in the router rebuilt from its store.
    pub(crate) fn meta_attached(&self, fresh: crate::Router, attach: impl FnOnce()) {
        let mut f = self.inner.meta_follow.lock.lock();
        self.inner.router.replace(fresh);
        f.foreign.clear();
        attach();
    }

    /// Shard 0 is being detached: hold what the follower brings until
    /// [`crate::Broker::meta_detached`].
    pub(crate) fn meta_detaching(&self) {
        self.inner.meta_follow.lock.lock().held = Some((Vec::new(), 0));
    }

    /// Shard 0 is detached; `position` is its log's last record this gateway wrote (or
    /// replayed), `fresh` the router rebuilt from its store (what the log says up to
    /// `position`; `None`: it could not be read, the router stays). Records after
    /// `position` that arrived meanwhile, or while the shard was owned here, are
    /// applied in order.
    pub(crate) fn meta_detached(&self, position: Option<u64>, fresh: Option<crate::Router>) {
        let m = &self.inner.meta_follow;
        let mut f = m.lock.lock();
        if let Some(fresh) = fresh {
            self.inner.router.replace(fresh);
        }
        let floor = position.unwrap_or(0);
        m.floor.fetch_max(floor, Ordering::AcqRel);
        let (held, last) = f.held.take().unwrap_or_default();
        let mut pending = std::mem::take(&mut f.foreign);
        pending.extend(held);
        pending.retain(|(s, _)| *s > floor);
        pending.sort_by_key(|(s, _)| *s);
        for (seq, changes) in &pending {
            apply_all(&self.inner.router, *seq, changes);
        }
        m.advance(floor.max(last));
    }

    /// Run `op` on shard 0's owner when that is another gateway: its per-change
    /// results once this gateway's router has it too. `None`: shard 0 is here (or
    /// there is no cluster), run it here.
    pub(crate) async fn relay_routing(
        &self,
        op: impl FnOnce() -> RoutingOp,
    ) -> Result<Option<Vec<Result<bool>>>> {
        let Some(link) = &self.inner.link else {
            return Ok(None);
        };
        if self.inner.local(0).is_some() {
            return Ok(None);
        }
        match link.admin(0, AdminOp::Routing(op())).await? {
            AdminAnswer::Routed { results, position } => {
                self.routing_barrier(position).await;
                Ok(Some(results))
            }
            other => Err(CoreError::Invalid(format!(
                "the admin relay answered a routing change with {other:?}"
            ))),
        }
    }

    /// Wait until this gateway's router has applied the routing log up to `position`.
    async fn routing_barrier(&self, position: u64) {
        let mut rx = self.inner.meta_follow.applied.subscribe();
        let deadline = tokio::time::Instant::now() + BARRIER;
        loop {
            if self.inner.local(0).is_some() || *rx.borrow_and_update() >= position {
                return;
            }
            tokio::select! {
                _ = rx.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        position,
                        applied = *rx.borrow(),
                        "cluster: a routing change is durable on shard 0's owner but not yet followed here; going on"
                    );
                    return;
                }
            }
        }
    }

    /// Run a routing change here (this gateway owns shard 0): what the admin relay's
    /// server does for another gateway. The answer carries the log position after it.
    pub(crate) async fn run_routing(&self, op: RoutingOp) -> Result<AdminAnswer> {
        let one = |r: Result<bool>| vec![r];
        let results = match op {
            RoutingOp::AddVhost(v) => one(self.add_vhost(&v).await.map(|()| true)),
            RoutingOp::DeclareExchange(v, def) => one(self.declare_exchange(&v, def).await),
            RoutingOp::DeleteExchange(v, name, if_unused) => {
                one(self.delete_exchange(&v, &name, if_unused).await)
            }
            RoutingOp::Bind(v, bindings, durable) => self.bind_many(&v, bindings, durable).await?,
            RoutingOp::Unbind(v, bindings) => self.unbind_many(&v, &bindings).await?,
            RoutingOp::UnbindTopic(v, t) => one(self.unbind_topic(&v, &t).await.map(|()| true)),
        };
        let position = match self.inner.local(0) {
            Some(meta) => meta.store.log_position().unwrap_or(0),
            None => self.routing_applied(),
        };
        Ok(AdminAnswer::Routed { results, position })
    }
}

/// The first (only) result of a relayed change of one thing.
pub(crate) fn first(results: Vec<Result<bool>>) -> Result<bool> {
    results.into_iter().next().unwrap_or_else(|| {
        Err(CoreError::Invalid(
            "a routing change answered nothing".into(),
        ))
    })
}
