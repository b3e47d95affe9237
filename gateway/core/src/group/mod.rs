//! Consumer groups. Each live group is one actor that owns all of the group's state: its
//! members, which member owns which queue, what is in flight, and where each queue is
//! read up to. Members talk to it over channels; publishers wake it through the topics
//! it watches. It runs as a task while it has work and parks without one while idle
//! (`park.rs`). Nothing unconsumed is held in memory: the actor reads from the store only
//! as much as members have credit for.
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

mod actor;
mod credit;
mod cursors;
mod deliver;
mod limits;
mod marks;
mod migrate;
mod park;
mod queue;
mod settle;
mod vecmap;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::mailbox;
use mqgate_store::{GroupName, Millis, QueueOffset, QueueRef, StoredMessage, TopicName};
use tokio::sync::oneshot;

use crate::broker::{ShardCore, TopicHandle};
use crate::endpoint::Policy;
use crate::error::{CoreError, Result};

use self::actor::Actor;
pub use self::credit::CreditPool;
pub(crate) use self::marks::{
    delete_topic_marks, delivered_key, held_at_rest, unheld_mark, DELIVERED_NS,
};
pub(crate) use self::park::GroupWake;
use self::vecmap::VecMap;

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
    /// A start at `First` is stored with the group's first delivery (or its first
    /// commit, or when its actor ends) instead of when it starts, so that a group that
    /// never delivers writes nothing: for groups that end with their connection (an
    /// MQTT clean session, whose idle connect so costs no store write). A crash before
    /// then leaves the store without the group (it starts at `First` all the same when
    /// it comes back, but is not listed meanwhile), so it is off by default.
    pub lazy_start: bool,
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
            lazy_start: false,
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
    /// [`Consumer::set_prefetch`]): for pull-style consumers such as AMQP's basic.get,
    /// and for AMQP's basic.qos, honoured up to 65,535 rather than
    /// `CoreConfig::max_prefetch`.
    pub exact_prefetch: bool,
    /// Credit shared with other members, of this group or others (AMQP's channel-wide
    /// `basic.qos` with `global`): a delivery also needs a unit of it. Not carried to a
    /// group in another process (there the member's prefetch is capped by its limit).
    pub credit_pool: Option<Arc<CreditPool>>,
    /// No limit on what it holds unacknowledged (AMQP's consumer without basic.qos,
    /// which RabbitMQ sends everything): `prefetch` bounds only the deliveries waiting
    /// in its mailbox, not yet taken by its connection, and the consumer asks for more
    /// when it has taken them all. A connection that cannot write stops taking, so what
    /// it is given stays bounded by its socket. Carried over the consume relay to a
    /// group on another gateway, and kept by a member that follows its shard's moves:
    /// both count along the way ([`Drain`]).
    pub unbounded: bool,
    /// An unbounded member's counts, when a consumer that wraps the member already
    /// holds them (a member that follows its shard, the relay's member side); `None`:
    /// new ones.
    pub drain: Option<Arc<Drain>>,
}

impl MemberOptions {
    /// A member with a prefetch limit and no heartbeat requirement.
    pub fn new(id: impl Into<String>, prefetch: usize) -> Self {
        Self {
            id: id.into(),
            prefetch,
            heartbeat: false,
            exact_prefetch: false,
            credit_pool: None,
            unbounded: false,
            drain: None,
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
    /// How many times it was tried before this delivery: its retries through the
    /// retry ladder (RocketMQ's reconsume times) plus its earlier deliveries in this
    /// group (nacked, requeued, or given back by a member that left). 0 on a first
    /// delivery. AMQP shows it as `x-delivery-count` (as RabbitMQ's quorum queues),
    /// MQTT 5 as the user property `x-delivery-count`.
    pub fn reconsume_count(&self) -> u32 {
        self.message
            .message
            .reconsume_times
            .saturating_add(self.delivery_count.saturating_sub(1))
    }

    /// The token that acknowledges this delivery (usable after the delivery is dropped).
    pub fn ack_token(&self) -> AckToken {
        AckToken {
            queue: self.queue.clone(),
            offset: self.offset.0,
            token: self.token,
        }
    }

    /// A delivery made on another gateway and relayed here: its fields as the group's
    /// actor there set them (`token` from [`AckToken::token`]).
    pub fn relayed(
        queue: QueueRef,
        offset: QueueOffset,
        message: Arc<StoredMessage>,
        redelivered: bool,
        delivery_count: u32,
        token: u64,
    ) -> Self {
        Self {
            queue,
            offset,
            message,
            redelivered,
            delivery_count,
            token,
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

impl AckToken {
    /// A token carried over the cluster's consume relay.
    pub fn from_parts(queue: QueueRef, offset: u64, token: u64) -> Self {
        Self {
            queue,
            offset,
            token,
        }
    }

    /// The queue of the delivery.
    pub fn queue(&self) -> &QueueRef {
        &self.queue
    }

    /// Its offset in the queue.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Which delivery of it (a later redelivery has another).
    pub fn token(&self) -> u64 {
        self.token
    }
}

enum Cmd {
    /// With the member id its consumer holds (a leave names its member by this very
    /// `Arc`, so a consumer dropped after its id joined again cannot remove the new
    /// one); the last: an unbounded member's [`Drain`].
    Join(
        MemberOptions,
        Arc<str>,
        mailbox::Sender<Delivery>,
        oneshot::Sender<()>,
        Option<Arc<Drain>>,
    ),
    // Member ids are shared, not copied: an ack per message sends one.
    /// A member leaves; `true`: sent by its dropped consumer, whose id (the `Arc` its
    /// join gave it) must be the member's: a member that joined again under the same id
    /// since stays.
    Leave(Arc<str>, bool),
    Ack(Arc<str>, AckToken),
    Nack(Arc<str>, AckToken, bool),
    /// A delivery that never reached the member's client: again, not counted.
    Release(Arc<str>, AckToken),
    Heartbeat(Arc<str>),
    Prefetch(Arc<str>, usize),
    /// An unbounded member is bounded from now on ([`Consumer::bound`]).
    Bound(Arc<str>),
    Reset(StartPosition, oneshot::Sender<Result<()>>),
    Info(oneshot::Sender<GroupInfo>),
    /// Settle expired messages at the head of each queue (members or not).
    /// Settle expired heads; answers whether a head may still expire later.
    Expire(oneshot::Sender<bool>),
    /// Ready messages and (when asked) their body bytes, over the group's queues.
    Ready(bool, oneshot::Sender<(u64, u64)>),
    /// Drop the oldest ready messages until within (count, bytes): a `drop-head` length
    /// limit; dead-lettered (`maxlen`) when the group's policy has a target.
    Trim(Option<u64>, Option<u64>, oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

/// A member's handle: receive deliveries, acknowledge them. Dropping it leaves the group.
#[derive(Debug)]
pub struct Consumer {
    member: Arc<str>,
    group: GroupName,
    rx: mailbox::Receiver<Delivery>,
    cmd: Control,
    /// An unbounded member ([`MemberOptions::unbounded`]): what it has taken, and
    /// whether its group is waiting for it to take.
    drain: Option<Arc<Drain>>,
}

/// An unbounded member's mailbox as its group counts it, without the mailbox's lock:
/// the group counts what it put in, the consumer what it took out. When the group finds
/// the mailbox full it sets `starved`, then counts again; the consumer counts a take,
/// then looks at `starved`, and asks for more (a `Heartbeat` command) once it has taken
/// everything. Either the group's second count sees the take, or the consumer sees the
/// flag (both sequentially consistent).
///
/// Shared along a chain of mailboxes: a member that follows its shard's moves, and a
/// member over the consume relay, count what their group put in the inner mailbox and
/// what the client's consumer took from the outer one, so `prefetch` bounds everything
/// on its way to the connection, and a member joined anew after a move adds to the same
/// counts ([`MemberOptions::drain`]).
#[derive(Debug, Default)]
pub struct Drain {
    put: std::sync::atomic::AtomicUsize,
    taken: std::sync::atomic::AtomicUsize,
    starved: std::sync::atomic::AtomicBool,
}

impl Drain {
    /// Deliveries put in and not yet taken.
    pub fn waiting(&self) -> usize {
        use std::sync::atomic::Ordering::SeqCst;
        // A take counted before its put reads as nothing waiting, never as a wrap.
        let taken = self.taken.load(SeqCst);
        self.put.load(SeqCst).saturating_sub(taken)
    }

    /// `n` more deliveries put in (by whatever feeds the consumer's mailbox).
    pub fn put(&self, n: usize) {
        self.put.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// What feeds the mailbox found it full: the consumer asks for more (its
    /// control's heartbeat) once it has taken everything. Count [`Drain::waiting`]
    /// again after it: a take that came first did not see the flag.
    pub fn starve(&self) {
        self.starved
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Take the flag back (it was seen): whether it was set.
    pub fn unstarve(&self) -> bool {
        self.starved
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

/// Where a consumer's acks and settings go: its group's actor in this process, or a
/// relay to the gateway owning the group's shard.
enum Control {
    Local(mailbox::Sender<Cmd>),
    Remote(Arc<dyn RemoteControl>),
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Local(_) => "Local",
            Control::Remote(_) => "Remote",
        })
    }
}

/// The member side of a consumer whose group lives on another gateway (the cluster's
/// consume relay): what [`Consumer`]'s calls become. Deliveries come the other way,
/// into the mailbox [`Consumer::remote`] returns.
pub trait RemoteControl: Send + Sync {
    /// [`Consumer::ack`].
    fn ack(&self, token: AckToken);
    /// [`Consumer::nack`].
    fn nack(&self, token: AckToken, requeue: bool);
    /// [`Consumer::release`] (a link that cannot say it requeues, counted).
    fn release(&self, token: AckToken) {
        self.nack(token, true);
    }
    /// [`Consumer::heartbeat`].
    fn heartbeat(&self);
    /// [`Consumer::set_prefetch`].
    fn set_prefetch(&self, prefetch: usize);
    /// The consumer is dropped: leave the group.
    fn leave(&self);
    /// Done once the member has left where the group lives (what it held is released
    /// there); taken before the consumer is dropped.
    fn left(&self) -> Left {
        Box::pin(std::future::ready(()))
    }
}

/// Resolves once a consumer that was dropped has left its group where the group lives
/// ([`Consumer::leave`]).
pub type Left = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Join(..) => "Join",
            Cmd::Leave(..) => "Leave",
            Cmd::Ack(..) => "Ack",
            Cmd::Nack(..) => "Nack",
            Cmd::Release(..) => "Release",
            Cmd::Heartbeat(..) => "Heartbeat",
            Cmd::Prefetch(..) => "Prefetch",
            Cmd::Bound(..) => "Bound",
            Cmd::Reset(..) => "Reset",
            Cmd::Info(..) => "Info",
            Cmd::Expire(..) => "Expire",
            Cmd::Ready(..) => "Ready",
            Cmd::Trim(..) => "Trim",
            Cmd::Stop(..) => "Stop",
        })
    }
}

impl Consumer {
    /// The next delivery; `None` once the group has stopped (broker shutdown).
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll for the next delivery (for adapters that wait on several consumers at once).
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Delivery>> {
        let d = self.rx.poll_recv(cx);
        if let std::task::Poll::Ready(Some(_)) = &d {
            self.taken();
        }
        d
    }

    /// A delivery if one is ready now.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let d = self.rx.try_recv();
        if d.is_some() {
            self.taken();
        }
        d
    }

    /// An unbounded member counts each delivery it takes, and asks its group for more
    /// once it has taken everything the group waits on ([`Drain`]).
    fn taken(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(d) = &self.drain {
            d.taken.fetch_add(1, SeqCst);
            if d.starved.load(SeqCst) && self.rx.is_empty() && d.unstarve() {
                self.heartbeat();
            }
        }
    }

    /// The member id.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// The group.
    pub fn group(&self) -> &GroupName {
        &self.group
    }

    /// A consumer whose group lives on another gateway: calls go to `control`,
    /// deliveries are what the returned sender queues.
    pub fn remote(
        member: &str,
        group: GroupName,
        control: Arc<dyn RemoteControl>,
    ) -> (Self, mailbox::Sender<Delivery>) {
        Self::remote_drained(member, group, control, None)
    }

    /// [`Consumer::remote`] for an unbounded member: it counts what it takes in
    /// `drain`, and asks for more (`control`'s heartbeat) once it has taken everything
    /// after what feeds it found the mailbox full ([`Drain::starve`]).
    pub fn remote_drained(
        member: &str,
        group: GroupName,
        control: Arc<dyn RemoteControl>,
        drain: Option<Arc<Drain>>,
    ) -> (Self, mailbox::Sender<Delivery>) {
        let (tx, rx) = mailbox::channel();
        (
            Self {
                member: member.into(),
                group,
                rx,
                cmd: Control::Remote(control),
                drain,
            },
            tx,
        )
    }

    /// Consumption succeeded.
    pub fn ack(&self, token: AckToken) {
        match &self.cmd {
            Control::Local(c) => {
                let _ = c.send(Cmd::Ack(Arc::clone(&self.member), token));
            }
            Control::Remote(r) => r.ack(token),
        }
    }

    /// Consumption failed. `requeue`: deliver it again now (AMQP requeue), else the
    /// group's failure policy applies (retry ladder / DLQ, or discard).
    pub fn nack(&self, token: AckToken, requeue: bool) {
        match &self.cmd {
            Control::Local(c) => {
                let _ = c.send(Cmd::Nack(Arc::clone(&self.member), token, requeue));
            }
            Control::Remote(r) => r.nack(token, requeue),
        }
    }

    /// The delivery never reached the client (a relay lost it on the way): deliver it
    /// again, flagged redelivered, without counting it as a delivery (a delivery limit
    /// counts what clients were given).
    pub fn release(&self, token: AckToken) {
        match &self.cmd {
            Control::Local(c) => {
                let _ = c.send(Cmd::Release(Arc::clone(&self.member), token));
            }
            Control::Remote(r) => r.release(token),
        }
    }

    /// I am alive (for members that joined with `heartbeat: true`).
    pub fn heartbeat(&self) {
        match &self.cmd {
            Control::Local(c) => {
                let _ = c.send(Cmd::Heartbeat(Arc::clone(&self.member)));
            }
            Control::Remote(r) => r.heartbeat(),
        }
    }

    /// Change the prefetch limit (0: the broker's maximum, unless the member joined
    /// with `exact_prefetch`).
    pub fn set_prefetch(&self, prefetch: usize) {
        match &self.cmd {
            Control::Local(c) => {
                let _ = c.send(Cmd::Prefetch(Arc::clone(&self.member), prefetch));
            }
            Control::Remote(r) => r.set_prefetch(prefetch),
        }
    }

    /// An unbounded member ([`MemberOptions::unbounded`]) of a group in this process
    /// holds at most its prefetch unacknowledged from now on (the consume relay's
    /// owner side, for a member whose AMQP channel got a global basic.qos limit).
    pub fn bound(&self) {
        if let Control::Local(c) = &self.cmd {
            let _ = c.send(Cmd::Bound(Arc::clone(&self.member)));
        }
    }
}

impl Consumer {
    /// Whether its group's actor is in this process.
    pub(crate) fn is_local(&self) -> bool {
        matches!(self.cmd, Control::Local(_))
    }

    /// Its mailbox, taken out (a closed one left in its place): for a consumer that
    /// wraps this one (`migrate.rs`).
    fn take_rx(&mut self) -> mailbox::Receiver<Delivery> {
        let (_, empty) = mailbox::channel();
        std::mem::replace(&mut self.rx, empty)
    }

    /// Leave the group now (as dropping it does); the returned future resolves once the
    /// member has left where the group lives: at once for a group on this gateway
    /// (what comes after reaches its actor after the leave), after the owner's answer
    /// for one on another gateway. An AMQP channel's close waits for it, so what its
    /// consumers held is back in the queue when close-ok is sent, as RabbitMQ does.
    pub fn leave(self) -> Left {
        let left = match &self.cmd {
            Control::Local(_) => None,
            Control::Remote(r) => Some(r.left()),
        };
        drop(self);
        left.unwrap_or_else(|| Box::pin(std::future::ready(())))
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // What is still in the mailbox never reached the client: released, so it does not
        // count as a delivery (a delivery limit would otherwise drop it unseen), before
        // the leave puts back what the client did get.
        match &self.cmd {
            Control::Local(c) => {
                self.rx.close();
                while let Some(d) = self.rx.try_recv() {
                    let _ = c.send(Cmd::Release(Arc::clone(&self.member), d.ack_token()));
                }
                let _ = c.send(Cmd::Leave(self.member.clone(), true));
            }
            Control::Remote(r) => {
                // Closed first: a batch its gateway takes in meanwhile is given back
                // there (it finds the mailbox closed), not lost with it.
                self.rx.close();
                while let Some(d) = self.rx.try_recv() {
                    r.release(d.ack_token());
                }
                r.leave();
            }
        }
    }
}

/// A live group's handle, kept in the broker's registry.
#[derive(Clone, Debug)]
pub(crate) struct GroupHandle {
    pub(crate) spec: Arc<GroupSpec>,
    cmd: mailbox::Sender<Cmd>,
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
        let (tx, rx) = mailbox::channel();
        let (done, joined) = oneshot::channel();
        let member: Arc<str> = opts.id.as_str().into();
        let drain = opts
            .unbounded
            .then(|| opts.drain.clone().unwrap_or_default());
        self.cmd
            .send(Cmd::Join(
                opts,
                Arc::clone(&member),
                tx,
                done,
                drain.clone(),
            ))
            .ok()?;
        joined.await.ok()?;
        Some(Consumer {
            member,
            group: self.spec.name.clone(),
            rx,
            cmd: Control::Local(self.cmd.clone()),
            drain,
        })
    }

    pub(crate) async fn reset(&self, to: StartPosition) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Reset(to, tx))
            .map_err(|_| CoreError::ShuttingDown)?;
        rx.await.map_err(|_| CoreError::ShuttingDown)?
    }

    /// Settle the expired messages at its queues' heads: whether a head left may still
    /// expire later (it carries an expiry, or the group has a message TTL).
    pub(crate) async fn expire(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Expire(tx)).is_err() {
            return true;
        }
        rx.await.unwrap_or(true)
    }

    /// Ready messages (not in flight) and, when `bytes`, their body bytes.
    pub(crate) async fn ready(&self, bytes: bool) -> Option<(u64, u64)> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(Cmd::Ready(bytes, tx)).ok()?;
        rx.await.ok()
    }

    /// Drop the oldest ready messages until at most `max_len` and `max_bytes` are ready
    /// (messages in flight stay and do not count).
    pub(crate) async fn trim(&self, max_len: Option<u64>, max_bytes: Option<u64>) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Trim(max_len, max_bytes, tx)).is_ok() {
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
    /// The committed offset: the lowest not yet acknowledged, or, once the group has
    /// checkpointed or closed the queue, the first never delivered, with what is still
    /// owed below it held (counted in `lag`).
    pub committed: u64,
    /// The queue's next offset.
    pub next: u64,
    /// `next - committed`, plus what is held below `committed`.
    pub lag: u64,
    /// Messages waiting to be delivered: not in flight, not acknowledged (AMQP's
    /// message count). Equals `lag` when read from the store.
    pub ready: u64,
    /// Delivered and not yet acknowledged.
    pub in_flight: usize,
}

impl QueueInfo {
    /// Offsets below `committed` that are settled (consumed): `committed` less what is
    /// held below it (`lag` beyond `next - committed`).
    pub fn consumed(&self) -> u64 {
        let held = self
            .lag
            .saturating_sub(self.next.saturating_sub(self.committed));
        self.committed.saturating_sub(held)
    }
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
    inner: Arc<ShardCore>,
    spec: GroupSpec,
    watched: Vec<Arc<TopicHandle>>,
) -> GroupHandle {
    let (cmd, rx) = mailbox::channel();
    let alive = Arc::new(AtomicBool::new(true));
    let spec = Arc::new(spec);
    let handle = GroupHandle {
        spec: Arc::clone(&spec),
        cmd,
        alive: Arc::clone(&alive),
    };
    let wake = Arc::new(GroupWake::new());
    for t in &watched {
        t.watch(Arc::clone(&wake));
    }
    let watched = watched.into_iter().map(cursors::Watched::new).collect();
    let max_reconsume = spec
        .max_reconsume_times
        .unwrap_or(inner.config.max_reconsume_times);
    let actor = Actor {
        inner: park::CoreRef::new(inner),
        spec,
        max_reconsume,
        members: VecMap::new(),
        queues: VecMap::new(),
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
    tokio::spawn(Box::new(actor).run());
    handle
}
