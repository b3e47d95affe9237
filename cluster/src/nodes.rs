//! Which gateways are alive: a TTL key per gateway in the KV bucket `<stream>-nodes`.
//!
//! Each gateway puts its key every `node_ttl / 3`; the bucket's max age drops the key
//! of a gateway that stopped (SIGKILL, partition) `node_ttl` after its last put. Every
//! gateway lists the bucket at the same pace and publishes the live set on a watch
//! channel, sorted, so rendezvous answers change only when the set does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;

/// The live gateways, sorted by id.
pub type LiveSet = Vec<String>;

/// The liveness bucket of a cluster.
pub fn bucket_name(stream: &str) -> String {
    format!("{stream}-nodes")
}

/// This gateway's heartbeat and its view of the live set.
#[derive(Debug)]
pub struct Nodes {
    live: watch::Receiver<LiveSet>,
    task: tokio::task::JoinHandle<()>,
    draining: Arc<AtomicBool>,
    kv: kv::Store,
    node: String,
}

/// The value of an active gateway's key; a draining one (a planned leave) puts
/// [`DRAINING`] and is left out of every ranking while it hands its shards over.
pub const ACTIVE: &[u8] = b"active";
/// See [`ACTIVE`].
pub const DRAINING: &[u8] = b"draining";

impl Nodes {
    /// Start heartbeating as `node` in `<stream>-nodes` and watching the live set.
    /// Returns once the first listing (with this node in it) is known.
    pub async fn start(
        js: jetstream::Context,
        stream: &str,
        node: String,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Self, String> {
        let name = bucket_name(stream);
        let mut delay = Duration::from_millis(100);
        let kv = loop {
            match mqgate_store::jetstream::ensure_kv_bucket(&js, &name, ttl, replicas).await {
                Ok(kv) => break kv,
                Err(e) if delay < Duration::from_secs(8) => {
                    tracing::warn!(error = %e, "cluster: the node bucket is not ready; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        let (tx, live) = watch::channel(Vec::new());
        let draining = Arc::new(AtomicBool::new(false));
        beat(&kv, &node, false).await;
        tx.send_replace(list(&kv).await.unwrap_or_else(|| vec![node.clone()]));
        let every = (ttl / 3).max(Duration::from_millis(50));
        let (task_kv, task_node, task_draining) = (kv.clone(), node.clone(), Arc::clone(&draining));
        let task = tokio::spawn(async move {
            let (kv, node) = (task_kv, task_node);
            loop {
                tokio::time::sleep(every).await;
                let leaving = task_draining.load(Ordering::Acquire);
                beat(&kv, &node, leaving).await;
                if let Some(mut set) = list(&kv).await {
                    // This node is alive by definition while it runs, even if its last
                    // put has not landed (a slow quorum); unless it is leaving.
                    if leaving {
                        set.retain(|n| *n != node);
                    } else if !set.contains(&node) {
                        set.push(node.clone());
                        set.sort();
                    }
                    tx.send_if_modified(|cur| {
                        if *cur != set {
                            tracing::info!(live = ?set, "cluster: the live gateways changed");
                            *cur = set;
                            true
                        } else {
                            false
                        }
                    });
                }
            }
        });
        Ok(Self {
            live,
            task,
            draining,
            kv,
            node,
        })
    }

    /// A planned leave: from the next heartbeat on this node is `draining`, out of
    /// every ranking (its own included), so each shard it owns ranks another node first
    /// and is handed over.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The end of a planned leave: stop heartbeating and delete the key at once.
    pub async fn leave(&self) {
        self.task.abort();
        let _ = self.kv.delete(&self.node).await;
    }

    /// The live set, as it changes.
    pub fn live(&self) -> watch::Receiver<LiveSet> {
        self.live.clone()
    }

    /// Stop heartbeating (a planned leave deletes the key itself; a crash lets it
    /// expire).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn beat(kv: &kv::Store, node: &str, draining: bool) {
    let state = if draining { DRAINING } else { ACTIVE };
    if let Err(e) = kv.put(node, Bytes::from_static(state)).await {
        tracing::warn!(error = %e, "cluster: heartbeat not stored (NATS unavailable?)");
    }
}

/// The active gateways' keys (expired ones are gone, draining ones left out), sorted;
/// `None` when NATS does not answer (the last answer stands).
pub(crate) async fn list(kv: &kv::Store) -> Option<LiveSet> {
    let mut keys = kv.keys().await.ok()?;
    let mut names = Vec::new();
    while let Some(k) = keys.next().await {
        names.push(k.ok()?);
    }
    let mut out = Vec::new();
    for k in names {
        if let Ok(Some(v)) = kv.get(&k).await {
            if v.as_ref() == ACTIVE {
                out.push(k);
            }
        }
    }
    out.sort();
    out.dedup();
    Some(out)
}
