//! What `mqgate cluster` will show for a sharded cluster: per shard, who owns it (and
//! since which lease revision), who ranks as its standby, how far each gateway that
//! reported has applied its log, and the log's length. Read from NATS only (the lease
//! bucket, the node bucket, each shard's stream), so any gateway, or a tool with a NATS
//! connection, can answer.

use futures_util::StreamExt;
use mqgate_store::jetstream::{Nats, ReplicaSpec};

use crate::nodes::{bucket_name, list};
use crate::placement::ShardId;
use crate::rendezvous::owner_and_standby;

/// A gateway's last report about one shard's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The gateway.
    pub node: String,
    /// `owner` or `standby`.
    pub role: String,
    /// The last record it applied (an owner: appended).
    pub applied: u64,
    /// Records it is behind the log's last one.
    pub lag: u64,
}

/// One shard, as the cluster sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: ShardId,
    /// The gateway holding its lease and the lease's revision, if any.
    pub owner: Option<(String, u64)>,
    /// The gateway rendezvous ranks first among the live ones (the owner once moves
    /// settle).
    pub ranked_owner: Option<String>,
    /// The gateway ranked second: the warm standby.
    pub standby: Option<String>,
    /// The log's last sequence.
    pub last_seq: u64,
    /// What each gateway reported about this shard, by node.
    pub reports: Vec<Report>,
}

/// The live (active) gateways.
pub async fn live_nodes(nats: &Nats) -> Vec<String> {
    match nats
        .jetstream()
        .get_key_value(bucket_name(&nats.config().stream))
        .await
    {
        Ok(kv) => list(&kv).await.unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// The gateway holding shard `shard`'s lease now, if any.
pub async fn owner(nats: &Nats, shard: ShardId) -> Option<String> {
    let spec = ReplicaSpec::shard(nats.config(), shard);
    let kv = nats
        .jetstream()
        .get_key_value(&spec.lease_bucket)
        .await
        .ok()?;
    let e = kv.entry(&spec.lease_key).await.ok()??;
    (e.operation == async_nats::jetstream::kv::Operation::Put)
        .then(|| String::from_utf8_lossy(&e.value).into_owned())
}

/// Every shard `0..shards` of the cluster `nats` is connected to.
pub async fn shards(nats: &Nats, shards: u16) -> Vec<ShardStatus> {
    let live = live_nodes(nats).await;
    let refs: Vec<&str> = live.iter().map(String::as_str).collect();
    let js = nats.jetstream();
    let mut out = Vec::with_capacity(usize::from(shards));
    for shard in 0..shards {
        let spec = ReplicaSpec::shard(nats.config(), shard);
        let (ranked, standby) = owner_and_standby(&refs, shard);
        let last_seq = match js.get_stream(&spec.stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
            Err(_) => 0,
        };
        let mut owner = None;
        let mut reports = Vec::new();
        if let Ok(kv) = js.get_key_value(&spec.lease_bucket).await {
            if let Ok(Some(e)) = kv.entry(&spec.lease_key).await {
                if e.operation == async_nats::jetstream::kv::Operation::Put {
                    owner = Some((String::from_utf8_lossy(&e.value).into_owned(), e.revision));
                }
            }
            if let Ok(mut keys) = kv.keys().await {
                let mut names = Vec::new();
                while let Some(Ok(k)) = keys.next().await {
                    if let Some(node) = k.strip_prefix(&spec.status_prefix) {
                        names.push((k.clone(), node.to_owned()));
                    }
                }
                for (k, node) in names {
                    if let Ok(Some(v)) = kv.get(&k).await {
                        let v = String::from_utf8_lossy(&v).into_owned();
                        let (role, at) = v.split_once(' ').unwrap_or(("?", "0"));
                        let applied = at.parse().unwrap_or(0);
                        reports.push(Report {
                            node,
                            role: role.to_owned(),
                            applied,
                            lag: last_seq.saturating_sub(applied),
                        });
                    }
                }
            }
        }
        reports.sort_by(|a, b| a.node.cmp(&b.node));
        out.push(ShardStatus {
            shard,
            owner,
            ranked_owner: ranked.map(str::to_owned),
            standby: standby.map(str::to_owned),
            last_seq,
            reports,
        });
    }
    out
}
