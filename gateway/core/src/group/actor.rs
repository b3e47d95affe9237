//! The group actor: its state, run loop, membership and offsets (the queues it reads:
//! `cursors.rs`; its state of each queue: `queue.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mailbox;
use mqgate_store::{GroupName, Millis, QueueOffset, QueueRef, StoredMessage, WriteBatch};
use tokio::sync::oneshot;

use super::cursors::Watched;
use super::marks::{delivered_key, DELIVERED_NS};
use super::park::{CoreRef, GroupWake, Park};
use super::queue::{held_record, HELD_UNKNOWN};
pub(super) use super::queue::{held_settled, InFlight, Pending, QueueState};
use super::vecmap::VecMap;
use super::{
    Cmd, ConsumeMode, Delivery, GroupHandle, GroupInfo, GroupSpec, MemberInfo, QueueInfo,
    StartPosition,
};
use crate::endpoint::DeathReason;
use crate::error::Result;

/// How long a member whose mailbox was found closed waits for its consumer's leave.
const CLOSED_GRACE: Duration = Duration::from_secs(2);

pub(super) struct Member {
    pub(super) tx: mailbox::Sender<Delivery>,
    pub(super) prefetch: usize,
    pub(super) exact: bool,
    /// An unbounded member ([`super::MemberOptions::unbounded`]): `prefetch` bounds
    /// what waits on its way to the consumer (put in, not yet taken).
    pub(super) drain: Option<Arc<super::Drain>>,
    /// Its mailbox was found closed (the consumer is being dropped): nothing more is
    /// sent to it, and it goes with the leave its consumer sends (what the consumer
    /// gives back meanwhile still finds it), or after [`CLOSED_GRACE`] without one.
    pub(super) closed: Option<Instant>,
    /// Delivered, not settled; changed through [`Member::delivered`] and
    /// [`Member::settled`], which keep the credit pool's count with it.
    pub(super) unacked: usize,
    /// Credit shared with other members ([`super::MemberOptions::credit_pool`]).
    pub(super) pool: Option<Arc<super::CreditPool>>,
    pub(super) heartbeat: bool,
    pub(super) last_seen: Instant,
    /// Broadcast: this member's own cursors.
    pub(super) cursors: VecMap<QueueRef, QueueState>,
}

impl Member {
    pub(super) fn credit(&self) -> usize {
        if self.closed.is_some() {
            return 0;
        }
        let own = match &self.drain {
            Some(d) => match self.prefetch.saturating_sub(d.waiting()) {
                // Full: flagged, then counted again (`Drain`).
                0 => {
                    d.starve();
                    self.prefetch.saturating_sub(d.waiting())
                }
                room => room,
            },
            None => self.prefetch.saturating_sub(self.unacked),
        };
        match &self.pool {
            Some(p) => own.min(p.available()),
            None => own,
        }
    }

    /// One more delivery in flight (its pool unit, if any, was taken as it was sent).
    pub(super) fn delivered(&mut self) {
        self.unacked += 1;
        if let Some(d) = &self.drain {
            d.put(1);
        }
    }

    /// `n` deliveries settled (or taken back) by the actor of `group`: their pool units
    /// go back (the other groups drawing on the pool are woken if it was full).
    pub(super) fn settled(&mut self, n: usize, group: &Arc<GroupWake>) {
        let n = n.min(self.unacked);
        self.unacked -= n;
        if let Some(p) = &self.pool {
            p.release(n, Some(group));
        }
    }
}

impl Drop for Member {
    /// A member that leaves (or whose group ends) gives back the pool units of what it
    /// held: those messages go to other members.
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            p.release(self.unacked, None);
        }
    }
}

/// A member's id in the actor: shared, so a delivery in flight names its member
/// without a copy of the string.
pub(super) type MemberId = Arc<str>;

/// A message the policy settled at delivery, to be dead-lettered.
pub(super) struct Dying {
    pub(super) offset: u64,
    pub(super) message: Arc<StoredMessage>,
    pub(super) count: u32,
    pub(super) reason: DeathReason,
}

/// How long a queue pauses after its settlement could not be stored.
pub(super) const FAILED_WRITE_PAUSE_MS: u64 = 1_000;
/// The most messages one expiry sweep settles per queue.
pub(super) const EXPIRE_SWEEP_MAX: usize = 10_000;

pub(super) struct Actor {
    pub(super) inner: CoreRef,
    pub(super) spec: Arc<GroupSpec>,
    pub(super) max_reconsume: u32,
    pub(super) members: VecMap<MemberId, Member>,
    /// Clustering and shared groups: one state per queue.
    pub(super) queues: VecMap<QueueRef, QueueState>,
    pub(super) watched: Vec<Watched>,
    pub(super) wake: Arc<GroupWake>,
    pub(super) rx: mailbox::Receiver<Cmd>,
    pub(super) next_token: u64,
    pub(super) rr: usize,
    pub(super) skipped: u64,
    pub(super) last_commit: Instant,
    pub(super) handle: GroupHandle,
    pub(super) stopped: Option<oneshot::Sender<()>>,
    /// Since when the group has had no member (`None`: it has members).
    pub(super) empty_since: Option<Instant>,
}

/// RocketMQ's average allocation of `queues` over `members`: member `k` takes a run of
/// `queues / n` queues, plus one for the first `queues % n` members.
fn owner_of(index: usize, queues: usize, members: &[MemberId]) -> Option<&MemberId> {
    let n = members.len();
    let base = queues.checked_div(n)?;
    let extra = queues % n;
    let k = if index < extra * (base + 1) {
        index / (base + 1)
    } else {
        extra + (index - extra * (base + 1)).checked_div(base)?
    };
    members.get(k)
}

/// The most unacknowledged messages a member that asked for an exact limit may hold:
/// AMQP's largest `prefetch_count` (a short), which RabbitMQ honours.
pub(crate) const EXACT_PREFETCH_MAX: usize = u16::MAX as usize;

/// A member's credit from what it asked for: 0 is the broker's maximum unless the
/// member asked for exactly that (a pull consumer); an exact limit is honoured up to
/// [`EXACT_PREFETCH_MAX`] (a consumer that acks every 5,000 messages with basic.qos
/// 5,000 must be sent 5,000), any other up to `max` (`CoreConfig::max_prefetch`).
fn member_prefetch(asked: usize, exact: bool, max: usize) -> usize {
    match (asked, exact) {
        (0, false) => max,
        (n, true) => n.min(EXACT_PREFETCH_MAX.max(max)),
        (n, false) => n.min(max),
    }
}

/// Where a delivery goes.
pub(super) enum Target {
    Owner(MemberId),
    AnyWithCredit,
    Member(MemberId),
}

impl Actor {
    /// The actor's loop. Every step that awaits runs boxed, so the task an idle group
    /// holds is the loop's wait and the actor's fields, not the largest step's state
    /// (1,840 bytes before; an MQTT session holds one of these while it is connected).
    pub(super) async fn run(mut self: Box<Self>) {
        if let Err(e) = Box::pin(self.load_queues()).await {
            tracing::error!(group = %self.spec.name, error = %e, "core: group failed to load its offsets");
        }
        self.serve().await;
    }

    /// The loop, until the group ends or parks (`park.rs`: a new task resumes it here).
    pub(super) async fn serve(mut self: Box<Self>) {
        let tick = self.inner.config.offset_commit_interval;
        // Ended for want of members (its last writes done, the group forgotten).
        let mut ended = false;
        loop {
            let deadline = self.next_deadline();
            let clock = Arc::clone(&self.inner.clock);
            // The periodic tick only runs when it has work: offsets to persist, members
            // to watch for heartbeats, or an empty group to end. An idle group with
            // connected members waits only for a command or a new message, parked:
            // without a task (thousands of idle MQTT sessions cost their state only).
            let needs_tick = self.members.is_empty()
                || self
                    .members
                    .values()
                    .any(|m| m.heartbeat || m.closed.is_some())
                || self.offsets_dirty();
            let mut wait = true;
            if !needs_tick && deadline.is_none() && self.stopped.is_none() {
                let wake = Arc::clone(&self.wake);
                match wake.park(self) {
                    Park::Parked => return,
                    Park::Again(me) => {
                        self = me;
                        wait = false;
                    }
                    Park::Wait(me) => self = me,
                }
            }
            if wait {
                tokio::select! {
                    biased;
                    cmd = self.rx.recv() => match cmd {
                        // Acks, one per message, skip the boxed step: nothing to await.
                        Some(Cmd::Ack(id, token)) => {
                            self.settle(&id, &token);
                        }
                        Some(c) => Box::pin(self.handle(c)).await,
                        None => break,
                    },
                    _ = self.wake.notify.notified() => {}
                    _ = tokio::time::sleep(tick), if needs_tick => {}
                    _ = async move { clock.sleep_until(deadline.unwrap_or(Millis::MAX)).await }, if deadline.is_some() => {}
                }
            }
            while let Some(c) = self.rx.try_recv() {
                match c {
                    Cmd::Ack(id, token) => {
                        self.settle(&id, &token);
                    }
                    c => Box::pin(self.handle(c)).await,
                }
            }
            if self.stopped.is_some() {
                break;
            }
            self.expire_members();
            if let Err(e) = Box::pin(self.refresh_queues()).await {
                tracing::warn!(group = %self.spec.name, error = %e, "core: group could not add new queues");
            }
            Box::pin(self.pump()).await;
            self.report_flow();
            if self.last_commit.elapsed() >= tick {
                Box::pin(self.commit()).await;
            }
            if !self.members.is_empty() {
                self.empty_since = None;
            }
            let idle = self.empty_since.get_or_insert_with(Instant::now).elapsed() >= tick;
            if self.members.is_empty() && idle && self.rx.is_empty() {
                // Memberless for a while: persist and end; a later subscribe starts a
                // fresh actor from the committed offsets.
                self.close_cursors();
                Box::pin(self.commit_with(true)).await;
                Box::pin(self.settle_delivered_marks()).await;
                let inner = Arc::clone(&*self.inner);
                self.handle.alive.store(false, Ordering::Release);
                inner.forget_group(&self.spec.name, &self.handle);
                // A join that raced the check above is answered by dropping its reply:
                // the subscriber retries against a new actor. Nothing is written from
                // here on: that actor may have read the offsets already (a commit that
                // failed above is not tried again over its state).
                ended = true;
                break;
            }
        }
        if !ended {
            self.close_cursors();
            Box::pin(self.commit_with(true)).await;
            Box::pin(self.settle_delivered_marks()).await;
        }
        self.handle.alive.store(false, Ordering::Release);
        for t in &self.watched {
            t.flow.progress_at.store(0, Ordering::Release);
            t.flow.moved.notify_waiters();
            t.unwatch(&self.wake);
        }
        if let Some(done) = self.stopped.take() {
            let _ = done.send(());
        }
    }

    /// Flow control by consumer lag: tell the publishers of each topic this group alone
    /// consumes how far it has consumed, and whether it has members to wait for.
    fn report_flow(&self) {
        if self.inner.config.consumer_lag_limit.is_none() || self.broadcast() {
            return;
        }
        let now = self.inner.clock.now().max(1);
        for t in &self.watched {
            if t.watcher_count() != 1 {
                continue;
            }
            if self.members.is_empty() {
                t.flow.progress_at.store(0, Ordering::Release);
                continue;
            }
            let sum: u64 = self
                .queues
                .iter()
                .filter(|(q, _)| q.topic == t.name)
                .map(|(_, c)| c.committed())
                .sum();
            let before = t.flow.committed.swap(sum, Ordering::AcqRel);
            if before != sum || t.flow.progress_at.load(Ordering::Acquire) == 0 {
                t.flow.progress_at.store(now, Ordering::Release);
                t.flow.moved.notify_waiters();
            }
        }
    }

    /// Whether some committed offset is not persisted yet, or is due a checkpoint
    /// ([`QueueState::checkpoint_due`]).
    fn offsets_dirty(&self) -> bool {
        let threshold = self.inner.config.checkpoint_settled;
        let dirty = |c: &QueueState| {
            let committed = c.committed();
            c.persisted != Some(committed) || c.checkpoint_due_at(committed, threshold)
        };
        if self.broadcast() {
            self.members.values().any(|m| m.cursors.values().any(dirty))
        } else {
            self.queues.values().any(dirty)
        }
    }

    fn next_deadline(&self) -> Option<Millis> {
        let now = self.inner.clock.now();
        self.queues
            .values()
            .chain(self.members.values().flat_map(|m| m.cursors.values()))
            .map(|q| q.suspended_until)
            .filter(|t| *t > now)
            .min()
    }

    pub(super) fn broadcast(&self) -> bool {
        self.spec.mode == ConsumeMode::Broadcast
    }

    pub(super) fn owned(&self) -> bool {
        self.spec.mode == ConsumeMode::Clustering || self.spec.orderly
    }

    pub(super) fn offsets_group(&self, member: Option<&str>) -> GroupName {
        match member {
            Some(m) if self.broadcast() => GroupName::new(format!("{}%{m}", self.spec.name))
                .unwrap_or_else(|_| self.spec.name.clone()),
            _ => self.spec.name.clone(),
        }
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join(opts, id, tx, done, drain) => {
                if self.members.contains_key(opts.id.as_str()) {
                    self.remove_member(&opts.id).await;
                }
                let prefetch = member_prefetch(
                    opts.prefetch,
                    opts.exact_prefetch,
                    self.inner.config.max_prefetch,
                );
                if let Some(p) = &opts.credit_pool {
                    p.register(&self.wake);
                }
                let mut member = Member {
                    tx,
                    prefetch,
                    exact: opts.exact_prefetch,
                    drain,
                    closed: None,
                    unacked: 0,
                    pool: opts.credit_pool.clone(),
                    heartbeat: opts.heartbeat,
                    last_seen: Instant::now(),
                    cursors: VecMap::new(),
                };
                if self.broadcast() {
                    for q in self.all_queues() {
                        match self.open_cursor(&q, Some(&opts.id)).await {
                            Ok(c) => {
                                member.cursors.insert(q, c);
                            }
                            Err(e) => {
                                tracing::error!(group = %self.spec.name, error = %e, "core: cursor")
                            }
                        }
                    }
                }
                let broadcast = !member.cursors.is_empty();
                self.members.insert(id, member);
                self.rebalance();
                if broadcast {
                    // A broadcast member's start stored before any delivery (a lazy one
                    // at `First` with the first delivered mark): a delivered mark without a
                    // committed offset is taken for a stale one.
                    self.commit().await;
                }
                let _ = done.send(());
            }
            Cmd::Leave(id, if_closed) => {
                // From a dropped consumer: its own membership only. Its id may have
                // joined again since, and that member's consumer be dropped too by now
                // (its mailbox closed, its acks and leave queued behind this one):
                // removed here, it would lose those acks.
                let stale = if_closed
                    && self
                        .members
                        .get_key_value(&*id)
                        .is_some_and(|(k, m)| !Arc::ptr_eq(k, &id) || !m.tx.is_closed());
                if !stale {
                    self.remove_member(&id).await;
                }
            }
            Cmd::Heartbeat(id) => {
                if let Some(m) = self.members.get_mut(&*id) {
                    m.last_seen = Instant::now();
                }
            }
            Cmd::Bound(id) => {
                if let Some(m) = self.members.get_mut(&*id) {
                    // `unacked` counts every delivery, unbounded or not.
                    m.drain = None;
                }
            }
            Cmd::Prefetch(id, n) => {
                let max = self.inner.config.max_prefetch;
                if let Some(m) = self.members.get_mut(&*id) {
                    m.prefetch = member_prefetch(n, m.exact, max);
                }
            }
            Cmd::Ack(id, token) => {
                self.settle(&id, &token);
            }
            Cmd::Nack(id, token, requeue) => {
                if let Some(f) = self.settle(&id, &token) {
                    self.failed(&id, token.queue, token.offset, f, requeue)
                        .await;
                }
            }
            Cmd::Release(id, token) => {
                if let Some(f) = self.settle(&id, &token) {
                    self.released(&id, &token.queue, token.offset, f);
                }
            }
            Cmd::Reset(to, reply) => {
                let _ = reply.send(self.reset(to).await);
            }
            Cmd::Info(reply) => {
                let _ = reply.send(self.info());
            }
            Cmd::Ready(bytes, reply) => {
                let _ = reply.send(self.ready(bytes).await);
            }
            Cmd::Trim(max_len, max_bytes, done) => {
                self.trim(max_len, max_bytes).await;
                let _ = done.send(());
            }
            Cmd::Expire(done) => {
                let pending = self.expire_heads().await;
                let _ = done.send(pending);
            }
            Cmd::Stop(done) => {
                self.stopped = Some(done);
            }
        }
    }

    /// The cursor of `queue` whose offsets `owner` keeps: a broadcast member's own
    /// (`Some`), the group's (`None`).
    fn owned_cursor(&mut self, owner: Option<&str>, queue: &QueueRef) -> Option<&mut QueueState> {
        match owner {
            Some(id) => self.members.get_mut(id)?.cursors.get_mut(queue),
            None => self.queues.get_mut(queue),
        }
    }

    pub(super) fn cursor_mut(&mut self, member: &str, queue: &QueueRef) -> Option<&mut QueueState> {
        if self.broadcast() {
            self.members.get_mut(member)?.cursors.get_mut(queue)
        } else {
            self.queues.get_mut(queue)
        }
    }

    /// Every cursor of the group: the members' own (broadcast), or the group's.
    fn cursors_mut(&mut self) -> Box<dyn Iterator<Item = &mut QueueState> + '_> {
        if self.broadcast() {
            Box::new(
                self.members
                    .values_mut()
                    .flat_map(|m| m.cursors.values_mut()),
            )
        } else {
            Box::new(self.queues.values_mut())
        }
    }

    /// The actor ends: every cursor's last commit ([`QueueState::close`]).
    fn close_cursors(&mut self) {
        self.cursors_mut().for_each(QueueState::close);
    }

    async fn remove_member(&mut self, id: &str) {
        let Some(mut member) = self.members.remove(id) else {
            return;
        };
        if self.broadcast() {
            let group = self.offsets_group(Some(id));
            let mut batch = WriteBatch::new();
            member.cursors.values_mut().for_each(QueueState::close);
            for (q, c) in &member.cursors {
                batch.commit_offset(group.clone(), q.clone(), QueueOffset(c.committed()));
                // Its delivered marks down to what it was delivered, with what it holds
                // below a reset's floor (not on a topic deleted meanwhile, which took
                // them; nor are its offsets kept there).
                if let Some(value) = self.settled_mark(q, c) {
                    batch.kv_put(DELIVERED_NS, delivered_key(&group, q), value);
                }
            }
            if let Err(e) = self.inner.store.write(batch).await {
                tracing::error!(group = %self.spec.name, error = %e, "core: broadcast offsets not saved");
            }
            return;
        }
        for q in self.queues.values_mut() {
            let theirs: Vec<u64> = q
                .in_flight
                .iter()
                .filter(|(_, f)| &*f.member == id)
                .map(|(o, _)| *o)
                .collect();
            for o in theirs {
                if let Some(f) = q.in_flight.remove(&o) {
                    q.redeliver.insert(
                        o,
                        Pending {
                            message: f.message,
                            count: f.count,
                        },
                    );
                }
            }
        }
        self.rebalance();
    }

    fn expire_members(&mut self) {
        let timeout = self.inner.config.heartbeat_timeout;
        let dead: Vec<MemberId> = self
            .members
            .iter()
            .filter(|(_, m)| {
                (m.heartbeat && m.last_seen.elapsed() > timeout)
                    || m.closed.is_some_and(|at| at.elapsed() > CLOSED_GRACE)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            tracing::info!(group = %self.spec.name, member = %id, "core: member missed its heartbeats (or its consumer went without a leave); removing");
            // Same path as a leave, minus the await on broadcast offsets (done in commit).
            let _ = self.handle.cmd.send(Cmd::Leave(id, false));
        }
    }

    /// RocketMQ's average allocation: sorted queues split in contiguous runs over sorted
    /// members, the first `queues % members` members taking one more.
    pub(super) fn rebalance(&mut self) {
        if !self.owned() {
            return;
        }
        let members: Vec<MemberId> = self.members.keys().cloned().collect();
        // The group's own queues are spread over the members, and its retry topic's on
        // their own (as RocketMQ allocates per topic): the retry queue goes to the first
        // member, with the first of the group's queues, so a single active consumer also
        // gets its queue's retries (spread over both together, a second consumer became
        // active on the retry queue).
        let retry = crate::retry::retry_topic(&self.spec.name).ok();
        let is_retry = |q: &QueueRef| retry.as_ref() == Some(&q.topic);
        let retries = self.queues.keys().filter(|q| is_retry(q)).count();
        let own = self.queues.len() - retries;
        let slots: Vec<(usize, usize)> = {
            let (mut i_own, mut i_retry) = (0, 0);
            self.queues
                .keys()
                .map(|q| {
                    if is_retry(q) {
                        i_retry += 1;
                        (i_retry - 1, retries)
                    } else {
                        i_own += 1;
                        (i_own - 1, own)
                    }
                })
                .collect()
        };
        for (q, (i, m)) in self.queues.values_mut().zip(slots) {
            q.owner = owner_of(i, m, &members).cloned();
        }
    }

    async fn reset(&mut self, to: StartPosition) -> Result<()> {
        let mut batch = WriteBatch::new();
        let mut written = Vec::new();
        let mut failed = None;
        if self.broadcast() {
            let ids: Vec<MemberId> = self.members.keys().cloned().collect();
            'members: for id in ids {
                let group = self.offsets_group(Some(&id));
                let queues: Vec<QueueRef> = self.members[&id]
                    .cursors
                    .keys()
                    .filter(|q| crate::retry::reset_moves(&self.spec.name, &to, q))
                    .cloned()
                    .collect();
                for q in queues {
                    let target = match self.inner.position(&q, &to).await {
                        Ok(t) => t,
                        Err(e) => {
                            failed = Some(e);
                            break 'members;
                        }
                    };
                    let mut held = None;
                    if let Some(member) = self.members.get_mut(&id) {
                        if let Some(c) = member.cursors.get_mut(&q) {
                            let dropped = c.reset_to(target);
                            held = held_record(c);
                            member.settled(dropped.len(), &self.wake);
                        }
                    }
                    batch.commit_offset(group.clone(), q.clone(), QueueOffset(target));
                    if let Some((value, _)) = &held {
                        batch.kv_put(DELIVERED_NS, delivered_key(&group, &q), value.clone());
                    }
                    written.push((Some(id.clone()), q, target, held.map(|h| h.1)));
                }
            }
        } else {
            let queues: Vec<QueueRef> = self
                .queues
                .keys()
                .filter(|q| crate::retry::reset_moves(&self.spec.name, &to, q))
                .cloned()
                .collect();
            for q in queues {
                let target = match self.inner.position(&q, &to).await {
                    Ok(t) => t,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                let state = self.queues.get_mut(&q).expect("listed");
                for f in state.reset_to(target) {
                    if let Some(m) = self.members.get_mut(&f.member) {
                        m.settled(1, &self.wake);
                    }
                }
                let held = held_record(self.queues.get(&q).expect("listed"));
                batch.commit_offset(self.spec.name.clone(), q.clone(), QueueOffset(target));
                if let Some((value, _)) = &held {
                    batch.kv_put(
                        DELIVERED_NS,
                        delivered_key(&self.spec.name, &q),
                        value.clone(),
                    );
                }
                written.push((None, q, target, held.map(|h| h.1)));
            }
        }
        // Stored only once written: a reset whose write failed (or that stopped on a
        // queue it could not place) is committed by the next commit (the committed
        // offset differs from the one stored), its held offsets' record too.
        let result = match failed {
            Some(e) => Err(e),
            None => self
                .inner
                .store
                .write(batch)
                .await
                .map(|_| ())
                .map_err(Into::into),
        };
        for (member, q, target, held) in written {
            if let Some(c) = self.owned_cursor(member.as_deref(), &q) {
                if result.is_ok() {
                    c.persisted = Some(target);
                    c.unstored = false;
                    if let Some(n) = held {
                        c.held_stored = n;
                    }
                } else {
                    c.held_stored = HELD_UNKNOWN;
                }
            }
        }
        result
    }

    fn info(&self) -> GroupInfo {
        let mut queues = Vec::new();
        let mut add = |q: &QueueRef, c: &QueueState, member: Option<String>| {
            let next = self
                .inner
                .store
                .queue_range(q)
                .map(|r| r.next.0)
                .unwrap_or(0);
            let committed = c.committed();
            queues.push(QueueInfo {
                queue: q.clone(),
                member,
                committed,
                next,
                // What is held below a reset's floor is owed too.
                lag: next.saturating_sub(committed) + c.held().len() as u64,
                ready: next.saturating_sub(c.read) + (c.buffer.len() + c.redeliver.len()) as u64,
                in_flight: c.in_flight.len(),
            });
        };
        if self.broadcast() {
            for (id, m) in &self.members {
                for (q, c) in &m.cursors {
                    add(q, c, Some(id.to_string()));
                }
            }
        } else {
            for (q, c) in &self.queues {
                add(q, c, c.owner.as_deref().map(str::to_owned));
            }
        }
        let members = self
            .members
            .iter()
            .map(|(id, m)| MemberInfo {
                id: id.to_string(),
                unacked: m.unacked,
                prefetch: m.prefetch,
                queues: self
                    .queues
                    .iter()
                    .filter(|(_, c)| c.owner.as_deref() == Some(id))
                    .map(|(q, _)| q.clone())
                    .collect(),
            })
            .collect();
        GroupInfo {
            name: self.spec.name.clone(),
            members,
            queues,
            skipped: self.skipped,
        }
    }

    /// The periodic commit; cursors with many acknowledgements above their first
    /// unsettled offset are checkpointed first ([`QueueState::checkpoint_due`]).
    pub(super) async fn commit(&mut self) {
        let threshold = self.inner.config.checkpoint_settled;
        self.cursors_mut()
            .filter(|c| c.checkpoint_due(threshold))
            .for_each(QueueState::close);
        self.commit_with(false).await;
    }

    /// [`Actor::commit`]; `ending`: the actor ends, and starts not stored yet
    /// ([`QueueState::unstored`]) are stored too, so a group that ends before it
    /// delivered is known to the store (listed, resettable while no actor runs). They
    /// are also stored with any other commit of their offsets group, so that the store
    /// knows all of it or none of it.
    pub(super) async fn commit_with(&mut self, ending: bool) {
        self.last_commit = Instant::now();
        let mut batch = WriteBatch::new();
        let mut marks = Vec::new();
        let mut held = Vec::new();
        let moved = |c: &QueueState| c.persisted != Some(c.committed());
        if self.broadcast() {
            for (id, m) in &self.members {
                let group = self.offsets_group(Some(id));
                let starts = ending || m.cursors.iter().any(|(_, c)| moved(c));
                for (q, c) in &m.cursors {
                    let committed = c.committed();
                    if moved(c) || (starts && c.unstored) {
                        batch.commit_offset(group.clone(), q.clone(), QueueOffset(committed));
                        marks.push((Some(id.clone()), q.clone(), committed));
                    }
                    if let Some((value, n)) = held_settled(c).filter(|_| self.topic_lives(q)) {
                        batch.kv_put(DELIVERED_NS, delivered_key(&group, q), value);
                        held.push((Some(id.clone()), q.clone(), n));
                    }
                }
            }
        } else {
            let starts = ending || self.queues.iter().any(|(_, c)| moved(c));
            for (q, c) in &self.queues {
                if let Some((value, n)) = held_settled(c).filter(|_| self.topic_lives(q)) {
                    batch.kv_put(DELIVERED_NS, delivered_key(&self.spec.name, q), value);
                    held.push((None, q.clone(), n));
                }
                let committed = c.committed();
                if moved(c) || (starts && c.unstored) {
                    batch.commit_offset(self.spec.name.clone(), q.clone(), QueueOffset(committed));
                    marks.push((None, q.clone(), committed));
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.inner.store.write(batch).await {
            tracing::error!(group = %self.spec.name, error = %e, "core: offset commit failed");
            return;
        }
        for (member, q, committed) in marks {
            if let Some(c) = self.owned_cursor(member.as_deref(), &q) {
                c.persisted = Some(committed);
                c.unstored = false;
            }
        }
        for (member, q, n) in held {
            if let Some(c) = self.owned_cursor(member.as_deref(), &q) {
                c.held_stored = n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{owner_of, MemberId};

    #[test]
    fn average_allocation() {
        let members: Vec<MemberId> = ["a", "b", "c"].iter().map(|&s| s.into()).collect();
        let owners = |m: usize, ms: &[MemberId]| -> Vec<String> {
            (0..m)
                .map(|i| owner_of(i, m, ms).map_or_else(String::new, |o| o.to_string()))
                .collect()
        };
        assert_eq!(
            owners(8, &members),
            ["a", "a", "a", "b", "b", "b", "c", "c"]
        );
        assert_eq!(owners(4, &members[..2]), ["a", "a", "b", "b"]);
        assert_eq!(
            owners(2, &members),
            ["a", "b"],
            "more members than queues: some idle"
        );
        assert_eq!(owners(3, &[]), ["", "", ""]);
    }
}
