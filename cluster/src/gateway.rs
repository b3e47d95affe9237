//! One gateway of a cluster: a broker core whose shards come and go as this gateway's
//! [`ShardManager`] says (`docs/design/sharding.md` sections 2 and 3).
//!
//! ```text
//!  ShardEvent::Acquired{shard, store} ──> broker.attach_shard(shard, store)
//!                                         + the shard's inbox served on the forward relay
//!                                         + its publishes served on the publish relay
//!  ShardEvent::Release{shard, done}   ──> relay server stopped, broker.detach_shard(shard)
//!                                         (groups commit, tasks end, store flushed), done
//!  ShardEvent::Lost{shard}            ──> the same, nothing to answer (another gateway
//!                                         fenced the log: the store refuses writes)
//! ```
//! The broker's forwarders and publishers reach a shard owned elsewhere through
//! [`NatsLink`]: the forward and publish relays' queue groups on that shard's
//! subjects, answered by whichever gateway owns it now.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mqgate_core::outbox::{ForwardTarget, ShardId};
use mqgate_core::shard::ClusterLink;
use mqgate_core::{Broker, Clock, CoreConfig, PublishBatch, Result, Submitted};
use mqgate_store::jetstream::Nats;
use mqgate_store::Store;
use tokio::sync::mpsc;

use crate::manager::{ManagerConfig, ShardEvent, ShardManager};
use crate::relay::forward::{Faults, ForwardServer, NatsForwardTarget};
use crate::relay::publish::{NatsPublisher, PublishServer};

/// How a broker reaches shards owned by other gateways: over core NATS.
#[derive(Debug)]
pub struct NatsLink {
    client: async_nats::Client,
    stream: String,
    timeout: Duration,
    publisher: NatsPublisher,
}

impl NatsLink {
    /// The link of the cluster of `stream`; a relayed request unanswered within
    /// `timeout` fails (and is retried by its caller).
    pub fn new(client: async_nats::Client, stream: &str, timeout: Duration) -> Self {
        Self {
            publisher: NatsPublisher::new(client.clone(), stream, timeout),
            client,
            stream: stream.to_owned(),
            timeout,
        }
    }
}

#[async_trait::async_trait]
impl ClusterLink for NatsLink {
    async fn publish(&self, shard: ShardId, batch: PublishBatch) -> Result<Submitted> {
        self.publisher.publish(shard, batch).await
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
        let link = Arc::new(NatsLink::new(client.clone(), &stream, relay_timeout));
        let broker = Broker::start_cluster(cfg.shards, link, core, clock)
            .map_err(|e| format!("start the core: {e}"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(broker.clone(), client, stream, rx));
        let manager = ShardManager::start(nats, cfg, tx).await?;
        Ok(Self {
            broker,
            manager: Some(manager),
            driver,
        })
    }

    /// The broker core (what adapters serve).
    pub fn broker(&self) -> &Broker {
        &self.broker
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
        handed
    }

    /// Stop at once, as a crash looks to the others: no hand-over, the keys expire;
    /// whatever the broker still writes is refused by the fenced logs.
    pub fn abort(mut self) {
        if let Some(m) = self.manager.take() {
            m.abort();
        }
        self.driver.abort();
        let broker = self.broker.clone();
        tokio::spawn(async move { broker.shutdown().await });
    }
}

/// Apply the manager's events to the broker until the manager goes.
async fn drive(
    broker: Broker,
    client: async_nats::Client,
    stream: String,
    mut events: mpsc::UnboundedReceiver<ShardEvent>,
) {
    let mut servers: HashMap<ShardId, (ForwardServer, Option<PublishServer>)> = HashMap::new();
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
                    Ok(s) => {
                        let p = PublishServer::start(client.clone(), &stream, shard, broker.clone())
                            .await
                            .map_err(|e| {
                                tracing::error!(shard, error = %e, "cluster: serving the shard's publishes failed")
                            })
                            .ok();
                        servers.insert(shard, (s, p));
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
