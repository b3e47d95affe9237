//! The per-(gateway, shard) state machine: every gateway runs one task per shard that
//! follows, takes, keeps or hands over that shard's log as the rendezvous ranking over
//! the live gateways says (`docs/design/sharding.md` section 3).
//!
//! ```text
//!  idle ──I rank 1st or 2nd──> following (the view tails the stream; reports progress)
//!  following ──I rank 1st, lease free, expired or handed to me──> owned: take_over
//!        (replay, fence) and ShardEvent::Acquired
//!  following ──I rank neither──> idle (the view is closed)
//!  owned ──another live node ranks 1st and reports itself within move_lag records──>
//!        ShardEvent::Release (the user stops writing and drops the store), hand-over
//!        record, lease moved to it, following (as its standby)
//!  owned ──fenced or lease lost──> ShardEvent::Lost, following
//! ```
//! A gateway that dies stops heartbeating: after `node_ttl` it leaves the live set, the
//! shards it ranked first in rank their standby first, and after `lease_ttl` the standby
//! takes the lease and fences the log. A gateway that joins ranks first in about
//! `S / N` shards: it follows them until caught up, then their owners hand them over.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use mqgate_store::jetstream::{Nats, OwnedShard, ReplicaSpec, ShardReplica};
use mqgate_store::RocksStore;
use tokio::sync::{mpsc, oneshot, watch, Mutex};

use crate::nodes::{LiveSet, Nodes};
use crate::placement::ShardId;
use crate::rendezvous::owner_and_standby;

/// How the shards of a cluster are managed.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// How many shards the cluster has.
    pub shards: u16,
    /// How long a gateway stays in the live set after its last heartbeat.
    pub node_ttl: Duration,
    /// How often each shard's state is looked at (and a standby's progress reported).
    pub tick: Duration,
    /// A planned move waits until the successor is within this many records.
    pub move_lag: u64,
    /// The run this gateway heartbeats ([`mqgate_core::Run`]; the gateway sets it from
    /// its broker).
    pub run: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            shards: 16,
            node_ttl: Duration::from_secs(3),
            tick: Duration::from_millis(250),
            move_lag: 1_000,
            run: 0,
        }
    }
}

/// What the manager tells the user of the stores (the broker core).
#[derive(Debug)]
pub enum ShardEvent {
    /// This gateway owns `shard` now: `store` is its log's only writer.
    Acquired {
        /// The shard.
        shard: ShardId,
        /// Its store.
        store: Arc<RocksStore>,
        /// The lease revision the log was taken with.
        epoch: u64,
    },
    /// A planned move to `to`: stop writing to `shard`'s store, drop every handle on
    /// it, then answer `done`. The manager appends the hand-over record after that.
    Release {
        /// The shard.
        shard: ShardId,
        /// The gateway that takes it.
        to: String,
        /// Answer once the store is no longer used.
        done: oneshot::Sender<()>,
    },
    /// The shard's store takes no more writes (another gateway fenced the log, or the
    /// lease was lost): drop it.
    Lost {
        /// The shard.
        shard: ShardId,
        /// Why.
        reason: String,
    },
}

struct Ctx {
    nats: Nats,
    node: String,
    cfg: ManagerConfig,
    events: mpsc::UnboundedSender<ShardEvent>,
    owned: Mutex<BTreeSet<ShardId>>,
}

/// One gateway's manager of every shard.
#[derive(Debug)]
pub struct ShardManager {
    nodes: Nodes,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("node", &self.node)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl ShardManager {
    /// Join the cluster as `nats`'s node and manage shards `0..cfg.shards`.
    pub async fn start(
        nats: Nats,
        cfg: ManagerConfig,
        events: mpsc::UnboundedSender<ShardEvent>,
    ) -> Result<Self, String> {
        let node = nats.node_id().to_owned();
        let nodes = Nodes::start(
            nats.jetstream().clone(),
            &nats.config().stream,
            node.clone(),
            cfg.run,
            cfg.node_ttl,
            nats.config().replicas,
        )
        .await?;
        let ctx = Arc::new(Ctx {
            nats,
            node,
            cfg,
            events,
            owned: Mutex::new(BTreeSet::new()),
        });
        let tasks = (0..ctx.cfg.shards)
            .map(|s| tokio::spawn(run_shard(Arc::clone(&ctx), nodes.live(), s)))
            .collect();
        Ok(Self { nodes, tasks, ctx })
    }

    /// The shards this gateway owns now.
    pub async fn owned(&self) -> BTreeSet<ShardId> {
        self.ctx.owned.lock().await.clone()
    }

    /// The live gateways as this one sees them.
    pub fn live(&self) -> watch::Receiver<LiveSet> {
        self.nodes.live()
    }

    /// The live gateways' runs as this one sees them.
    pub fn runs(&self) -> watch::Receiver<crate::nodes::LiveRuns> {
        self.nodes.runs()
    }

    /// A planned leave (SIGTERM): leave every ranking, hand each owned shard to the
    /// node that now ranks first once it has caught up (a hand-over record each, no
    /// lease left to expire), then stop and delete this node's key. Returns whether
    /// every shard was handed over within `timeout` (else the rest expire as after a
    /// crash).
    pub async fn leave(self, timeout: Duration) -> bool {
        self.nodes.drain();
        let deadline = tokio::time::Instant::now() + timeout;
        let handed = loop {
            if self.ctx.owned.lock().await.is_empty() {
                break true;
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(self.ctx.cfg.tick).await;
        };
        for t in &self.tasks {
            t.abort();
        }
        self.nodes.leave().await;
        handed
    }

    /// Stop at once, as a crash would look to the others: no hand-over; the heartbeat
    /// and the lease renewals stop, so the keys expire.
    pub fn abort(self) {
        self.nodes.stop();
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for ShardManager {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

enum State {
    Idle,
    Following(Box<ShardReplica>),
    Owned(Arc<RocksStore>, Box<OwnedShard>),
}

async fn run_shard(ctx: Arc<Ctx>, mut live: watch::Receiver<LiveSet>, shard: ShardId) {
    let tick = ctx.cfg.tick;
    let mut state = State::Idle;
    loop {
        let set = live.borrow_and_update().clone();
        let refs: Vec<&str> = set.iter().map(String::as_str).collect();
        let (first, second) = owner_and_standby(&refs, shard);
        let me = ctx.node.as_str();
        let first_me = first == Some(me);
        let second_me = second == Some(me);
        state = match state {
            State::Idle if first_me || second_me => {
                let spec = ReplicaSpec::shard(ctx.nats.config(), shard);
                match ShardReplica::open(&ctx.nats, spec).await {
                    Ok(r) => State::Following(Box::new(r)),
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "cluster: cannot follow the shard yet; retrying");
                        tokio::time::sleep(tick).await;
                        State::Idle
                    }
                }
            }
            State::Idle => {
                let _ = tokio::time::timeout(tick * 4, live.changed()).await;
                State::Idle
            }
            State::Following(r) if !first_me && !second_me => {
                // Neither owner nor standby: close the view (its drop flushes).
                let _ = tokio::task::spawn_blocking(move || drop(r)).await;
                State::Idle
            }
            State::Following(mut r) => {
                let took = if first_me {
                    r.try_acquire().await.unwrap_or_else(|e| {
                        tracing::warn!(shard, error = %e, "cluster: the lease cannot be read");
                        false
                    })
                } else {
                    false
                };
                if took {
                    match r.take_over().await {
                        Ok((store, owned)) => {
                            let store = Arc::new(store);
                            ctx.owned.lock().await.insert(shard);
                            tracing::info!(
                                shard,
                                epoch = owned.epoch(),
                                "cluster: this gateway owns the shard"
                            );
                            let _ = ctx.events.send(ShardEvent::Acquired {
                                shard,
                                store: Arc::clone(&store),
                                epoch: owned.epoch(),
                            });
                            State::Owned(store, Box::new(owned))
                        }
                        Err(e) => {
                            tracing::error!(shard, error = %e, "cluster: taking the shard over failed; following again");
                            tokio::time::sleep(tick).await;
                            State::Idle
                        }
                    }
                } else {
                    match r.follow(tokio::time::Instant::now() + tick).await {
                        Ok(applied) => {
                            r.report(applied).await;
                            State::Following(r)
                        }
                        Err(e) => {
                            tracing::warn!(shard, error = %e, "cluster: following the shard failed; starting again");
                            let _ = tokio::task::spawn_blocking(move || drop(r)).await;
                            tokio::time::sleep(tick).await;
                            State::Idle
                        }
                    }
                }
            }
            State::Owned(store, owned) if !owned.is_writer() => {
                ctx.owned.lock().await.remove(&shard);
                let reason = "the log was fenced or the lease lost".to_string();
                tracing::warn!(shard, %reason, "cluster: this gateway no longer owns the shard");
                let _ = ctx.events.send(ShardEvent::Lost { shard, reason });
                back_to_following(&ctx, shard, store, owned).await
            }
            State::Owned(store, mut owned) => match first.filter(|f| *f != me) {
                Some(to) if successor_ready(&ctx, &owned, to).await => {
                    let (done, wait) = oneshot::channel();
                    let _ = ctx.events.send(ShardEvent::Release {
                        shard,
                        to: to.to_owned(),
                        done,
                    });
                    // A user that dropped the channel has stopped using the store too.
                    let _ = wait.await;
                    ctx.owned.lock().await.remove(&shard);
                    match owned.hand_over(Some(to)).await {
                        Ok(seq) => {
                            tracing::info!(shard, to, seq, "cluster: shard handed over");
                        }
                        Err(e) => {
                            tracing::warn!(shard, to, error = %e, "cluster: the hand-over failed; the lease expires instead");
                        }
                    }
                    back_to_following(&ctx, shard, store, owned).await
                }
                _ => {
                    let _ = tokio::time::timeout(tick, live.changed()).await;
                    State::Owned(store, owned)
                }
            },
        };
    }
}

/// Whether `to` follows the shard within `move_lag` records of this owner.
async fn successor_ready(ctx: &Ctx, owned: &OwnedShard, to: &str) -> bool {
    match owned.reported(to).await {
        Some(r) if r.role == "standby" => owned.tip().saturating_sub(r.applied) <= ctx.cfg.move_lag,
        _ => false,
    }
}

/// Close the store once no one else holds it, and follow the log again.
async fn back_to_following(
    ctx: &Ctx,
    shard: ShardId,
    mut store: Arc<RocksStore>,
    owned: Box<OwnedShard>,
) -> State {
    let mut waited = Duration::ZERO;
    let store = loop {
        match Arc::try_unwrap(store) {
            Ok(s) => break s,
            Err(s) => {
                store = s;
                if waited == Duration::from_secs(5) {
                    tracing::warn!(
                        shard,
                        "cluster: the shard's store is still in use 5 s after its release"
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                waited += Duration::from_millis(20);
            }
        }
    };
    match owned.into_replica(store).await {
        Ok(r) => State::Following(Box::new(r)),
        Err(e) => {
            tracing::error!(shard, error = %e, "cluster: closing the shard's store failed");
            tokio::time::sleep(ctx.cfg.tick).await;
            State::Idle
        }
    }
}
