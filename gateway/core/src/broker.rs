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
use crate::router::{Router, DEFAULT_VHOST};

/// What every shard of a gateway shares: configuration, clock, the routing tables, the
/// login throttle, the memory watermark, producer counts and the core's counters. One
/// per gateway (`docs/design/sharding.md` section 2).
pub(crate) struct Common {
    /// When this broker started (wall clock, ms): transient messages stored before it
    /// are not delivered.
    pub(crate) boot: Millis,
    /// Failed logins (every protocol and the admin API share it).
    login: crate::login::LoginThrottle,
    /// Group actors parked now (idle, without a task: `group/park.rs`).
    pub(crate) groups_parked: AtomicU64,
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
    pub(crate) closed: AtomicBool,
    /// Whether publishers are blocked (memory above the watermark).
    pub(crate) memory: crate::memory::MemoryWatermark,
    /// Which shard holds each topic and group.
    pub(crate) placement: crate::shard::Placement,
    /// Endpoint events of every shard.
    pub(crate) endpoint_events: tokio::sync::broadcast::Sender<crate::EndpointEvent>,
    /// How far this gateway followed a cluster's routing log (`meta.rs`).
    pub(crate) meta_follow: crate::meta::MetaFollow,
    /// What turns adapters' declaration records into endpoints (`catalog.rs`).
    pub(crate) kinds: RwLock<Vec<Arc<dyn crate::catalog::EndpointKind>>>,
    /// Addresses this gateway advertises, by service (`locate.rs`).
    pub(crate) services: RwLock<HashMap<String, String>>,
    /// Shards attached and detached here.
    pub(crate) shard_events: tokio::sync::broadcast::Sender<crate::locate::ShardEvent>,
}

/// One shard's core: its store and everything kept beside it (topics, consumer groups,
/// endpoints, the delay scheduler's state, retained messages, the services' tasks).
/// A broker holds one per shard (one in all, unless started sharded). The shared part
/// is reached through `Deref` to [`Common`].
pub(crate) struct ShardCore {
    /// Its number (0 when the broker has one shard).
    pub(crate) id: crate::shard::ShardId,
    pub(crate) common: Arc<Common>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) topics: RwLock<HashMap<TopicName, Arc<TopicHandle>>>,
    /// Handles of deleted topics, kept while groups watch them or may start to
    /// (`ShardCore::forget_topic`): a topic of that name created again takes its handle
    /// back. Locked after `topics`.
    pub(crate) retired: Mutex<HashMap<TopicName, Arc<TopicHandle>>>,
    pub(crate) groups: Mutex<HashMap<GroupName, GroupHandle>>,
    /// The endpoints the core manages (policies with or without members, idle expiry).
    pub(crate) endpoints: crate::endpoints::Registry,
    /// The delay scheduler's state (`delay.rs`).
    pub(crate) delay: crate::delay::DelayState,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Retained messages (kept in shard 0 of a sharded broker).
    pub(crate) retained: Arc<crate::retained::Retained>,
    /// Where forwarded entries from other shards are applied, each once.
    pub(crate) inbox: crate::outbox::Inbox,
    /// Forwarding from this shard to each other one (index: destination; empty with
    /// one shard).
    pub(crate) routes: Vec<Arc<crate::shard::Route>>,
    /// The broker it belongs to.
    set: std::sync::Weak<ShardSet>,
    /// Messages other shards forwarded into this one (each counted once).
    pub(crate) forwarded_in: AtomicU64,
    /// Endpoint declarations take turns (`catalog.rs`: declared once).
    pub(crate) declares: tokio::sync::Mutex<()>,
}

impl std::ops::Deref for ShardCore {
    type Target = Common;

    fn deref(&self) -> &Common {
        &self.common
    }
}

impl std::fmt::Debug for ShardCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCore")
            .field("id", &self.id)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl ShardCore {
    /// Start shard `id` of `set` over `store`: loads its topics and retained messages,
    /// starts its delay scheduler, retention, endpoint sweep and its forwarders.
    async fn start(
        id: crate::shard::ShardId,
        set: &Arc<ShardSet>,
        store: Arc<dyn Store>,
    ) -> Result<Arc<Self>> {
        let common = Arc::clone(&set.common);
        let topics = store
            .topics()
            .iter()
            .map(|cfg| {
                common.placement.topic_is_in(&cfg.name, id);
                (cfg.name.clone(), Arc::new(TopicHandle::new(cfg)))
            })
            .collect();
        for g in store.groups().await? {
            common.placement.group_is_in(&g, id);
        }
        let retained = crate::retained::Retained::load(
            Arc::clone(&store),
            common.config.retained_cache_messages,
            common.config.retained_cache_bytes,
        )
        .await?;
        let count = set.count;
        if count > 1 {
            let dests = (0..count).filter(|d| *d != id);
            crate::outbox::ensure_outboxes(&*store, dests).await?;
        }
        let routes = if count > 1 {
            (0..count)
                .map(|_| Arc::new(crate::shard::Route::new()))
                .collect()
        } else {
            Vec::new()
        };
        let inner = Arc::new(ShardCore {
            id,
            endpoints: crate::endpoints::Registry::new(common.endpoint_events.clone()),
            inbox: crate::outbox::Inbox::new(id, Arc::clone(&store)),
            common,
            store,
            topics: RwLock::new(topics),
            retired: Mutex::default(),
            groups: Mutex::default(),
            delay: crate::delay::DelayState::new(),
            tasks: Mutex::default(),
            retained: Arc::new(retained),
            routes,
            set: Arc::downgrade(set),
            forwarded_in: AtomicU64::new(0),
            declares: tokio::sync::Mutex::new(()),
        });
        let scheduler = tokio::spawn(crate::delay::run(Arc::downgrade(&inner)));
        let retention = tokio::spawn(retention_task(Arc::downgrade(&inner)));
        let expiry = tokio::spawn(crate::endpoints::run(Arc::downgrade(&inner)));
        let mut tasks = vec![scheduler, retention, expiry];
        for d in inner.dests() {
            tasks.push(tokio::spawn(crate::shard::forward(
                Arc::downgrade(&inner),
                d,
                Arc::clone(&inner.routes[usize::from(d)]),
            )));
        }
        inner.tasks.lock().extend(tasks);
        Ok(inner)
    }

    /// The broker this shard belongs to (`None` once it is gone).
    pub(crate) fn broker(&self) -> Option<Broker> {
        let inner = self.set.upgrade()?;
        Some(Broker { inner })
    }

    /// The set this shard belongs to (`None` once it is gone).
    pub(crate) fn shard_set(&self) -> Option<Arc<ShardSet>> {
        self.set.upgrade()
    }

    /// The other shards this one forwards to.
    pub(crate) fn dests(&self) -> Vec<crate::shard::ShardId> {
        (0..self.routes.len() as u16)
            .filter(|d| *d != self.id)
            .collect()
    }

    /// Tell retention which messages outbox entries still point at, then apply it.
    pub(crate) async fn enforce_retention(
        &self,
        now: Millis,
    ) -> Result<mqgate_store::RetentionReport> {
        if self.routes.len() > 1 {
            let floor = crate::outbox::retention_floor(&*self.store, &self.dests()).await?;
            self.store.set_retention_floor(floor);
        }
        Ok(self.store.enforce_retention(now).await?)
    }

    /// Stop serving: members are cut off, groups commit their offsets, tasks end, the
    /// store is flushed.
    async fn stop(&self) {
        let groups: Vec<GroupHandle> = self.groups.lock().drain().map(|(_, h)| h).collect();
        for g in groups {
            g.stop().await;
        }
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        if let Err(e) = self.store.flush().await {
            tracing::error!(shard = self.id, error = %e, "core: store flush failed");
        }
    }
}

/// A broker's shards and what they share.
pub(crate) struct ShardSet {
    pub(crate) common: Arc<Common>,
    /// How many shards there are (owned here or not).
    pub(crate) count: u16,
    /// The shards this broker owns (index: shard id).
    slots: RwLock<Vec<Option<Arc<ShardCore>>>>,
    /// How shards owned elsewhere are reached (none: every shard is here).
    pub(crate) link: Option<Arc<dyn crate::shard::ClusterLink>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// This run's number (`runs.rs`).
    pub(crate) run_id: u64,
    /// Since when each gateway run asked about has been missing from the live set.
    pub(crate) absences: crate::runs::Absences,
    /// Retained messages when shard 0 is not owned here (none).
    no_retained: Arc<crate::retained::Retained>,
}

impl std::ops::Deref for ShardSet {
    type Target = Common;

    fn deref(&self) -> &Common {
        &self.common
    }
}

impl std::fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("count", &self.count)
            .field(
                "owned",
                &self.owned().iter().map(|s| s.id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl ShardSet {
    /// Shard `id` when this broker owns it.
    pub(crate) fn local(&self, id: crate::shard::ShardId) -> Option<Arc<ShardCore>> {
        self.slots.read().get(usize::from(id)).cloned().flatten()
    }

    /// Shard `id`, or why it cannot be used here.
    pub(crate) fn shard(&self, id: crate::shard::ShardId) -> Result<Arc<ShardCore>> {
        self.local(id).ok_or(CoreError::NotOwned(id))
    }

    /// The shards owned here, by id.
    pub(crate) fn owned(&self) -> Vec<Arc<ShardCore>> {
        self.slots.read().iter().flatten().cloned().collect()
    }

    /// Shard 0: routing state, retained messages, named timers, records no endpoint
    /// anchors.
    pub(crate) fn meta(&self) -> Result<Arc<ShardCore>> {
        self.shard(0)
    }

    /// The shard holding (or that would hold) `topic`.
    pub(crate) fn of_topic(&self, topic: &TopicName) -> Result<Arc<ShardCore>> {
        self.shard(self.placement.topic(topic))
    }

    /// The shard holding (or that would hold) `group`.
    pub(crate) fn of_group(&self, group: &GroupName) -> Result<Arc<ShardCore>> {
        self.shard(self.placement.group(group))
    }

    pub(crate) fn sharded(&self) -> bool {
        self.count > 1
    }

    /// Whether an endpoint with a length limit exists in a shard owned here.
    pub(crate) fn any_limited(&self) -> bool {
        self.slots
            .read()
            .iter()
            .flatten()
            .any(|s| s.endpoints.any_limited())
    }
}

/// The broker core. Cheap to clone; every adapter holds one.
#[derive(Clone, Debug)]
pub struct Broker {
    pub(crate) inner: Arc<ShardSet>,
}

impl Broker {
    /// Start the core over `store`: loads topics, starts the delay scheduler and the
    /// retention task. Must be called inside a tokio runtime.
    pub async fn start(
        store: Arc<dyn Store>,
        config: CoreConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        Self::start_sharded(vec![store], config, clock).await
    }

    /// Start the core over several shards in this process, one store each (index:
    /// shard id). Each store must assign ids from its shard's base (`shard << 44`:
    /// `RocksConfig::id_base`, `MemoryStore::with_id_base`), so that ids name their
    /// shard. Shard 0 holds the routing state, retained messages and named timers; a
    /// topic goes to the shard its name hashes to, a group to its first topic's;
    /// publishes reaching several shards are forwarded exactly once
    /// (`docs/design/sharding.md`).
    pub async fn start_sharded(
        stores: Vec<Arc<dyn Store>>,
        config: CoreConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let count = u16::try_from(stores.len()).unwrap_or(u16::MAX);
        let broker = Self::start_empty(count, None, config, clock)?;
        for (id, store) in stores.into_iter().enumerate() {
            broker.attach_shard(id as u16, store).await?;
        }
        Ok(broker)
    }

    /// Start the core of one gateway of a cluster of `shards` shards: it owns none
    /// until [`Broker::attach_shard`]; forwards to shards owned elsewhere go through
    /// `link`.
    pub fn start_cluster(
        shards: u16,
        link: Arc<dyn crate::shard::ClusterLink>,
        config: CoreConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        Self::start_empty(shards, Some(link), config, clock)
    }

    fn start_empty(
        count: u16,
        link: Option<Arc<dyn crate::shard::ClusterLink>>,
        config: CoreConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        if !(1..=crate::shard::MAX_SHARDS).contains(&count) {
            return Err(CoreError::Invalid(format!(
                "a broker has 1..={} shards, not {count}",
                crate::shard::MAX_SHARDS
            )));
        }
        let router = Router::new();
        router.add_vhost(DEFAULT_VHOST);
        let memory = crate::memory::MemoryWatermark::new(config.memory_high_watermark);
        let login = crate::login::LoginThrottle::new(config.login_throttle);
        let retained_cap = (config.retained_cache_messages, config.retained_cache_bytes);
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
            groups_parked: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            memory,
            placement: crate::shard::Placement::new(count),
            endpoint_events: tokio::sync::broadcast::channel(1024).0,
            meta_follow: crate::meta::MetaFollow::default(),
            kinds: RwLock::default(),
            services: RwLock::default(),
            shard_events: tokio::sync::broadcast::channel(256).0,
        });
        let set = Arc::new(ShardSet {
            common: Arc::clone(&common),
            count,
            slots: RwLock::new(vec![None; usize::from(count)]),
            link,
            tasks: Mutex::default(),
            run_id: crate::runs::draw(),
            absences: crate::runs::Absences::default(),
            no_retained: Arc::new(crate::retained::Retained::empty(
                retained_cap.0,
                retained_cap.1,
            )),
        });
        set.tasks
            .lock()
            .push(tokio::spawn(crate::memory::run(Arc::downgrade(&common))));
        Ok(Self { inner: set })
    }

    /// Own shard `id` from now on, over `store` (its only writer): its topics, groups,
    /// delay scheduler, retention, endpoint sweep and forwarders start; shard 0 also
    /// brings the routing state.
    pub async fn attach_shard(
        &self,
        id: crate::shard::ShardId,
        store: Arc<dyn Store>,
    ) -> Result<()> {
        let set = &self.inner;
        if id >= set.count {
            return Err(CoreError::Invalid(format!(
                "shard {id} of a broker with {} shards",
                set.count
            )));
        }
        if set.local(id).is_some() {
            return Err(CoreError::Conflict(format!(
                "shard {id} is attached already"
            )));
        }
        // In a cluster, shard 0's store has the routing state as its last owner left
        // it: a router rebuilt from it replaces the followed one when the shard is
        // attached. A broker of its own loads it into its (empty) router.
        let fresh = match (id, &set.link) {
            (0, Some(_)) => {
                let fresh = Router::new();
                fresh.add_vhost(DEFAULT_VHOST);
                crate::durable::load(&*store, &fresh).await?;
                Some(fresh)
            }
            (0, None) => {
                crate::durable::load(&*store, &set.router).await?;
                None
            }
            _ => None,
        };
        let core = ShardCore::start(id, set, store).await?;
        let attach = || set.slots.write()[usize::from(id)] = Some(Arc::clone(&core));
        match fresh {
            Some(fresh) => self.meta_attached(fresh, attach),
            None => attach(),
        }
        // Its endpoints are managed here now (a moved shard's, by its next owner).
        if let Err(e) = self.register_endpoints_of(&core).await {
            tracing::error!(shard = id, error = %e, "core: the shard's endpoint records could not be read; their policies wait for the next declaration");
        }
        // Forwarders to it may find it here now.
        for h in set.owned() {
            if h.id != id {
                h.routes[usize::from(id)].kick.notify_one();
            }
        }
        let _ = set
            .shard_events
            .send(crate::locate::ShardEvent::Attached(id));
        tracing::info!(shard = id, "core: shard attached");
        Ok(())
    }

    /// Stop owning shard `id`: new work on it fails with [`CoreError::NotOwned`], its
    /// groups commit their offsets and end, its tasks stop, its store is flushed. The
    /// store is no longer used by the core when this returns.
    pub async fn detach_shard(&self, id: crate::shard::ShardId) -> bool {
        let meta = id == 0 && self.inner.link.is_some() && self.inner.local(0).is_some();
        if meta {
            self.meta_detaching();
        }
        let core = self
            .inner
            .slots
            .write()
            .get_mut(usize::from(id))
            .and_then(Option::take);
        let Some(core) = core else {
            if meta {
                self.meta_detached(None, None);
            }
            return false;
        };
        // New work on it goes to its next owner from now: adapters let go of what
        // they keep of it (the MQTT sessions in it).
        let _ = self
            .inner
            .shard_events
            .send(crate::locate::ShardEvent::Detached(id));
        core.stop().await;
        if meta {
            // What the log has up to this gateway's last write: a change the router
            // took whose write failed (fenced, stopped) is not kept.
            let fresh = Router::new();
            fresh.add_vhost(DEFAULT_VHOST);
            let fresh = match crate::durable::load(&*core.store, &fresh).await {
                Ok(()) => Some(fresh),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: the routing state could not be read back from shard 0; the router stays as it was");
                    None
                }
            };
            self.meta_detached(core.store.log_position(), fresh);
        }
        tracing::info!(shard = id, "core: shard detached");
        true
    }

    /// The shards this broker owns now.
    pub fn owned_shards(&self) -> Vec<crate::shard::ShardId> {
        self.inner.owned().iter().map(|s| s.id).collect()
    }

    /// Shard `id`'s inbox, when owned here: what forwarders of other gateways reach
    /// (over the cluster's relay) to apply their outbox entries, each once.
    pub fn inbox(
        &self,
        id: crate::shard::ShardId,
    ) -> Option<Arc<dyn crate::outbox::ForwardTarget>> {
        let core = self.inner.local(id)?;
        Some(Arc::new(crate::shard::LocalTarget::new(&core)))
    }

    /// How many shards this broker has (owned here or not).
    pub fn shard_count(&self) -> u16 {
        self.inner.count
    }

    /// Messages forwarded from their home shard into another, since the start (each
    /// counted once, by the shard that applied it).
    pub fn forwarded(&self) -> u64 {
        self.inner
            .owned()
            .iter()
            .map(|s| s.forwarded_in.load(Ordering::Relaxed))
            .sum()
    }

    /// Consumer groups whose actor is parked now: idle, waiting for a message or a
    /// command without a task of its own (`group/park.rs`).
    pub fn groups_parked(&self) -> u64 {
        self.inner.groups_parked.load(Ordering::Relaxed)
    }

    /// The shard holding (or that would hold) `topic`.
    pub fn shard_of_topic(&self, topic: &TopicName) -> u16 {
        self.inner.placement.topic(topic)
    }

    /// The retained messages (those of shard 0; none when another gateway owns it).
    pub fn retained(&self) -> Arc<crate::retained::Retained> {
        match self.inner.local(0) {
            Some(meta) => Arc::clone(&meta.retained),
            None => Arc::clone(&self.inner.no_retained),
        }
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

    /// Whether a durable publish's answer waits on I/O (`Store::answers_wait` of a
    /// shard owned here, or another gateway's answer in a cluster).
    pub fn answers_wait(&self) -> bool {
        self.inner.link.is_some() || self.inner.owned().iter().any(|s| s.store.answers_wait())
    }

    /// Join (or create) a consumer group as a member. The group's spec must match the
    /// existing group's, if any. On a gateway of a cluster, a member of a group whose
    /// shard is owned here follows the shard if it moves (`group/migrate.rs`), and one
    /// whose shard another gateway owns joins it there over the consume relay.
    pub async fn subscribe(&self, spec: GroupSpec, mut member: MemberOptions) -> Result<Consumer> {
        if self.inner.link.is_some() && member.unbounded && member.drain.is_none() {
            // A member that may follow its shard's moves is fed through a pump that
            // empties its mailbox at once, and one over the relay through another
            // mailbox: the consumer the client takes from counts what it took, for
            // whichever member feeds it (`Drain`).
            member.drain = Some(Arc::default());
        }
        let c = self.subscribe_direct(spec.clone(), member.clone()).await?;
        if self.inner.link.is_none() || !c.is_local() {
            return Ok(c);
        }
        // A gateway of a cluster: the member follows its group's shard if it moves.
        let shard = self.inner.placement.group(&spec.name);
        Ok(self.following(c, spec, member, shard))
    }

    /// [`Broker::subscribe`] without following the shard's moves: a member here ends
    /// when its shard is let go (the consume relay's owner side: its remote member then
    /// joins the next owner by itself).
    pub async fn subscribe_direct(
        &self,
        spec: GroupSpec,
        member: MemberOptions,
    ) -> Result<Consumer> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(CoreError::ShuttingDown);
        }
        self.record_group_placement(&spec).await?;
        let shard = match self.group_shard(&spec) {
            Err(CoreError::NotOwned(id)) => match &self.inner.link {
                // Owned by another gateway: a member here, its group there.
                Some(link) => return link.subscribe(id, spec, member).await,
                None => return Err(CoreError::NotOwned(id)),
            },
            other => other?,
        };
        let watched = shard.watch_topics(&spec).await?;
        // A group actor that just ended (memberless) may miss the join: start a new one.
        for _ in 0..8 {
            let handle = shard.group_handle(&spec, &watched)?;
            if let Some(consumer) = handle.join(member.clone()).await {
                return Ok(consumer);
            }
        }
        Err(CoreError::ShuttingDown)
    }

    /// The shard a group lives in: its first topic's. Every topic it consumes must be
    /// there (a group spanning shards is not supported yet).
    /// In a cluster, a group not known here whose first topic lies in another shard
    /// than its name hashes to is recorded with the cluster (or found there, placed
    /// by another gateway) before it is placed here.
    async fn record_group_placement(&self, spec: &GroupSpec) -> Result<()> {
        let set = &self.inner;
        let (Some(link), Some(first)) = (&set.link, spec.topics.first()) else {
            return Ok(());
        };
        if set.placement.known_group(&spec.name).is_some() {
            return Ok(());
        }
        let proposed = set.placement.topic(first);
        if proposed == crate::shard::shard_of(spec.name.as_str(), set.count) {
            return Ok(());
        }
        let s = link.record_group(&spec.name, proposed).await?;
        set.placement.group_is_in(&spec.name, s);
        Ok(())
    }

    /// Where group `group` lives, as the cluster recorded it (`None`: it was deleted):
    /// what a gateway's follower of the cluster's placement records calls.
    pub fn learn_group_placement(&self, group: &GroupName, shard: Option<crate::shard::ShardId>) {
        let p = &self.inner.placement;
        match shard {
            Some(s) if s < self.inner.count => p.group_is_in(group, s),
            Some(_) => {}
            None => {
                // Still running here (a subscribe raced the delete): keep it.
                let live = p
                    .known_group(group)
                    .and_then(|s| self.inner.local(s))
                    .is_some_and(|s| s.groups.lock().contains_key(group));
                if !live {
                    p.group_gone(group);
                }
            }
        }
    }

    pub(crate) fn group_shard(&self, spec: &GroupSpec) -> Result<Arc<ShardCore>> {
        let set = &self.inner;
        let id = set.placement.place_group(&spec.name, &spec.topics);
        if set.sharded() {
            if let Some(t) = spec.topics.iter().find(|t| set.placement.topic(t) != id) {
                return Err(CoreError::Invalid(format!(
                    "group {} consumes topics of several shards ({t} is not in shard {id})",
                    spec.name
                )));
            }
        }
        set.shard(id)
    }

    /// Move a group's position on all its queues (replay), whether or not members are
    /// connected; consumption continues from there.
    pub async fn reset_group(&self, group: &GroupName, to: StartPosition) -> Result<()> {
        let local = match self.inner.of_group(group) {
            Ok(shard) => shard.reset_group(group, to).await,
            Err(e) => Err(e),
        };
        self.or_relay(
            local,
            || crate::shard::AdminOp::ResetGroup(group.clone(), to),
            |a| matches!(a, crate::shard::AdminAnswer::Done).then_some(()),
        )
        .await
    }

    /// Delete a group: its members are cut off (their consumers end), its committed
    /// offsets are forgotten, its `%RETRY%` topic is deleted (its `%DLQ%` kept). A
    /// later subscribe starts it afresh.
    pub async fn delete_group(&self, group: &GroupName) -> Result<()> {
        let shard = match self.inner.of_group(group) {
            Ok(shard) => shard,
            Err(e) => {
                return self
                    .or_relay(
                        Err(e),
                        || crate::shard::AdminOp::DeleteGroup(group.clone()),
                        |a| matches!(a, crate::shard::AdminAnswer::Done).then_some(()),
                    )
                    .await
            }
        };
        shard.endpoints.forget(group);
        let handle = shard.groups.lock().remove(group);
        if let Some(h) = handle {
            h.stop().await;
        }
        let mut batch = WriteBatch::new();
        batch.delete_offsets(group.clone(), None);
        // Its delivered marks go with its offsets (`group::DELIVERED_NS`), a broadcast
        // group's members' (`<group>%<member>`) too.
        for end in [0, b'%'] {
            let mut prefix = group.as_str().as_bytes().to_vec();
            prefix.push(end);
            for (key, _) in shard
                .store
                .kv_scan(crate::group::DELIVERED_NS, &prefix, None, 65_536)
                .await?
            {
                batch.kv_delete(crate::group::DELIVERED_NS, key);
            }
        }
        shard.store.write(batch).await?;
        // Its retry topic goes with it (as RocketMQ's deleteSubGroup does): what waits
        // there was the deleted group's, and a group of that name placed again (in a
        // cluster, maybe in another shard) starts without it. Its DLQ stays.
        if let Ok(retry) = crate::retry::retry_topic(group) {
            let here =
                shard.topics.read().contains_key(&retry) || shard.store.topic(&retry).is_some();
            if here {
                match shard.store.delete_topic(&retry).await {
                    Ok(_) => {
                        shard.forget_topic(&retry);
                        self.inner.placement.topic_gone(&retry);
                    }
                    Err(e) => {
                        tracing::warn!(group = %group, error = %e, "core: the deleted group's retry topic stays");
                    }
                }
            }
        }
        self.inner.placement.group_gone(group);
        if let Some(link) = &self.inner.link {
            if let Err(e) = link.forget_group(group).await {
                tracing::warn!(group = %group, error = %e, "cluster: the deleted group's placement record stays");
            }
        }
        Ok(())
    }

    /// A group's members, offsets and lag (from the live group, or from the store).
    pub async fn group_info(&self, group: &GroupName) -> Result<GroupInfo> {
        let local = match self.inner.of_group(group) {
            Ok(shard) => shard.group_info(group).await,
            Err(e) => Err(e),
        };
        self.or_relay(
            local,
            || crate::shard::AdminOp::GroupInfo(group.clone()),
            |a| match a {
                crate::shard::AdminAnswer::Group(g) => Some(g),
                _ => None,
            },
        )
        .await
    }

    /// Every group known to the store or live.
    pub async fn groups(&self) -> Result<Vec<GroupName>> {
        let mut g = Vec::new();
        for shard in self.inner.owned() {
            g.extend(shard.store.groups().await?);
            g.extend(shard.groups.lock().keys().cloned());
        }
        g.sort();
        g.dedup();
        Ok(g)
    }

    /// Apply the store's retention policy now (every shard).
    pub async fn enforce_retention(&self) -> Result<mqgate_store::RetentionReport> {
        let mut total = mqgate_store::RetentionReport::default();
        for shard in self.inner.owned() {
            let r = shard.enforce_retention(self.inner.clock.now()).await?;
            total.messages_deleted += r.messages_deleted;
            total.bytes_deleted += r.bytes_deleted;
            total.entries_deleted += r.entries_deleted;
        }
        Ok(total)
    }

    /// Stop: members are disconnected, groups persist their offsets, tasks end.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        // Nothing is served from here on: every shard is detached (its work fails
        // with `NotOwned`), its groups commit, its tasks end.
        let shards: Vec<Arc<ShardCore>> = self
            .inner
            .slots
            .write()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for shard in shards {
            shard.stop().await;
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
        match i.enforce_retention(mqgate_store::now_millis()).await {
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
        let mut info = GroupInfo::from_offsets(&*self.store, group.clone(), offsets);
        // Messages a reset left held below the committed offsets wait too.
        for q in &mut info.queues {
            let held = group::held_at_rest(&*self.store, group, &q.queue, q.committed).await;
            q.lag += held;
            q.ready += held;
        }
        Ok(info)
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
                    if !crate::retry::reset_moves(group, &to, &q) {
                        continue;
                    }
                    if let Ok(target) = self.position(&q, &to).await {
                        batch.commit_offset(group.clone(), q.clone(), QueueOffset(target));
                        // Messages an earlier reset left held (unacknowledged then) wait
                        // to be delivered again like any other: this one takes them.
                        if let Some(mark) = group::unheld_mark(&*self.store, group, &q).await? {
                            batch.kv_put(
                                group::DELIVERED_NS,
                                group::delivered_key(group, &q),
                                mark,
                            );
                        }
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
                self.placement.group_is_in(&spec.name, self.id);
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
