//! The broker: the handle adapters hold and the state it shares with the core's services
//! (`ShardCore`, and through it `Common`): topics (`topics.rs`), publishing (`publish.rs`), the delay scheduler
//! (`delay.rs`), retry and DLQ (`retry.rs`), endpoints (`endpoints.rs`), consumer groups
//! (`group`), retained messages, retention. This file: start, shutdown, routing
//! changes, group membership.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use mqgate_store::{GroupName, Millis, QueueOffset, QueueRef, Store, TopicName, WriteBatch};
use parking_lot::{Mutex, RwLock};
use tokio::task::JoinHandle;

pub(crate) use crate::topics::TopicHandle;

use crate::clock::Clock;
use crate::config::CoreConfig;
use crate::error::{CoreError, Result};
use crate::group::{
    self, Consumer, GroupHandle, GroupInfo, GroupSpec, MemberOptions, StartPosition,
};
use crate::router::{Binding, ExchangeDef, Router, DEFAULT_VHOST};

/// What every shard of a gateway shares: configuration, clock, the routing tables, the
/// login throttle, the memory watermark, producer counts and the core's counters. One
/// per gateway (`docs/design/sharding.md` section 2).
pub(crate) struct Common {
    /// When this broker started (wall clock, ms): transient messages stored before it
    /// are not delivered.
    pub(crate) boot: Millis,
    /// Failed logins (every protocol and the admin API share it).
    login: crate::login::LoginThrottle,
    pub(crate) config: CoreConfig,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) router: Router,
    /// Messages published per (address, producer group) (`topics.rs`).
    pub(crate) producers: crate::topics::ProducerCounts,
    /// Publishes that waited for consumers to catch up (flow control by consumer lag).
    pub(crate) flow_waits: AtomicU64,
    /// Failed consumptions scheduled for retry.
    pub(crate) retries: AtomicU64,
    /// Messages moved to a DLQ.
    pub(crate) dead_lettered: AtomicU64,
    closed: AtomicBool,
    /// Whether publishers are blocked (memory above the watermark).
    pub(crate) memory: crate::memory::MemoryWatermark,
}

/// One shard's core: its store and everything kept beside it (topics, consumer groups,
/// endpoints, the delay scheduler's state, retained messages, the services' tasks).
/// Today a broker has one, over its whole store; a sharded gateway will hold one per
/// shard it owns. The shared part is reached through `Deref` to [`Common`].
pub(crate) struct ShardCore {
    pub(crate) common: Arc<Common>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) topics: RwLock<HashMap<TopicName, Arc<TopicHandle>>>,
    pub(crate) groups: Mutex<HashMap<GroupName, GroupHandle>>,
    /// The endpoints the core manages (policies with or without members, idle expiry).
    pub(crate) endpoints: crate::endpoints::Registry,
    /// The delay scheduler's state (`delay.rs`).
    pub(crate) delay: crate::delay::DelayState,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Retained messages.
    pub(crate) retained: crate::retained::Retained,
}

impl std::ops::Deref for ShardCore {
    type Target = Common;

    fn deref(&self) -> &Common {
        &self.common
    }
}

impl std::fmt::Debug for ShardCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The broker core. Cheap to clone; every adapter holds one.
#[derive(Clone, Debug)]
pub struct Broker {
    pub(crate) inner: Arc<ShardCore>,
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
        let common = Arc::new(Common {
            boot: mqgate_store::now_millis(),
            login,
            config,
            clock,
            router,
            producers: crate::topics::ProducerCounts::default(),
            flow_waits: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            memory,
        });
        let inner = Arc::new(ShardCore {
            common,
            store,
            topics: RwLock::new(topics),
            groups: Mutex::default(),
            endpoints: crate::endpoints::Registry::new(),
            delay: crate::delay::DelayState::new(),
            tasks: Mutex::default(),
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

    /// Apply the store's retention policy now.
    pub async fn enforce_retention(&self) -> Result<mqgate_store::RetentionReport> {
        Ok(self
            .inner
            .store
            .enforce_retention(self.inner.clock.now())
            .await?)
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
async fn retention_task(inner: std::sync::Weak<ShardCore>) {
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

impl ShardCore {
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
        Ok(GroupInfo::from_offsets(
            &*self.store,
            group.clone(),
            offsets,
        ))
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

    /// The live actor of a group, or a new one (memberless: it ends after a commit
    /// interval without members).
    pub(crate) async fn live_group(self: &Arc<Self>, spec: &GroupSpec) -> Result<GroupHandle> {
        let live = self
            .groups
            .lock()
            .get(&spec.name)
            .filter(|h| h.is_alive())
            .cloned();
        if let Some(h) = live {
            return Ok(h);
        }
        let watched = self.watch_topics(spec).await?;
        self.group_handle(spec, &watched)
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
}
