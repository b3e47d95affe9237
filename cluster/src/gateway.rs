//! One gateway of a cluster: a broker core whose shards come and go as this gateway's
//! [`ShardManager`] says (`docs/design/sharding.md` sections 2 and 3).
//!
//! ```text
//!  ShardEvent::Acquired{shard, store} ──> broker.attach_shard(shard, store)
//!                                         + the shard's inbox served on the forward relay
//!                                         + its publishes served on the publish relay
//!                                         + its groups served on the consume relay
//!                                         + its topics and groups on the admin relay
//!                                         (a task per shard starts the four servers,
//!                                         again until they start, and holds them)
//!  ShardEvent::Release{shard, done}   ──> relay servers stopped (awaited),
//!                                         broker.detach_shard(shard)
//!                                         (groups commit, tasks end, store flushed), done
//!  ShardEvent::Lost{shard}            ──> the same, nothing to answer (another gateway
//!                                         fenced the log: the store refuses writes)
//! ```
//! The broker's forwarders, publishers and consumers reach a shard owned elsewhere
//! through [`NatsLink`]: the relays' queue groups on that shard's subjects, answered by
//! whichever gateway owns it now.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mqgate_core::outbox::{ForwardTarget, ShardId};
use mqgate_core::shard::{AdminAnswer, AdminOp, ClusterLink};
use mqgate_core::{
    Broker, Clock, Consumer, CoreConfig, GroupSpec, MemberOptions, PublishBatch, Result, Submitted,
};
use mqgate_store::jetstream::Nats;
use mqgate_store::{GroupName, Store};
use tokio::sync::mpsc;

use crate::manager::{ManagerConfig, ShardEvent, ShardManager};
use crate::placement::GroupBook;
use crate::relay::admin::{AdminServer, NatsAdmin};
use crate::relay::consume::{ConsumeServer, NatsConsumers};
use crate::relay::forward::{ForwardServer, NatsForwardTarget};
use crate::relay::publish::{NatsPublisher, PublishServer};
use crate::relay::Faults;

/// How a broker reaches shards owned by other gateways: over core NATS.
#[derive(Debug)]
pub struct NatsLink {
    client: async_nats::Client,
    stream: String,
    timeout: Duration,
    publisher: NatsPublisher,
    consumers: NatsConsumers,
    admin: NatsAdmin,
    groups: Option<GroupBook>,
    /// The live gateways (set once the manager runs): how many answers a routing
    /// barrier waits for.
    live: parking_lot::Mutex<Option<tokio::sync::watch::Receiver<crate::nodes::LiveSet>>>,
    /// This gateway's node id.
    node: String,
    /// The live gateways' runs (set once the manager runs), and how long one may be
    /// missing before it is gone (the node TTL).
    runs: parking_lot::Mutex<
        Option<(
            tokio::sync::watch::Receiver<crate::nodes::LiveRuns>,
            Duration,
        )>,
    >,
}

/// How long shard 0's owner waits for every live gateway to apply a routing change
/// before it answers anyway (a gateway that slow is cut off by its node key soon).
const ROUTING_BARRIER: Duration = Duration::from_secs(3);

/// The subject every gateway answers routing barriers on.
fn barrier_subject(stream: &str) -> String {
    format!("mqgate.{stream}.meta.barrier")
}

impl NatsLink {
    /// The link of the cluster of `stream`; a relayed request unanswered within
    /// `timeout` fails (and is retried by its caller).
    pub fn new(client: async_nats::Client, stream: &str, timeout: Duration) -> Self {
        Self::for_node(client, stream, timeout, String::new())
    }

    /// [`NatsLink::new`] for gateway `node`.
    pub fn for_node(
        client: async_nats::Client,
        stream: &str,
        timeout: Duration,
        node: String,
    ) -> Self {
        Self {
            publisher: NatsPublisher::new(client.clone(), stream, timeout),
            consumers: NatsConsumers::new(client.clone(), stream, timeout),
            admin: NatsAdmin::new(client.clone(), stream, timeout),
            client,
            stream: stream.to_owned(),
            timeout,
            groups: None,
            live: parking_lot::Mutex::new(None),
            node,
            runs: parking_lot::Mutex::new(None),
        }
    }

    /// Record where groups live in `book` (without it, a group is found by name only
    /// where its placement follows from its name or it was seen).
    pub fn with_groups(mut self, book: GroupBook) -> Self {
        self.groups = Some(book);
        self
    }
}

#[async_trait::async_trait]
impl ClusterLink for NatsLink {
    fn node(&self) -> String {
        self.node.clone()
    }

    fn live_runs(&self) -> Option<mqgate_core::LiveRuns> {
        let runs = self.runs.lock();
        let (rx, grace) = runs.as_ref()?;
        let runs = rx.borrow().clone();
        // Nothing listed yet (the first listing failed): nothing is judged gone.
        (!runs.is_empty()).then_some(mqgate_core::LiveRuns {
            runs,
            grace: *grace,
        })
    }

    async fn publish(&self, shard: ShardId, batch: PublishBatch) -> Result<Submitted> {
        self.publisher.publish(shard, batch).await
    }

    async fn subscribe(
        &self,
        shard: ShardId,
        spec: GroupSpec,
        member: MemberOptions,
    ) -> Result<Consumer> {
        self.consumers.subscribe(shard, spec, member).await
    }

    async fn admin(&self, shard: ShardId, op: AdminOp) -> Result<AdminAnswer> {
        if let AdminOp::GroupInfo(group) = &op {
            // Counts read after this gateway's members acked or requeued see it.
            self.consumers.settle_group(group).await;
        }
        self.admin.run(shard, op).await
    }

    async fn routing_barrier(&self, position: u64) {
        use futures_util::StreamExt;
        let want = match &*self.live.lock() {
            Some(live) => live.borrow().len(),
            None => return,
        };
        if want <= 1 {
            return;
        }
        let inbox = self.client.new_inbox();
        let Ok(mut answers) = self.client.subscribe(inbox.clone()).await else {
            return;
        };
        let asked = self
            .client
            .publish_with_reply(
                barrier_subject(&self.stream),
                inbox,
                bytes::Bytes::copy_from_slice(&position.to_be_bytes()),
            )
            .await;
        if asked.is_err() {
            return;
        }
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + ROUTING_BARRIER;
        while got < want {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(_)) => got += 1,
                _ => {
                    tracing::warn!(position, answered = got, live = want, "cluster: not every gateway applied a routing change in time; answering anyway");
                    return;
                }
            }
        }
    }

    async fn record_group(&self, group: &GroupName, proposed: ShardId) -> Result<ShardId> {
        match &self.groups {
            Some(b) => b.record(group, proposed).await,
            None => Ok(proposed),
        }
    }

    async fn forget_group(&self, group: &GroupName) -> Result<()> {
        match &self.groups {
            Some(b) => b.forget(group).await,
            None => Ok(()),
        }
    }

    fn forward_target(&self, dest: ShardId) -> Arc<dyn ForwardTarget> {
        Arc::new(NatsForwardTarget::new(
            self.client.clone(),
            &self.stream,
            dest,
            self.timeout,
        ))
    }
}

/// A running gateway: its broker and the manager of its shards.
#[derive(Debug)]
pub struct Gateway {
    broker: Broker,
    manager: Option<ShardManager>,
    driver: tokio::task::JoinHandle<()>,
    /// The follower of the routing state (`meta.rs`).
    follower: tokio::task::JoinHandle<()>,
    /// The follower of the groups' placement records.
    placement: tokio::task::JoinHandle<()>,
    /// What answers shard 0's owner's routing barriers.
    barrier: tokio::task::JoinHandle<()>,
    faults: Arc<Faults>,
    nats: Nats,
    shards: u16,
}

impl Gateway {
    /// Join the cluster `nats` connects to as its node, with a broker core of
    /// `cfg.shards` shards that owns what the manager hands it.
    pub async fn start(
        nats: Nats,
        mut cfg: ManagerConfig,
        core: CoreConfig,
        clock: Arc<dyn Clock>,
        relay_timeout: Duration,
    ) -> Result<Self, String> {
        let client = nats.jetstream().client();
        let stream = nats.config().stream.clone();
        let book = GroupBook::open(&nats).await?;
        let link = Arc::new(
            NatsLink::for_node(
                client.clone(),
                &stream,
                relay_timeout,
                nats.node_id().to_owned(),
            )
            .with_groups(book.clone()),
        );

        let broker = Broker::start_cluster(cfg.shards, link.clone(), core, clock)
            .map_err(|e| format!("start the core: {e}"))?;
        let barrier = tokio::spawn(answer_barriers(
            client.clone(),
            stream.clone(),
            broker.clone(),
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let faults = Arc::new(Faults::default());
        let driver = tokio::spawn(drive(
            broker.clone(),
            client,
            stream,
            relay_timeout,
            Arc::clone(&faults),
            rx,
        ));
        let follower = tokio::spawn(crate::meta::follow(nats.clone(), broker.clone()));
        let placement = tokio::spawn(book.follow(broker.clone()));
        let shards = cfg.shards;
        cfg.run = broker.run().id;
        let node_ttl = cfg.node_ttl;
        let manager = ShardManager::start(nats.clone(), cfg, tx).await?;
        *link.live.lock() = Some(manager.live());
        *link.runs.lock() = Some((manager.runs(), node_ttl));
        Ok(Self {
            broker,
            manager: Some(manager),
            driver,
            follower,
            placement,
            barrier,
            faults,
            nats,
            shards,
        })
    }

    /// Wait until this gateway can serve clients: shard 0 (the routing state) has an
    /// owner and this gateway routes with its state. `false` if not within `timeout`.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.broker.routing_followed() && crate::status::owner(&self.nats, 0).await.is_some()
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The cluster's connection (for its status).
    pub fn nats(&self) -> &Nats {
        &self.nats
    }

    /// Every shard as the cluster sees it now (owner, standby, logs).
    pub async fn shards(&self) -> Vec<crate::status::ShardStatus> {
        crate::status::shards(&self.nats, self.shards).await
    }

    /// The broker core (what adapters serve).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Faults injected into the deliveries this gateway relays to members elsewhere
    /// (tests).
    pub fn delivery_faults(&self) -> &Faults {
        &self.faults
    }

    /// The shard manager.
    pub fn manager(&self) -> Option<&ShardManager> {
        self.manager.as_ref()
    }

    /// A planned leave: every owned shard is handed over (see [`ShardManager::leave`]),
    /// then the broker stops. Whether every shard was handed over within `timeout`.
    pub async fn leave(mut self, timeout: Duration) -> bool {
        let handed = match self.manager.take() {
            Some(m) => m.leave(timeout).await,
            None => true,
        };
        self.broker.shutdown().await;
        self.driver.abort();
        self.follower.abort();
        self.placement.abort();
        self.barrier.abort();
        // Its view is closed when this returns.
        let _ = (&mut self.follower).await;
        handed
    }

    /// Stop at once, as a crash looks to the others: no hand-over, the keys expire;
    /// whatever the broker still writes is refused by the fenced logs.
    pub fn abort(mut self) {
        if let Some(m) = self.manager.take() {
            m.abort();
        }
        self.driver.abort();
        self.follower.abort();
        self.placement.abort();
        self.barrier.abort();
        let broker = self.broker.clone();
        tokio::spawn(async move { broker.shutdown().await });
    }
}

/// Answer shard 0's owner's routing barriers: each once this gateway's router has
/// applied the position asked about (or it owns shard 0); not at all if that takes
/// longer than `ROUTING_BARRIER`.
async fn answer_barriers(client: async_nats::Client, stream: String, broker: Broker) {
    use futures_util::StreamExt;
    let Ok(mut asks) = client.subscribe(barrier_subject(&stream)).await else {
        tracing::error!("cluster: routing barriers cannot be answered (no subscription)");
        return;
    };
    while let Some(msg) = asks.next().await {
        let (Some(reply), Ok(pos)) = (msg.reply, <[u8; 8]>::try_from(&msg.payload[..])) else {
            continue;
        };
        let position = u64::from_be_bytes(pos);
        let (client, broker) = (client.clone(), broker.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + ROUTING_BARRIER;
            let applied =
                || broker.routing_applied() >= position || broker.owned_shards().contains(&0);
            while !applied() {
                if tokio::time::Instant::now() >= deadline {
                    // Not applied: no answer (the owner's wait says how many did).
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = client.publish(reply, bytes::Bytes::new()).await;
        });
    }
}

/// The relay servers of one owned shard (they stop when dropped).
struct Servers {
    _forward: ForwardServer,
    _publish: PublishServer,
    _consume: ConsumeServer,
    _admin: AdminServer,
}

/// What the relay servers of a shard are started with.
#[derive(Clone)]
struct ServerCtx {
    broker: Broker,
    client: async_nats::Client,
    stream: String,
    relay_timeout: Duration,
    faults: Arc<Faults>,
}

impl ServerCtx {
    /// Every relay server of `shard`, or the first failure (those started stop).
    async fn start(&self, shard: ShardId) -> Result<Servers> {
        if self.faults.fail_start() {
            return Err(mqgate_core::CoreError::Invalid(
                "a relay server start failed (injected)".into(),
            ));
        }
        let inbox = self
            .broker
            .inbox(shard)
            .ok_or(mqgate_core::CoreError::NotOwned(shard))?;
        let (c, st, b) = (&self.client, self.stream.as_str(), &self.broker);
        Ok(Servers {
            _forward: ForwardServer::start(
                c.clone(),
                st,
                shard,
                inbox,
                Arc::new(Faults::default()),
            )
            .await?,
            _publish: PublishServer::start(c.clone(), st, shard, b.clone()).await?,
            _consume: ConsumeServer::start(
                c.clone(),
                st,
                shard,
                b.clone(),
                self.relay_timeout,
                Arc::clone(&self.faults),
            )
            .await?,
            _admin: AdminServer::start(c.clone(), st, shard, b.clone()).await?,
        })
    }

    /// A task that starts `shard`'s relay servers, again (100 ms, doubling to 2 s)
    /// until they start, and holds them until it is aborted (the shard let go, or the
    /// gateway stopped: dropped): a shard owned here is never left unserved.
    fn serve(self, shard: ShardId) -> ServingShard {
        ServingShard(tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            let _servers = loop {
                match self.start(shard).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::error!(shard, error = %e, retry_in = ?pause, "cluster: the shard's relay servers did not start; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            };
            std::future::pending::<()>().await;
        }))
    }
}

/// The task holding a shard's relay servers: stopped when dropped (the driver ends
/// with the gateway, and its servers with it).
struct ServingShard(tokio::task::JoinHandle<()>);

impl Drop for ServingShard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stop shard `shard`'s relay servers (if any), and wait until they are.
async fn stop_serving(serving: &mut HashMap<ShardId, ServingShard>, shard: ShardId) {
    if let Some(mut s) = serving.remove(&shard) {
        s.0.abort();
        let _ = (&mut s.0).await;
    }
}

/// Apply the manager's events to the broker until the manager goes.
async fn drive(
    broker: Broker,
    client: async_nats::Client,
    stream: String,
    relay_timeout: Duration,
    faults: Arc<Faults>,
    mut events: mpsc::UnboundedReceiver<ShardEvent>,
) {
    let ctx = ServerCtx {
        broker: broker.clone(),
        client,
        stream,
        relay_timeout,
        faults,
    };
    let mut serving: HashMap<ShardId, ServingShard> = HashMap::new();
    while let Some(e) = events.recv().await {
        match e {
            ShardEvent::Acquired { shard, store, .. } => {
                let store: Arc<dyn Store> = store;
                if let Err(e) = broker.attach_shard(shard, store).await {
                    tracing::error!(shard, error = %e, "cluster: attaching an acquired shard failed");
                    continue;
                }
                stop_serving(&mut serving, shard).await;
                serving.insert(shard, ctx.clone().serve(shard));
            }
            ShardEvent::Release { shard, done, to } => {
                stop_serving(&mut serving, shard).await;
                broker.detach_shard(shard).await;
                tracing::info!(shard, to, "cluster: shard released");
                let _ = done.send(());
            }
            ShardEvent::Lost { shard, reason } => {
                stop_serving(&mut serving, shard).await;
                broker.detach_shard(shard).await;
                tracing::warn!(shard, reason, "cluster: shard lost");
            }
        }
    }
}
