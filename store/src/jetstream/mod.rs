//! The jetstream backend: [`RocksStore`] as a local view of a log replicated on NATS
//! JetStream, with one fenced writer.
//!
//! - **The log** is one JetStream stream (file storage, R3 in production). Each group
//!   commit of the store's writer is one stream message: the bytes of the RocksDB write
//!   batch the writer built (split into parts when larger than the server's payload
//!   limit, applied only once complete). It is published with
//!   `Nats-Expected-Last-Sequence` = the last sequence this process appended and
//!   `Nats-Msg-Id` = node, epoch and sequence, and answered only once JetStream has
//!   acknowledged it (after a quorum has it on disk; the servers run with
//!   `sync_interval: always`). Then it is applied to the local RocksDB, whose own WAL is
//!   off.
//! - **The owner** is the node that holds the key `owner` in the KV bucket
//!   `<stream>-lease` (its revision is the epoch). The bucket's max age is the lease's
//!   time to live; the owner renews it with compare-and-set on the revision. A standby
//!   waits for the key to expire while it tails the stream into its own view; then it
//!   takes the key, catches up, and appends a **fence** record with the expected last
//!   sequence. A paused or partitioned old owner's next append fails that check
//!   (JetStream error 10071): it steps down and never answers a writer as if it had
//!   stored anything. Safety rests on the sequence check, not on clocks: the lease only
//!   decides who should try.
//!
//! See ARCHITECTURE.md ("Replication on NATS JetStream").

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, DeliverPolicy},
    context::PublishErrorKind,
    kv,
    message::PublishMessage,
    stream,
};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::error::{Result, StoreError};
use crate::rocks::{ApplyRecord, ExternalLog, RocksConfig, RocksStore, View};

pub mod testing;

/// The oldest NATS server with what this design needs (`sync_interval: always`,
/// expected-sequence checks that hold across leader changes, KV max age).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 12);

const LEASE_KEY: &str = "owner";
/// `node.<id>` = `<role> <applied>`: each gateway's report of itself.
const NODE_KEY_PREFIX: &str = "node.";
const HDR_MSG_ID: &str = "Nats-Msg-Id";
/// `i/n` on the parts of a record split over several stream messages (1-based).
const HDR_PART: &str = "Mqgate-Part";
/// On a fence record: the node and epoch that appended it.
const HDR_FENCE: &str = "Mqgate-Fence";
/// On a record with appends (each part): the first message id it appends.
const HDR_FIRST_ID: &str = "Mqgate-First-Id";

/// How the jetstream backend is opened.
#[derive(Clone, Debug)]
pub struct JetStreamConfig {
    /// NATS server URLs (`nats://host:port`); the client fails over between them.
    pub servers: Vec<String>,
    /// The stream that holds the log (its subject is `<stream>.log`); the lease bucket
    /// is `<stream>-lease`.
    pub stream: String,
    /// This gateway's name: in the lease, the message ids and the fence records.
    pub node_id: String,
    /// Replicas of the stream and the lease bucket (3 in production; the servers must
    /// form a cluster of at least that many).
    pub replicas: usize,
    /// How long an owner that stopped renewing keeps the lease.
    pub lease_ttl: Duration,
    /// User and password, when the servers want them.
    pub user: Option<(String, String)>,
    /// A token, when the servers want one.
    pub token: Option<String>,
    /// A CA file for TLS (`tls://` URLs or servers that require TLS).
    pub tls_ca_file: Option<PathBuf>,
    /// The local view: a RocksDB folder and its settings (`fsync` is ignored: the
    /// log's quorum is the durability).
    pub view: RocksConfig,
}

impl JetStreamConfig {
    /// Defaults for one node of a 3-replica log on `servers`.
    pub fn new(servers: Vec<String>, node_id: impl Into<String>, view: RocksConfig) -> Self {
        Self {
            servers,
            stream: "mqgate".into(),
            node_id: node_id.into(),
            replicas: 3,
            lease_ttl: Duration::from_secs(10),
            user: None,
            token: None,
            tls_ca_file: None,
            view,
        }
    }
}

/// Where this node stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Waiting for the lease; the view holds the log up to `applied` of `last`.
    Standby {
        /// Last record applied to the view.
        applied: u64,
        /// The stream's last sequence when last looked at.
        last: u64,
    },
    /// The only writer, since the lease revision `epoch`.
    Owner {
        /// The lease revision this node took the log with.
        epoch: u64,
    },
    /// No longer the writer: another node fenced the log, the lease was taken, or the
    /// view failed. The process must drop its clients and stop (a restart comes back
    /// as a standby).
    SteppedDown {
        /// Why.
        reason: String,
    },
}

/// The replication side of an open jetstream store: the node's role, and the stream's
/// state for `mqgate cluster status`.
#[derive(Debug, Clone)]
pub struct Replication {
    role: watch::Receiver<Role>,
    js: jetstream::Context,
    cfg: Arc<JetStreamConfig>,
    log: Option<Arc<JsLog>>,
}

/// One replica of the stream, as JetStream reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The NATS server's name.
    pub name: String,
    /// Whether it leads the stream's Raft group.
    pub leader: bool,
    /// Whether it is caught up.
    pub current: bool,
    /// Whether the leader has lost it.
    pub offline: bool,
    /// Operations it is behind, when known.
    pub lag: u64,
}

/// What `mqgate cluster status` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The stream's name.
    pub stream: String,
    /// This node.
    pub node: String,
    /// This node's role.
    pub role: Role,
    /// The node holding the lease and the lease's current revision (it moves at each
    /// renewal; the owner's epoch is the revision it took the log with), if any.
    pub owner: Option<(String, u64)>,
    /// The stream's first and last sequence.
    pub first_seq: u64,
    /// Last sequence.
    pub last_seq: u64,
    /// Records this node's view has applied.
    pub applied: u64,
    /// The stream's replicas.
    pub replicas: Vec<ReplicaStatus>,
    /// The gateways that reported in the last `lease_ttl`: the owner and the standbys.
    pub nodes: Vec<NodeStatus>,
}

/// A gateway as it last reported itself (key `node.<id>` in the lease bucket, renewed
/// every second or so; it disappears `lease_ttl` after the node stops).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// Its node id.
    pub node: String,
    /// `owner` or `standby`.
    pub role: String,
    /// The last record its view has applied.
    pub applied: u64,
    /// Records it is behind the stream's last sequence.
    pub lag: u64,
}

impl Replication {
    /// This node's role now.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Wait until this node steps down; returns why.
    pub async fn stepped_down(&mut self) -> String {
        loop {
            if let Role::SteppedDown { reason } = &*self.role.borrow_and_update() {
                return reason.clone();
            }
            if self.role.changed().await.is_err() {
                return "the replication task ended".into();
            }
        }
    }

    /// The stream, the lease and the replicas, as JetStream reports them now.
    pub async fn status(&self) -> Result<ClusterStatus> {
        let mut stream = self
            .js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| nats("look up the stream", e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| nats("read the stream's state", e))?
            .clone();
        let mut replicas = Vec::new();
        if let Some(c) = &info.cluster {
            if let Some(l) = &c.leader {
                replicas.push(ReplicaStatus {
                    name: l.clone(),
                    leader: true,
                    current: true,
                    offline: false,
                    lag: 0,
                });
            }
            for p in &c.replicas {
                replicas.push(ReplicaStatus {
                    name: p.name.clone(),
                    leader: false,
                    current: p.current,
                    offline: p.offline,
                    lag: p.lag.unwrap_or(0),
                });
            }
        }
        let owner = match self.js.get_key_value(lease_bucket(&self.cfg)).await {
            Ok(kv) => match kv.entry(LEASE_KEY).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => {
                    Some((String::from_utf8_lossy(&e.value).into_owned(), e.revision))
                }
                _ => None,
            },
            Err(_) => None,
        };
        let role = self.role();
        let applied = match (&role, &self.log) {
            (Role::Standby { applied, .. }, _) => *applied,
            (_, Some(log)) => log.tip.load(Ordering::Acquire),
            _ => 0,
        };
        let last_seq = info.state.last_sequence;
        let mut nodes = Vec::new();
        if let Ok(kv) = self.js.get_key_value(lease_bucket(&self.cfg)).await {
            if let Ok(mut keys) = kv.keys().await {
                while let Some(Ok(k)) = keys.next().await {
                    let Some(id) = k.strip_prefix(NODE_KEY_PREFIX) else {
                        continue;
                    };
                    if let Ok(Some(v)) = kv.get(&k).await {
                        let v = String::from_utf8_lossy(&v).into_owned();
                        let (role, at) = v.split_once(' ').unwrap_or(("?", "0"));
                        let at = at.parse().unwrap_or(0);
                        nodes.push(NodeStatus {
                            node: id.to_string(),
                            role: role.to_string(),
                            applied: at,
                            lag: last_seq.saturating_sub(at),
                        });
                    }
                }
            }
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(ClusterStatus {
            stream: self.cfg.stream.clone(),
            node: self.cfg.node_id.clone(),
            role,
            owner,
            first_seq: info.state.first_sequence,
            last_seq,
            applied,
            replicas,
            nodes,
        })
    }
}

fn nats(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("NATS JetStream: {what}: {e}"))
}

fn lease_bucket(cfg: &JetStreamConfig) -> String {
    format!("{}-lease", cfg.stream)
}

fn subject(cfg: &JetStreamConfig) -> String {
    format!("{}.log", cfg.stream)
}

/// Connect, check the servers, wait for the lease (tailing the log into the view
/// meanwhile), then open the view as the log's only writer. `on_role` hears each
/// change of role, the standby's progress included.
pub async fn open(cfg: JetStreamConfig) -> Result<(RocksStore, Replication)> {
    let cfg = Arc::new(cfg);
    let client = connect(&cfg).await?;
    check_server(&client)?;
    let js = jetstream::new(client.clone());
    let max_payload = client.server_info().max_payload.max(64 << 10);
    let mut stream = ensure_stream(&js, &cfg).await?;
    let lease = ensure_lease_bucket(&js, &cfg).await?;
    let (role_tx, role_rx) = watch::channel(Role::Standby {
        applied: 0,
        last: 0,
    });
    let role_tx = Arc::new(role_tx);

    // Standby: tail the log into the view until the lease is ours.
    let epoch = standby(&cfg, &mut stream, &lease, &role_tx).await?;
    tracing::info!(node = %cfg.node_id, epoch, "replication: this node holds the lease; catching up and fencing the log");

    let log = Arc::new(JsLog {
        rt: Handle::current(),
        js: js.clone(),
        stream: stream.clone(),
        subject: subject(&cfg),
        node: cfg.node_id.clone(),
        epoch,
        last: Mutex::new(0),
        part_bytes: (max_payload as usize).saturating_sub(8 << 10).max(32 << 10),
        role: Arc::clone(&role_tx),
        closing: AtomicBool::new(false),
        lost: AtomicBool::new(false),
        appended: AtomicU64::new(0),
        tip: AtomicU64::new(0),
    });
    let mut view = cfg.view.clone();
    view.external_log = Some(Arc::clone(&log) as Arc<dyn ExternalLog>);
    let store = tokio::task::spawn_blocking(move || RocksStore::open(view))
        .await
        .map_err(|e| StoreError::Backend(format!("open the view: {e}")))??;
    role_tx.send_replace(Role::Owner { epoch });
    tokio::spawn(renew_lease(
        lease,
        cfg.node_id.clone(),
        epoch,
        cfg.lease_ttl,
        Arc::clone(&log),
    ));
    Ok((
        store,
        Replication {
            role: role_rx,
            js,
            cfg,
            log: Some(log),
        },
    ))
}

async fn connect(cfg: &JetStreamConfig) -> Result<async_nats::Client> {
    if cfg.servers.is_empty() {
        return Err(StoreError::Invalid(
            "store.jetstream.servers lists no NATS server".into(),
        ));
    }
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("mqgate {}", cfg.node_id))
        .connection_timeout(Duration::from_secs(5))
        // Writers wait while the servers are away (back-pressure), never fail fast.
        .max_reconnects(None);
    if let Some((u, p)) = &cfg.user {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let mut delay = Duration::from_millis(200);
    loop {
        match opts.clone().connect(cfg.servers.clone()).await {
            Ok(c) => return Ok(c),
            Err(e)
                if e.kind() == async_nats::ConnectErrorKind::Io
                    || e.kind() == async_nats::ConnectErrorKind::TimedOut =>
            {
                tracing::warn!(servers = ?cfg.servers, error = %e, "replication: no NATS server answers yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(nats("connect", e)),
        }
    }
}

/// Refuse servers without what the design needs, in one line.
fn check_server(client: &async_nats::Client) -> Result<()> {
    let info = client.server_info();
    let version = parse_version(&info.version);
    if version < MIN_SERVER_VERSION {
        return Err(StoreError::Invalid(format!(
            "NATS server {} ({}) is older than {}.{}: it lacks `sync_interval: always` and \
             the expected-sequence checks the fenced writer relies on; run NATS's own release \
             binaries (2.12 or later)",
            info.server_name, info.version, MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1
        )));
    }
    if !info.jetstream {
        return Err(StoreError::Invalid(format!(
            "NATS server {} runs without JetStream: enable it (`jetstream {{ sync_interval: always }}`)",
            info.server_name
        )));
    }
    Ok(())
}

fn parse_version(v: &str) -> (u64, u64) {
    let mut it = v
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

async fn ensure_stream(js: &jetstream::Context, cfg: &JetStreamConfig) -> Result<stream::Stream> {
    let want = stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![subject(cfg)],
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        allow_direct: true,
        deny_delete: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let mut s = match js.get_stream(&cfg.stream).await {
        Ok(s) => s,
        Err(_) => js
            .create_stream(want.clone())
            .await
            .map_err(|e| nats(&format!("create the stream {}", cfg.stream), e))?,
    };
    let have = s
        .info()
        .await
        .map_err(|e| nats("read the stream's config", e))?
        .config
        .clone();
    if have.num_replicas != cfg.replicas
        || have.storage != stream::StorageType::File
        || have.subjects != want.subjects
    {
        return Err(StoreError::Invalid(format!(
            "the stream {} exists with {} replicas on {:?} storage for {:?}; this node wants {} \
             on file storage for {:?}",
            cfg.stream, have.num_replicas, have.storage, have.subjects, cfg.replicas, want.subjects
        )));
    }
    Ok(s)
}

async fn ensure_lease_bucket(js: &jetstream::Context, cfg: &JetStreamConfig) -> Result<kv::Store> {
    let name = lease_bucket(cfg);
    if let Ok(kv) = js.get_key_value(&name).await {
        return Ok(kv);
    }
    js.create_key_value(kv::Config {
        bucket: name.clone(),
        history: 1,
        max_age: cfg.lease_ttl,
        num_replicas: cfg.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| nats(&format!("create the lease bucket {name}"), e))
}

/// Take the lease if nobody holds it (or this node held it before a restart).
async fn try_acquire(lease: &kv::Store, node: &str) -> Result<Option<u64>> {
    match lease.create(LEASE_KEY, Bytes::from(node.to_owned())).await {
        Ok(rev) => Ok(Some(rev)),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            match lease.entry(LEASE_KEY).await {
                // Ours from before a restart: take it back at once.
                Ok(Some(e)) if e.operation == kv::Operation::Put && e.value == node.as_bytes() => {
                    match lease
                        .update(LEASE_KEY, Bytes::from(node.to_owned()), e.revision)
                        .await
                    {
                        Ok(rev) => Ok(Some(rev)),
                        Err(_) => Ok(None),
                    }
                }
                _ => Ok(None),
            }
        }
        Err(e) => Err(nats("take the lease", e)),
    }
}

/// Tail the log into the view until the lease is this node's; returns its revision.
async fn standby(
    cfg: &JetStreamConfig,
    stream: &mut stream::Stream,
    lease: &kv::Store,
    role: &watch::Sender<Role>,
) -> Result<u64> {
    let mut view: Option<View> = None;
    let mut tail: Option<Tail> = None;
    let mut said = false;
    loop {
        match try_acquire(lease, &cfg.node_id).await {
            Ok(Some(rev)) => return Ok(rev),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "replication: the lease could not be read; retrying")
            }
        }
        if view.is_none() {
            let path = cfg.view.path.clone();
            let vc = cfg.view.clone();
            view = Some(
                tokio::task::spawn_blocking(move || View::open(&vc))
                    .await
                    .map_err(|e| StoreError::Backend(format!("open the view: {e}")))?
                    .map_err(|e| {
                        StoreError::Backend(format!("open the view in {}: {e}", path.display()))
                    })?,
            );
        }
        let v = view.as_ref().expect("opened");
        if tail.is_none() {
            let from = v.applied()? + 1;
            tail = Some(Tail::start(stream, from).await?);
        }
        let t = tail.as_mut().expect("started");
        let last = stream
            .info()
            .await
            .map(|i| i.state.last_sequence)
            .unwrap_or(t.applied);
        if !said {
            tracing::info!(node = %cfg.node_id, applied = t.applied, last, "replication: standby; another node holds the lease; tailing the log");
            said = true;
        }
        // Apply what arrives for a while, then look at the lease again.
        let until = tokio::time::Instant::now() + cfg.lease_ttl.min(Duration::from_secs(1));
        t.apply_until(v, None, Some(until)).await?;
        role.send_replace(Role::Standby {
            applied: t.applied,
            last: last.max(t.applied),
        });
        report(lease, &cfg.node_id, "standby", t.applied).await;
    }
}

/// Put this node's role and position in the lease bucket (best effort: it is only for
/// `mqgate cluster status`).
async fn report(lease: &kv::Store, node: &str, role: &str, applied: u64) {
    let _ = lease
        .put(
            format!("{NODE_KEY_PREFIX}{node}"),
            Bytes::from(format!("{role} {applied}")),
        )
        .await;
}

/// An ordered read of the stream from a sequence, reassembling split records.
struct Tail {
    msgs: pull::Ordered,
    applied: u64,
    partial: Vec<u8>,
    parts_seen: u32,
}

impl Tail {
    async fn start(stream: &stream::Stream, from: u64) -> Result<Self> {
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| nats("read the log", e))?;
        let msgs = consumer
            .messages()
            .await
            .map_err(|e| nats("read the log", e))?;
        Ok(Self {
            msgs,
            applied: from.saturating_sub(1),
            partial: Vec::new(),
            parts_seen: 0,
        })
    }

    /// Apply records until `last` is applied (or seen: an incomplete record at the end
    /// is not applied), or until `deadline`.
    async fn apply_until(
        &mut self,
        view: &dyn Apply,
        last: Option<u64>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<()> {
        let mut seen = self.applied;
        loop {
            if last.is_some_and(|l| seen >= l) {
                return Ok(());
            }
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, self.msgs.next()).await {
                    Ok(n) => n,
                    Err(_) => return Ok(()),
                },
                None => self.msgs.next().await,
            };
            let m = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(nats("read the log", e)),
                None => return Err(nats("read the log", "the consumer ended")),
            };
            let seq = m
                .info()
                .map_err(|e| nats("read the log", e))?
                .stream_sequence;
            seen = seq;
            let part = m
                .headers
                .as_ref()
                .and_then(|h| h.get(HDR_PART))
                .and_then(|v| parse_part(v.as_str()));
            let first_id = m
                .headers
                .as_ref()
                .and_then(|h| h.get(HDR_FIRST_ID))
                .and_then(|v| v.as_str().parse::<u64>().ok());
            match part {
                None => {
                    // A whole record (an incomplete split one before it is dropped:
                    // its writer died between the parts).
                    self.partial.clear();
                    self.parts_seen = 0;
                    view.apply(seq, first_id, &m.payload)?;
                    self.applied = seq;
                }
                Some((i, n)) => {
                    if i == 1 {
                        self.partial.clear();
                        self.parts_seen = 0;
                    }
                    if i != self.parts_seen + 1 {
                        // A part without its predecessors: the rest of a dropped record.
                        continue;
                    }
                    self.partial.extend_from_slice(&m.payload);
                    self.parts_seen = i;
                    if i == n {
                        let record = std::mem::take(&mut self.partial);
                        self.parts_seen = 0;
                        view.apply(seq, first_id, &record)?;
                        self.applied = seq;
                    }
                }
            }
        }
    }
}

fn parse_part(v: &str) -> Option<(u32, u32)> {
    let (i, n) = v.split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// Where records are applied.
trait Apply {
    fn apply(&self, seq: u64, first_id: Option<u64>, record: &[u8]) -> Result<()>;
}

impl Apply for View {
    fn apply(&self, seq: u64, first_id: Option<u64>, record: &[u8]) -> Result<()> {
        View::apply(self, seq, first_id, record)
    }
}

struct ApplyFn<'a>(Mutex<ApplyRecord<'a>>);

impl Apply for ApplyFn<'_> {
    fn apply(&self, seq: u64, first_id: Option<u64>, record: &[u8]) -> Result<()> {
        (self.0.lock())(seq, first_id, record)
    }
}

/// Renew the lease every fifth of its time to live; losing it to another node steps
/// this one down.
async fn renew_lease(lease: kv::Store, node: String, mut rev: u64, ttl: Duration, log: Arc<JsLog>) {
    let every = (ttl / 5).max(Duration::from_millis(100));
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(every).await;
        if log.closing.load(Ordering::Acquire) || log.lost.load(Ordering::Acquire) {
            return;
        }
        report(&lease, &node, "owner", log.tip.load(Ordering::Acquire)).await;
        match lease
            .update(LEASE_KEY, Bytes::from(node.clone()), rev)
            .await
        {
            Ok(r) => {
                rev = r;
                if failing_since.take().is_some() {
                    tracing::info!("replication: the lease is renewed again");
                }
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Someone else's revision, or none: the key expired while NATS could not
                // renew it (a leader change), or an update of ours landed unacknowledged.
                match lease.entry(LEASE_KEY).await {
                    Ok(Some(e)) if e.operation == kv::Operation::Put => {
                        if e.value == node.as_bytes() {
                            rev = e.revision;
                            continue;
                        }
                        let holder = String::from_utf8_lossy(&e.value).into_owned();
                        log.lose(format!("the lease was lost; it is held by {holder}"));
                        return;
                    }
                    Ok(_) => {
                        // Expired and nobody took it: take it again. Safe either way: a
                        // node that took it meanwhile fences this one's next append.
                        match lease.create(LEASE_KEY, Bytes::from(node.clone())).await {
                            Ok(r) => {
                                tracing::warn!("replication: the lease had expired (NATS unavailable for longer than lease_ttl?); taken again");
                                rev = r;
                            }
                            Err(e) => {
                                log.lose(format!(
                                    "the lease expired and could not be taken again: {e}"
                                ));
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "replication: the lease cannot be read; retrying");
                    }
                }
            }
            Err(e) => {
                // No quorum, or the servers are away: keep trying. Safety does not
                // depend on it: a new owner's fence refuses this node's next append.
                if failing_since.is_none() {
                    failing_since = Some(std::time::Instant::now());
                    tracing::warn!(error = %e, "replication: the lease cannot be renewed (NATS unavailable?); retrying");
                }
            }
        }
    }
}

/// The log on JetStream, as [`RocksStore`]'s writer sees it.
#[derive(Debug)]
struct JsLog {
    rt: Handle,
    js: jetstream::Context,
    stream: stream::Stream,
    subject: String,
    node: String,
    epoch: u64,
    /// The last sequence appended (or applied at take-over).
    last: Mutex<u64>,
    /// The largest part of a split record.
    part_bytes: usize,
    role: Arc<watch::Sender<Role>>,
    closing: AtomicBool,
    lost: AtomicBool,
    /// Records appended since the take-over.
    appended: AtomicU64,
    /// `last`, readable without waiting for an append in progress.
    tip: AtomicU64,
}

/// How one publish ended.
enum Published {
    Stored,
    /// The stream's last sequence was not the expected one, and the record there is
    /// not this one: another writer appended.
    Conflict,
}

impl JsLog {
    fn lose(&self, reason: String) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::error!(node = %self.node, epoch = self.epoch, %reason, "replication: stepping down; this node no longer writes the log");
            metrics::counter!(crate::metrics::REPLICATION_STEP_DOWNS).increment(1);
            self.role.send_replace(Role::SteppedDown { reason });
        }
    }

    fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(StoreError::Backend(
                "this node no longer owns the replicated log (stepped down)".into(),
            ));
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// Publish one stream message as sequence `seq`, retrying while the servers are
    /// unavailable (the same message id: a retry of a publish that did land is
    /// deduplicated, or recognised by its id).
    fn publish(&self, seq: u64, payload: Bytes, headers: &[(&str, String)]) -> Result<Published> {
        let id = format!("{}.{}.{}", self.node, self.epoch, seq);
        let mut backoff = Duration::from_millis(20);
        let mut unavailable_since: Option<std::time::Instant> = None;
        loop {
            self.check()?;
            let msg = self.message(seq, payload.clone(), headers);
            let r = self.rt.block_on(async {
                let ack = self.js.send_publish(self.subject.clone(), msg).await?;
                ack.await
            });
            match r {
                Ok(ack) if ack.sequence == seq => {
                    if let Some(since) = unavailable_since {
                        metrics::gauge!(crate::metrics::REPLICATION_BLOCKED).set(0.0);
                        tracing::info!(
                            waited_ms = since.elapsed().as_millis() as u64,
                            "replication: the log takes writes again"
                        );
                    }
                    return Ok(Published::Stored);
                }
                Ok(ack) => {
                    return Err(StoreError::Backend(format!(
                        "NATS JetStream stored record {seq} as {} (the stream changed under this writer)",
                        ack.sequence
                    )));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return if self.holds(seq, &id)? {
                        Ok(Published::Stored)
                    } else {
                        Ok(Published::Conflict)
                    };
                }
                Err(e) => {
                    if unavailable_since.is_none() {
                        unavailable_since = Some(std::time::Instant::now());
                        metrics::gauge!(crate::metrics::REPLICATION_BLOCKED).set(1.0);
                        tracing::warn!(error = %e, seq, "replication: the log does not take writes (no quorum or no server); writers wait");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// The stream message for sequence `seq`.
    fn message(&self, seq: u64, payload: Bytes, headers: &[(&str, String)]) -> PublishMessage {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, v.as_str());
        }
        PublishMessage::build()
            .payload(payload)
            .headers(h)
            .expected_last_sequence(seq - 1)
            .message_id(format!("{}.{}.{}", self.node, self.epoch, seq))
    }

    /// Publish the parts of a split record all at once (each still expecting its
    /// predecessor's sequence), then await their acknowledgements in order: one round
    /// trip to the quorum instead of one per part. Returns how many, from the first,
    /// are stored; the rest go through [`JsLog::publish`] one by one.
    fn publish_parts(&self, base: u64, parts: &[(Bytes, Vec<(&str, String)>)]) -> usize {
        self.rt.block_on(async {
            let mut acks = Vec::with_capacity(parts.len());
            for (i, (payload, headers)) in parts.iter().enumerate() {
                let msg = self.message(base + 1 + i as u64, payload.clone(), headers);
                match self.js.send_publish(self.subject.clone(), msg).await {
                    Ok(ack) => acks.push(ack),
                    Err(_) => break,
                }
            }
            let mut stored = 0;
            for (i, ack) in acks.into_iter().enumerate() {
                match ack.await {
                    Ok(a) if a.sequence == base + 1 + i as u64 => stored += 1,
                    _ => break,
                }
            }
            stored
        })
    }

    /// Whether the stream's record `seq` is the one with message id `id`.
    fn holds(&self, seq: u64, id: &str) -> Result<bool> {
        let mut backoff = Duration::from_millis(20);
        for _ in 0..50 {
            self.check()?;
            match self.rt.block_on(self.stream.get_raw_message(seq)) {
                Ok(m) => {
                    return Ok(m.headers.get(HDR_MSG_ID).is_some_and(|v| v.as_str() == id));
                }
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                    return Ok(false)
                }
                Err(_) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
        Err(nats("check who appended a record", "no answer"))
    }

    fn fence(&self, last: u64) -> Result<Published> {
        let empty = Bytes::copy_from_slice(rocksdb::WriteBatch::default().data());
        self.publish(
            last + 1,
            empty,
            &[(HDR_FENCE, format!("{}/{}", self.node, self.epoch))],
        )
    }
}

impl ExternalLog for JsLog {
    fn take_over(&self, applied: u64, apply: ApplyRecord<'_>) -> Result<u64> {
        let apply = ApplyFn(Mutex::new(apply));
        let mut applied = applied;
        loop {
            self.check()?;
            let mut stream = self.stream.clone();
            let (first, last) = self
                .rt
                .block_on(stream.info())
                .map(|i| (i.state.first_sequence, i.state.last_sequence))
                .map_err(|e| nats("read the stream's state", e))?;
            if applied + 1 < first && last > 0 {
                return Err(StoreError::Backend(format!(
                    "the view has the log up to {applied} but the stream starts at {first}: \
                     remove the view's folder and start again to rebuild it"
                )));
            }
            if last > applied {
                applied = self.rt.block_on(async {
                    let mut t = Tail::start(&stream, applied + 1).await?;
                    t.apply_until(&apply, Some(last), None).await?;
                    Ok::<_, StoreError>(t.applied.max(applied))
                })?;
            }
            // Records seen but not applied (an incomplete split record) count too:
            // the fence goes after the stream's last sequence.
            let tip = last.max(applied);
            match self.fence(tip)? {
                Published::Stored => {
                    let fence = tip + 1;
                    apply.apply(fence, None, rocksdb::WriteBatch::default().data())?;
                    *self.last.lock() = fence;
                    self.tip.store(fence, Ordering::Release);
                    tracing::info!(node = %self.node, epoch = self.epoch, fence, "replication: the log is fenced; this node is its only writer");
                    return Ok(fence);
                }
                // The old owner appended after the catch-up: catch up again.
                Published::Conflict => continue,
            }
        }
    }

    fn append(&self, record: &[u8], first_id: Option<u64>) -> Result<u64> {
        let mut last = self.last.lock();
        let parts: Vec<&[u8]> = if record.is_empty() {
            vec![record]
        } else {
            record.chunks(self.part_bytes).collect()
        };
        let n = parts.len();
        let parts: Vec<(Bytes, Vec<(&str, String)>)> = parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut headers = Vec::new();
                if n > 1 {
                    headers.push((HDR_PART, format!("{}/{n}", i + 1)));
                }
                if let Some(id) = first_id {
                    headers.push((HDR_FIRST_ID, id.to_string()));
                }
                (Bytes::copy_from_slice(p), headers)
            })
            .collect();
        let base = *last;
        let pipelined = if n > 1 {
            self.publish_parts(base, &parts)
        } else {
            0
        };
        let mut seq = base + pipelined as u64;
        *last = seq;
        self.tip.store(seq, Ordering::Release);
        for (payload, headers) in parts.into_iter().skip(pipelined) {
            seq += 1;
            match self.publish(seq, payload, &headers) {
                Ok(Published::Stored) => {}
                Ok(Published::Conflict) => {
                    self.lose(format!(
                        "another node appended record {seq}: the log is fenced against this one"
                    ));
                    return Err(StoreError::Backend(
                        "this node no longer owns the replicated log (fenced)".into(),
                    ));
                }
                // Parts already stored are dropped by readers (incomplete); this
                // node appends nothing more (it stepped down or is closing).
                Err(e) => return Err(e),
            }
            *last = seq;
            self.tip.store(seq, Ordering::Release);
        }
        self.appended.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::REPLICATION_RECORDS).increment(1);
        Ok(seq)
    }

    fn purge_below(&self, seq: u64) -> Result<()> {
        self.check()?;
        let purged = self
            .rt
            .block_on(std::future::IntoFuture::into_future(
                self.stream.purge().sequence(seq),
            ))
            .map_err(|e| nats("purge the log below the retention checkpoint", e))?;
        tracing::info!(
            below = seq,
            records = purged.purged,
            "replication: records before the retention checkpoint purged from the log"
        );
        Ok(())
    }

    fn poison(&self, reason: &str) {
        self.lose(reason.to_string());
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }
}
