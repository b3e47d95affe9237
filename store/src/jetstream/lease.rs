//! The lease that says which node should write the log (KV bucket `<stream>-lease`,
//! key `owner`), the standby's wait for it, and the owner's renewals.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use tokio::sync::watch;

use super::log::{JsLog, Tail};
use super::{lease_bucket, nats, JetStreamConfig, Role, LEASE_KEY, NODE_KEY_PREFIX};
use crate::error::{Result, StoreError};
use crate::rocks::View;

pub(super) async fn ensure_lease_bucket(
    js: &jetstream::Context,
    cfg: &JetStreamConfig,
) -> Result<kv::Store> {
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
pub(super) async fn try_acquire(lease: &kv::Store, node: &str) -> Result<Option<u64>> {
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
pub(super) async fn standby(
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
pub(super) async fn report(lease: &kv::Store, node: &str, role: &str, applied: u64) {
    let _ = lease
        .put(
            format!("{NODE_KEY_PREFIX}{node}"),
            Bytes::from(format!("{role} {applied}")),
        )
        .await;
}

/// Renew the lease every fifth of its time to live; losing it to another node steps
/// this one down.
pub(super) async fn renew_lease(
    lease: kv::Store,
    node: String,
    mut rev: u64,
    ttl: Duration,
    log: Arc<JsLog>,
) {
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
