//! Which gateways are alive: a TTL key per gateway in the KV bucket `<stream>-nodes`.
//!
//! Each gateway puts its key every `node_ttl / 3`; the bucket's max age drops the key
//! of a gateway that stopped (SIGKILL, partition) `node_ttl` after its last put. Every
//! gateway lists the bucket at the same pace and publishes the live set on a watch
//! channel, sorted, so rendezvous answers change only when the set does.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;

/// The live gateways, sorted by id.
pub type LiveSet = Vec<String>;

/// The liveness bucket of a cluster.
pub fn bucket_name(stream: &str) -> String {
    format!("{stream}-nodes")
}

async fn ensure_bucket(
    js: &jetstream::Context,
    name: &str,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store, String> {
    if let Ok(kv) = js.get_key_value(name).await {
        return Ok(kv);
    }
    js.create_key_value(kv::Config {
        bucket: name.to_owned(),
        history: 1,
        max_age: ttl,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("create the node bucket {name}: {e}"))
}

/// This gateway's heartbeat and its view of the live set.
#[derive(Debug)]
pub struct Nodes {
    live: watch::Receiver<LiveSet>,
    task: tokio::task::JoinHandle<()>,
}

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
            match ensure_bucket(&js, &name, ttl, replicas).await {
                Ok(kv) => break kv,
                Err(e) if delay < Duration::from_secs(8) => {
                    tracing::warn!(error = %e, "cluster: the node bucket is not ready; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(e),
            }
        };
        let (tx, live) = watch::channel(Vec::new());
        beat(&kv, &node).await;
        tx.send_replace(list(&kv).await.unwrap_or_else(|| vec![node.clone()]));
        let every = (ttl / 3).max(Duration::from_millis(50));
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                beat(&kv, &node).await;
                if let Some(mut set) = list(&kv).await {
                    // This node is alive by definition while it runs, even if its last
                    // put has not landed (a slow quorum).
                    if !set.contains(&node) {
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
        Ok(Self { live, task })
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

async fn beat(kv: &kv::Store, node: &str) {
    if let Err(e) = kv.put(node, Bytes::from_static(b"active")).await {
        tracing::warn!(error = %e, "cluster: heartbeat not stored (NATS unavailable?)");
    }
}

/// The keys of the bucket (the expired ones are gone), sorted; `None` when NATS does
/// not answer (the last answer stands).
async fn list(kv: &kv::Store) -> Option<LiveSet> {
    let mut keys = kv.keys().await.ok()?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        out.push(k.ok()?);
    }
    out.sort();
    out.dedup();
    Some(out)
}
