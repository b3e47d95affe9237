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
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::error::{Result, StoreError};
use crate::rocks::{RocksConfig, RocksStore};

mod lease;
mod log;
mod shard;
mod status;
pub mod testing;

pub use lease::ensure_kv_bucket;
pub use shard::{Nats, OwnedShard, ReplicaSpec, Reported, ShardReplica, SHARD_ID_SHIFT};
pub use status::{ClusterStatus, NodeStatus, ReplicaStatus, Replication};

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
/// On a hand-over record: `<from node>/<epoch> <to node or ->`.
pub const HDR_HANDOVER: &str = "Mqgate-Handover";

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

fn nats(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("NATS JetStream: {what}: {e}"))
}

/// How long creating a stream or bucket waits for the cluster to have peers for it.
const PLACEMENT_WAIT: Duration = Duration::from_secs(30);

/// `create` (a stream or a KV bucket), asked again while JetStream cannot place it for
/// now: no suitable peers (10005: a node starting, restarting, or not heard from for a
/// moment), no cluster yet (10008), or no answer in time. Anything else, or still so
/// after [`PLACEMENT_WAIT`], is the error. (async-nats gives a bucket's placement
/// error only as text, so the codes are read from it.)
pub(crate) async fn until_placed<T, E, F, Fut>(what: &str, mut create: F) -> Result<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    let since = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match create().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let text = e.to_string();
                let transient = ["error code 10005", "error code 10008", "timed out"]
                    .iter()
                    .any(|t| text.contains(t));
                if !transient || since.elapsed() >= PLACEMENT_WAIT {
                    return Err(nats(what, text));
                }
                tracing::warn!(error = %text, "replication: {what}: not placed yet; again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn lease_bucket(cfg: &JetStreamConfig) -> String {
    format!("{}-lease", cfg.stream)
}

/// Connect, check the servers, wait for the lease (tailing the log into the view
/// meanwhile), then open the view as the log's only writer. The returned
/// [`Replication`] hears each change of role, the standby's progress included.
pub async fn open(cfg: JetStreamConfig) -> Result<(RocksStore, Replication)> {
    let nats = Nats::connect(cfg).await?;
    let spec = ReplicaSpec::single(&nats.cfg);
    let replica = ShardReplica::open(&nats, spec).await?;
    let role = replica.role();
    let (store, owned) = replica.acquire().await?;
    let replication = Replication {
        role,
        js: owned.nats().js.clone(),
        cfg: Arc::clone(&owned.nats().cfg),
        log: Some(Arc::clone(&owned.log)),
    };
    Ok((store, replication))
}

/// Retry `step` while JetStream is not answering yet (a cluster still electing its
/// meta leader, or a busy one, times out requests), for up to a minute. Errors that are
/// not about time (a stream with another configuration) return at once.
async fn settle<T, F, Fut>(what: &str, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut delay = Duration::from_millis(100);
    loop {
        match step().await {
            Err(StoreError::Backend(e))
                if tokio::time::Instant::now() < deadline
                    && (e.contains("timed out") || e.contains("no responders")) =>
            {
                tracing::warn!(error = %e, "replication: JetStream does not answer about {what} yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
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

async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<stream::Stream> {
    let want = stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{name}.log")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        allow_direct: true,
        deny_delete: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let mut s = match js.get_stream(name).await {
        Ok(s) => s,
        Err(_) => {
            until_placed(&format!("create the stream {name}"), || {
                js.create_stream(want.clone())
            })
            .await?
        }
    };
    let have = s
        .info()
        .await
        .map_err(|e| nats("read the stream's config", e))?
        .config
        .clone();
    if have.num_replicas != replicas
        || have.storage != stream::StorageType::File
        || have.subjects != want.subjects
    {
        return Err(StoreError::Invalid(format!(
            "the stream {name} exists with {} replicas on {:?} storage for {:?}; this node wants \
             {replicas} on file storage for {:?}",
            have.num_replicas, have.storage, have.subjects, want.subjects
        )));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn creation_waits_for_placement_and_no_more() {
        // Not placed twice (a peer not heard from), then placed.
        let mut tries = 0;
        let got = until_placed("create the stream s", || {
            tries += 1;
            let n = tries;
            async move {
                if n < 3 {
                    Err("jetstream error: no suitable peers for placement, peer offline (code 400, error code 10005)")
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .expect("placed on the third try");
        assert_eq!(got, 3);
        // Any other refusal is the error at once.
        let mut tries = 0;
        let err = until_placed::<(), _, _, _>("create the stream s", || {
            tries += 1;
            async {
                Err("jetstream error: stream name already in use (code 400, error code 10058)")
            }
        })
        .await
        .expect_err("refused");
        assert_eq!(tries, 1);
        assert!(err.to_string().contains("10058"), "{err}");
        // Never placed: the error once the wait is over.
        let since = tokio::time::Instant::now();
        let err = until_placed::<(), _, _, _>("create the KV bucket b", || async {
            Err("jetstream error: JetStream cluster not available (code 503, error code 10008)")
        })
        .await
        .expect_err("not placed within the wait");
        assert!(since.elapsed() >= PLACEMENT_WAIT);
        assert!(err.to_string().contains("create the KV bucket b"), "{err}");
    }
}
