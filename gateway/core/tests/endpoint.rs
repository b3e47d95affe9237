//! Endpoint policies and the core features that came with them, through the broker's
//! API: dead-letter targets (on reject, on expiry, past a delivery limit, after the retry
//! ladder), a failure's effect written in one batch with the offset commit (and nothing
//! lost when that write fails), expiry sweeps of endpoints nobody consumes, named
//! cancellable timers, and `publish_batch` with records.
//!
//! Time runs on a `ManualClock` started at the wall clock (store timestamps are wall
//! clock, TTLs are compared with the core's clock). Periodic offset commits and periodic
//! expiry sweeps are pushed an hour out, so every commit a test sees was written by the
//! operation under test.

mod common;

use common::Tagging;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use mqgate_core::endpoint::Overflow;
use mqgate_core::props::EXPIRES_AT;
use mqgate_core::retry::{dlq_topic, retry_topic, PROP_DLQ_FAILURES};
use mqgate_core::router::{
    Binding, Destination as BindTo, ExchangeDef, ExchangeKind, DEFAULT_VHOST as VHOST,
};
use mqgate_core::{
    Broker, Clock, ConsumeMode, Consumer, CoreConfig, DeadLetter, Delay, Delivery, Destination,
    GroupSpec, ManualClock, MemberOptions, OnFailure, Outgoing, PublishBatch, Published, Records,
    StartPosition,
};
use mqgate_store::{
    now_millis, GroupName, MemoryStore, Message, MessageId, Millis, OffsetRange, QueueMessage,
    QueueOffset, QueueRef, ReadLimits, RetentionReport, RocksConfig, RocksStore, Store, StoreError,
    StoreHealth, StoreStats, StoredMessage, TimerKey, TopicConfig, TopicName, WriteBatch,
    WriteReceipt,
};
use tokio::sync::Notify;

/// The keyed-area namespace the core keeps named timers in (private to the core).
const NS_SCHEDULED: &str = "core.scheduled";
/// How long a queue pauses after a settlement could not be stored (the core's
/// `FAILED_WRITE_PAUSE_MS`), plus a margin.
const PAST_FAILED_WRITE_PAUSE: Duration = Duration::from_millis(1_100);

// ---------------------------------------------------------------------------------------
// A store that fails writes on demand, counts them, and can hold one keyed-area read.

/// Holds the next `kv_get` of `namespace` after it has read its value, until released.
#[derive(Debug)]
struct Gate {
    namespace: &'static str,
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

/// A [`MemoryStore`] whose writes fail while `fail` is set.
#[derive(Debug, Default)]
struct FailingStore {
    inner: MemoryStore,
    fail: AtomicBool,
    /// Writes attempted (`write` and `write_notify`), failed ones included.
    writes: AtomicU64,
    gate: Mutex<Option<Gate>>,
}

impl FailingStore {
    fn set_failing(&self, on: bool) {
        self.fail.store(on, Ordering::SeqCst);
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Hold the next read of `namespace`: returns (entered, release).
    fn arm_gate(&self, namespace: &'static str) -> (Arc<Notify>, Arc<Notify>) {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        *self.gate.lock().unwrap() = Some(Gate {
            namespace,
            entered: Arc::clone(&entered),
            release: Arc::clone(&release),
        });
        (entered, release)
    }

    fn check_write(&self) -> mqgate_store::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for FailingStore {
    async fn create_topic(
        &self,
        name: &TopicName,
        queue_count: u32,
    ) -> mqgate_store::Result<TopicConfig> {
        self.inner.create_topic(name, queue_count).await
    }

    async fn delete_topic(&self, name: &TopicName) -> mqgate_store::Result<bool> {
        self.inner.delete_topic(name).await
    }

    fn topic(&self, name: &TopicName) -> Option<TopicConfig> {
        self.inner.topic(name)
    }

    fn topics(&self) -> Vec<TopicConfig> {
        self.inner.topics()
    }

    async fn write(&self, batch: WriteBatch) -> mqgate_store::Result<WriteReceipt> {
        self.check_write()?;
        self.inner.write(batch).await
    }

    async fn write_notify(
        &self,
        batch: WriteBatch,
        visible: tokio::sync::oneshot::Sender<()>,
    ) -> mqgate_store::Result<WriteReceipt> {
        self.check_write()?;
        self.inner.write_notify(batch, visible).await
    }

    fn queue_range(&self, queue: &QueueRef) -> mqgate_store::Result<OffsetRange> {
        self.inner.queue_range(queue)
    }

    async fn read(
        &self,
        queue: &QueueRef,
        from: QueueOffset,
        limits: ReadLimits,
    ) -> mqgate_store::Result<Vec<QueueMessage>> {
        self.inner.read(queue, from, limits).await
    }

    async fn offset_for_timestamp(
        &self,
        queue: &QueueRef,
        timestamp: Millis,
    ) -> mqgate_store::Result<QueueOffset> {
        self.inner.offset_for_timestamp(queue, timestamp).await
    }

    async fn message(&self, id: MessageId) -> mqgate_store::Result<Option<Arc<StoredMessage>>> {
        self.inner.message(id).await
    }

    async fn messages_by_key(
        &self,
        topic: &TopicName,
        key: &str,
        limit: usize,
    ) -> mqgate_store::Result<Vec<Arc<StoredMessage>>> {
        self.inner.messages_by_key(topic, key, limit).await
    }

    async fn committed_offset(
        &self,
        group: &GroupName,
        queue: &QueueRef,
    ) -> mqgate_store::Result<Option<QueueOffset>> {
        self.inner.committed_offset(group, queue).await
    }

    async fn committed_offsets(
        &self,
        group: &GroupName,
    ) -> mqgate_store::Result<Vec<(QueueRef, QueueOffset)>> {
        self.inner.committed_offsets(group).await
    }

    async fn groups(&self) -> mqgate_store::Result<Vec<GroupName>> {
        self.inner.groups().await
    }

    async fn groups_on_topic(&self, topic: &TopicName) -> mqgate_store::Result<Vec<GroupName>> {
        self.inner.groups_on_topic(topic).await
    }

    async fn kv_get(&self, namespace: &str, key: &[u8]) -> mqgate_store::Result<Option<Bytes>> {
        let value = self.inner.kv_get(namespace, key).await;
        let gate = {
            let mut g = self.gate.lock().unwrap();
            if g.as_ref().is_some_and(|g| g.namespace == namespace) {
                g.take()
            } else {
                None
            }
        };
        if let Some(g) = gate {
            // The value is read; whatever is written from now on is not in it.
            g.entered.notify_one();
            g.release.notified().await;
        }
        value
    }

    async fn kv_scan(
        &self,
        namespace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> mqgate_store::Result<Vec<(Bytes, Bytes)>> {
        self.inner.kv_scan(namespace, prefix, after, limit).await
    }

    async fn timers_due(
        &self,
        until: Millis,
        after: Option<TimerKey>,
        limit: usize,
    ) -> mqgate_store::Result<Vec<(TimerKey, Bytes)>> {
        self.inner.timers_due(until, after, limit).await
    }

    async fn next_timer(&self) -> mqgate_store::Result<Option<TimerKey>> {
        self.inner.next_timer().await
    }

    async fn enforce_retention(&self, now: Millis) -> mqgate_store::Result<RetentionReport> {
        self.inner.enforce_retention(now).await
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }

    fn health(&self) -> StoreHealth {
        self.inner.health()
    }

    async fn flush(&self) -> mqgate_store::Result<()> {
        self.inner.flush().await
    }
}

// ---------------------------------------------------------------------------------------
// The dead-letter copy.

// ---------------------------------------------------------------------------------------
// Helpers.

struct Env {
    store: Arc<dyn Store>,
    clock: ManualClock,
    broker: Broker,
}

impl Env {
    async fn start(store: Arc<dyn Store>) -> Self {
        Self::with(store, config()).await
    }

    async fn with(store: Arc<dyn Store>, config: CoreConfig) -> Self {
        let clock = ManualClock::new(now_millis());
        let broker = Broker::start(Arc::clone(&store), config, Arc::new(clock.clone()))
            .await
            .unwrap();
        Self {
            store,
            clock,
            broker,
        }
    }

    async fn memory() -> Self {
        Self::start(Arc::new(MemoryStore::new())).await
    }

    /// The group's committed offset on queue 0 of `t`, as stored.
    async fn committed(&self, g: &str, t: &str) -> Option<u64> {
        self.store
            .committed_offset(&group(g), &QueueRef::new(topic(t), 0))
            .await
            .unwrap()
            .map(|o| o.0)
    }
}

/// No periodic offset commits or expiry sweeps during a test; 50 ms delay levels.
fn config() -> CoreConfig {
    CoreConfig {
        offset_commit_interval: Duration::from_secs(3600),
        expiry_interval: Duration::from_secs(3600),
        delay_levels: vec![Duration::from_millis(50); 18],
        ..CoreConfig::default()
    }
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

fn group(s: &str) -> GroupName {
    GroupName::new(s).unwrap()
}

fn msg(t: &str, body: &str) -> Message {
    Message::new(topic(t), Bytes::from(body.to_owned()))
}

fn text(m: &StoredMessage) -> String {
    String::from_utf8(m.message.body.to_vec()).unwrap()
}

fn body(d: &Delivery) -> String {
    text(&d.message)
}

fn prop<'a>(m: &'a StoredMessage, name: &str) -> Option<&'a str> {
    m.message
        .property(name)
        .map(|v| std::str::from_utf8(v).unwrap())
}

fn death(m: &StoredMessage) -> Option<&str> {
    prop(m, "death")
}

/// A shared group over one topic, from its first message.
fn spec(g: &str, t: &str, on_failure: OnFailure) -> GroupSpec {
    let mut s = GroupSpec::new(group(g), vec![topic(t)], ConsumeMode::Shared);
    s.start = StartPosition::First;
    s.on_failure = on_failure;
    s
}

/// The dead-letter target `exchange` of the default vhost, for endpoint `endpoint`.
fn dead_letter(exchange: &str, routing_key: Option<&str>, endpoint: &str) -> Box<DeadLetter> {
    Box::new(DeadLetter {
        vhost: VHOST.into(),
        exchange: exchange.into(),
        routing_key: routing_key.map(str::to_owned),
        endpoint: endpoint.into(),
        format: Arc::new(Tagging),
    })
}

/// A durable direct exchange that routes `key` to the one-queue topic `target`.
async fn declare_route(b: &Broker, exchange: &str, key: &str, target: &str) {
    b.declare_exchange(VHOST, ExchangeDef::new(exchange, ExchangeKind::Direct))
        .await
        .unwrap();
    b.create_topic(&topic(target), Some(1)).await.unwrap();
    b.bind(
        VHOST,
        Binding {
            source: exchange.into(),
            destination: BindTo::Topic(topic(target)),
            key: key.into(),
            headers: None,
            mqtt: false,
            arguments: Bytes::new(),
        },
        true,
    )
    .await
    .unwrap();
}

/// The dead-letter exchange `dlx` routing `dead` to the topic `dead-target`.
async fn declare_dlx(b: &Broker) {
    declare_route(b, "dlx", "dead", "dead-target").await;
}

/// The endpoint `q` over the one-queue topic `work`, whose messages live 1 s and are
/// dead-lettered through `dlx` (to `dead-target`): declared and registered; its group's
/// spec.
async fn ttl_endpoint(b: &Broker) -> GroupSpec {
    declare_dlx(b).await;
    let mut s = spec("q", "work", OnFailure::Discard);
    s.policy.message_ttl = Some(1_000);
    s.policy.dead_letter = Some(dead_letter("dlx", Some("dead"), "work"));
    b.declare_endpoint(&topic("work"), 1, &group("q"), Records::new())
        .await
        .unwrap();
    b.register_endpoint(s.clone());
    s
}

async fn publish(b: &Broker, t: &str, body: &str) {
    b.publish(mqgate_core::Publish::new(msg(t, body)))
        .await
        .unwrap();
}

/// Every message indexed in `t` (all queues), without consuming.
async fn messages_in(b: &Broker, t: &str) -> Vec<Arc<StoredMessage>> {
    let Some(cfg) = b.topic(&topic(t)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for q in 0..cfg.queue_count {
        let q = QueueRef::new(topic(t), q);
        let range = b.queue_range(&q).unwrap();
        for m in b
            .peek(&q, range.min, ReadLimits::count(1000))
            .await
            .unwrap()
        {
            out.push(m.message);
        }
    }
    out
}

/// Poll until `t` holds at least `n` messages (5 s at most); returns them.
async fn wait_messages(b: &Broker, t: &str, n: usize) -> Vec<Arc<StoredMessage>> {
    for _ in 0..500 {
        let m = messages_in(b, t).await;
        if m.len() >= n {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{t} holds {} messages, expected {n}",
        messages_in(b, t).await.len()
    );
}

/// Poll until exactly `n` timers are pending (5 s at most).
async fn wait_pending(b: &Broker, n: u64) {
    for _ in 0..500 {
        if b.delayed_pending() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} timers pending, expected {n}", b.delayed_pending());
}

/// Poll until the group has nothing in flight (acks and nacks processed).
async fn settled(b: &Broker, g: &str) {
    for _ in 0..500 {
        let info = b.group_info(&group(g)).await.unwrap();
        if info.queues.iter().all(|q| q.in_flight == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("group {g} still has messages in flight");
}

async fn recv(c: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), c.recv())
        .await
        .expect("a delivery within 5 s")
        .expect("group alive")
}

/// Receive, moving the manual clock 50 ms at a time while nothing comes (retry timers).
async fn recv_advancing(c: &mut Consumer, clock: &ManualClock) -> Delivery {
    for _ in 0..200 {
        if let Ok(d) = tokio::time::timeout(Duration::from_millis(20), c.recv()).await {
            return d.expect("group alive");
        }
        clock.advance(Duration::from_millis(50));
    }
    panic!("no delivery while the clock moved 10 s");
}

async fn nothing(c: &mut Consumer) {
    if let Ok(d) = tokio::time::timeout(Duration::from_millis(300), c.recv()).await {
        panic!(
            "no delivery expected, got {:?}",
            d.map(|d| (body(&d), d.delivery_count))
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Reject with a dead-letter exchange.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_dead_letters_through_the_exchange_with_the_offset_commit() {
    let mem = Arc::new(MemoryStore::new());
    let env = Env::start(mem.clone()).await;
    let b = &env.broker;
    declare_dlx(b).await;
    b.create_topic(&topic("work"), Some(1)).await.unwrap();
    let mut s = spec("g", "work", OnFailure::Discard);
    // No routing key of its own: the format's default (`dead`) routes it.
    s.policy.dead_letter = Some(dead_letter("dlx", None, "work"));
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();

    publish(b, "work", "hello").await;
    let d = recv(&mut c).await;
    assert_eq!(body(&d), "hello");
    let work0 = QueueRef::new(topic("work"), 0);
    assert_eq!(
        mem.committed_offset(&group("g"), &work0).await.unwrap(),
        Some(QueueOffset(0)),
        "in flight: not committed"
    );

    c.nack(d.ack_token(), false);
    let dead = wait_messages(b, "dead-target", 1).await;
    // The copy and the commit past the original are one batch: once the copy is
    // visible, so is the commit (periodic commits are an hour away).
    assert_eq!(
        mem.committed_offset(&group("g"), &work0).await.unwrap(),
        Some(QueueOffset(1)),
        "the offset commit went with the dead-letter copy"
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(text(&dead[0]), "hello");
    assert_eq!(death(&dead[0]), Some("rejected"));
    assert_eq!(prop(&dead[0], "death-queue"), Some("work"));
    assert_eq!(dead[0].message.topic, topic("dlx"));
    assert_eq!(b.dead_lettered(), 1);
    // Neither redelivered nor sent to the group's DLQ.
    nothing(&mut c).await;
    assert!(b.dlq(&group("g"), 0, 10).await.unwrap().is_empty());
    assert_eq!(messages_in(b, "dead-target").await.len(), 1);
}

/// A target exchange that routes nowhere drops the copy, and the original is still
/// settled (RabbitMQ's behaviour); a missing exchange likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_to_an_unroutable_or_missing_dead_letter_exchange_drops_it() {
    let env = Env::memory().await;
    let b = &env.broker;
    declare_dlx(b).await;
    b.create_topic(&topic("work"), Some(1)).await.unwrap();
    let mut s = spec("g", "work", OnFailure::Discard);
    s.policy.dead_letter = Some(dead_letter("dlx", Some("unbound-key"), "work"));
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    publish(b, "work", "a").await;
    let d = recv(&mut c).await;
    c.nack(d.ack_token(), false);
    settled(b, "g").await;
    nothing(&mut c).await;
    assert!(messages_in(b, "dead-target").await.is_empty());

    b.create_topic(&topic("work2"), Some(1)).await.unwrap();
    let mut s = spec("g2", "work2", OnFailure::Discard);
    s.policy.dead_letter = Some(dead_letter("no-such-exchange", None, "work2"));
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    publish(b, "work2", "b").await;
    let d = recv(&mut c).await;
    c.nack(d.ack_token(), false);
    settled(b, "g2").await;
    nothing(&mut c).await;
}

// ---------------------------------------------------------------------------------------
// 2. A dead-letter write that fails loses nothing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dead_letter_write_redelivers_after_a_pause() {
    let store = Arc::new(FailingStore::default());
    let env = Env::start(store.clone()).await;
    let b = &env.broker;
    declare_dlx(b).await;
    b.create_topic(&topic("work"), Some(1)).await.unwrap();
    let mut s = spec("g", "work", OnFailure::Discard);
    s.policy.dead_letter = Some(dead_letter("dlx", Some("dead"), "work"));
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    publish(b, "work", "precious").await;
    let d1 = recv(&mut c).await;
    assert_eq!(d1.delivery_count, 1);

    store.set_failing(true);
    let before = store.writes();
    c.nack(d1.ack_token(), false);
    settled(b, "g").await;
    assert!(
        store.writes() > before,
        "the dead-letter write was attempted"
    );
    assert!(messages_in(b, "dead-target").await.is_empty());
    assert_eq!(env.committed("g", "work").await, Some(0), "not committed");
    // Paused, not redelivered at once (the clock has not moved).
    nothing(&mut c).await;

    store.set_failing(false);
    env.clock.advance(PAST_FAILED_WRITE_PAUSE);
    let d2 = recv(&mut c).await;
    assert_eq!(body(&d2), "precious");
    assert_eq!(d2.offset, d1.offset);
    assert!(d2.redelivered);
    assert_eq!(d2.delivery_count, 2);
    assert!(messages_in(b, "dead-target").await.is_empty());

    // Now it can be stored: exactly one copy, committed with it.
    c.nack(d2.ack_token(), false);
    let dead = wait_messages(b, "dead-target", 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(text(&dead[0]), "precious");
    assert_eq!(death(&dead[0]), Some("rejected"));
    assert_eq!(env.committed("g", "work").await, Some(1));
    nothing(&mut c).await;
    assert_eq!(messages_in(b, "dead-target").await.len(), 1);
}

/// The same at delivery: an expired message whose dead-letter write fails stays in its
/// queue and is dead-lettered by a later sweep, after the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_expiry_write_keeps_the_message_for_a_later_sweep() {
    let store = Arc::new(FailingStore::default());
    let env = Env::start(store.clone()).await;
    let b = &env.broker;
    ttl_endpoint(b).await;
    publish(b, "work", "old").await;
    env.clock.advance(Duration::from_millis(1_500));

    store.set_failing(true);
    b.expire_endpoints().await;
    assert!(messages_in(b, "dead-target").await.is_empty());
    assert_eq!(env.committed("q", "work").await, Some(0));

    store.set_failing(false);
    // Within the pause the queue is left alone.
    b.expire_endpoints().await;
    assert!(messages_in(b, "dead-target").await.is_empty());
    env.clock.advance(PAST_FAILED_WRITE_PAUSE);
    b.expire_endpoints().await;
    let dead = messages_in(b, "dead-target").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(text(&dead[0]), "old");
    assert_eq!(death(&dead[0]), Some("expired"));
    assert_eq!(env.committed("q", "work").await, Some(1));
}

/// A reset whose write fails is not taken for stored: the group's next commit (here its
/// last, at shutdown) writes where the reset put it, so a restart does not undo it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_whose_write_failed_is_committed_later() {
    let store = Arc::new(FailingStore::default());
    let env = Env::start(store.clone()).await;
    let b = &env.broker;
    b.create_topic(&topic("work"), Some(1)).await.unwrap();
    let mut c = b
        .subscribe(
            spec("g", "work", OnFailure::Discard),
            MemberOptions::new("c", 10),
        )
        .await
        .unwrap();
    for i in 0..3 {
        publish(b, "work", &format!("m{i}")).await;
    }
    for _ in 0..3 {
        let d = recv(&mut c).await;
        c.ack(d.ack_token());
    }
    drop(c);
    b.reset_group(&group("g"), StartPosition::Last)
        .await
        .unwrap();
    assert_eq!(env.committed("g", "work").await, Some(3));
    store.set_failing(true);
    assert!(b
        .reset_group(&group("g"), StartPosition::First)
        .await
        .is_err());
    store.set_failing(false);
    assert_eq!(env.committed("g", "work").await, Some(3), "not written");
    b.shutdown().await;
    assert_eq!(env.committed("g", "work").await, Some(0));
}

// ---------------------------------------------------------------------------------------
// 3. Expired at delivery.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dead_lettered_instead_of_delivered() {
    let env = Env::memory().await;
    let b = &env.broker;
    declare_dlx(b).await;
    b.create_topic(&topic("work"), Some(1)).await.unwrap();
    let mut s = spec("g", "work", OnFailure::Discard);
    s.policy.message_ttl = Some(1_000);
    s.policy.dead_letter = Some(dead_letter("dlx", Some("dead"), "work"));

    // Within its TTL a message is delivered.
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("c", 10))
        .await
        .unwrap();
    publish(b, "work", "fresh").await;
    let d = recv(&mut c).await;
    assert_eq!(body(&d), "fresh");
    c.ack(d.ack_token());
    settled(b, "g").await;
    drop(c);

    // Past it, nobody gets it: its copy goes to the target.
    publish(b, "work", "stale").await;
    env.clock.advance(Duration::from_millis(1_500));
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    let dead = wait_messages(b, "dead-target", 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(text(&dead[0]), "stale");
    assert_eq!(death(&dead[0]), Some("expired"));
    assert_eq!(env.committed("g", "work").await, Some(2));
    nothing(&mut c).await;

    // A message's own `expires-at` counts too (a group without a TTL).
    b.create_topic(&topic("work2"), Some(1)).await.unwrap();
    let mut s2 = spec("g2", "work2", OnFailure::Discard);
    s2.policy.dead_letter = Some(dead_letter("dlx", Some("dead"), "work2"));
    let now = env.clock.now();
    let mut past = msg("work2", "too late");
    past.properties.push((
        EXPIRES_AT.into(),
        Bytes::copy_from_slice(&(now - 1).to_be_bytes()),
    ));
    let mut future = msg("work2", "in time");
    future.properties.push((
        EXPIRES_AT.into(),
        Bytes::copy_from_slice(&(now + 3_600_000).to_be_bytes()),
    ));
    for m in [past, future] {
        b.publish(mqgate_core::Publish::new(m)).await.unwrap();
    }
    let mut c2 = b.subscribe(s2, MemberOptions::new("c", 10)).await.unwrap();
    let d = recv(&mut c2).await;
    assert_eq!(body(&d), "in time", "the expired one is not delivered");
    c2.ack(d.ack_token());
    nothing(&mut c2).await;
    let dead = wait_messages(b, "dead-target", 2).await;
    assert_eq!(dead.len(), 2);
    assert_eq!(text(&dead[1]), "too late");
    assert_eq!(death(&dead[1]), Some("expired"));
    assert_eq!(prop(&dead[1], "death-queue"), Some("work2"));
}

// ---------------------------------------------------------------------------------------
// 4. Delivery limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_limit_dead_letters_after_limit_plus_one_deliveries() {
    let env = Env::memory().await;
    let b = &env.broker;
    declare_dlx(b).await;
    b.create_topic(&topic("work"), Some(1)).await.unwrap();
    let mut s = spec("g", "work", OnFailure::Discard);
    s.policy.delivery_limit = Some(2);
    s.policy.dead_letter = Some(dead_letter("dlx", Some("dead"), "work"));
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    publish(b, "work", "bouncy").await;
    for n in 1..=3 {
        let d = recv(&mut c).await;
        assert_eq!(body(&d), "bouncy");
        assert_eq!(d.delivery_count, n);
        assert_eq!(d.redelivered, n > 1);
        c.nack(d.ack_token(), true);
    }
    let dead = wait_messages(b, "dead-target", 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(text(&dead[0]), "bouncy");
    assert_eq!(death(&dead[0]), Some("delivery_limit"));
    assert_eq!(env.committed("g", "work").await, Some(1));
    nothing(&mut c).await;

    // The limit counts deliveries of one message, not of the queue.
    publish(b, "work", "next").await;
    let d = recv(&mut c).await;
    assert_eq!((body(&d).as_str(), d.delivery_count), ("next", 1));
    c.ack(d.ack_token());
}

// ---------------------------------------------------------------------------------------
// 5. The retry ladder ends in the dead-letter target, or in the DLQ without one.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_ladder_ends_in_the_dead_letter_target_or_the_dlq() {
    let env = Env::memory().await;
    let b = &env.broker;
    declare_dlx(b).await;

    // With a target.
    b.create_topic(&topic("work"), Some(1)).await.unwrap();
    let mut s = spec("g", "work", OnFailure::Retry);
    s.max_reconsume_times = Some(1);
    s.policy.dead_letter = Some(dead_letter("dlx", Some("dead"), "work"));
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    publish(b, "work", "flaky").await;
    let d1 = recv(&mut c).await;
    assert_eq!(d1.message.message.reconsume_times, 0);
    c.nack(d1.ack_token(), false);
    // The retry timer and the commit past the original: one batch.
    wait_pending(b, 1).await;
    assert_eq!(env.committed("g", "work").await, Some(1));
    let d2 = recv_advancing(&mut c, &env.clock).await;
    assert_eq!(body(&d2), "flaky");
    assert_eq!(d2.queue.topic, retry_topic(&group("g")).unwrap());
    assert_eq!(d2.message.message.reconsume_times, 1);
    c.nack(d2.ack_token(), false);
    let dead = wait_messages(b, "dead-target", 1).await;
    assert_eq!(text(&dead[0]), "flaky");
    assert_eq!(death(&dead[0]), Some("rejected"));
    assert!(
        b.dlq(&group("g"), 0, 10).await.unwrap().is_empty(),
        "dead-lettered, not in %DLQ%g"
    );
    assert_eq!(b.retries(), 1);
    // No further retry.
    env.clock.advance(Duration::from_secs(10));
    nothing(&mut c).await;
    assert_eq!(b.delayed_pending(), 0);

    // Without a target: %DLQ%<group>.
    b.create_topic(&topic("work2"), Some(1)).await.unwrap();
    let mut s = spec("h", "work2", OnFailure::Retry);
    s.max_reconsume_times = Some(1);
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    publish(b, "work2", "flaky too").await;
    let d1 = recv(&mut c).await;
    c.nack(d1.ack_token(), false);
    wait_pending(b, 1).await;
    let d2 = recv_advancing(&mut c, &env.clock).await;
    assert_eq!(body(&d2), "flaky too");
    assert_eq!(d2.message.message.reconsume_times, 1);
    c.nack(d2.ack_token(), false);
    wait_messages(b, dlq_topic(&group("h")).unwrap().as_str(), 1).await;
    let dlq = b.dlq(&group("h"), 0, 10).await.unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(text(&dlq[0].message), "flaky too");
    assert_eq!(prop(&dlq[0].message, PROP_DLQ_FAILURES), Some("2"));
    assert_eq!(
        messages_in(b, "dead-target").await.len(),
        1,
        "the other group's target is untouched"
    );
    env.clock.advance(Duration::from_secs(10));
    nothing(&mut c).await;
}

// ---------------------------------------------------------------------------------------
// 6. Expiry sweeps of an endpoint nobody consumes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_sweep_settles_an_unconsumed_endpoint() {
    let env = Env::memory().await;
    let b = &env.broker;
    let s = ttl_endpoint(b).await;
    publish(b, "work", "old").await;

    // Not expired yet: the sweep leaves it.
    b.expire_endpoints().await;
    assert!(messages_in(b, "dead-target").await.is_empty());
    assert_eq!(env.committed("q", "work").await, Some(0));

    // Store timestamps are wall clock: `young` is stored 400 ms (real) after `old`, so
    // that with the clock 1.2 s on `old` is past its TTL and `young` is not.
    tokio::time::sleep(Duration::from_millis(400)).await;
    publish(b, "work", "young").await;
    env.clock.advance(Duration::from_millis(1_200));
    b.expire_endpoints().await;
    let dead = messages_in(b, "dead-target").await;
    assert_eq!(dead.len(), 1, "settled when the sweep returns");
    assert_eq!(text(&dead[0]), "old");
    assert_eq!(death(&dead[0]), Some("expired"));
    assert_eq!(prop(&dead[0], "death-queue"), Some("work"));
    // Committed past the expired head, not past the live message behind it.
    assert_eq!(env.committed("q", "work").await, Some(1));

    // A later consumer gets what had not expired.
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    let d = recv(&mut c).await;
    assert_eq!(body(&d), "young");
    c.ack(d.ack_token());
    nothing(&mut c).await;
    assert_eq!(messages_in(b, "dead-target").await.len(), 1);
}

/// Messages still owed at a clean stop (delivered, unacknowledged, below one that was
/// acknowledged: the delivered mark's held list) expire like any other once past their
/// TTL: the next life neither delivers them (`consumed`: a consumer joins) nor leaves
/// them counted once the sweep has run (no consumer), and dead-letters each once.
async fn held_past_ttl_after_a_clean_restart(consumed: bool, rocks: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    // The same store in each life: the memory store itself, or RocksDB opened again
    // once the last life has let it go.
    let open = || async {
        if !rocks {
            return Arc::clone(&mem) as Arc<dyn Store>;
        }
        for _ in 0..200 {
            if let Ok(s) = RocksStore::open(RocksConfig::new(dir.path().join("data"))) {
                return Arc::new(s) as Arc<dyn Store>;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the store did not open again");
    };
    let env = Env::start(open().await).await;
    let b = &env.broker;
    let s = ttl_endpoint(b).await;
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("c", 10))
        .await
        .unwrap();
    for i in 0..5 {
        publish(b, "work", &format!("m{i}")).await;
    }
    for i in 0..5 {
        let d = recv(&mut c).await;
        assert_eq!(body(&d), format!("m{i}"));
        if i % 2 == 1 {
            c.ack(d.ack_token());
        }
    }
    common::settled_to(b, &group("q"), 3).await;
    b.shutdown().await;
    drop(c);
    drop(env.broker);
    drop(env.store);

    let b = Broker::start(open().await, config(), Arc::new(env.clock.clone()))
        .await
        .unwrap();
    b.register_endpoint(s.clone());
    assert_eq!(owed(&b, "q").await, 3, "m0, m2 and m4 owed after the stop");
    env.clock.advance(Duration::from_millis(1_500));
    if consumed {
        let mut c = b
            .subscribe(s.clone(), MemberOptions::new("c", 10))
            .await
            .unwrap();
        nothing(&mut c).await;
        drop(c);
    } else {
        b.expire_endpoints().await;
    }
    let dead = wait_messages(&b, "dead-target", 3).await;
    let mut texts: Vec<String> = dead.iter().map(|m| text(m)).collect();
    texts.sort();
    assert_eq!(texts, ["m0", "m2", "m4"]);
    assert!(dead.iter().all(|m| death(m) == Some("expired")));
    assert_eq!(owed(&b, "q").await, 0, "nothing owed once they expired");
    b.shutdown().await;
    drop(b);

    // And they stay settled: the next life owes nothing and dead-letters nothing more.
    let b = Broker::start(open().await, config(), Arc::new(env.clock.clone()))
        .await
        .unwrap();
    b.register_endpoint(s);
    assert_eq!(
        owed(&b, "q").await,
        0,
        "nothing owed after the next restart"
    );
    b.expire_endpoints().await;
    assert_eq!(messages_in(&b, "dead-target").await.len(), 3);
    b.shutdown().await;
}

/// What the group counts as owed (ready and in flight, all queues).
async fn owed(b: &Broker, g: &str) -> u64 {
    let info = b.group_info(&group(g)).await.unwrap();
    info.queues
        .iter()
        .map(|q| q.ready + q.in_flight as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_past_their_ttl_are_not_delivered_after_a_clean_restart() {
    held_past_ttl_after_a_clean_restart(true, false).await;
    held_past_ttl_after_a_clean_restart(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_past_their_ttl_are_swept_after_a_clean_restart() {
    held_past_ttl_after_a_clean_restart(false, false).await;
    held_past_ttl_after_a_clean_restart(false, true).await;
}

/// The core sweeps on its own every `expiry_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_task_sweeps_by_itself() {
    let env = Env::with(
        Arc::new(MemoryStore::new()),
        CoreConfig {
            expiry_interval: Duration::from_millis(20),
            ..config()
        },
    )
    .await;
    let b = &env.broker;
    ttl_endpoint(b).await;
    publish(b, "work", "old").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(messages_in(b, "dead-target").await.is_empty());
    env.clock.advance(Duration::from_millis(1_500));
    let dead = wait_messages(b, "dead-target", 1).await;
    assert_eq!(death(&dead[0]), Some("expired"));
    assert_eq!(env.committed("q", "work").await, Some(1));

    // A forgotten endpoint is no longer swept.
    b.forget_endpoint(&group("q"));
    publish(b, "work", "old too").await;
    env.clock.advance(Duration::from_millis(1_500));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(messages_in(b, "dead-target").await.len(), 1);
}

// ---------------------------------------------------------------------------------------
// 7. Named timers.

/// `wills` routes `k` to the one-queue topic `will-target`.
async fn declare_wills(b: &Broker) {
    declare_route(b, "wills", "k", "will-target").await;
}

async fn bodies(b: &Broker, t: &str) -> Vec<String> {
    messages_in(b, t).await.iter().map(|m| text(m)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_named_timer_never_fires() {
    let env = Env::memory().await;
    let b = &env.broker;
    declare_wills(b).await;
    let due = env.clock.now() + 1_000;
    b.schedule_named(
        "c1",
        VHOST,
        "wills",
        "k",
        msg("wills", "cancelled"),
        None,
        due,
    )
    .await
    .unwrap();
    b.schedule_named("c2", VHOST, "wills", "k", msg("wills", "kept"), None, due)
        .await
        .unwrap();
    assert_eq!(b.delayed_pending(), 2);
    assert!(b.cancel_scheduled("c1").await.unwrap());
    assert!(
        !b.cancel_scheduled("c1").await.unwrap(),
        "already withdrawn"
    );
    assert!(!b.cancel_scheduled("never").await.unwrap());

    env.clock.advance(Duration::from_millis(2_000));
    // Both timers leave the index; only the live one publishes.
    wait_pending(b, 0).await;
    assert_eq!(bodies(b, "will-target").await, ["kept"]);
    assert_eq!(b.delayed_released(), 1);
    assert!(
        !b.cancel_scheduled("c2").await.unwrap(),
        "fired: nothing pending"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bodies(b, "will-target").await, ["kept"]);
}

/// `fire_scheduled` releases a named timer now, not at its due time, and only that one
/// among timers due at the same instant; its message's expiry stamp moves earlier by
/// as much; a name already released, cancelled or never scheduled fires nothing. On
/// both stores: the timer is found through the store's timer index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fired_named_timer_releases_now() {
    let dir = tempfile::tempdir().unwrap();
    let rocks: Arc<dyn Store> = Arc::new(
        mqgate_store::RocksStore::open(mqgate_store::RocksConfig::new(dir.path().join("d")))
            .unwrap(),
    );
    for store in [Arc::new(MemoryStore::new()) as Arc<dyn Store>, rocks] {
        let env = Env::start(store).await;
        let b = &env.broker;
        declare_wills(b).await;
        let now = env.clock.now();
        let due = now + 60_000;
        for name in ["f1", "f2", "f3"] {
            let mut m = msg("wills", name);
            if name == "f2" {
                m.properties.push((
                    EXPIRES_AT.into(),
                    Bytes::copy_from_slice(&(due + 10_000).to_be_bytes()),
                ));
            }
            b.schedule_named(name, VHOST, "wills", "k", m, None, due)
                .await
                .unwrap();
        }
        b.schedule_named("c", VHOST, "wills", "k", msg("wills", "c"), None, due)
            .await
            .unwrap();
        assert!(b.cancel_scheduled("c").await.unwrap());
        assert!(b.fire_scheduled("f2").await.unwrap());
        let got = wait_messages(b, "will-target", 1).await;
        assert_eq!(got.iter().map(|m| text(m)).collect::<Vec<_>>(), ["f2"]);
        let expires = got[0]
            .message
            .properties
            .iter()
            .find(|(k, _)| k.as_ref() == EXPIRES_AT)
            .map(|(_, v)| u64::from_be_bytes(<[u8; 8]>::try_from(v.as_ref()).unwrap()));
        assert_eq!(
            expires,
            Some(now + 10_000),
            "its time to live counts from now"
        );
        assert!(!b.fire_scheduled("f2").await.unwrap(), "released already");
        assert!(!b.fire_scheduled("c").await.unwrap(), "cancelled");
        assert!(!b.fire_scheduled("never").await.unwrap());
        wait_pending(b, 3).await; // f1, f3 and the cancelled c (released into nothing)
        env.clock.advance(Duration::from_millis(61_000));
        wait_pending(b, 0).await;
        let mut all = bodies(b, "will-target").await;
        all.sort();
        assert_eq!(all, ["f1", "f2", "f3"], "the others at their time, f2 once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescheduling_a_name_replaces_the_earlier_timer() {
    let env = Env::memory().await;
    let b = &env.broker;
    declare_wills(b).await;
    let now = env.clock.now();
    b.schedule_named(
        "n",
        VHOST,
        "wills",
        "k",
        msg("wills", "first"),
        None,
        now + 500,
    )
    .await
    .unwrap();
    b.schedule_named(
        "n",
        VHOST,
        "wills",
        "k",
        msg("wills", "second"),
        None,
        now + 1_500,
    )
    .await
    .unwrap();
    assert_eq!(b.delayed_pending(), 2);

    // The first one's time comes: it releases into nothing.
    env.clock.advance(Duration::from_millis(1_000));
    wait_pending(b, 1).await;
    assert!(bodies(b, "will-target").await.is_empty());

    env.clock.advance(Duration::from_millis(1_000));
    let m = wait_messages(b, "will-target", 1).await;
    wait_pending(b, 0).await;
    assert_eq!(text(&m[0]), "second");
    assert_eq!(m[0].message.deliver_at, Some(now + 1_500));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bodies(b, "will-target").await, ["second"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_timer_survives_a_restart() {
    let mem = Arc::new(MemoryStore::new());
    let env = Env::start(mem.clone()).await;
    let b = &env.broker;
    declare_wills(b).await;
    let due = env.clock.now() + 1_000;
    b.schedule_named(
        "r",
        VHOST,
        "wills",
        "k",
        msg("wills", "after restart"),
        None,
        due,
    )
    .await
    .unwrap();
    b.schedule_named(
        "x",
        VHOST,
        "wills",
        "k",
        msg("wills", "cancelled later"),
        None,
        due,
    )
    .await
    .unwrap();
    b.shutdown().await;
    drop(env.broker);

    let b = Broker::start(mem.clone(), config(), Arc::new(env.clock.clone()))
        .await
        .unwrap();
    assert_eq!(b.delayed_pending(), 2);
    assert!(
        b.cancel_scheduled("x").await.unwrap(),
        "the name survived too"
    );
    env.clock.advance(Duration::from_millis(2_000));
    let m = wait_messages(&b, "will-target", 1).await;
    assert_eq!(text(&m[0]), "after restart");
    assert_eq!(m[0].message.deliver_at, Some(due));
    wait_pending(&b, 0).await;
    assert_eq!(bodies(&b, "will-target").await, ["after restart"]);
    b.shutdown().await;
}

/// A schedule that replaces a name while that name's earlier timer is being released
/// must still fire. The gate holds the scheduler between reading the name's current
/// generation and writing the release (which deletes the name); a `schedule_named` of
/// the same name lands in between.
///
/// The release deletes the name it fired; the core serialises releases of named timers
/// with `schedule_named` / `cancel_named` (the new schedule waits for the release's write),
/// so the replacing generation is written after the delete, never deleted by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reschedule_racing_the_release_of_the_old_timer_still_fires() {
    let store = Arc::new(FailingStore::default());
    let env = Env::start(store.clone()).await;
    let b = &env.broker;
    declare_wills(b).await;
    let now = env.clock.now();
    b.schedule_named(
        "n",
        VHOST,
        "wills",
        "k",
        msg("wills", "first"),
        None,
        now + 100,
    )
    .await
    .unwrap();
    let (entered, release) = store.arm_gate(NS_SCHEDULED);
    env.clock.advance(Duration::from_millis(200));
    tokio::time::timeout(Duration::from_secs(5), entered.notified())
        .await
        .expect("the scheduler reads the name");
    let b2 = b.clone();
    let second = tokio::spawn(async move {
        b2.schedule_named(
            "n",
            VHOST,
            "wills",
            "k",
            msg("wills", "second"),
            None,
            now + 1_000,
        )
        .await
    });
    // The schedule waits for the release in progress (it cannot slip in between).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!second.is_finished(), "the schedule waits for the release");
    release.notify_one();
    second.await.unwrap().unwrap();
    wait_pending(b, 1).await;
    env.clock.advance(Duration::from_millis(2_000));
    wait_pending(b, 0).await;
    let got = bodies(b, "will-target").await;
    assert!(
        got.iter().any(|m| m == "second"),
        "the replacing schedule was lost: {got:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 8. publish_batch.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_batch_writes_messages_timers_and_records_at_once() {
    let store = Arc::new(FailingStore::default());
    let env = Env::start(store.clone()).await;
    let b = &env.broker;
    b.create_topic(&topic("pb"), Some(1)).await.unwrap();
    b.create_topic(&topic("pb2"), Some(1)).await.unwrap();
    b.declare_exchange(VHOST, ExchangeDef::new("nowhere", ExchangeKind::Direct))
        .await
        .unwrap();
    let to_pb = || Destination::Topic {
        topic: topic("pb"),
        queue: None,
        sharding_key: None,
    };
    let batch = || {
        let mut batch = PublishBatch::new();
        batch
            .push(Outgoing {
                message: msg("pb", "now"),
                to: to_pb(),
                delay: None,
                retain: None,
            })
            .push(Outgoing {
                message: msg("pb", "later"),
                to: to_pb(),
                delay: Some(Delay::For(Duration::from_millis(1_000))),
                retain: None,
            })
            .push(Outgoing::routed(msg("pb", "to no topic"), Vec::new()))
            .push(Outgoing {
                message: msg("nowhere", "routed nowhere"),
                to: Destination::Exchange {
                    vhost: VHOST.into(),
                    exchange: "nowhere".into(),
                    key: "k".into(),
                    headers: Vec::new(),
                },
                delay: None,
                retain: None,
            })
            .push(Outgoing::routed(
                msg("pb", "twice"),
                vec![topic("pb"), topic("pb2")],
            ));
        batch.records.put("test.ns", "key", "value");
        batch
    };

    // A failed write stores nothing of it: no message, no timer, no record.
    let stats0 = b.store_stats();
    store.set_failing(true);
    assert!(b.publish_batch(batch()).await.is_err());
    store.set_failing(false);
    assert_eq!(b.store_stats(), stats0);
    assert_eq!(b.record("test.ns", b"key").await.unwrap(), None);

    let writes0 = store.writes();
    let now = env.clock.now();
    let answers = b.publish_batch(batch()).await.unwrap();
    assert_eq!(store.writes() - writes0, 1, "one store write");
    let stats = b.store_stats();
    assert_eq!(stats.messages, stats0.messages + 2);
    assert_eq!(stats.timers, stats0.timers + 1);
    assert_eq!(
        b.record("test.ns", b"key").await.unwrap().as_deref(),
        Some(&b"value"[..])
    );

    assert_eq!(answers.len(), 5);
    match &answers[0] {
        Some(Published::Stored { offsets, .. }) => {
            assert_eq!(offsets, &[(QueueRef::new(topic("pb"), 0), QueueOffset(0))]);
        }
        other => panic!("item 0: {other:?}"),
    }
    match &answers[1] {
        Some(Published::Delayed { timer }) => assert_eq!(timer.due, now + 1_000),
        other => panic!("item 1: {other:?}"),
    }
    assert_eq!(answers[2], None, "no topics");
    assert_eq!(answers[3], None, "routed nowhere");
    let (id0, id4) = match (&answers[0], &answers[4]) {
        (Some(Published::Stored { id: a, .. }), Some(Published::Stored { id: b, offsets, .. })) => {
            assert_eq!(
                offsets,
                &[
                    (QueueRef::new(topic("pb"), 0), QueueOffset(1)),
                    (QueueRef::new(topic("pb2"), 0), QueueOffset(0)),
                ]
            );
            (*a, *b)
        }
        other => panic!("items 0 and 4: {other:?}"),
    };
    assert!(id0 < id4, "appended in order");
    assert_eq!(bodies(b, "pb").await, ["now", "twice"]);
    assert_eq!(bodies(b, "pb2").await, ["twice"]);

    // The delayed item is released when due.
    env.clock.advance(Duration::from_millis(1_500));
    wait_messages(b, "pb", 3).await;
    assert_eq!(bodies(b, "pb").await, ["now", "twice", "later"]);
    wait_pending(b, 0).await;

    // Records alone, and a batch of nothing at all (no write).
    let mut r = Records::new();
    r.delete("test.ns", "key");
    let mut only = PublishBatch::new();
    only.records = r;
    assert!(b.publish_batch(only).await.unwrap().is_empty());
    assert_eq!(b.record("test.ns", b"key").await.unwrap(), None);
    let writes1 = store.writes();
    let mut empty = PublishBatch::new();
    empty.push(Outgoing::routed(msg("pb", "x"), Vec::new()));
    assert_eq!(b.publish_batch(empty).await.unwrap(), vec![None]);
    assert_eq!(store.writes(), writes1, "nothing to write");

    // An unknown exchange fails the whole batch before anything is written.
    let mut bad = PublishBatch::new();
    bad.push(Outgoing::routed(msg("pb", "y"), vec![topic("pb")]))
        .push(Outgoing {
            message: msg("missing", "z"),
            to: Destination::Exchange {
                vhost: VHOST.into(),
                exchange: "missing".into(),
                key: String::new(),
                headers: Vec::new(),
            },
            delay: None,
            retain: None,
        });
    assert!(b.publish_batch(bad).await.is_err());
    assert_eq!(bodies(b, "pb").await, ["now", "twice", "later"]);
}

// ---------------------------------------------------------------------------------------
// 9. Idle expiry (AMQP x-expires, MQTT session expiry).

/// An endpoint unused for its `idle_expiry` is deleted by the core (topic, group offsets,
/// records) and announced with its records; one in use, or touched, is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_endpoints_expire_with_their_records() {
    let env = Env::memory().await;
    let b = &env.broker;
    let mut events = b.endpoint_events();
    let mut records = Records::new();
    records.put(
        "test.ep",
        Bytes::from_static(b"q"),
        Bytes::from_static(b"decl"),
    );
    b.declare_endpoint(&topic("idle"), 1, &group("q"), records)
        .await
        .unwrap();
    let ep = mqgate_core::Endpoint {
        spec: spec("q", "idle", OnFailure::Discard),
        vhost: VHOST.to_owned(),
        records: vec![("test.ep".to_owned(), Bytes::from_static(b"q"))],
        idle_expiry: Some(1_000),
        owner: None,
    };
    b.register_endpoint(ep);
    publish(b, "idle", "m").await;

    // In use: never expires, however long.
    b.endpoint_in_use(&group("q"), true);
    env.clock.advance(Duration::from_millis(5_000));
    b.expire_endpoints().await;
    assert!(b.topic(&topic("idle")).is_some());
    // Unused from now: 999 ms later it is kept; a touch restarts the count.
    b.endpoint_in_use(&group("q"), false);
    env.clock.advance(Duration::from_millis(999));
    b.expire_endpoints().await;
    assert!(b.topic(&topic("idle")).is_some());
    b.touch_endpoint(&group("q"));
    env.clock.advance(Duration::from_millis(999));
    b.expire_endpoints().await;
    assert!(b.topic(&topic("idle")).is_some());
    env.clock.advance(Duration::from_millis(2));
    b.expire_endpoints().await;

    assert!(b.topic(&topic("idle")).is_none(), "its topic is deleted");
    assert!(
        b.record("test.ep", b"q").await.unwrap().is_none(),
        "its record is deleted"
    );
    assert_eq!(
        env.committed("q", "idle").await,
        None,
        "its offsets are deleted"
    );
    match tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
        Ok(Ok(mqgate_core::EndpointEvent::Expired { group: g, records })) => {
            assert_eq!(g, group("q"));
            assert_eq!(
                records,
                vec![(
                    "test.ep".to_owned(),
                    Bytes::from_static(b"q"),
                    Some(Bytes::from_static(b"decl"))
                )]
            );
        }
        other => panic!("no expiry event: {other:?}"),
    }
    // Gone from the registry: a second sweep does nothing more.
    b.expire_endpoints().await;
    assert!(events.try_recv().is_err());
}

/// A registration with an earlier `idle_since` (an MQTT session that disconnected before
/// a restart) expires counting from then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_time_counts_from_the_time_given_at_registration() {
    let env = Env::memory().await;
    let b = &env.broker;
    b.declare_endpoint(&topic("s"), 1, &group("s"), Records::new())
        .await
        .unwrap();
    let mut ep = mqgate_core::Endpoint::new(spec("s", "s", OnFailure::Discard));
    ep.idle_expiry = Some(10_000);
    b.register_endpoint_since(ep, Some(env.clock.now() - 9_500));
    b.expire_endpoints().await;
    assert!(b.topic(&topic("s")).is_some());
    env.clock.advance(Duration::from_millis(600));
    b.expire_endpoints().await;
    assert!(b.topic(&topic("s")).is_none());
}

// ---------------------------------------------------------------------------------------
// 10. Found in review: length limits count ready messages only, the answer of a partial
// refusal, expiry against concurrent uses, retained settings of failed writes.

fn limited(g: &str, t: &str) -> GroupSpec {
    spec(g, t, OnFailure::Discard)
}

async fn ready(b: &Broker, g: &str) -> u64 {
    b.group_info(&group(g))
        .await
        .unwrap()
        .queues
        .iter()
        .map(|q| q.ready)
        .sum()
}

/// drop-head keeps `max_length` ready messages: with older messages back in the ready
/// set (a member left) and newer ones in flight, it drops only the oldest one, as
/// RabbitMQ does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_head_drops_only_what_is_over_the_limit_of_ready_messages() {
    let env = Env::memory().await;
    let b = &env.broker;
    b.declare_endpoint(&topic("lim"), 1, &group("q"), Records::new())
        .await
        .unwrap();
    let mut s = limited("q", "lim");
    s.policy.max_length = Some(5);
    s.policy.overflow = Overflow::DropHead;
    b.register_endpoint(s.clone());
    let mut a = b
        .subscribe(s.clone(), MemberOptions::new("a", 5))
        .await
        .unwrap();
    for i in 0..5 {
        publish(b, "lim", &format!("m{i}")).await;
    }
    for _ in 0..5 {
        recv(&mut a).await;
    }
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("b", 5))
        .await
        .unwrap();
    for i in 5..10 {
        publish(b, "lim", &format!("m{i}")).await;
    }
    for _ in 0..5 {
        recv(&mut c).await;
    }
    drop(a); // m0..m4 back to ready (redeliver); b holds m5..m9
    for _ in 0..100 {
        if ready(b, "q").await == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready(b, "q").await, 5, "m0..m4 ready again");
    publish(b, "lim", "m10").await; // 6 ready > 5: RabbitMQ drops one (m0)
    let r = ready(b, "q").await;
    println!("ready after one publish over the limit: {r}");
    assert_eq!(
        r, 5,
        "RabbitMQ keeps max_length ready messages (drops only m0)"
    );
}

/// x-max-length-bytes counts ready bytes only: what is in flight does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_limit_counts_ready_bytes_only() {
    let env = Env::memory().await;
    let b = &env.broker;
    b.declare_endpoint(&topic("lim"), 1, &group("q"), Records::new())
        .await
        .unwrap();
    let mut s = limited("q", "lim");
    s.policy.max_length_bytes = Some(10);
    s.policy.overflow = Overflow::RejectPublish;
    b.register_endpoint(s.clone());
    let mut a = b
        .subscribe(s.clone(), MemberOptions::new("a", 1))
        .await
        .unwrap();
    publish(b, "lim", "aaaaaaaa").await;
    let _d = recv(&mut a).await; // in flight, not acked
    assert_eq!(ready(b, "q").await, 0);
    let p = b
        .publish(mqgate_core::Publish::new(msg("lim", "bbbbb")))
        .await
        .unwrap();
    assert!(!p.refused(), "only ready bytes count (RabbitMQ); 5 <= 10");
}

/// reject-publish-dlx with another destination: the answer describes the message where
/// it was stored, not its dead-letter copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_publish_dlx_answer_describes_the_message_not_its_copy() {
    let env = Env::memory().await;
    let b = &env.broker;
    declare_dlx(b).await;
    b.create_topic(&topic("other"), Some(1)).await.unwrap();
    b.declare_endpoint(&topic("lim"), 1, &group("q"), Records::new())
        .await
        .unwrap();
    let mut s = limited("q", "lim");
    s.policy.max_length = Some(1);
    s.policy.overflow = Overflow::RejectPublishDlx;
    s.policy.dead_letter = Some(dead_letter("dlx", None, "lim"));
    b.register_endpoint(s.clone());
    let mut batch = PublishBatch::new();
    batch.push(Outgoing::routed(msg("lim", "first"), vec![topic("lim")]));
    b.publish_batch(batch).await.unwrap();
    let mut batch = PublishBatch::new();
    batch.push(Outgoing::routed(
        msg("lim", "second"),
        vec![topic("lim"), topic("other")],
    ));
    let ans = b.publish_batch(batch).await.unwrap();
    match &ans[0] {
        Some(Published::Stored {
            offsets, refused, ..
        }) => {
            assert_eq!(refused, &vec![topic("lim")]);
            assert_eq!(
                offsets[0].0.topic,
                topic("other"),
                "the message went to `other`"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// A use that arrives while the sweep is deleting an endpoint is refused (the caller
/// treats the endpoint as gone), and a claim waits until the deletion is over: nobody
/// gets an endpoint that is deleted under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_during_an_expiry_are_refused_and_claims_wait() {
    let store = Arc::new(FailingStore::default());
    let env = Env::start(store.clone()).await;
    let b = env.broker.clone();
    let mut records = Records::new();
    records.put(
        "test.ep",
        Bytes::from_static(b"q"),
        Bytes::from_static(b"decl"),
    );
    b.declare_endpoint(&topic("idle"), 1, &group("q"), records)
        .await
        .unwrap();
    let s = spec("q", "idle", OnFailure::Discard);
    b.register_endpoint(mqgate_core::Endpoint {
        spec: s.clone(),
        vhost: VHOST.to_owned(),
        records: vec![("test.ep".to_owned(), Bytes::from_static(b"q"))],
        idle_expiry: Some(1_000),
        owner: None,
    });
    env.clock.advance(Duration::from_millis(2_000));
    let (entered, release) = store.arm_gate("test.ep");
    let b2 = b.clone();
    let sweep = tokio::spawn(async move { b2.expire_endpoints().await });
    entered.notified().await;
    // A consumer (AMQP basic.consume) or a redeclare arrives now: refused.
    assert!(
        !b.endpoint_in_use(&group("q"), true),
        "a new use is refused"
    );
    assert!(!b.touch_endpoint(&group("q")), "a touch is refused");
    // A reconnecting MQTT client claims its session: it waits for the deletion.
    let b3 = b.clone();
    let claim = tokio::spawn(async move { b3.claim_endpoint(&group("q")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !claim.is_finished(),
        "the claim waits while the endpoint is being deleted"
    );
    release.notify_one();
    sweep.await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), claim)
        .await
        .expect("the claim ends once the deletion is over")
        .unwrap();
    assert!(b.topic(&topic("idle")).is_none(), "then it is gone, whole");
    assert!(b.record("test.ep", b"q").await.unwrap().is_none());
    // Not managed any more: a use now is not refused (the adapter declares anew).
    assert!(b.endpoint_in_use(&group("q"), true));
}

/// A retained setting whose write fails is undone in memory (index and cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_setting_whose_write_fails_is_undone() {
    let store = Arc::new(FailingStore::default());
    let env = Env::start(store.clone()).await;
    let b = &env.broker;
    store.set_failing(true);
    let mut batch = PublishBatch::new();
    batch.push(Outgoing {
        retain: Some("a/b".into()),
        ..Outgoing::routed(msg("x", "retained body"), vec![])
    });
    assert!(b.publish_batch(batch).await.is_err());
    store.set_failing(false);
    let now = b.now();
    let m = b.retained().matching("a/b", now);
    assert!(m.is_empty(), "the write failed: not retained");
}
