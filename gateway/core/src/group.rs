//! Consumer groups. Each live group is one task (an actor) that owns all of the group's
//! state: its members, which member owns which queue, what is in flight, and where each
//! queue is read up to. Members talk to it over channels; publishers wake it through the
//! topics it watches. Nothing unconsumed is held in memory: the actor reads from the store
//! only as much as members have credit for.
//!
//! # Member state machine
//! ```text
//!  join ──> Active ──(ack / nack)──> Active
//!             │  prefetch full: no deliveries until an ack frees credit
//!             ├─(Consumer dropped | leave | heartbeat timeout)──> Gone
//!             │      its in-flight messages go back to be redelivered (redelivered = true)
//!             └─ rebalance (clustering, orderly): owned queues recomputed on every join/leave
//! ```
//! # Per-queue delivery
//! A queue's committed offset is its lowest offset not yet acknowledged (in flight,
//! waiting for redelivery, or not yet delivered). It is persisted every
//! `offset_commit_interval` and when the group stops, so a crash redelivers at most what
//! was in flight: duplicates, never loss.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mqgate_store::{
    GroupName, Millis, QueueMessage, QueueOffset, QueueRef, ReadLimits, StoredMessage, TopicName,
    WriteBatch,
};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::broker::{Inner, TopicHandle};
use crate::endpoint::{self, DeathReason, Policy, Verdict};
use crate::error::{CoreError, Result};

/// How a group's members share its topics' queues.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConsumeMode {
    /// RocketMQ clustering: the members split the queues (average allocation by member
    /// id); each message goes to the member owning its queue.
    Clustering,
    /// Competing consumers on every queue: each message goes to any member with free
    /// prefetch (AMQP queues, MQTT shared subscriptions).
    Shared,
    /// Every member gets every message, with its own offsets.
    Broadcast,
}

/// Where a group starts on a queue it has no committed offset for, or moves to on replay.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StartPosition {
    /// The oldest message still stored.
    First,
    /// Only messages published from now on.
    Last,
    /// The first message stored at or after this time (ms).
    Timestamp(Millis),
    /// This offset on every queue (clamped to what is stored).
    Offset(u64),
    /// The last message stored on each queue, and everything after it (RabbitMQ
    /// streams' `last`).
    LastStored,
}

impl StartPosition {
    /// The words of `x-stream-offset`, meaning the same in every protocol: `first`, `last`
    /// (the last message stored, as RabbitMQ streams read it) and `next` (only messages
    /// published from now on). Protocol-specific forms (numbers, timestamps) are the
    /// adapter's to read.
    pub fn from_stream_offset_word(word: &str) -> Option<Self> {
        match word.trim() {
            "first" => Some(StartPosition::First),
            "last" => Some(StartPosition::LastStored),
            "next" => Some(StartPosition::Last),
            _ => None,
        }
    }
}

/// What a failed consumption (nack without requeue) does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OnFailure {
    /// RocketMQ's ladder: `%RETRY%<group>` with growing delay, then `%DLQ%<group>`.
    Retry,
    /// Drop it (AMQP's default for reject without requeue).
    Discard,
}

/// A group's definition. Every member of a group must use the same one.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    /// The group's name.
    pub name: GroupName,
    /// The topics it consumes.
    pub topics: Vec<TopicName>,
    /// How members share them.
    pub mode: ConsumeMode,
    /// One message in flight per queue, one member per queue; a failed message is
    /// retried in place after a pause, so order holds.
    pub orderly: bool,
    /// Where a new group starts.
    pub start: StartPosition,
    /// What a failed consumption does.
    pub on_failure: OnFailure,
    /// Failures before the DLQ (default: the broker's `max_reconsume_times`).
    pub max_reconsume_times: Option<u32>,
    /// TTL, delivery limit and dead-letter target, applied by the core.
    pub policy: Policy,
}

impl GroupSpec {
    /// A group over `topics`: starts at the last offset, retries failures.
    pub fn new(name: GroupName, topics: Vec<TopicName>, mode: ConsumeMode) -> Self {
        Self {
            name,
            topics,
            mode,
            orderly: false,
            start: StartPosition::Last,
            on_failure: OnFailure::Retry,
            max_reconsume_times: None,
            policy: Policy::default(),
        }
    }

    /// Its topics plus its retry topic when failures are retried through one.
    pub(crate) fn all_topics(&self) -> Vec<TopicName> {
        let mut t = self.topics.clone();
        if self.on_failure == OnFailure::Retry && !self.orderly {
            if let Ok(r) = crate::retry::retry_topic(&self.name) {
                t.push(r);
            }
        }
        t
    }

    pub(crate) fn compatible(&self, other: &GroupSpec) -> bool {
        self.mode == other.mode && self.orderly == other.orderly && self.topics == other.topics
    }
}

/// How a member joins.
#[derive(Clone, Debug)]
pub struct MemberOptions {
    /// Unique within the group (a later join with the same id replaces the earlier).
    pub id: String,
    /// The most unacknowledged messages it holds (0: the broker's maximum).
    pub prefetch: usize,
    /// Remove the member if it does not call [`Consumer::heartbeat`] within the broker's
    /// heartbeat timeout (for members not tied to a connection).
    pub heartbeat: bool,
    /// `prefetch` is taken as given, 0 included (no deliveries until it is raised with
    /// [`Consumer::set_prefetch`]): for pull-style consumers such as AMQP's basic.get.
    pub exact_prefetch: bool,
}

impl MemberOptions {
    /// A member with a prefetch limit and no heartbeat requirement.
    pub fn new(id: impl Into<String>, prefetch: usize) -> Self {
        Self {
            id: id.into(),
            prefetch,
            heartbeat: false,
            exact_prefetch: false,
        }
    }
}

/// One message handed to a member.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The queue it came from.
    pub queue: QueueRef,
    /// Its offset there.
    pub offset: QueueOffset,
    /// The message.
    pub message: Arc<StoredMessage>,
    /// Whether it was delivered before (to this or another member).
    pub redelivered: bool,
    /// How many times it has been delivered (1 on first delivery).
    pub delivery_count: u32,
    token: u64,
}

impl Delivery {
    /// The token that acknowledges this delivery (usable after the delivery is dropped).
    pub fn ack_token(&self) -> AckToken {
        AckToken {
            queue: self.queue.clone(),
            offset: self.offset.0,
            token: self.token,
        }
    }
}

/// Identifies one delivery for ack / nack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckToken {
    queue: QueueRef,
    offset: u64,
    token: u64,
}

enum Cmd {
    Join(
        MemberOptions,
        mpsc::UnboundedSender<Delivery>,
        oneshot::Sender<()>,
    ),
    Leave(String),
    Ack(String, AckToken),
    Nack(String, AckToken, bool),
    Heartbeat(String),
    Prefetch(String, usize),
    Reset(StartPosition, oneshot::Sender<Result<()>>),
    Info(oneshot::Sender<GroupInfo>),
    /// Settle expired messages at the head of each queue (members or not).
    Expire(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

/// A member's handle: receive deliveries, acknowledge them. Dropping it leaves the group.
#[derive(Debug)]
pub struct Consumer {
    member: String,
    group: GroupName,
    rx: mpsc::UnboundedReceiver<Delivery>,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Join(..) => "Join",
            Cmd::Leave(..) => "Leave",
            Cmd::Ack(..) => "Ack",
            Cmd::Nack(..) => "Nack",
            Cmd::Heartbeat(..) => "Heartbeat",
            Cmd::Prefetch(..) => "Prefetch",
            Cmd::Reset(..) => "Reset",
            Cmd::Info(..) => "Info",
            Cmd::Expire(..) => "Expire",
            Cmd::Stop(..) => "Stop",
        })
    }
}

impl Consumer {
    /// The next delivery; `None` once the group has stopped (broker shutdown).
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// Poll for the next delivery (for adapters that wait on several consumers at once).
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Delivery>> {
        self.rx.poll_recv(cx)
    }

    /// A delivery if one is ready now.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }

    /// The member id.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// The group.
    pub fn group(&self) -> &GroupName {
        &self.group
    }

    /// Consumption succeeded.
    pub fn ack(&self, token: AckToken) {
        let _ = self.cmd.send(Cmd::Ack(self.member.clone(), token));
    }

    /// Consumption failed. `requeue`: deliver it again now (AMQP requeue), else the
    /// group's failure policy applies (retry ladder / DLQ, or discard).
    pub fn nack(&self, token: AckToken, requeue: bool) {
        let _ = self
            .cmd
            .send(Cmd::Nack(self.member.clone(), token, requeue));
    }

    /// I am alive (for members that joined with `heartbeat: true`).
    pub fn heartbeat(&self) {
        let _ = self.cmd.send(Cmd::Heartbeat(self.member.clone()));
    }

    /// Change the prefetch limit (0: the broker's maximum, unless the member joined
    /// with `exact_prefetch`).
    pub fn set_prefetch(&self, prefetch: usize) {
        let _ = self.cmd.send(Cmd::Prefetch(self.member.clone(), prefetch));
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Leave(self.member.clone()));
    }
}

/// A live group's handle, kept in the broker's registry.
#[derive(Clone, Debug)]
pub(crate) struct GroupHandle {
    pub(crate) spec: GroupSpec,
    cmd: mpsc::UnboundedSender<Cmd>,
    alive: Arc<AtomicBool>,
}

impl GroupHandle {
    pub(crate) fn is_alive(&self) -> bool {
        // The channel closes if the actor is gone for any reason, a panic included.
        self.alive.load(Ordering::Acquire) && !self.cmd.is_closed()
    }

    pub(crate) fn same(&self, other: &GroupHandle) -> bool {
        Arc::ptr_eq(&self.alive, &other.alive)
    }

    /// Join; `None` if the actor ended before taking the join (start a new one).
    pub(crate) async fn join(&self, opts: MemberOptions) -> Option<Consumer> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done, joined) = oneshot::channel();
        let member = opts.id.clone();
        self.cmd.send(Cmd::Join(opts, tx, done)).ok()?;
        joined.await.ok()?;
        Some(Consumer {
            member,
            group: self.spec.name.clone(),
            rx,
            cmd: self.cmd.clone(),
        })
    }

    pub(crate) async fn reset(&self, to: StartPosition) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Reset(to, tx))
            .map_err(|_| CoreError::ShuttingDown)?;
        rx.await.map_err(|_| CoreError::ShuttingDown)?
    }

    /// Settle the expired messages at the head of the group's queues.
    pub(crate) async fn expire(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Expire(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub(crate) async fn info(&self) -> Result<GroupInfo> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Info(tx))
            .map_err(|_| CoreError::ShuttingDown)?;
        rx.await.map_err(|_| CoreError::ShuttingDown)
    }

    pub(crate) async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// A group as an operator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupInfo {
    /// The group.
    pub name: GroupName,
    /// Connected members, sorted by id.
    pub members: Vec<MemberInfo>,
    /// Per queue: committed offset, end, lag.
    pub queues: Vec<QueueInfo>,
    /// Messages skipped because retention deleted them before the group got there.
    pub skipped: u64,
}

/// One member.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberInfo {
    /// Its id.
    pub id: String,
    /// Messages it holds unacknowledged.
    pub unacked: usize,
    /// Its prefetch limit.
    pub prefetch: usize,
    /// Queues it owns (clustering and orderly groups).
    pub queues: Vec<QueueRef>,
}

/// One queue of a group.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueInfo {
    /// The queue.
    pub queue: QueueRef,
    /// The member reading it (broadcast: the member whose cursor this is).
    pub member: Option<String>,
    /// The lowest offset not yet acknowledged.
    pub committed: u64,
    /// The queue's next offset.
    pub next: u64,
    /// `next - committed`.
    pub lag: u64,
    /// Messages waiting to be delivered: not in flight, not acknowledged (AMQP's
    /// message count). Equals `lag` when read from the store.
    pub ready: u64,
    /// Delivered and not yet acknowledged.
    pub in_flight: usize,
}

impl GroupInfo {
    pub(crate) fn from_offsets(
        store: &dyn mqgate_store::Store,
        name: GroupName,
        offsets: Vec<(QueueRef, QueueOffset)>,
    ) -> Self {
        let mut queues = Vec::new();
        for (q, o) in offsets {
            let next = store.queue_range(&q).map(|r| r.next.0).unwrap_or(o.0);
            queues.push(QueueInfo {
                queue: q,
                member: None,
                committed: o.0,
                next,
                lag: next.saturating_sub(o.0),
                ready: next.saturating_sub(o.0),
                in_flight: 0,
            });
        }
        GroupInfo {
            name,
            members: Vec::new(),
            queues,
            skipped: 0,
        }
    }
}

/// Start a group's actor.
pub(crate) fn spawn(
    inner: Arc<Inner>,
    spec: GroupSpec,
    watched: Vec<Arc<TopicHandle>>,
) -> GroupHandle {
    let (cmd, rx) = mpsc::unbounded_channel();
    let alive = Arc::new(AtomicBool::new(true));
    let handle = GroupHandle {
        spec: spec.clone(),
        cmd,
        alive: Arc::clone(&alive),
    };
    let wake = Arc::new(Notify::new());
    for t in &watched {
        t.watch(Arc::clone(&wake));
    }
    let max_reconsume = spec
        .max_reconsume_times
        .unwrap_or(inner.config.max_reconsume_times);
    let actor = Actor {
        inner,
        spec,
        max_reconsume,
        members: BTreeMap::new(),
        queues: BTreeMap::new(),
        watched,
        wake,
        rx,
        next_token: 1,
        rr: 0,
        skipped: 0,
        last_commit: Instant::now(),
        handle: handle.clone(),
        stopped: None,
        empty_since: Some(Instant::now()),
    };
    tokio::spawn(actor.run());
    handle
}

struct Member {
    tx: mpsc::UnboundedSender<Delivery>,
    prefetch: usize,
    exact: bool,
    unacked: usize,
    heartbeat: bool,
    last_seen: Instant,
    /// Broadcast: this member's own cursors.
    cursors: BTreeMap<QueueRef, QueueState>,
}

impl Member {
    fn credit(&self) -> usize {
        self.prefetch.saturating_sub(self.unacked)
    }
}

struct InFlight {
    token: u64,
    member: String,
    count: u32,
    message: Arc<StoredMessage>,
}

struct Pending {
    message: Arc<StoredMessage>,
    count: u32,
}

/// A message the policy settled at delivery, to be dead-lettered.
struct Dying {
    offset: u64,
    message: Arc<StoredMessage>,
    count: u32,
    reason: DeathReason,
}

/// How long a queue pauses after its settlement could not be stored.
const FAILED_WRITE_PAUSE_MS: u64 = 1_000;
/// The most messages one expiry sweep settles per queue.
const EXPIRE_SWEEP_MAX: usize = 10_000;

#[derive(Default)]
struct QueueState {
    /// Clustering / orderly: the member that reads this queue.
    owner: Option<String>,
    /// The next offset to read from the store.
    read: u64,
    /// Read, not yet delivered.
    buffer: VecDeque<QueueMessage>,
    /// Delivered before, to be delivered again (offset order).
    redeliver: BTreeMap<u64, Pending>,
    in_flight: BTreeMap<u64, InFlight>,
    /// The committed offset last written to the store.
    persisted: Option<u64>,
    /// Orderly: no delivery before this time (after a failure).
    suspended_until: Millis,
}

impl QueueState {
    fn committed(&self) -> u64 {
        let mut c = self.read;
        if let Some(m) = self.buffer.front() {
            c = c.min(m.entry.offset.0);
        }
        if let Some((o, _)) = self.redeliver.first_key_value() {
            c = c.min(*o);
        }
        if let Some((o, _)) = self.in_flight.first_key_value() {
            c = c.min(*o);
        }
        c
    }
}

struct Actor {
    inner: Arc<Inner>,
    spec: GroupSpec,
    max_reconsume: u32,
    members: BTreeMap<String, Member>,
    /// Clustering and shared groups: one state per queue.
    queues: BTreeMap<QueueRef, QueueState>,
    watched: Vec<Arc<TopicHandle>>,
    wake: Arc<Notify>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    next_token: u64,
    rr: usize,
    skipped: u64,
    last_commit: Instant,
    handle: GroupHandle,
    stopped: Option<oneshot::Sender<()>>,
    /// Since when the group has had no member (`None`: it has members).
    empty_since: Option<Instant>,
}

/// RocketMQ's average allocation of `queues` over `members`: member `k` takes a run of
/// `queues / n` queues, plus one for the first `queues % n` members.
fn owner_of(index: usize, queues: usize, members: &[String]) -> Option<&String> {
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

/// Where a delivery goes.
enum Target {
    Owner(String),
    AnyWithCredit,
    Member(String),
}

impl Actor {
    async fn run(mut self) {
        if let Err(e) = self.load_queues().await {
            tracing::error!(group = %self.spec.name, error = %e, "core: group failed to load its offsets");
        }
        let tick = self.inner.config.offset_commit_interval;
        loop {
            let deadline = self.next_deadline();
            let clock = Arc::clone(&self.inner.clock);
            // The periodic tick only runs when it has work: offsets to persist, members
            // to watch for heartbeats, or an empty group to end. An idle group with
            // connected members sleeps until a command or a new message (thousands of
            // idle MQTT sessions cost nothing between messages).
            let needs_tick = self.members.is_empty()
                || self.members.values().any(|m| m.heartbeat)
                || self.offsets_dirty();
            tokio::select! {
                biased;
                cmd = self.rx.recv() => match cmd {
                    Some(c) => self.handle(c).await,
                    None => break,
                },
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(tick), if needs_tick => {}
                _ = async move { clock.sleep_until(deadline.unwrap_or(Millis::MAX)).await }, if deadline.is_some() => {}
            }
            while let Ok(c) = self.rx.try_recv() {
                self.handle(c).await;
            }
            if self.stopped.is_some() {
                break;
            }
            self.expire_members();
            if let Err(e) = self.refresh_queues().await {
                tracing::warn!(group = %self.spec.name, error = %e, "core: group could not add new queues");
            }
            self.pump().await;
            if self.last_commit.elapsed() >= tick {
                self.commit().await;
            }
            if !self.members.is_empty() {
                self.empty_since = None;
            }
            let idle = self.empty_since.get_or_insert_with(Instant::now).elapsed() >= tick;
            if self.members.is_empty() && idle && self.rx.is_empty() {
                // Memberless for a while: persist and end; a later subscribe starts a
                // fresh actor from the committed offsets.
                self.commit().await;
                let inner = Arc::clone(&self.inner);
                self.handle.alive.store(false, Ordering::Release);
                inner.forget_group(&self.spec.name, &self.handle);
                // A join that raced the check above is answered by dropping its reply:
                // the subscriber retries against a new actor.
                break;
            }
        }
        self.commit().await;
        self.handle.alive.store(false, Ordering::Release);
        for t in &self.watched {
            t.unwatch(&self.wake);
        }
        if let Some(done) = self.stopped.take() {
            let _ = done.send(());
        }
    }

    /// Whether some committed offset is not persisted yet.
    fn offsets_dirty(&self) -> bool {
        if self.broadcast() {
            self.members.values().any(|m| {
                m.cursors
                    .values()
                    .any(|c| c.persisted != Some(c.committed()))
            })
        } else {
            self.queues
                .values()
                .any(|c| c.persisted != Some(c.committed()))
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

    fn broadcast(&self) -> bool {
        self.spec.mode == ConsumeMode::Broadcast
    }

    fn owned(&self) -> bool {
        self.spec.mode == ConsumeMode::Clustering || self.spec.orderly
    }

    fn offsets_group(&self, member: Option<&str>) -> GroupName {
        match member {
            Some(m) if self.broadcast() => GroupName::new(format!("{}%{m}", self.spec.name))
                .unwrap_or_else(|_| self.spec.name.clone()),
            _ => self.spec.name.clone(),
        }
    }

    fn all_queues(&self) -> Vec<QueueRef> {
        let mut out = Vec::new();
        for t in &self.watched {
            for q in 0..t.queue_count() {
                out.push(QueueRef::new(t.name.clone(), q));
            }
        }
        out
    }

    /// A fresh cursor for `queue`: the committed offset, or the start position.
    async fn open_cursor(&self, queue: &QueueRef, member: Option<&str>) -> Result<QueueState> {
        let group = self.offsets_group(member);
        let (read, persisted) = match self.inner.store.committed_offset(&group, queue).await? {
            Some(o) => (o.0, Some(o.0)),
            None => (self.inner.position(queue, &self.spec.start).await?, None),
        };
        Ok(QueueState {
            read,
            persisted,
            ..QueueState::default()
        })
    }

    async fn load_queues(&mut self) -> Result<()> {
        if self.broadcast() {
            return Ok(());
        }
        for q in self.all_queues() {
            let state = self.open_cursor(&q, None).await?;
            self.queues.insert(q, state);
        }
        // New groups persist their start so a restart resumes there, not at "last".
        self.commit().await;
        Ok(())
    }

    /// Pick up queues added to watched topics since the group started.
    async fn refresh_queues(&mut self) -> Result<()> {
        let all = self.all_queues();
        let mut changed = false;
        if self.broadcast() {
            let ids: Vec<String> = self.members.keys().cloned().collect();
            for id in ids {
                for q in &all {
                    if !self.members[&id].cursors.contains_key(q) {
                        let c = self.open_cursor(q, Some(&id)).await?;
                        if let Some(m) = self.members.get_mut(&id) {
                            m.cursors.insert(q.clone(), c);
                        }
                    }
                }
            }
            return Ok(());
        }
        for q in all {
            if !self.queues.contains_key(&q) {
                let c = self.open_cursor(&q, None).await?;
                self.queues.insert(q, c);
                changed = true;
            }
        }
        if changed {
            self.rebalance();
        }
        Ok(())
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join(opts, tx, done) => {
                if self.members.contains_key(&opts.id) {
                    self.remove_member(&opts.id).await;
                }
                let prefetch = match opts.prefetch {
                    0 if !opts.exact_prefetch => self.inner.config.max_prefetch,
                    n => n.min(self.inner.config.max_prefetch),
                };
                let mut member = Member {
                    tx,
                    prefetch,
                    exact: opts.exact_prefetch,
                    unacked: 0,
                    heartbeat: opts.heartbeat,
                    last_seen: Instant::now(),
                    cursors: BTreeMap::new(),
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
                self.members.insert(opts.id, member);
                self.rebalance();
                let _ = done.send(());
            }
            Cmd::Leave(id) => self.remove_member(&id).await,
            Cmd::Heartbeat(id) => {
                if let Some(m) = self.members.get_mut(&id) {
                    m.last_seen = Instant::now();
                }
            }
            Cmd::Prefetch(id, n) => {
                let max = self.inner.config.max_prefetch;
                if let Some(m) = self.members.get_mut(&id) {
                    m.prefetch = if n == 0 && !m.exact { max } else { n.min(max) };
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
            Cmd::Reset(to, reply) => {
                let _ = reply.send(self.reset(to).await);
            }
            Cmd::Info(reply) => {
                let _ = reply.send(self.info());
            }
            Cmd::Expire(done) => {
                self.expire_heads().await;
                let _ = done.send(());
            }
            Cmd::Stop(done) => {
                self.stopped = Some(done);
            }
        }
    }

    fn cursor_mut(&mut self, member: &str, queue: &QueueRef) -> Option<&mut QueueState> {
        if self.broadcast() {
            self.members.get_mut(member)?.cursors.get_mut(queue)
        } else {
            self.queues.get_mut(queue)
        }
    }

    /// Remove a delivery from flight (ack or nack). Returns it if the token was current.
    fn settle(&mut self, member: &str, token: &AckToken) -> Option<InFlight> {
        let q = self.cursor_mut(member, &token.queue)?;
        match q.in_flight.get(&token.offset) {
            Some(f) if f.token == token.token => {}
            _ => return None,
        }
        let f = q.in_flight.remove(&token.offset)?;
        if let Some(m) = self.members.get_mut(&f.member) {
            m.unacked = m.unacked.saturating_sub(1);
        }
        Some(f)
    }

    async fn failed(
        &mut self,
        member: &str,
        queue: QueueRef,
        offset: u64,
        f: InFlight,
        requeue: bool,
    ) {
        let orderly = self.spec.orderly;
        let now = self.inner.clock.now();
        let suspend = self.inner.config.orderly_suspend.as_millis() as u64;
        let max = self.max_reconsume;
        let attempts = f.message.message.reconsume_times + f.count;
        if requeue || (orderly && attempts <= max) {
            let Some(q) = self.cursor_mut(member, &queue) else {
                return;
            };
            if orderly && !requeue {
                q.suspended_until = now + suspend;
            }
            q.redeliver.insert(
                offset,
                Pending {
                    message: f.message,
                    count: f.count,
                },
            );
            return;
        }
        // The failure's effect (a retry timer, the DLQ, the dead-letter target) and the
        // commit of the offset past the message go in one store batch.
        let mut batch = WriteBatch::new();
        let (wake, timer, dlq) = match self.stage_failure(&f, &queue, attempts, &mut batch).await {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(group = %self.spec.name, error = %e, "core: failed message could not be staged; redelivering");
                self.put_back(member, &queue, vec![(offset, f.message, f.count)], now);
                return;
            }
        };
        if batch.is_empty() {
            // Discarded: nothing to store; the commit follows with the next tick.
            return;
        }
        match self.write_with_commit(member, &queue, batch).await {
            Ok(()) => {
                if let Some(due) = timer {
                    self.inner.timer_added(due);
                    self.inner.retries.fetch_add(1, Ordering::Relaxed);
                } else if dlq || !wake.is_empty() {
                    self.inner.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                for t in &wake {
                    self.inner.wake_topic(t);
                }
            }
            Err(e) => {
                // Could not store it: deliver it again rather than lose it.
                tracing::error!(group = %self.spec.name, error = %e, "core: retry/dead-letter write failed; redelivering");
                self.put_back(member, &queue, vec![(offset, f.message, f.count)], now);
            }
        }
    }

    /// Add what a failed message becomes to `batch`: the next retry (a timer), its
    /// dead-letter copy, its DLQ copy, or nothing (discarded). Returns the topics to wake,
    /// the retry's due time, and whether it went to the DLQ.
    async fn stage_failure(
        &self,
        f: &InFlight,
        queue: &QueueRef,
        attempts: u32,
        batch: &mut WriteBatch,
    ) -> Result<(Vec<TopicName>, Option<Millis>, bool)> {
        let orderly = self.spec.orderly;
        let retrying = self.spec.on_failure == OnFailure::Retry && !orderly;
        let m = &f.message.message;
        let group = &self.spec.name;
        if retrying && m.reconsume_times < self.max_reconsume {
            let due = crate::retry::stage_retry(&self.inner, group, m, queue, batch)?;
            return Ok((Vec::new(), Some(due), false));
        }
        if let Some(dl) = &self.spec.policy.dead_letter {
            let wake =
                endpoint::stage(&self.inner, dl, &f.message, DeathReason::Rejected, batch).await?;
            return Ok((wake, None, false));
        }
        if retrying || orderly {
            let failures = if orderly {
                attempts
            } else {
                m.reconsume_times + 1
            };
            let t = crate::retry::stage_dlq(&self.inner, group, m, queue, failures, batch).await?;
            return Ok((vec![t], None, true));
        }
        Ok((Vec::new(), None, false))
    }

    /// Write `batch` together with the commit of `queue`'s offset (what was settled
    /// before it is written is past the commit): both, or neither.
    async fn write_with_commit(
        &mut self,
        member: &str,
        queue: &QueueRef,
        mut batch: WriteBatch,
    ) -> Result<()> {
        let group = self.offsets_group(Some(member));
        let committed = self.cursor_mut(member, queue).map(|q| q.committed());
        if let Some(c) = committed {
            batch.commit_offset(group, queue.clone(), QueueOffset(c));
        }
        self.inner.store.write(batch).await?;
        if let (Some(c), Some(q)) = (committed, self.cursor_mut(member, queue)) {
            q.persisted = Some(c);
        }
        Ok(())
    }

    /// Messages whose settlement could not be stored go back to be delivered again,
    /// after a pause (a store that fails now would fail again at once).
    fn put_back(
        &mut self,
        member: &str,
        queue: &QueueRef,
        msgs: Vec<(u64, Arc<StoredMessage>, u32)>,
        now: Millis,
    ) {
        if let Some(q) = self.cursor_mut(member, queue) {
            for (offset, message, count) in msgs {
                q.redeliver.insert(offset, Pending { message, count });
            }
            q.suspended_until = q.suspended_until.max(now + FAILED_WRITE_PAUSE_MS);
        }
    }

    /// Dead-letter what the policy settled at delivery, with the commit past it, in one
    /// batch.
    async fn flush_dying(&mut self, member: &str, queue: &QueueRef, dying: Vec<Dying>) {
        let Some(dl) = self.spec.policy.dead_letter.clone() else {
            return;
        };
        if dying.is_empty() {
            return;
        }
        let mut batch = WriteBatch::new();
        let mut wake = Vec::new();
        let mut result = Ok(());
        for d in &dying {
            match endpoint::stage(&self.inner, &dl, &d.message, d.reason, &mut batch).await {
                Ok(t) => wake.extend(t),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.write_with_commit(member, queue, batch).await;
        }
        match result {
            Ok(()) => {
                self.inner
                    .dead_lettered
                    .fetch_add(dying.len() as u64, Ordering::Relaxed);
                wake.sort();
                wake.dedup();
                for t in &wake {
                    self.inner.wake_topic(t);
                }
            }
            Err(e) => {
                tracing::error!(group = %self.spec.name, error = %e, "core: dead-letter write failed; the messages stay in their queue");
                let now = self.inner.clock.now();
                let back = dying
                    .into_iter()
                    .map(|d| (d.offset, d.message, d.count))
                    .collect();
                self.put_back(member, queue, back, now);
            }
        }
    }

    /// Settle expired messages at the head of each queue's undelivered part (the sweep
    /// for endpoints with a TTL, consumed or not).
    async fn expire_heads(&mut self) {
        if self.broadcast() {
            return;
        }
        let now = self.inner.clock.now();
        let boot = self.inner.boot;
        let queues: Vec<QueueRef> = self.queues.keys().cloned().collect();
        for queue in queues {
            let mut dying = Vec::new();
            for _ in 0..EXPIRE_SWEEP_MAX {
                let verdict = {
                    let Some(q) = self.queues.get(&queue) else {
                        break;
                    };
                    if now < q.suspended_until {
                        break;
                    }
                    let head = match q.redeliver.first_key_value() {
                        Some((_, p)) => Some((&p.message, p.count)),
                        None => q.buffer.front().map(|m| (&m.message, 0)),
                    };
                    match head {
                        Some((m, count)) => {
                            Some(
                                self.spec
                                    .policy
                                    .verdict(m, count, self.retrying(), boot, now),
                            )
                        }
                        None => None,
                    }
                };
                match verdict {
                    None => {
                        if !self.fill("", &queue, self.inner.config.read_batch).await {
                            break;
                        }
                    }
                    Some(Verdict::Deliver) => break,
                    Some(v) => {
                        let q = self.queues.get_mut(&queue).expect("listed");
                        let (offset, message, count) = match q.redeliver.pop_first() {
                            Some((o, p)) => (o, p.message, p.count),
                            None => match q.buffer.pop_front() {
                                Some(m) => (m.entry.offset.0, m.message, 0),
                                None => break,
                            },
                        };
                        if let Verdict::Dead(reason) = v {
                            dying.push(Dying {
                                offset,
                                message,
                                count,
                                reason,
                            });
                        }
                    }
                }
            }
            self.flush_dying("", &queue, dying).await;
        }
    }

    fn retrying(&self) -> bool {
        self.spec.on_failure == OnFailure::Retry
    }

    async fn remove_member(&mut self, id: &str) {
        let Some(member) = self.members.remove(id) else {
            return;
        };
        if self.broadcast() {
            let group = self.offsets_group(Some(id));
            let mut batch = WriteBatch::new();
            for (q, c) in &member.cursors {
                batch.commit_offset(group.clone(), q.clone(), QueueOffset(c.committed()));
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
                .filter(|(_, f)| f.member == id)
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
        let dead: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.heartbeat && m.last_seen.elapsed() > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            tracing::info!(group = %self.spec.name, member = %id, "core: member missed its heartbeats; removing");
            // Same path as a leave, minus the await on broadcast offsets (done in commit).
            let _ = self.handle.cmd.send(Cmd::Leave(id));
        }
    }

    /// RocketMQ's average allocation: sorted queues split in contiguous runs over sorted
    /// members, the first `queues % members` members taking one more.
    fn rebalance(&mut self) {
        if !self.owned() {
            return;
        }
        let members: Vec<String> = self.members.keys().cloned().collect();
        let m = self.queues.len();
        for (i, q) in self.queues.values_mut().enumerate() {
            q.owner = owner_of(i, m, &members).cloned();
        }
    }

    async fn reset(&mut self, to: StartPosition) -> Result<()> {
        let mut batch = WriteBatch::new();
        if self.broadcast() {
            let ids: Vec<String> = self.members.keys().cloned().collect();
            for id in ids {
                let group = self.offsets_group(Some(&id));
                let queues: Vec<QueueRef> = self.members[&id].cursors.keys().cloned().collect();
                for q in queues {
                    let target = self.inner.position(&q, &to).await?;
                    if let Some(member) = self.members.get_mut(&id) {
                        if let Some(c) = member.cursors.get_mut(&q) {
                            member.unacked = member.unacked.saturating_sub(c.in_flight.len());
                            *c = QueueState {
                                read: target,
                                persisted: Some(target),
                                ..QueueState::default()
                            };
                        }
                    }
                    batch.commit_offset(group.clone(), q, QueueOffset(target));
                }
            }
        } else {
            let queues: Vec<QueueRef> = self.queues.keys().cloned().collect();
            for q in queues {
                let target = self.inner.position(&q, &to).await?;
                let state = self.queues.get_mut(&q).expect("listed");
                for f in state.in_flight.values() {
                    if let Some(m) = self.members.get_mut(&f.member) {
                        m.unacked = m.unacked.saturating_sub(1);
                    }
                }
                let owner = state.owner.take();
                *state = QueueState {
                    owner,
                    read: target,
                    persisted: Some(target),
                    ..QueueState::default()
                };
                batch.commit_offset(self.spec.name.clone(), q, QueueOffset(target));
            }
        }
        self.inner.store.write(batch).await?;
        Ok(())
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
                lag: next.saturating_sub(committed),
                ready: next.saturating_sub(c.read) + (c.buffer.len() + c.redeliver.len()) as u64,
                in_flight: c.in_flight.len(),
            });
        };
        if self.broadcast() {
            for (id, m) in &self.members {
                for (q, c) in &m.cursors {
                    add(q, c, Some(id.clone()));
                }
            }
        } else {
            for (q, c) in &self.queues {
                add(q, c, c.owner.clone());
            }
        }
        let members = self
            .members
            .iter()
            .map(|(id, m)| MemberInfo {
                id: id.clone(),
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

    async fn commit(&mut self) {
        self.last_commit = Instant::now();
        let mut batch = WriteBatch::new();
        let mut marks = Vec::new();
        if self.broadcast() {
            for (id, m) in &self.members {
                let group = self.offsets_group(Some(id));
                for (q, c) in &m.cursors {
                    let committed = c.committed();
                    if c.persisted != Some(committed) {
                        batch.commit_offset(group.clone(), q.clone(), QueueOffset(committed));
                        marks.push((Some(id.clone()), q.clone(), committed));
                    }
                }
            }
        } else {
            for (q, c) in &self.queues {
                let committed = c.committed();
                if c.persisted != Some(committed) {
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
            let c = match &member {
                Some(id) => self.members.get_mut(id).and_then(|m| m.cursors.get_mut(&q)),
                None => self.queues.get_mut(&q),
            };
            if let Some(c) = c {
                c.persisted = Some(committed);
            }
        }
    }

    /// Deliver as much as members have credit for.
    async fn pump(&mut self) {
        loop {
            let mut progress = false;
            if self.broadcast() {
                let ids: Vec<String> = self.members.keys().cloned().collect();
                for id in ids {
                    let queues: Vec<QueueRef> = self.members[&id].cursors.keys().cloned().collect();
                    for q in queues {
                        progress |= self.pump_queue(&q, Target::Member(id.clone())).await;
                    }
                }
            } else {
                let queues: Vec<QueueRef> = self.queues.keys().cloned().collect();
                for q in queues {
                    let target = match (self.owned(), &self.queues[&q].owner) {
                        (true, Some(o)) => Target::Owner(o.clone()),
                        (true, None) => continue,
                        (false, _) => Target::AnyWithCredit,
                    };
                    progress |= self.pump_queue(&q, target).await;
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// The member the next message goes to, and for round robin its position. It does
    /// not move the round robin: only a message actually sent does (`pump_queue`), so
    /// looking for work in an empty queue (or the retry queue) never skips a member.
    fn pick(&self, target: &Target) -> Option<(String, Option<usize>)> {
        match target {
            Target::Owner(id) | Target::Member(id) => self
                .members
                .get(id)
                .filter(|m| m.credit() > 0)
                .map(|_| (id.clone(), None)),
            Target::AnyWithCredit => {
                let n = self.members.len();
                (0..n).find_map(|k| {
                    let i = (self.rr + k) % n;
                    let (id, m) = self.members.iter().nth(i).expect("in range");
                    (m.credit() > 0).then(|| (id.clone(), Some(i)))
                })
            }
        }
    }

    /// Deliver from one queue (at most one read batch per call, for fairness).
    async fn pump_queue(&mut self, queue: &QueueRef, target: Target) -> bool {
        let owner_key = match &target {
            Target::Member(id) => id.clone(),
            _ => String::new(),
        };
        let mut dying = Vec::new();
        let delivered = self
            .pump_queue_into(queue, target, &owner_key, &mut dying)
            .await;
        let progress = delivered || !dying.is_empty();
        self.flush_dying(&owner_key, queue, dying).await;
        progress
    }

    async fn pump_queue_into(
        &mut self,
        queue: &QueueRef,
        target: Target,
        owner_key: &str,
        dying: &mut Vec<Dying>,
    ) -> bool {
        let owner_key = owner_key.to_owned();
        let orderly = self.spec.orderly;
        let now = self.inner.clock.now();
        let boot = self.inner.boot;
        let retrying = self.retrying();
        let mut delivered = false;
        for _ in 0..self.inner.config.read_batch {
            {
                let Some(q) = self.cursor_mut(&owner_key, queue) else {
                    return delivered;
                };
                if now < q.suspended_until || (orderly && !q.in_flight.is_empty()) {
                    break;
                }
            }
            let Some((member, position)) = self.pick(&target) else {
                break;
            };
            // Next message: redeliveries first (offset order), then the read-ahead.
            let next = {
                let q = self.cursor_mut(&owner_key, queue).expect("checked");
                match q.redeliver.pop_first() {
                    Some((offset, p)) => Some((offset, p.message, p.count, true)),
                    None => q
                        .buffer
                        .pop_front()
                        .map(|m| (m.entry.offset.0, m.message, 0, false)),
                }
            };
            let (offset, message, count, redelivered) = match next {
                Some((offset, message, count, redelivered)) => {
                    match self
                        .spec
                        .policy
                        .verdict(&message, count, retrying, boot, now)
                    {
                        Verdict::Deliver => (offset, message, count, redelivered),
                        Verdict::Skip => {
                            delivered = true;
                            continue;
                        }
                        Verdict::Dead(reason) => {
                            if self.spec.policy.dead_letter.is_some() {
                                dying.push(Dying {
                                    offset,
                                    message,
                                    count,
                                    reason,
                                });
                            } else {
                                delivered = true;
                            }
                            continue;
                        }
                    }
                }
                None => {
                    // Read only what members can take now: the backlog stays in the store.
                    let credit = match &target {
                        Target::Owner(id) | Target::Member(id) => {
                            self.members.get(id).map_or(0, Member::credit)
                        }
                        Target::AnyWithCredit => self.members.values().map(Member::credit).sum(),
                    };
                    if !self.fill(&owner_key, queue, credit).await {
                        break;
                    }
                    continue;
                }
            };
            let token = self.next_token;
            self.next_token += 1;
            let delivery = Delivery {
                queue: queue.clone(),
                offset: QueueOffset(offset),
                message: Arc::clone(&message),
                redelivered,
                delivery_count: count + 1,
                token,
            };
            let m = self.members.get_mut(&member).expect("picked");
            if m.tx.send(delivery).is_err() {
                // The member is gone; its Leave is on the way. Put the message back.
                let q = self.cursor_mut(&owner_key, queue).expect("checked");
                q.redeliver.insert(offset, Pending { message, count });
                let _ = self.handle.cmd.send(Cmd::Leave(member));
                break;
            }
            m.unacked += 1;
            if let Some(i) = position {
                self.rr = i + 1;
            }
            let q = self.cursor_mut(&owner_key, queue).expect("checked");
            q.in_flight.insert(
                offset,
                InFlight {
                    token,
                    member,
                    count: count + 1,
                    message,
                },
            );
            delivered = true;
        }
        delivered
    }

    /// Read the next (at most `want`) messages of `queue` into its buffer. Returns
    /// whether anything changed.
    async fn fill(&mut self, member: &str, queue: &QueueRef, want: usize) -> bool {
        let batch = self.inner.config.read_batch.min(want).max(1);
        let store = Arc::clone(&self.inner.store);
        let Ok(range) = store.queue_range(queue) else {
            return false;
        };
        let Some(q) = self.cursor_mut(member, queue) else {
            return false;
        };
        if q.read < range.min.0 {
            // Retention deleted what this group had not read yet: continue from the new
            // start, and count the loss.
            let lost = range.min.0 - q.read;
            q.read = range.min.0;
            self.skipped += lost;
            tracing::warn!(group = %self.spec.name, queue = %queue, lost, "core: group fell behind retention");
            return true;
        }
        if q.read >= range.next.0 {
            return false;
        }
        let from = QueueOffset(q.read);
        match store.read(queue, from, ReadLimits::count(batch)).await {
            Ok(msgs) if !msgs.is_empty() => {
                let q = self.cursor_mut(member, queue).expect("exists");
                q.read = msgs.last().map_or(q.read, |m| m.entry.offset.0 + 1);
                q.buffer.extend(msgs);
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::error!(group = %self.spec.name, queue = %queue, error = %e, "core: read failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::owner_of;

    #[test]
    fn average_allocation() {
        let members: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let owners = |m: usize, ms: &[String]| -> Vec<String> {
            (0..m)
                .map(|i| owner_of(i, m, ms).cloned().unwrap_or_default())
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
