//! The lease that says which node should write a log (a key in a KV bucket: `owner` in
//! `<stream>-lease` for the issue-11 log, `shard.NN` in `<stream>-leases` for a shard),
//! taking it, and the owner's renewals. The standby's wait is `shard::ShardReplica`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;

use super::log::JsLog;
use super::nats;
use crate::error::Result;

/// Get or create the KV bucket `name` (file storage, one revision per key, keys expire
/// `ttl` after their last put): the lease buckets and the cluster's node bucket.
pub async fn ensure_kv_bucket(
    js: &jetstream::Context,
    name: &str,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store> {
    if let Ok(kv) = js.get_key_value(name).await {
        return Ok(kv);
    }
    let config = kv::Config {
        bucket: name.to_owned(),
        history: 1,
        max_age: ttl,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    super::until_placed(&format!("create the KV bucket {name}"), || {
        js.create_key_value(config.clone())
    })
    .await
}

/// Take the lease `key` if nobody holds it, or if it names this node (a restart, or a
/// hand-over to it).
///
/// A bucket another node has just created may not yet be known to the NATS server this
/// node talks to (JetStream places streams through its meta leader; the others learn of
/// it a moment later, answering "no stream found" until then), and a bucket's stream
/// just created may have no leader yet ("503 no responders"): such answers are tried
/// again for up to two seconds before they are an error.
pub(super) async fn try_acquire(lease: &kv::Store, key: &str, node: &str) -> Result<Option<u64>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match try_acquire_once(lease, key, node).await {
            Err(e) if tokio::time::Instant::now() < deadline && not_ready_yet(&e) => {
                tracing::debug!(error = %e, key, "replication: the lease bucket is not known or not led here yet; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

/// A just-created bucket this server does not know yet, or whose stream has no leader
/// yet (the answers [`try_acquire`] tries again).
fn not_ready_yet(e: &impl std::fmt::Display) -> bool {
    let e = e.to_string();
    e.contains("no stream found") || e.contains("no responders")
}

async fn try_acquire_once(lease: &kv::Store, key: &str, node: &str) -> Result<Option<u64>> {
    match lease.create(key, Bytes::from(node.to_owned())).await {
        Ok(rev) => Ok(Some(rev)),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => match lease.entry(key).await {
            // Ours from before a restart, or handed to us: take it at once.
            Ok(Some(e)) if e.operation == kv::Operation::Put && e.value == node.as_bytes() => {
                match lease
                    .update(key, Bytes::from(node.to_owned()), e.revision)
                    .await
                {
                    Ok(rev) => Ok(Some(rev)),
                    Err(_) => Ok(None),
                }
            }
            _ => Ok(None),
        },
        Err(e) => Err(nats("take the lease", e)),
    }
}

/// Put this node's role and position in the lease bucket (best effort: it is only for
/// `mqgate cluster status`).
pub(super) async fn report(lease: &kv::Store, status_key: &str, role: &str, applied: u64) {
    let _ = lease
        .put(status_key, Bytes::from(format!("{role} {applied}")))
        .await;
}

/// A lease this node holds: where it is, and its current revision (moved by each
/// renewal; a hand-over moves the key from it).
pub(super) struct LeaseHold {
    pub(super) kv: kv::Store,
    pub(super) key: String,
    pub(super) status_key: String,
    pub(super) node: String,
    pub(super) rev: AtomicU64,
}

/// Renew the lease every fifth of its time to live; losing it to another node steps
/// this one down.
pub(super) async fn renew_lease(hold: Arc<LeaseHold>, ttl: Duration, log: Arc<JsLog>) {
    let LeaseHold {
        kv: lease,
        key,
        status_key,
        node,
        ..
    } = &*hold;
    let every = (ttl / 5).max(Duration::from_millis(100));
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(every).await;
        if log.closing.load(Ordering::Acquire) || log.lost.load(Ordering::Acquire) {
            return;
        }
        report(lease, status_key, "owner", log.tip.load(Ordering::Acquire)).await;
        let rev = hold.rev.load(Ordering::Acquire);
        match lease.update(key, Bytes::from(node.clone()), rev).await {
            Ok(r) => {
                hold.rev.store(r, Ordering::Release);
                if failing_since.take().is_some() {
                    tracing::info!("replication: the lease is renewed again");
                }
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Someone else's revision, or none: the key expired while NATS could not
                // renew it (a leader change), or an update of ours landed unacknowledged.
                match lease.entry(key).await {
                    Ok(Some(e)) if e.operation == kv::Operation::Put => {
                        if e.value == node.as_bytes() {
                            hold.rev.store(e.revision, Ordering::Release);
                            continue;
                        }
                        let holder = String::from_utf8_lossy(&e.value).into_owned();
                        log.lose(format!("the lease was lost; it is held by {holder}"));
                        return;
                    }
                    Ok(_) => {
                        // Expired and nobody took it: take it again. Safe either way: a
                        // node that took it meanwhile fences this one's next append.
                        match lease.create(key, Bytes::from(node.clone())).await {
                            Ok(r) => {
                                tracing::warn!("replication: the lease had expired (NATS unavailable for longer than lease_ttl?); taken again");
                                hold.rev.store(r, Ordering::Release);
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
