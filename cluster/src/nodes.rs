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

/// The runs of the live gateways (draining ones included: their clients are still
/// connected), sorted.
pub type LiveRuns = Vec<mqgate_core::Run>;

/// The liveness bucket of a cluster.
pub fn bucket_name(stream: &str) -> String {
    format!("{stream}-nodes")
}

/// This gateway's heartbeat and its view of the live set.
#[derive(Debug)]
pub struct Nodes {
    live: watch::Receiver<LiveSet>,
    runs: watch::Receiver<LiveRuns>,
    task: tokio::task::JoinHandle<()>,
    draining: Arc<AtomicBool>,
    kv: kv::Store,
    node: String,
}

/// The value of an active gateway's key (then a space and its run, in hex); a
/// draining one (a planned leave) puts [`DRAINING`] and is left out of every ranking
/// while it hands its shards over.
pub const ACTIVE: &[u8] = b"active";
/// See [`ACTIVE`].
pub const DRAINING: &[u8] = b"draining";

/// A key's value: its state and run.
fn value(draining: bool, run: u64) -> Bytes {
    let state = if draining { DRAINING } else { ACTIVE };
    let mut v = state.to_vec();
    v.extend_from_slice(format!(" {run:x}").as_bytes());
    Bytes::from(v)
}

/// A key's value read: whether it is active (else draining), and its run (0 when a
/// gateway of an earlier version put none).
fn parse(v: &[u8]) -> Option<(bool, u64)> {
    let (state, run) = match v.iter().position(|b| *b == b' ') {
        Some(i) => (&v[..i], std::str::from_utf8(&v[i + 1..]).ok()?),
        None => (v, "0"),
    };
    let run = u64::from_str_radix(run, 16).ok()?;
    match state {
        ACTIVE => Some((true, run)),
        DRAINING => Some((false, run)),
        _ => None,
    }
}

impl Nodes {
    /// Start heartbeating as run `run` of `node` in `<stream>-nodes` and watching the
    /// live set. Returns once the first listing (with this node in it) is known.
    pub async fn start(
        js: jetstream::Context,
        stream: &str,
        node: String,
        run: u64,
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
        let (runs_tx, runs) = watch::channel(Vec::new());
        let draining = Arc::new(AtomicBool::new(false));
        beat(&kv, &node, run, false).await;
        let first = listing(&kv).await;
        tx.send_replace(
            first
                .as_ref()
                .map_or_else(|| vec![node.clone()], |l| l.active.clone()),
        );
        runs_tx.send_replace(first.map(|l| l.runs).unwrap_or_default());
        let every = (ttl / 3).max(Duration::from_millis(50));
        let (task_kv, task_node, task_draining) = (kv.clone(), node.clone(), Arc::clone(&draining));
        let task = tokio::spawn(async move {
            let (kv, node) = (task_kv, task_node);
            loop {
                tokio::time::sleep(every).await;
                let leaving = task_draining.load(Ordering::Acquire);
                beat(&kv, &node, run, leaving).await;
                if let Some(l) = listing(&kv).await {
                    runs_tx.send_if_modified(|cur| {
                        let changed = *cur != l.runs;
                        *cur = l.runs;
                        changed
                    });
                    let mut set = l.active;
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
            runs,
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

    /// The live gateways' runs, as they change.
    pub fn runs(&self) -> watch::Receiver<LiveRuns> {
        self.runs.clone()
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

async fn beat(kv: &kv::Store, node: &str, run: u64, draining: bool) {
    if let Err(e) = kv.put(node, value(draining, run)).await {
        tracing::warn!(error = %e, "cluster: heartbeat not stored (NATS unavailable?)");
    }
}

/// What the node bucket lists.
pub(crate) struct Listing {
    /// The active gateways, sorted.
    pub(crate) active: LiveSet,
    /// Every listed gateway's run (draining ones too), sorted.
    pub(crate) runs: LiveRuns,
}

/// The active gateways' keys (expired ones are gone, draining ones left out), sorted;
/// `None` when NATS does not answer (the last answer stands).
pub(crate) async fn list(kv: &kv::Store) -> Option<LiveSet> {
    listing(kv).await.map(|l| l.active)
}

/// The longest one listing of the bucket may take. The key iterator
/// (`kv::Store::keys`) notes whether keys are pending when its consumer starts and then
/// ends only on a delivered key with none pending after it: a key whose max age passes
/// between the two is never delivered, and the wait never ended (a heartbeat task, or
/// a gateway's start, stuck for good; seen in `cluster/tests/fanout.rs` on a loaded
/// machine with a 3 s TTL).
const LISTING_TIMEOUT: Duration = Duration::from_secs(2);

/// The bucket's keys and runs; `None` when NATS does not answer (within
/// [`LISTING_TIMEOUT`]).
pub(crate) async fn listing(kv: &kv::Store) -> Option<Listing> {
    match tokio::time::timeout(LISTING_TIMEOUT, listing_now(kv)).await {
        Ok(l) => l,
        Err(_) => {
            tracing::warn!(
                "cluster: listing the live gateways took over {LISTING_TIMEOUT:?}; \
                 the last answer stands"
            );
            None
        }
    }
}

async fn listing_now(kv: &kv::Store) -> Option<Listing> {
    let mut keys = kv.keys().await.ok()?;
    let mut names = Vec::new();
    while let Some(k) = keys.next().await {
        names.push(k.ok()?);
    }
    let mut active = Vec::new();
    let mut runs = Vec::new();
    for k in names {
        if let Ok(Some(v)) = kv.get(&k).await {
            if let Some((is_active, run)) = parse(&v) {
                runs.push(mqgate_core::Run {
                    node: k.clone(),
                    id: run,
                });
                if is_active {
                    active.push(k);
                }
            }
        }
    }
    active.sort();
    active.dedup();
    runs.sort_by(|a, b| (&a.node, a.id).cmp(&(&b.node, b.id)));
    runs.dedup();
    Some(Listing { active, runs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        assert_eq!(parse(&value(false, 0xabc)), Some((true, 0xabc)));
        assert_eq!(parse(&value(true, u64::MAX)), Some((false, u64::MAX)));
        // Written by a gateway of an earlier version: no run.
        assert_eq!(parse(b"active"), Some((true, 0)));
        assert_eq!(parse(b"draining"), Some((false, 0)));
        assert_eq!(parse(b"active zz"), None);
        assert_eq!(parse(b"gone 1"), None);
    }
}
