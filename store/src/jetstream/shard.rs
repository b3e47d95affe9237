//! One replicated log and its fenced writer, parametrised by name: the issue-11 log
//! (`open`: stream `<stream>`, lease `<stream>-lease`/`owner`) and each shard of a
//! cluster (issue 16: stream `<stream>-sNN`, lease `<stream>-leases`/`shard.NN`) are the
//! same machinery.
//!
//! ```text
//!  ShardReplica (follower)                     OwnedShard (the only writer)
//!    follow(): tail the stream into the view     RocksStore over JsLog, lease renewed
//!    try_acquire(): create the lease key  ──>    hand_over(to): stop renewing, append a
//!      (or take it back when it names us)          hand-over record (fenced like any
//!    take_over(): open the RocksStore, replay      append), close the log to writes,
//!      the stream, append a fence                  move the lease key to `to`
//!                                        <──     into_replica(store): close the store,
//!                                                  follow again (as `to`'s standby)
//! ```
//! A hand-over is planned: the old owner's last record says who comes next, and the
//! successor's fence follows it. The key naming the successor lets it take the lease at
//! once (the path a restarted owner uses). Safety is the fence, as always: an owner that
//! did not hand over (paused, partitioned) is refused its next append.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::lease::{ensure_kv_bucket, renew_lease, report, try_acquire, LeaseHold};
use super::log::{Apply, JsLog, Tail};
use super::{check_server, connect, ensure_stream, nats, settle, JetStreamConfig, Role};
use crate::error::{Result, StoreError};
use crate::rocks::{ExternalLog, RocksConfig, RocksStore, View};
use crate::store::KvChange;

/// The bits a shard's first id is shifted by (`RocksConfig::id_base`): ids name their
/// shard and stay below 2^53 with up to 512 shards.
pub const SHARD_ID_SHIFT: u32 = 44;

/// A connection to the NATS servers, shared by every replica of a process.
#[derive(Clone, Debug)]
pub struct Nats {
    pub(super) js: jetstream::Context,
    pub(super) cfg: Arc<JetStreamConfig>,
    max_payload: u64,
}

impl Nats {
    /// Connect (retrying while no server answers) and check the servers.
    pub async fn connect(cfg: JetStreamConfig) -> Result<Self> {
        let cfg = Arc::new(cfg);
        let client = connect(&cfg).await?;
        check_server(&client)?;
        let max_payload = client.server_info().max_payload.max(64 << 10) as u64;
        Ok(Self {
            js: jetstream::new(client),
            cfg,
            max_payload,
        })
    }

    /// What it was made with.
    pub fn config(&self) -> &JetStreamConfig {
        &self.cfg
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// The JetStream context (for the cluster's own buckets).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

/// Which log a replica follows and which lease key decides its writer.
#[derive(Clone, Debug)]
pub struct ReplicaSpec {
    /// The stream (its subject is `<stream>.log`).
    pub stream: String,
    /// The KV bucket of the lease.
    pub lease_bucket: String,
    /// The key in it that names the writer.
    pub lease_key: String,
    /// Each node reports `<role> <applied>` in the lease bucket under this prefix and
    /// its node id.
    pub status_prefix: String,
    /// The local view's folder and settings.
    pub view: RocksConfig,
}

impl ReplicaSpec {
    /// The issue-11 log: stream `<stream>`, key `owner` in `<stream>-lease`.
    pub fn single(cfg: &JetStreamConfig) -> Self {
        Self {
            stream: cfg.stream.clone(),
            lease_bucket: format!("{}-lease", cfg.stream),
            lease_key: super::LEASE_KEY.into(),
            status_prefix: super::NODE_KEY_PREFIX.into(),
            view: cfg.view.clone(),
        }
    }

    /// Shard `shard` of a cluster: stream `<stream>-sNN`, key `shard.NN` in
    /// `<stream>-leases`, ids from `shard << 44`, the view in `<view>/sNN`.
    pub fn shard(cfg: &JetStreamConfig, shard: u16) -> Self {
        let mut view = cfg.view.clone();
        view.path = view.path.join(format!("s{shard:02}"));
        view.id_base = u64::from(shard) << SHARD_ID_SHIFT;
        Self {
            stream: format!("{}-s{shard:02}", cfg.stream),
            lease_bucket: format!("{}-leases", cfg.stream),
            lease_key: format!("shard.{shard:02}"),
            status_prefix: format!("status.{shard:02}."),
            view,
        }
    }
}

impl ReplicaSpec {
    /// The key under which `node` reports itself.
    pub fn status_key(&self, node: &str) -> String {
        format!("{}{node}", self.status_prefix)
    }
}

/// What a node last reported about a log: its role and the last record it applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reported {
    /// `owner` or `standby`.
    pub role: String,
    /// The last record its view applied (an owner: the last it appended).
    pub applied: u64,
}

/// The report under `key` in `lease` (none: nothing reported within the bucket's max
/// age). A future that owns what it needs, so a spawned task may hold it.
fn reported(
    lease: &kv::Store,
    key: String,
) -> impl std::future::Future<Output = Option<Reported>> + Send + 'static {
    let lease = lease.clone();
    async move {
        let v = lease.get(key).await.ok()??;
        let v = String::from_utf8_lossy(&v).into_owned();
        let (role, applied) = v.split_once(' ')?;
        Some(Reported {
            role: role.to_owned(),
            applied: applied.parse().ok()?,
        })
    }
}

/// A follower of one log: it tails the stream into its view and may take the lease.
pub struct ShardReplica {
    nats: Nats,
    spec: Arc<ReplicaSpec>,
    stream: stream::Stream,
    lease: kv::Store,
    role: Arc<watch::Sender<Role>>,
    view: Option<View>,
    tail: Option<Tail>,
    /// The lease revision once [`ShardReplica::try_acquire`] took it.
    epoch: Option<u64>,
}

impl std::fmt::Debug for ShardReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReplica")
            .field("stream", &self.spec.stream)
            .field("node", &self.nats.cfg.node_id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// A view that also hands each record's keyed-area changes to a callback.
struct Reporting<'a> {
    view: &'a View,
    on_kv: Mutex<&'a mut (dyn FnMut(u64, Vec<KvChange>) + Send)>,
}

impl Apply for Reporting<'_> {
    fn apply(&self, seq: u64, first_id: Option<u64>, record: &[u8]) -> Result<()> {
        self.view.apply(seq, first_id, record)?;
        // Every record, changes or none: a follower knows how far it has applied.
        let changes = self.view.kv_changes(record);
        (self.on_kv.lock())(seq, changes);
        Ok(())
    }
}

impl ShardReplica {
    /// Make sure the stream and the lease bucket exist (as configured), and follow.
    pub async fn open(nats: &Nats, spec: ReplicaSpec) -> Result<Self> {
        let cfg = &nats.cfg;
        let stream = settle("the stream", || {
            ensure_stream(&nats.js, &spec.stream, cfg.replicas)
        })
        .await?;
        let lease = settle("the lease bucket", || {
            ensure_kv_bucket(&nats.js, &spec.lease_bucket, cfg.lease_ttl, cfg.replicas)
        })
        .await?;
        let (role, _) = watch::channel(Role::Standby {
            applied: 0,
            last: 0,
        });
        Ok(Self {
            nats: nats.clone(),
            spec: Arc::new(spec),
            stream,
            lease,
            role: Arc::new(role),
            view: None,
            tail: None,
            epoch: None,
        })
    }

    /// The log this replica follows.
    pub fn spec(&self) -> &ReplicaSpec {
        &self.spec
    }

    /// This replica's role, as it changes (a standby's progress included).
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// The last record applied to the view (0 before the view is open).
    pub fn applied(&self) -> u64 {
        self.tail.as_ref().map_or(0, |t| t.applied)
    }

    /// The stream's last sequence now.
    pub async fn last(&mut self) -> Result<u64> {
        self.stream
            .info()
            .await
            .map(|i| i.state.last_sequence)
            .map_err(|e| nats("read the stream's state", e))
    }

    /// Report this node as a standby at `applied` (for the owner deciding a hand-over,
    /// and `cluster status`).
    pub fn report(&self, applied: u64) -> impl std::future::Future<Output = ()> + Send + 'static {
        let lease = self.lease.clone();
        let key = self.spec.status_key(&self.nats.cfg.node_id);
        async move { report(&lease, &key, "standby", applied).await }
    }

    /// What `node` last reported about this log.
    pub fn reported(
        &self,
        node: &str,
    ) -> impl std::future::Future<Output = Option<Reported>> + Send + 'static {
        reported(&self.lease, self.spec.status_key(node))
    }

    /// Apply what arrives until `deadline`; returns the last record applied.
    pub async fn follow(&mut self, deadline: tokio::time::Instant) -> Result<u64> {
        self.follow_with(deadline, &mut |_, _| {}).await
    }

    /// [`ShardReplica::follow`], handing each applied record's keyed-area changes to
    /// `on_kv` (its sequence and the changes, in order; none for a record without
    /// any): what a follower of the meta stream keeps its router with.
    pub async fn follow_with(
        &mut self,
        deadline: tokio::time::Instant,
        on_kv: &mut (dyn FnMut(u64, Vec<KvChange>) + Send),
    ) -> Result<u64> {
        if self.view.is_none() {
            let vc = self.spec.view.clone();
            let path = vc.path.clone();
            self.view = Some(
                tokio::task::spawn_blocking(move || View::open(&vc))
                    .await
                    .map_err(|e| StoreError::Backend(format!("open the view: {e}")))?
                    .map_err(|e| {
                        StoreError::Backend(format!("open the view in {}: {e}", path.display()))
                    })?,
            );
        }
        let view = self.view.as_ref().expect("opened");
        if self.tail.is_none() {
            let from = view.applied()? + 1;
            self.tail = Some(Tail::start(&self.stream, from).await?);
        }
        let tail = self.tail.as_mut().expect("started");
        let apply = Reporting {
            view,
            on_kv: Mutex::new(on_kv),
        };
        tail.apply_until(&apply, None, Some(deadline)).await?;
        Ok(tail.applied)
    }

    /// Take the lease if nobody holds it, or if it names this node (a restart, or a
    /// hand-over to it). Returns whether this replica holds it now.
    pub async fn try_acquire(&mut self) -> Result<bool> {
        if self.epoch.is_some() {
            return Ok(true);
        }
        self.epoch = try_acquire(&self.lease, &self.spec.lease_key, &self.nats.cfg.node_id).await?;
        Ok(self.epoch.is_some())
    }

    /// Follow the log until the lease is this node's (trying every second), reporting
    /// progress as [`Role::Standby`], then take over: the issue-11 standby.
    pub async fn acquire(mut self) -> Result<(RocksStore, OwnedShard)> {
        let node = self.nats.cfg.node_id.clone();
        let mut said = false;
        loop {
            match self.try_acquire().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "replication: the lease could not be read; retrying")
                }
            }
            let until =
                tokio::time::Instant::now() + self.nats.cfg.lease_ttl.min(Duration::from_secs(1));
            let applied = self.follow(until).await?;
            let last = self.last().await.unwrap_or(applied);
            if !said {
                tracing::info!(node = %node, stream = %self.spec.stream, applied, last, "replication: standby; another node holds the lease; tailing the log");
                said = true;
            }
            self.role.send_replace(Role::Standby {
                applied,
                last: last.max(applied),
            });
            self.report(applied).await;
        }
        self.take_over().await
    }

    /// Once [`ShardReplica::try_acquire`] took the lease: open the view as the log's
    /// only writer (it replays the stream and appends a fence), and renew the lease.
    pub async fn take_over(mut self) -> Result<(RocksStore, OwnedShard)> {
        let Some(epoch) = self.epoch else {
            return Err(StoreError::Invalid(
                "take_over without the lease (try_acquire first)".into(),
            ));
        };
        // The view's folder is the store's: close the follower's handle first.
        self.tail = None;
        if let Some(v) = self.view.take() {
            tokio::task::spawn_blocking(move || drop(v))
                .await
                .map_err(|e| StoreError::Backend(format!("close the view: {e}")))?;
        }
        let cfg = &self.nats.cfg;
        tracing::info!(node = %cfg.node_id, stream = %self.spec.stream, epoch, "replication: this node holds the lease; catching up and fencing the log");
        let log = Arc::new(JsLog {
            rt: Handle::current(),
            js: self.nats.js.clone(),
            stream: self.stream.clone(),
            subject: format!("{}.log", self.spec.stream),
            node: cfg.node_id.clone(),
            epoch,
            last: Mutex::new(0),
            part_bytes: (self.nats.max_payload as usize)
                .saturating_sub(8 << 10)
                .max(32 << 10),
            role: Arc::clone(&self.role),
            closing: AtomicBool::new(false),
            closed: tokio::sync::Notify::new(),
            lost: AtomicBool::new(false),
            tip: AtomicU64::new(0),
        });
        let mut view = self.spec.view.clone();
        view.external_log = Some(Arc::clone(&log) as Arc<dyn ExternalLog>);
        let store = tokio::task::spawn_blocking(move || RocksStore::open(view))
            .await
            .map_err(|e| StoreError::Backend(format!("open the view: {e}")))??;
        self.role.send_replace(Role::Owner { epoch });
        let hold = Arc::new(LeaseHold {
            kv: self.lease.clone(),
            key: self.spec.lease_key.clone(),
            status_key: self.spec.status_key(&cfg.node_id),
            node: cfg.node_id.clone(),
            rev: AtomicU64::new(epoch),
        });
        // Say so at once (the renewals repeat it), for whoever reads the status.
        report(
            &self.lease,
            &hold.status_key,
            "owner",
            log.tip.load(Ordering::Acquire),
        )
        .await;
        let renew = tokio::spawn(renew_lease(
            Arc::clone(&hold),
            cfg.lease_ttl,
            Arc::clone(&log),
        ));
        Ok((
            store,
            OwnedShard {
                nats: self.nats,
                spec: self.spec,
                stream: self.stream,
                lease: self.lease,
                role: self.role,
                log,
                hold,
                renew: Some(renew),
                epoch,
            },
        ))
    }
}

/// The writer's side of a log this node owns (the store itself is returned beside it).
pub struct OwnedShard {
    nats: Nats,
    spec: Arc<ReplicaSpec>,
    stream: stream::Stream,
    lease: kv::Store,
    role: Arc<watch::Sender<Role>>,
    pub(super) log: Arc<JsLog>,
    hold: Arc<LeaseHold>,
    renew: Option<JoinHandle<()>>,
    epoch: u64,
}

impl std::fmt::Debug for OwnedShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedShard")
            .field("stream", &self.spec.stream)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl OwnedShard {
    /// The lease revision this node took the log with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The log this node writes.
    pub fn spec(&self) -> &ReplicaSpec {
        &self.spec
    }

    /// The last record appended.
    pub fn tip(&self) -> u64 {
        self.log.tip.load(Ordering::Acquire)
    }

    /// What `node` last reported about this log (a standby's progress).
    pub fn reported(
        &self,
        node: &str,
    ) -> impl std::future::Future<Output = Option<Reported>> + Send + 'static {
        reported(&self.lease, self.spec.status_key(node))
    }

    /// Whether this node still writes the log (not stepped down, not handed over).
    pub fn is_writer(&self) -> bool {
        matches!(&*self.role.borrow(), Role::Owner { .. })
    }

    /// This node's role for the log, as it changes (a step-down included).
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    pub(super) fn nats(&self) -> &Nats {
        &self.nats
    }

    /// Hand the log over (a planned move): the core has stopped writing to the store.
    /// Stops renewing the lease, appends a hand-over record naming `to` (fenced like any
    /// append: refused if this node was fenced meanwhile), closes the log to further
    /// writes (the store's writers get an error), and moves the lease key to `to` (or
    /// deletes it: `None`, the next ranking decides) so the successor takes it at once.
    /// Returns the hand-over record's sequence.
    pub async fn hand_over(&mut self, to: Option<&str>) -> Result<u64> {
        if let Some(r) = self.renew.take() {
            r.abort();
            let _ = r.await;
        }
        let log = Arc::clone(&self.log);
        let target = to.map(str::to_owned);
        let seq = tokio::task::spawn_blocking(move || log.hand_over(target.as_deref()))
            .await
            .map_err(|e| StoreError::Backend(format!("append the hand-over record: {e}")))??;
        let node = self.nats.cfg.node_id.clone();
        let key = &self.spec.lease_key;
        let mut rev = self.hold.rev.load(Ordering::Acquire);
        for _ in 0..5 {
            let moved = match to {
                Some(to) => self
                    .lease
                    .update(key, Bytes::from(to.to_owned()), rev)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => self
                    .lease
                    .delete_expect_revision(key, Some(rev))
                    .await
                    .map_err(|e| e.to_string()),
            };
            match moved {
                Ok(()) => break,
                // A renewal that landed unanswered moved the revision: read it again,
                // as long as the key is still ours.
                Err(e) => match self.lease.entry(key).await {
                    Ok(Some(en))
                        if en.operation == kv::Operation::Put && en.value == node.as_bytes() =>
                    {
                        rev = en.revision;
                    }
                    _ => {
                        // Not ours any more (expired): the ranking decides; the record
                        // already says the log was handed over.
                        tracing::warn!(error = %e, stream = %self.spec.stream, "replication: the lease could not be moved after the hand-over; it expires instead");
                        break;
                    }
                },
            }
        }
        self.role.send_replace(Role::SteppedDown {
            reason: format!(
                "handed over to {}",
                to.unwrap_or("whichever node ranks first")
            ),
        });
        tracing::info!(stream = %self.spec.stream, epoch = self.epoch, seq, to = to.unwrap_or("-"), "replication: the log is handed over");
        Ok(seq)
    }

    /// After [`OwnedShard::hand_over`] (or a step-down): close the store and follow the
    /// log again, as a standby. Every other handle on the store must be gone.
    pub async fn into_replica(mut self, store: RocksStore) -> Result<ShardReplica> {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
        self.log.close();
        tokio::task::spawn_blocking(move || drop(store))
            .await
            .map_err(|e| StoreError::Backend(format!("close the store: {e}")))?;
        self.role.send_replace(Role::Standby {
            applied: self.log.tip.load(Ordering::Acquire),
            last: self.log.tip.load(Ordering::Acquire),
        });
        Ok(ShardReplica {
            nats: self.nats,
            spec: self.spec,
            stream: self.stream,
            lease: self.lease,
            role: self.role,
            view: None,
            tail: None,
            epoch: None,
        })
    }
}
