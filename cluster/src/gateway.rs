//! One gateway of a cluster: a broker core whose shards come and go as this gateway's
//! [`ShardManager`] says (`docs/design/sharding.md` sections 2 and 3).
//!
//! ```text
//!  ShardEvent::Acquired{shard, store} ──> broker.attach_shard(shard, store)
//!                                         + the shard's inbox served on the forward relay
//!                                         + its publishes served on the publish relay
//!                                         + its groups served on the consume relay
//!                                         + its topics and groups on the admin relay
//!  ShardEvent::Release{shard, done}   ──> relay server stopped, broker.detach_shard(shard)
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
}

impl NatsLink {
    /// The link of the cluster of `stream`; a relayed request unanswered within
    /// `timeout` fails (and is retried by its caller).
    pub fn new(client: async_nats::Client, stream: &str, timeout: Duration) -> Self {
        Self {
            publisher: NatsPublisher::new(client.clone(), stream, timeout),
            consumers: NatsConsumers::new(client.clone(), stream, timeout),
            admin: NatsAdmin::new(client.clone(), stream, timeout),
            client,
            stream: stream.to_owned(),
            timeout,
            groups: None,
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
        self.admin.run(shard, op).await
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
    faults: Arc<Faults>,
}

impl Gateway {
    /// Join the cluster `nats` connects to as its node, with a broker core of
    /// `cfg.shards` shards that owns what the manager hands it.
    pub async fn start(
        nats: Nats,
        cfg: ManagerConfig,
        core: CoreConfig,
        clock: Arc<dyn Clock>,
        relay_timeout: Duration,
    ) -> Result<Self, String> {
        let client = nats.jetstream().client();
        let stream = nats.config().stream.clone();
        let book = GroupBook::open(&nats).await?;
        let link = Arc::new(
            NatsLink::new(client.clone(), &stream, relay_timeout).with_groups(book.clone()),
        );
        let broker = Broker::start_cluster(cfg.shards, link, core, clock)
            .map_err(|e| format!("start the core: {e}"))?;
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
        let manager = ShardManager::start(nats, cfg, tx).await?;
        Ok(Self {
            broker,
            manager: Some(manager),
            driver,
            follower,
            placement,
            faults,
        })
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
        let broker = self.broker.clone();
        tokio::spawn(async move { broker.shutdown().await });
    }
}

/// The relay servers of one owned shard (they stop when dropped).
struct Servers {
    _forward: ForwardServer,
    _publish: Option<PublishServer>,
    _consume: Option<ConsumeServer>,
    _admin: Option<AdminServer>,
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
    let mut servers: HashMap<ShardId, Servers> = HashMap::new();
    while let Some(e) = events.recv().await {
        match e {
            ShardEvent::Acquired { shard, store, .. } => {
                let store: Arc<dyn Store> = store;
                if let Err(e) = broker.attach_shard(shard, store).await {
                    tracing::error!(shard, error = %e, "cluster: attaching an acquired shard failed");
                    continue;
                }
                let Some(inbox) = broker.inbox(shard) else {
                    continue;
                };
                match ForwardServer::start(
                    client.clone(),
                    &stream,
                    shard,
                    inbox,
                    Arc::new(Faults::default()),
                )
                .await
                {
                    Ok(forward) => {
                        let publish = PublishServer::start(client.clone(), &stream, shard, broker.clone())
                            .await
                            .map_err(|e| {
                                tracing::error!(shard, error = %e, "cluster: serving the shard's publishes failed")
                            })
                            .ok();
                        let consume = ConsumeServer::start(
                            client.clone(),
                            &stream,
                            shard,
                            broker.clone(),
                            relay_timeout,
                            Arc::clone(&faults),
                        )
                        .await
                        .map_err(|e| {
                            tracing::error!(shard, error = %e, "cluster: serving the shard's groups failed")
                        })
                        .ok();
                        let admin = AdminServer::start(client.clone(), &stream, shard, broker.clone())
                            .await
                            .map_err(|e| {
                                tracing::error!(shard, error = %e, "cluster: serving the shard's admin operations failed")
                            })
                            .ok();
                        servers.insert(
                            shard,
                            Servers {
                                _forward: forward,
                                _publish: publish,
                                _consume: consume,
                                _admin: admin,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(shard, error = %e, "cluster: serving the shard's inbox failed")
                    }
                }
            }
            ShardEvent::Release { shard, done, to } => {
                servers.remove(&shard);
                broker.detach_shard(shard).await;
                tracing::info!(shard, to, "cluster: shard released");
                let _ = done.send(());
            }
            ShardEvent::Lost { shard, reason } => {
                servers.remove(&shard);
                broker.detach_shard(shard).await;
                tracing::warn!(shard, reason, "cluster: shard lost");
            }
        }
    }
}
