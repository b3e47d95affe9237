//! What the core lets adapters and the admin API read and keep: a read-only view of the
//! log (ranges, counters, health; pages of a queue and messages by id or key are in
//! `views.rs`, wherever their shard is owned) and the
//! endpoints' durable records. Nobody outside the core holds a storage handle, so every
//! write (messages, offsets, timers, records) goes through the core's own operations.

use bytes::Bytes;
use mqgate_store::{OffsetRange, QueueRef, StoreHealth, StoreStats, TopicConfig, TopicName};

use crate::broker::Broker;
use crate::error::Result;
use crate::publish::Records;

impl Broker {
    /// The store's counters.
    pub fn store_stats(&self) -> StoreStats {
        let mut total = StoreStats::default();
        for s in self.inner.owned() {
            let st = s.store.stats();
            total.messages += st.messages;
            total.log_bytes += st.log_bytes;
            total.timers += st.timers;
            total.topics += st.topics;
            total.cold_reads += st.cold_reads;
        }
        if self.inner.sharded() {
            // The outbox topics are the broker's own.
            total.topics = self.topics().len() as u64;
        }
        total
    }

    /// Whether the store takes writes now, and its last degraded period (a sharded
    /// broker: the first shard that is degraded, errors summed).
    pub fn store_health(&self) -> StoreHealth {
        let owned = self.inner.owned();
        let mut out = owned.first().map(|s| s.store.health()).unwrap_or_default();
        for s in owned.iter().skip(1) {
            let h = s.store.health();
            out.errors += h.errors;
            if out.degraded.is_none() {
                out.degraded = h.degraded;
            }
            if out.last_degraded.is_none() {
                out.last_degraded = h.last_degraded;
            }
        }
        out
    }

    /// A topic's configuration, if it exists.
    pub fn topic(&self, name: &TopicName) -> Option<TopicConfig> {
        self.inner.of_topic(name).ok()?.store.topic(name)
    }

    /// The offsets a queue holds (`min..next`).
    pub fn queue_range(&self, queue: &QueueRef) -> Result<OffsetRange> {
        Ok(self
            .inner
            .of_topic(&queue.topic)?
            .store
            .queue_range(queue)?)
    }

    /// An endpoint record.
    pub async fn record(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        for s in self.inner.owned() {
            if let Some(v) = s.store.kv_get(namespace, key).await? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The shard holding record `key` of `namespace`, if any.
    pub(crate) async fn record_shard(&self, namespace: &str, key: &[u8]) -> Result<Option<u16>> {
        if !self.inner.sharded() {
            return Ok(None);
        }
        for s in self.inner.owned() {
            if s.store.kv_get(namespace, key).await?.is_some() {
                return Ok(Some(s.id));
            }
        }
        Ok(None)
    }

    /// Endpoint records of `namespace` whose key starts with `prefix`, in key order, at
    /// most `limit`, after `after` when given (paging).
    pub async fn records(
        &self,
        namespace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        if !self.inner.sharded() {
            return Ok(self
                .inner
                .meta()?
                .store
                .kv_scan(namespace, prefix, after, limit)
                .await?);
        }
        // Each shard's first `limit` after `after`, merged: the first `limit` overall.
        let mut all = Vec::new();
        for s in self.inner.owned() {
            all.extend(s.store.kv_scan(namespace, prefix, after, limit).await?);
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.dedup_by(|a, b| a.0 == b.0);
        all.truncate(limit);
        Ok(all)
    }

    /// Write endpoint records (one atomic batch, durable when it returns).
    pub async fn write_records(&self, records: Records) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if !self.inner.sharded() {
            let mut batch = mqgate_store::WriteBatch::new();
            records.apply(&mut batch);
            self.inner.meta()?.store.write(batch).await?;
            return Ok(());
        }
        // Each change goes where its key is (an endpoint's records live with its
        // topic), a new key to shard 0; one atomic write per shard.
        let mut parts: std::collections::BTreeMap<u16, Records> = Default::default();
        for (ns, key, op) in records.into_ops() {
            let at = self.record_shard(&ns, &key).await?.unwrap_or(0);
            parts.entry(at).or_default().push_op(ns, key, op);
        }
        for (at, part) in parts {
            let mut batch = mqgate_store::WriteBatch::new();
            part.apply(&mut batch);
            self.inner.shard(at)?.store.write(batch).await?;
        }
        Ok(())
    }
}
