//! Where a topic lives: `shard_of(topic) = splitmix64(fnv1a(topic)) % shards`.
//!
//! A topic's shard is this hash while the cluster's shard count stays what it was
//! (changing it is out of scope: `docs/design/sharding.md` section 8). A group's home is
//! the shard of its first topic; `%RETRY%<g>` and `%DLQ%<g>` follow the group. Groups
//! named apart from their first topic are recorded in the cluster's KV bucket
//! ([`GroupBook`]) so every gateway finds them by name.

pub use mqgate_core::shard::{shard_of, ShardId, MAX_SHARDS};

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use mqgate_core::{Broker, CoreError, Result};
use mqgate_store::jetstream::Nats;
use mqgate_store::GroupName;

/// The cluster's record of where groups live, for the groups whose shard is not the one
/// their name hashes to (a consumer group named apart from its first topic): KV bucket
/// `<stream>-placement`, key `g.<hex of the name>`, value the shard in decimal. The
/// first gateway to place such a group creates its key; the others find it (a create
/// that lost the race reads the winner's). Every gateway follows the bucket into its
/// broker ([`GroupBook::follow`]), so the group, its `%RETRY%` and `%DLQ%` topics are
/// found by name on any of them; a deleted group's key is deleted.
#[derive(Clone, Debug)]
pub struct GroupBook {
    kv: kv::Store,
}

fn key(g: &GroupName) -> String {
    let mut k = String::with_capacity(2 + 2 * g.as_str().len());
    k.push_str("g.");
    for b in g.as_str().bytes() {
        k.push_str(&format!("{b:02x}"));
    }
    k
}

fn group_of(key: &str) -> Option<GroupName> {
    let hex = key.strip_prefix("g.")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    GroupName::new(String::from_utf8(bytes?).ok()?).ok()
}

fn shard_in(v: &[u8]) -> Option<ShardId> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn nats_error(what: &str, e: impl std::fmt::Display) -> CoreError {
    CoreError::Store(mqgate_store::StoreError::Backend(format!(
        "cluster placement: {what}: {e}"
    )))
}

impl GroupBook {
    /// The bucket of the cluster `nats` connects to (created if missing).
    pub async fn open(nats: &Nats) -> std::result::Result<Self, String> {
        let name = format!("{}-placement", nats.config().stream);
        let mut delay = Duration::from_millis(100);
        loop {
            match mqgate_store::jetstream::ensure_kv_bucket(
                nats.jetstream(),
                &name,
                Duration::ZERO,
                nats.config().replicas,
            )
            .await
            {
                Ok(kv) => return Ok(Self { kv }),
                Err(e) if delay < Duration::from_secs(8) => {
                    tracing::warn!(error = %e, "cluster: the placement bucket is not ready; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Record `group` in `proposed` unless it is recorded already: where it lives.
    pub async fn record(&self, group: &GroupName, proposed: ShardId) -> Result<ShardId> {
        let k = key(group);
        match self.kv.create(&k, Bytes::from(proposed.to_string())).await {
            Ok(_) => Ok(proposed),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let v = self
                    .kv
                    .get(&k)
                    .await
                    .map_err(|e| nats_error("read a group's record", e))?;
                match v.as_deref().and_then(shard_in) {
                    Some(s) => Ok(s),
                    // Deleted in between: ours to create again.
                    None => {
                        self.kv
                            .put(&k, Bytes::from(proposed.to_string()))
                            .await
                            .map_err(|e| nats_error("record a group", e))?;
                        Ok(proposed)
                    }
                }
            }
            Err(e) => Err(nats_error("record a group", e)),
        }
    }

    /// Forget `group` (deleted).
    pub async fn forget(&self, group: &GroupName) -> Result<()> {
        self.kv
            .delete(key(group))
            .await
            .map_err(|e| nats_error("forget a group", e))
    }

    /// Tell `broker` where every recorded group lives, then each change, until the task
    /// is aborted (the watch is opened again when it ends).
    pub async fn follow(self, broker: Broker) {
        loop {
            let mut watch = match self.kv.watch_with_history("g.>").await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot watch the placement bucket; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(entry) = watch.next().await {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: the placement watch failed; watching again");
                        break;
                    }
                };
                let Some(g) = group_of(&entry.key) else {
                    continue;
                };
                let shard = match entry.operation {
                    kv::Operation::Put => shard_in(&entry.value),
                    kv::Operation::Delete | kv::Operation::Purge => None,
                };
                broker.learn_group_placement(&g, shard);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The pinned values are checked where the function lives (`mqgate_core::shard`).

    #[test]
    fn topics_spread_over_the_shards() {
        for shards in [2u16, 8, 16, 64] {
            let mut counts = vec![0u32; usize::from(shards)];
            let n = 20_000u32;
            for i in 0..n {
                counts[usize::from(shard_of(&format!("sensor/{i}/temp"), shards))] += 1;
            }
            let mean = f64::from(n) / f64::from(shards);
            for (s, c) in counts.iter().enumerate() {
                let off = (f64::from(*c) - mean).abs() / mean;
                assert!(
                    off < 0.25,
                    "shard {s} of {shards} holds {c} topics, mean {mean}"
                );
            }
        }
    }

    #[test]
    fn group_keys_round_trip_and_are_valid_kv_keys() {
        for name in ["g", "%MQTT%client/1", "grupo é", "a.b>c*d"] {
            let g = GroupName::new(name).unwrap();
            let k = key(&g);
            assert!(k[2..].bytes().all(|b| b.is_ascii_hexdigit()), "{k}");
            assert_eq!(group_of(&k).unwrap(), g);
        }
        assert!(group_of("g.zz").is_none());
        assert!(group_of("g.abc").is_none());
        assert!(group_of("t.00").is_none());
    }

    proptest! {
        #[test]
        fn always_a_valid_shard(topic in ".{0,64}", shards in 1u16..=MAX_SHARDS) {
            let s = shard_of(&topic, shards);
            prop_assert!(s < shards);
            prop_assert_eq!(s, shard_of(&topic, shards));
        }
    }
}
