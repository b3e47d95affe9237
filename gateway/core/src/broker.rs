//! The broker: topics, publishing (direct to a topic or through an exchange), the delay
//! scheduler, retention, and the registry of consumer groups.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use mqgate_store::{
    GroupName, Message, MessageId, Millis, QueueId, QueueOffset, QueueRef, Store, TimerKey,
    TopicConfig, TopicName, WriteBatch,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::CoreConfig;
use crate::error::{CoreError, Result};
use crate::group::{
    self, Consumer, GroupHandle, GroupInfo, GroupSpec, MemberOptions, StartPosition,
};
use crate::publish::{Destination, Outgoing, PublishBatch};
use crate::router::{Binding, ExchangeDef, HeaderValue, Router, DEFAULT_VHOST};
use crate::wire::{get_headers, put_headers, put_str, Reader};

/// When a delayed message becomes visible.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Delay {
    /// One of the configured levels (1-based; RocketMQ: 1s 5s 10s 30s 1m ... 2h).
    Level(u8),
    /// After this long.
    For(Duration),
    /// At this wall-clock time (ms).
    At(Millis),
}

/// A publish straight to a topic (RocketMQ's producer API).
#[derive(Clone, Debug)]
pub struct Publish {
    /// The message; `message.topic` is the topic published to.
    pub message: Message,
    /// Messages with the same key go to the same queue, in order.
    pub sharding_key: Option<String>,
    /// Or an explicit queue.
    pub queue: Option<QueueId>,
    /// Deliver later.
    pub delay: Option<Delay>,
}

impl Publish {
    /// Publish `message` to its topic, round robin over the topic's queues.
    pub fn new(message: Message) -> Self {
        Self {
            message,
            sharding_key: None,
            queue: None,
            delay: None,
        }
    }
}

/// What happened to a publish.
#[derive(Clone, Debug, PartialEq)]
pub enum Published {
    /// Stored and indexed into these queues.
    Stored {
        /// The message id.
        id: MessageId,
        /// Where it went.
        offsets: Vec<(QueueRef, QueueOffset)>,
        /// Destinations that refused it: full endpoints with `reject-publish`.
        refused: Vec<TopicName>,
    },
    /// Stored as a timer; it will be released at `due`.
    Delayed {
        /// The timer.
        timer: TimerKey,
    },
    /// Not stored: every destination was a full endpoint with `reject-publish`.
    Refused {
        /// The destinations that refused it.
        by: Vec<TopicName>,
    },
}

impl Published {
    /// How many queues indexed it (0 when delayed or refused).
    pub fn routed(&self) -> usize {
        match self {
            Published::Stored { offsets, .. } => offsets.len(),
            Published::Delayed { .. } | Published::Refused { .. } => 0,
        }
    }

    /// Whether some destination refused it (a full endpoint with `reject-publish`): the
    /// publisher is told (AMQP: basic.nack).
    pub fn refused(&self) -> bool {
        match self {
            Published::Stored { refused, .. } => !refused.is_empty(),
            Published::Refused { .. } => true,
            Published::Delayed { .. } => false,
        }
    }
}

/// A route resolved when a delayed message is released (so bindings made during the
/// delay count, as with RabbitMQ's delayed exchange and EMQX's `$delayed`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Route {
    Topic {
        topic: TopicName,
        queue: Option<u32>,
        sharding_key: Option<String>,
    },
    Exchange {
        vhost: String,
        exchange: String,
        key: String,
        headers: Vec<(String, HeaderValue)>,
    },
}

/// Keyed-area namespace of named timers: name -> the generation of its current timer.
const NS_SCHEDULED: &str = "core.scheduled";

const ROUTE_TOPIC: u8 = 1;
const ROUTE_EXCHANGE: u8 = 2;

pub(crate) fn encode_timer(route: &Route, message: &Message) -> Result<Vec<u8>> {
    encode_named_timer(None, None, route, message)
}

/// A timer's payload: version 1 `[1][route][message]`; version 2, for a named
/// (cancellable) timer or one that sets a retained message when released,
/// `[2][name][generation u64][retain topic][route][message]` ("" for none).
pub(crate) fn encode_named_timer(
    name: Option<(&str, u64)>,
    retain: Option<&str>,
    route: &Route,
    message: &Message,
) -> Result<Vec<u8>> {
    let body = message.encode()?;
    let mut out = Vec::with_capacity(body.len() + 64);
    if name.is_none() && retain.is_none() {
        out.put_u8(1);
    } else {
        let (n, generation) = name.unwrap_or(("", 0));
        out.put_u8(2);
        put_str(&mut out, n);
        out.put_u64_le(generation);
        put_str(&mut out, retain.unwrap_or(""));
    }
    match route {
        Route::Topic {
            topic,
            queue,
            sharding_key,
        } => {
            out.put_u8(ROUTE_TOPIC);
            put_str(&mut out, topic.as_str());
            out.put_u64_le(queue.map_or(u64::MAX, u64::from));
            put_str(&mut out, sharding_key.as_deref().unwrap_or(""));
            out.put_u8(u8::from(sharding_key.is_some()));
        }
        Route::Exchange {
            vhost,
            exchange,
            key,
            headers,
        } => {
            out.put_u8(ROUTE_EXCHANGE);
            put_str(&mut out, vhost);
            put_str(&mut out, exchange);
            put_str(&mut out, key);
            put_headers(&mut out, headers);
        }
    }
    out.extend_from_slice(&body);
    Ok(out)
}

/// A decoded timer payload.
#[derive(Debug, PartialEq)]
struct DecodedTimer {
    /// Named timers: the name and generation.
    name: Option<(String, u64)>,
    /// The retained topic it sets when released.
    retain: Option<String>,
    route: Route,
    message: Message,
}

fn decode_timer(payload: Bytes) -> Result<DecodedTimer> {
    let mut r = Reader(payload);
    let (name, retain) = match r.u8()? {
        1 => (None, None),
        2 => {
            let name = r.string()?;
            let generation = r.u64()?;
            let retain = r.string()?;
            (
                (!name.is_empty()).then_some((name, generation)),
                (!retain.is_empty()).then_some(retain),
            )
        }
        _ => return Err(CoreError::Invalid("unknown timer payload version".into())),
    };
    let route = match r.u8()? {
        ROUTE_TOPIC => {
            let topic = TopicName::new(r.string()?)?;
            let q = r.u64()?;
            let key = r.string()?;
            let has_key = r.u8()? == 1;
            Route::Topic {
                topic,
                queue: u32::try_from(q).ok(),
                sharding_key: has_key.then_some(key),
            }
        }
        ROUTE_EXCHANGE => {
            let vhost = r.string()?;
            let exchange = r.string()?;
            let key = r.string()?;
            let headers = get_headers(&mut r)?;
            Route::Exchange {
                vhost,
                exchange,
                key,
                headers,
            }
        }
        k => return Err(CoreError::Invalid(format!("unknown route kind {k}"))),
    };
    Ok(DecodedTimer {
        name,
        retain,
        route,
        message: Message::decode(r.rest())?,
    })
}

/// Per-topic state the publish path needs without touching the store's topic map.
#[derive(Debug)]
pub(crate) struct TopicHandle {
    pub(crate) name: TopicName,
    queue_count: AtomicU32,
    round_robin: AtomicU64,
    /// Groups consuming this topic: woken after each append.
    watchers: RwLock<Vec<Arc<Notify>>>,
    /// Messages published per producer group.
    producers: Mutex<HashMap<String, u64>>,
}

impl TopicHandle {
    fn new(cfg: &TopicConfig) -> Self {
        Self {
            name: cfg.name.clone(),
            queue_count: AtomicU32::new(cfg.queue_count),
            round_robin: AtomicU64::new(0),
            watchers: RwLock::default(),
            producers: Mutex::default(),
        }
    }

    pub(crate) fn queue_count(&self) -> u32 {
        self.queue_count.load(Ordering::Acquire)
    }

    pub(crate) fn select(&self, queue: Option<u32>, sharding_key: Option<&str>) -> Result<u32> {
        let n = self.queue_count();
        match (queue, sharding_key) {
            (Some(q), _) if q < n => Ok(q),
            (Some(q), _) => Err(CoreError::Invalid(format!(
                "topic {} has {n} queues, no queue {q}",
                self.name
            ))),
            (None, Some(key)) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                key.hash(&mut h);
                Ok((h.finish() % u64::from(n)) as u32)
            }
            (None, None) => {
                Ok((self.round_robin.fetch_add(1, Ordering::Relaxed) % u64::from(n)) as u32)
            }
        }
    }

    pub(crate) fn watch(&self, wake: Arc<Notify>) {
        self.watchers.write().push(wake);
    }

    pub(crate) fn unwatch(&self, wake: &Arc<Notify>) {
        self.watchers.write().retain(|w| !Arc::ptr_eq(w, wake));
    }

    pub(crate) fn wake(&self) {
        for w in self.watchers.read().iter() {
            w.notify_one();
        }
    }
}

/// What a producer group has written to a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerStat {
    /// The topic.
    pub topic: TopicName,
    /// The producer group.
    pub producer_group: String,
    /// Messages published.
    pub messages: u64,
}

pub(crate) struct Inner {
    /// When this broker started (wall clock, ms): transient messages stored before it
    /// are not delivered.
    pub(crate) boot: Millis,
    /// Failed logins (every protocol and the admin API share it).
    login: crate::login::LoginThrottle,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: CoreConfig,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) router: Router,
    topics: RwLock<HashMap<TopicName, Arc<TopicHandle>>>,
    pub(crate) groups: Mutex<HashMap<GroupName, GroupHandle>>,
    /// The endpoints the core manages (policies with or without members, idle expiry).
    pub(crate) endpoints: crate::endpoints::Registry,
    /// Wakes the delay scheduler when a timer earlier than its current wait is added.
    delay_wake: Notify,
    /// The earliest due time the scheduler may have skipped past (u64::MAX: none).
    delay_rewind: AtomicU64,
    pub(crate) delayed_released: AtomicU64,
    /// Failed consumptions scheduled for retry.
    pub(crate) retries: AtomicU64,
    /// Messages moved to a DLQ.
    pub(crate) dead_lettered: AtomicU64,
    /// Generations of named timers (unique across restarts: seeded with the time in µs).
    next_generation: AtomicU64,
    /// Held by a release from reading named timers' names until its batch is written,
    /// and by schedule/cancel of a named timer: a schedule that replaces a name while
    /// the old timer is being released is never lost, and a cancel that returns `true`
    /// did stop its timer.
    named: tokio::sync::Mutex<()>,
    closed: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Whether publishers are blocked (memory above the watermark).
    pub(crate) memory: crate::memory::MemoryWatermark,
    /// Retained messages.
    pub(crate) retained: crate::retained::Retained,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The broker core. Cheap to clone; every adapter holds one.
#[derive(Clone, Debug)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
}

impl Broker {
    /// Start the core over `store`: loads topics, starts the delay scheduler and the
    /// retention task. Must be called inside a tokio runtime.
    pub async fn start(
        store: Arc<dyn Store>,
        config: CoreConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let topics = store
            .topics()
            .iter()
            .map(|cfg| (cfg.name.clone(), Arc::new(TopicHandle::new(cfg))))
            .collect();
        let router = Router::new();
        router.add_vhost(DEFAULT_VHOST);
        let memory = crate::memory::MemoryWatermark::new(config.memory_high_watermark);
        crate::durable::load(&*store, &router).await?;
        let login = crate::login::LoginThrottle::new(config.login_throttle);
        let retained = crate::retained::Retained::load(
            Arc::clone(&store),
            config.retained_cache_messages,
            config.retained_cache_bytes,
        )
        .await?;
        let inner = Arc::new(Inner {
            boot: mqgate_store::now_millis(),
            login,
            store,
            config,
            clock,
            router,
            topics: RwLock::new(topics),
            groups: Mutex::default(),
            endpoints: crate::endpoints::Registry::new(),
            delay_wake: Notify::new(),
            delay_rewind: AtomicU64::new(u64::MAX),
            delayed_released: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            next_generation: AtomicU64::new(mqgate_store::now_millis().saturating_mul(1000)),
            named: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
            tasks: Mutex::default(),
            memory,
            retained,
        });
        let scheduler = tokio::spawn(crate::delay::run(Arc::downgrade(&inner)));
        let retention = tokio::spawn(retention_task(Arc::downgrade(&inner)));
        let memory = tokio::spawn(crate::memory::run(Arc::downgrade(&inner)));
        let expiry = tokio::spawn(crate::endpoints::run(Arc::downgrade(&inner)));
        inner
            .tasks
            .lock()
            .extend([scheduler, retention, memory, expiry]);
        Ok(Self { inner })
    }

    /// The retained messages.
    pub fn retained(&self) -> &crate::retained::Retained {
        &self.inner.retained
    }

    /// The routing tables.
    pub fn router(&self) -> &Router {
        &self.inner.router
    }

    /// Failed logins, per source and user, for every protocol and the admin API.
    pub fn login_throttle(&self) -> &crate::login::LoginThrottle {
        &self.inner.login
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.inner.config
    }

    /// The clock.
    pub fn now(&self) -> Millis {
        self.inner.clock.now()
    }

    /// Create a virtual host (with the standard exchanges); it survives restarts.
    pub async fn add_vhost(&self, vhost: &str) -> Result<()> {
        self.inner.router.add_vhost(vhost);
        let mut batch = WriteBatch::new();
        crate::durable::put_vhost(&mut batch, vhost);
        self.inner.store.write(batch).await?;
        Ok(())
    }

    /// Declare an exchange (see [`Router::declare_exchange`]); a durable one survives
    /// restarts.
    pub async fn declare_exchange(&self, vhost: &str, def: ExchangeDef) -> Result<bool> {
        let created = self.inner.router.declare_exchange(vhost, def.clone())?;
        if created && def.durable {
            let mut batch = WriteBatch::new();
            crate::durable::put_exchange(&mut batch, vhost, &def);
            self.inner.store.write(batch).await?;
        }
        Ok(created)
    }

    /// Delete an exchange with its bindings and the bindings to it, stored ones included.
    pub async fn delete_exchange(&self, vhost: &str, name: &str, if_unused: bool) -> Result<bool> {
        let existed = self.inner.router.delete_exchange(vhost, name, if_unused)?;
        if existed {
            crate::durable::prune(&*self.inner.store, &self.inner.router, vhost).await?;
        }
        Ok(existed)
    }

    /// Add a binding; with `durable` (its exchange and destination are durable) it
    /// survives restarts.
    pub async fn bind(&self, vhost: &str, binding: Binding, durable: bool) -> Result<bool> {
        let new = self.inner.router.bind(vhost, binding.clone())?;
        if new && durable {
            let mut batch = WriteBatch::new();
            crate::durable::put_binding(&mut batch, vhost, &binding);
            self.inner.store.write(batch).await?;
        }
        Ok(new)
    }

    /// Add many bindings in one go (an MQTT SUBSCRIBE's filters): the router takes its
    /// lock per [`crate::router::LOCK_CHUNK`] bindings and, with `durable`, the new ones
    /// are stored in one write. Per binding: whether it was new, or why it could not be
    /// added; `Err` if the store write failed (the router keeps them, as with
    /// [`Broker::bind`]).
    pub async fn bind_many(
        &self,
        vhost: &str,
        bindings: Vec<Binding>,
        durable: bool,
    ) -> Result<Vec<Result<bool>>> {
        let results = self.inner.router.bind_many(vhost, &bindings)?;
        if durable {
            let mut batch = WriteBatch::new();
            for (b, r) in bindings.iter().zip(&results) {
                if matches!(r, Ok(true)) {
                    crate::durable::put_binding(&mut batch, vhost, b);
                }
            }
            if !batch.is_empty() {
                self.inner.store.write(batch).await?;
            }
        }
        Ok(results)
    }

    /// Remove many bindings in one go (an MQTT UNSUBSCRIBE's filters), stored ones in
    /// one write. Per binding: whether it existed, or why it could not be removed.
    pub async fn unbind_many(
        &self,
        vhost: &str,
        bindings: &[Binding],
    ) -> Result<Vec<Result<bool>>> {
        let results = self.inner.router.unbind_many(vhost, bindings)?;
        let mut batch = WriteBatch::new();
        let mut sources = std::collections::HashSet::new();
        for (b, r) in bindings.iter().zip(&results) {
            if matches!(r, Ok(true)) {
                crate::durable::delete_binding(&mut batch, vhost, b);
                sources.insert(b.source.as_str());
            }
        }
        if !batch.is_empty() {
            self.inner.store.write(batch).await?;
        }
        // An auto-delete exchange left empty went with its last binding.
        if sources
            .iter()
            .any(|x| self.inner.router.exchange(vhost, x).is_none())
        {
            crate::durable::prune(&*self.inner.store, &self.inner.router, vhost).await?;
        }
        Ok(results)
    }

    /// Remove a binding (and an auto-delete exchange it leaves empty), stored ones too.
    pub async fn unbind(&self, vhost: &str, binding: &Binding) -> Result<bool> {
        let removed = self.inner.router.unbind(vhost, binding)?;
        if removed {
            let mut batch = WriteBatch::new();
            crate::durable::delete_binding(&mut batch, vhost, binding);
            self.inner.store.write(batch).await?;
            if self.inner.router.exchange(vhost, &binding.source).is_none() {
                crate::durable::prune(&*self.inner.store, &self.inner.router, vhost).await?;
            }
        }
        Ok(removed)
    }

    /// Remove every binding to `topic` (its queue was deleted), stored ones too.
    pub async fn unbind_topic(&self, vhost: &str, topic: &TopicName) -> Result<()> {
        let (removed, emptied) = self.inner.router.unbind_topic(vhost, topic);
        if removed.is_empty() && emptied.is_empty() {
            return Ok(());
        }
        // Delete exactly what went (deleting a key that was never stored is harmless).
        let mut batch = WriteBatch::new();
        for b in &removed {
            crate::durable::delete_binding(&mut batch, vhost, b);
        }
        for name in &emptied {
            crate::durable::delete_exchange(&mut batch, vhost, name);
        }
        self.inner.store.write(batch).await?;
        Ok(())
    }

    /// Create a topic (or grow its queue count); `None` takes the default count.
    pub async fn create_topic(
        &self,
        name: &TopicName,
        queue_count: Option<u32>,
    ) -> Result<TopicConfig> {
        self.inner.create_topic(name, queue_count).await
    }

    /// Delete a topic: its queues, and every group's offsets on it.
    pub async fn delete_topic(&self, name: &TopicName) -> Result<bool> {
        let existed = self.inner.store.delete_topic(name).await?;
        self.inner.topics.write().remove(name);
        Ok(existed)
    }

    /// Every topic.
    pub fn topics(&self) -> Vec<TopicConfig> {
        self.inner.store.topics()
    }

    /// Messages published per (topic, producer group), sorted.
    pub fn producer_stats(&self) -> Vec<ProducerStat> {
        let topics: Vec<Arc<TopicHandle>> = self.inner.topics.read().values().cloned().collect();
        let mut out: Vec<ProducerStat> = topics
            .iter()
            .flat_map(|t| {
                t.producers
                    .lock()
                    .iter()
                    .map(|(g, n)| ProducerStat {
                        topic: t.name.clone(),
                        producer_group: g.clone(),
                        messages: *n,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| (&a.topic, &a.producer_group).cmp(&(&b.topic, &b.producer_group)));
        out
    }

    /// Publish a batch: every message (to a topic, to resolved topics, or through an
    /// exchange; now or delayed) and the records with them in one atomic store write
    /// (one fsync when durable). Answers, in order: where each message was stored, its
    /// timer when delayed, `None` when it went nowhere. An exchange that does not exist
    /// fails the whole batch. See [`crate::publish`].
    pub async fn publish_batch(&self, batch: PublishBatch) -> Result<Vec<Option<Published>>> {
        self.inner.publish_batch(batch).await
    }

    /// Publish one message to a topic: round robin, by sharding key, or to a given
    /// queue; now or after a delay. Returns once stored as durably as the store's policy
    /// promises. A one-message [`Broker::publish_batch`].
    pub async fn publish(&self, p: Publish) -> Result<Published> {
        let Publish {
            message,
            sharding_key,
            queue,
            delay,
        } = p;
        let to = Destination::Topic {
            topic: message.topic.clone(),
            queue,
            sharding_key,
        };
        self.publish_one(Outgoing {
            message,
            to,
            delay,
            retain: None,
        })
        .await
    }

    /// Publish one message through an exchange of `vhost`: stored once and indexed into
    /// one queue of every topic the exchange routes to (none: `routed() == 0`). A
    /// one-message [`Broker::publish_batch`].
    pub async fn publish_exchange(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        headers: &[(String, HeaderValue)],
        message: Message,
        delay: Option<Delay>,
    ) -> Result<Published> {
        let to = Destination::Exchange {
            vhost: vhost.to_owned(),
            exchange: exchange.to_owned(),
            key: routing_key.to_owned(),
            headers: headers.to_vec(),
        };
        self.publish_one(Outgoing {
            message,
            to,
            delay,
            retain: None,
        })
        .await
    }

    async fn publish_one(&self, item: Outgoing) -> Result<Published> {
        let mut batch = PublishBatch::new();
        batch.push(item);
        Ok(self
            .publish_batch(batch)
            .await?
            .pop()
            .flatten()
            .unwrap_or(Published::Stored {
                id: MessageId(0),
                offsets: Vec::new(),
                refused: Vec::new(),
            }))
    }

    /// Join (or create) a consumer group as a member. The group's spec must match the
    /// existing group's, if any.
    pub async fn subscribe(&self, spec: GroupSpec, member: MemberOptions) -> Result<Consumer> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(CoreError::ShuttingDown);
        }
        let watched = self.inner.watch_topics(&spec).await?;
        // A group actor that just ended (memberless) may miss the join: start a new one.
        for _ in 0..8 {
            let handle = self.inner.group_handle(&spec, &watched)?;
            if let Some(consumer) = handle.join(member.clone()).await {
                return Ok(consumer);
            }
        }
        Err(CoreError::ShuttingDown)
    }

    /// Publish `message` through `exchange` of `vhost` at `due` (ms), under `name`: a
    /// later schedule with the same name replaces it and [`Broker::cancel_scheduled`]
    /// withdraws it. Stored as a timer, it survives restarts (MQTT 5 delayed wills).
    /// Routing happens when it fires; with `retain`, it also becomes that MQTT topic's
    /// retained message then, in the same write.
    #[allow(clippy::too_many_arguments)]
    pub async fn schedule_named(
        &self,
        name: &str,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        message: Message,
        retain: Option<&str>,
        due: Millis,
    ) -> Result<()> {
        let route = Route::Exchange {
            vhost: vhost.to_owned(),
            exchange: exchange.to_owned(),
            key: routing_key.to_owned(),
            headers: Vec::new(),
        };
        self.inner
            .schedule_named(name, due, &route, retain, message)
            .await
    }

    /// Withdraw what [`Broker::schedule_named`] scheduled under `name` (if it has not
    /// fired yet); whether something was pending.
    pub async fn cancel_scheduled(&self, name: &str) -> Result<bool> {
        self.inner.cancel_named(name).await
    }

    /// Move a group's position on all its queues (replay), whether or not members are
    /// connected; consumption continues from there.
    pub async fn reset_group(&self, group: &GroupName, to: StartPosition) -> Result<()> {
        self.inner.reset_group(group, to).await
    }

    /// Delete a group: its members are cut off (their consumers end), its committed
    /// offsets are forgotten. A later subscribe starts it afresh.
    pub async fn delete_group(&self, group: &GroupName) -> Result<()> {
        self.inner.endpoints.forget(group);
        let handle = self.inner.groups.lock().remove(group);
        if let Some(h) = handle {
            h.stop().await;
        }
        let mut batch = WriteBatch::new();
        batch.delete_offsets(group.clone(), None);
        self.inner.store.write(batch).await?;
        Ok(())
    }

    /// A group's members, offsets and lag (from the live group, or from the store).
    pub async fn group_info(&self, group: &GroupName) -> Result<GroupInfo> {
        self.inner.group_info(group).await
    }

    /// Every group known to the store or live.
    pub async fn groups(&self) -> Result<Vec<GroupName>> {
        let mut g = self.inner.store.groups().await?;
        g.extend(self.inner.groups.lock().keys().cloned());
        g.sort();
        g.dedup();
        Ok(g)
    }

    /// Messages of a group's dead-letter topic, oldest first, from `from`.
    pub async fn dlq(
        &self,
        group: &GroupName,
        from: u64,
        limit: usize,
    ) -> Result<Vec<mqgate_store::QueueMessage>> {
        let q = QueueRef::new(crate::retry::dlq_topic(group)?, 0);
        if self.inner.store.topic(&q.topic).is_none() {
            return Ok(Vec::new());
        }
        Ok(self
            .inner
            .store
            .read(
                &q,
                QueueOffset(from),
                mqgate_store::ReadLimits::count(limit),
            )
            .await?)
    }

    /// Send a dead-lettered message back to the queue it failed in (reconsume count reset).
    pub async fn resend_dlq(&self, group: &GroupName, offset: u64) -> Result<Published> {
        let msgs = self.dlq(group, offset, 1).await?;
        let m = msgs
            .into_iter()
            .find(|m| m.entry.offset.0 == offset)
            .ok_or_else(|| CoreError::Invalid(format!("no DLQ message at offset {offset}")))?;
        let mut r = self.resend_messages(vec![m]).await?;
        r.pop()
            .flatten()
            .ok_or_else(|| CoreError::Invalid("resend stored nothing".into()))
    }

    /// Resend up to `limit` DLQ messages from offset `from` in one store write (one
    /// fsync): what a bulk resend pages through. Returns how many and the last offset.
    pub async fn resend_dlq_page(
        &self,
        group: &GroupName,
        from: u64,
        limit: usize,
    ) -> Result<(usize, Option<u64>)> {
        let msgs = self.dlq(group, from, limit).await?;
        let last = msgs.last().map(|m| m.entry.offset.0);
        let n = msgs.len();
        self.resend_messages(msgs).await?;
        Ok((n, last))
    }

    /// Publish DLQ messages again, each back to the queue it failed in: its topic is the
    /// message's address for RocketMQ topics, but not for AMQP queues or MQTT sessions,
    /// whose messages keep the address they were published to.
    async fn resend_messages(
        &self,
        msgs: Vec<mqgate_store::QueueMessage>,
    ) -> Result<Vec<Option<Published>>> {
        let mut items = Vec::with_capacity(msgs.len());
        for m in msgs {
            let stored = &m.message.message;
            let origin = stored
                .property(crate::retry::PROP_ORIGIN_QUEUE)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.rsplit_once('#'))
                .and_then(|(t, _)| TopicName::new(t).ok());
            let message = crate::retry::restore_original(stored);
            let topic = origin.unwrap_or_else(|| message.topic.clone());
            self.inner.topic_handle(&topic).await?;
            items.push((message, vec![topic]));
        }
        let mut batch = PublishBatch::new();
        for (message, topic) in items {
            batch.push(Outgoing::routed(message, topic));
        }
        self.publish_batch(batch).await
    }

    /// Apply the store's retention policy now.
    pub async fn enforce_retention(&self) -> Result<mqgate_store::RetentionReport> {
        Ok(self
            .inner
            .store
            .enforce_retention(self.inner.clock.now())
            .await?)
    }

    /// Delayed messages still pending.
    pub fn delayed_pending(&self) -> u64 {
        self.inner.store.stats().timers
    }

    /// Failed consumptions scheduled for a retry so far by this process.
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// Messages moved to a dead-letter queue so far by this process.
    pub fn dead_lettered(&self) -> u64 {
        self.inner.dead_lettered.load(Ordering::Relaxed)
    }

    /// Delayed messages released so far by this process.
    pub fn delayed_released(&self) -> u64 {
        self.inner.delayed_released.load(Ordering::Relaxed)
    }

    /// Stop: members are disconnected, groups persist their offsets, tasks end.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let groups: Vec<GroupHandle> = self.inner.groups.lock().drain().map(|(_, h)| h).collect();
        for g in groups {
            g.stop().await;
        }
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        if let Err(e) = self.inner.store.flush().await {
            tracing::error!(error = %e, "core: store flush at shutdown failed");
        }
    }
}

/// Apply the store's retention policy every `retention_interval`.
async fn retention_task(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.config.retention_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(i) = inner.upgrade() else { return };
        // Store timestamps are wall-clock time, whatever clock the core runs on.
        match i.store.enforce_retention(mqgate_store::now_millis()).await {
            Ok(r) if r.messages_deleted > 0 => tracing::info!(
                messages = r.messages_deleted,
                bytes = r.bytes_deleted,
                entries = r.entries_deleted,
                "core: retention deleted old messages"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "core: retention failed"),
        }
    }
}

impl TopicHandle {
    pub(crate) fn count(&self, producer_group: &str, n: u64) {
        let mut p = self.producers.lock();
        match p.get_mut(producer_group) {
            Some(c) => *c += n,
            None => {
                p.insert(producer_group.to_owned(), n);
            }
        }
    }
}

impl Inner {
    /// [`Broker::group_info`].
    pub(crate) async fn group_info(&self, group: &GroupName) -> Result<GroupInfo> {
        let handle = self.groups.lock().get(group).cloned();
        if let Some(h) = handle.filter(|h| h.is_alive()) {
            return h.info().await;
        }
        let offsets = self.store.committed_offsets(group).await?;
        if offsets.is_empty() {
            return Err(CoreError::NoSuchGroup(group.to_string()));
        }
        Ok(GroupInfo::from_offsets(&*self.store, group.clone(), offsets))
    }

    /// [`Broker::reset_group`].
    pub(crate) async fn reset_group(&self, group: &GroupName, to: StartPosition) -> Result<()> {
        let handle = self.groups.lock().get(group).cloned();
        match handle {
            Some(h) if h.is_alive() => h.reset(to).await,
            _ => {
                let offsets = self.store.committed_offsets(group).await?;
                if offsets.is_empty() {
                    return Err(CoreError::NoSuchGroup(group.to_string()));
                }
                let mut batch = WriteBatch::new();
                for (q, _) in offsets {
                    if let Ok(target) = self.position(&q, &to).await {
                        batch.commit_offset(group.clone(), q, QueueOffset(target));
                    }
                }
                self.store.write(batch).await?;
                Ok(())
            }
        }
    }

    /// The handles of the topics a group consumes (created on demand).
    pub(crate) async fn watch_topics(&self, spec: &GroupSpec) -> Result<Vec<Arc<TopicHandle>>> {
        let mut watched = Vec::new();
        for t in spec.all_topics() {
            watched.push(self.topic_handle(&t).await?);
        }
        Ok(watched)
    }

    /// The live actor of a group, or a new one.
    pub(crate) fn group_handle(
        self: &Arc<Self>,
        spec: &GroupSpec,
        watched: &[Arc<TopicHandle>],
    ) -> Result<GroupHandle> {
        let mut groups = self.groups.lock();
        match groups.get(&spec.name) {
            Some(h) if h.is_alive() => {
                if !h.spec.compatible(spec) {
                    return Err(CoreError::Conflict(format!(
                        "group {} exists with another mode or topics",
                        spec.name
                    )));
                }
                Ok(h.clone())
            }
            _ => {
                let h = group::spawn(Arc::clone(self), spec.clone(), watched.to_vec());
                groups.insert(spec.name.clone(), h.clone());
                Ok(h)
            }
        }
    }

    pub(crate) fn stamp(&self, message: &mut Message) {
        if message.producer_group.is_empty() {
            message
                .producer_group
                .clone_from(&self.config.default_producer_group);
        }
    }

    /// The due time of a delay, or `None` when it is due now.
    pub(crate) fn due(&self, delay: Option<Delay>) -> Option<Millis> {
        let now = self.clock.now();
        let due = match delay? {
            Delay::Level(l) => now + self.config.level_delay(l).as_millis() as u64,
            Delay::For(d) => now + d.as_millis() as u64,
            Delay::At(t) => t,
        };
        (due > now).then_some(due)
    }

    pub(crate) async fn create_topic(
        &self,
        name: &TopicName,
        queue_count: Option<u32>,
    ) -> Result<TopicConfig> {
        let count = queue_count.unwrap_or(self.config.default_queue_count);
        let cfg = self.store.create_topic(name, count).await?;
        let mut topics = self.topics.write();
        match topics.get(name) {
            Some(h) => h.queue_count.store(cfg.queue_count, Ordering::Release),
            None => {
                topics.insert(name.clone(), Arc::new(TopicHandle::new(&cfg)));
            }
        }
        Ok(cfg)
    }

    /// The handle of a topic, created on first use when auto-creation is on.
    pub(crate) async fn topic_handle(&self, name: &TopicName) -> Result<Arc<TopicHandle>> {
        if let Some(h) = self.topics.read().get(name) {
            return Ok(Arc::clone(h));
        }
        if let Some(cfg) = self.store.topic(name) {
            let mut topics = self.topics.write();
            return Ok(Arc::clone(
                topics
                    .entry(name.clone())
                    .or_insert_with(|| Arc::new(TopicHandle::new(&cfg))),
            ));
        }
        if !self.config.auto_create_topics && !crate::retry::is_system_topic(name) {
            return Err(CoreError::NoSuchTopic(name.to_string()));
        }
        let queues = crate::retry::is_system_topic(name).then_some(1);
        self.create_topic(name, queues).await?;
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| CoreError::NoSuchTopic(name.to_string()))
    }

    /// A timer due at `due` was written: the scheduler may have to wake earlier.
    pub(crate) fn timer_added(&self, due: Millis) {
        self.delay_rewind.fetch_min(due, Ordering::AcqRel);
        self.delay_wake.notify_one();
    }

    /// Schedule a publish through an exchange at `due` under `name` (one store batch: the
    /// timer and its name). A later schedule under the same name replaces it, and
    /// [`Inner::cancel_named`] withdraws it; it survives restarts.
    pub(crate) async fn schedule_named(
        &self,
        name: &str,
        due: Millis,
        route: &Route,
        retain: Option<&str>,
        mut message: Message,
    ) -> Result<()> {
        self.stamp(&mut message);
        let _named = self.named.lock().await;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let payload = encode_named_timer(Some((name, generation)), retain, route, &message)?;
        let mut batch = WriteBatch::new();
        batch.timer_put(due, payload);
        batch.kv_put(
            NS_SCHEDULED,
            name.as_bytes().to_vec(),
            generation.to_be_bytes().to_vec(),
        );
        self.store.write(batch).await?;
        self.timer_added(due);
        Ok(())
    }

    /// Withdraw the timer scheduled under `name`; whether there was one. Its timer stays
    /// in the index and releases into nothing.
    pub(crate) async fn cancel_named(&self, name: &str) -> Result<bool> {
        let _named = self.named.lock().await;
        if self
            .store
            .kv_get(NS_SCHEDULED, name.as_bytes())
            .await?
            .is_none()
        {
            return Ok(false);
        }
        let mut batch = WriteBatch::new();
        batch.kv_delete(NS_SCHEDULED, name.as_bytes().to_vec());
        self.store.write(batch).await?;
        Ok(true)
    }

    /// The offset `to` designates on `queue`.
    pub(crate) async fn position(&self, queue: &QueueRef, to: &StartPosition) -> Result<u64> {
        let range = self.store.queue_range(queue)?;
        Ok(match to {
            StartPosition::First => range.min.0,
            StartPosition::Last => range.next.0,
            StartPosition::LastStored => range.next.0.saturating_sub(1).max(range.min.0),
            StartPosition::Timestamp(t) => self.store.offset_for_timestamp(queue, *t).await?.0,
            StartPosition::Offset(o) => (*o).clamp(range.min.0, range.next.0),
        })
    }

    pub(crate) fn forget_group(&self, name: &GroupName, handle: &GroupHandle) {
        let mut groups = self.groups.lock();
        if groups.get(name).is_some_and(|h| h.same(handle)) {
            groups.remove(name);
        }
    }

    pub(crate) fn wake_topic(&self, topic: &TopicName) {
        if let Some(h) = self.topics.read().get(topic) {
            h.wake();
        }
    }

    /// Release the due timers: one store batch appends each message into its route's
    /// queues and deletes its timer, so a crash leaves each either pending or released.
    pub(crate) async fn release_due(
        &self,
        after: Option<TimerKey>,
    ) -> Result<(usize, Option<TimerKey>)> {
        let now = self.clock.now();
        let due = self
            .store
            .timers_due(now, after, self.config.release_batch)
            .await?;
        if due.is_empty() {
            return Ok((0, after));
        }
        let last = due.last().map(|(k, _)| *k);
        let _named = self.named.lock().await;
        let mut batch = WriteBatch::new();
        let mut woken = Vec::new();
        let mut count = 0;
        let mut staged = Vec::new();
        for (key, payload) in due {
            batch.timer_delete(key);
            let DecodedTimer {
                name,
                retain,
                route,
                mut message,
            } = match decode_timer(payload) {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(timer = ?key, error = %e, "core: dropping undecodable timer");
                    continue;
                }
            };
            if let Some((name, generation)) = name {
                // A named timer fires only if it is still the current one under its
                // name (not cancelled, not replaced); its name goes with it.
                match self.store.kv_get(NS_SCHEDULED, name.as_bytes()).await? {
                    Some(v) if v.as_ref() == generation.to_be_bytes() => {
                        batch.kv_delete(NS_SCHEDULED, name.into_bytes());
                    }
                    _ => continue,
                }
            }
            message.deliver_at = Some(key.due);
            let queues = match self.resolve(&route).await {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(timer = ?key, error = %e, "core: delayed message has nowhere to go");
                    Vec::new()
                }
            };
            for q in &queues {
                woken.push(q.topic.clone());
            }
            if let Some(topic) = retain {
                staged.extend(self.retained.stage(&topic, &message, &mut batch));
            }
            batch.append(message, queues);
            count += 1;
        }
        self.store.write(batch).await?;
        drop(staged);
        self.delayed_released
            .fetch_add(count as u64, Ordering::Relaxed);
        woken.sort();
        woken.dedup();
        for t in woken {
            self.wake_topic(&t);
        }
        Ok((count, last))
    }

    async fn resolve(&self, route: &Route) -> Result<Vec<QueueRef>> {
        match route {
            Route::Topic {
                topic,
                queue,
                sharding_key,
            } => {
                let h = self.topic_handle(topic).await?;
                let q = h.select(
                    queue.filter(|q| *q < h.queue_count()),
                    sharding_key.as_deref(),
                )?;
                Ok(vec![QueueRef::new(topic.clone(), q)])
            }
            Route::Exchange {
                vhost,
                exchange,
                key,
                headers,
            } => {
                let routed = self.router.route(vhost, exchange, key, headers)?;
                let mut out = Vec::with_capacity(routed.topics.len());
                for t in routed.topics {
                    let h = self.topic_handle(&t).await?;
                    out.push(QueueRef::new(t, h.select(None, None)?));
                }
                Ok(out)
            }
        }
    }

    pub(crate) fn delay_rewind(&self) -> Option<Millis> {
        let v = self.delay_rewind.swap(u64::MAX, Ordering::AcqRel);
        (v != u64::MAX).then_some(v)
    }

    pub(crate) async fn delay_woken(&self) {
        self.delay_wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_payload_round_trips() {
        let mut m = Message::new(TopicName::new("t").unwrap(), "body");
        m.keys = vec!["k".into()];
        for route in [
            Route::Topic {
                topic: TopicName::new("t").unwrap(),
                queue: Some(3),
                sharding_key: Some("key".into()),
            },
            Route::Topic {
                topic: TopicName::new("t").unwrap(),
                queue: None,
                sharding_key: None,
            },
            Route::Exchange {
                vhost: "/".into(),
                exchange: "x".into(),
                key: "a.b".into(),
                headers: vec![
                    ("s".into(), HeaderValue::Str("v".into())),
                    ("i".into(), HeaderValue::Int(-5)),
                    ("f".into(), HeaderValue::Float(1.5)),
                    ("b".into(), HeaderValue::Bool(true)),
                    ("v".into(), HeaderValue::Void),
                    ("o".into(), HeaderValue::Other(Bytes::from_static(b"x"))),
                ],
            },
        ] {
            let enc = encode_timer(&route, &m).unwrap();
            let d = decode_timer(Bytes::from(enc.clone())).unwrap();
            assert_eq!((d.name, d.retain), (None, None));
            assert_eq!(d.route, route);
            let back = d.message;
            let named =
                encode_named_timer(Some(("will/c1", 7)), Some("a/b"), &route, &m).unwrap();
            let d = decode_timer(Bytes::from(named)).unwrap();
            assert_eq!(d.name, Some(("will/c1".to_owned(), 7)));
            assert_eq!(d.retain.as_deref(), Some("a/b"));
            assert_eq!((d.route, d.message), (route.clone(), m.clone()));
            assert_eq!(back, m);
            for cut in 0..enc.len() {
                assert!(decode_timer(Bytes::copy_from_slice(&enc[..cut])).is_err());
            }
        }
    }
}
