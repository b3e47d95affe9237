//! What the core lets adapters and the admin API read and keep: a read-only view of the
//! log (ranges, pages of a queue, messages by id or key, counters, health) and the
//! endpoints' durable records. Nobody outside the core holds a storage handle, so every
//! write (messages, offsets, timers, records) goes through the core's own operations.

use std::sync::Arc;

use bytes::Bytes;
use mqgate_store::{
    MessageId, OffsetRange, QueueMessage, QueueOffset, QueueRef, ReadLimits, StoreHealth,
    StoreStats, StoredMessage, TopicConfig, TopicName,
};

use crate::broker::Broker;
use crate::error::Result;
use crate::publish::Records;

impl Broker {
    /// The store's counters.
    pub fn store_stats(&self) -> StoreStats {
        self.inner.store.stats()
    }

    /// Whether the store takes writes now, and its last degraded period.
    pub fn store_health(&self) -> StoreHealth {
        self.inner.store.health()
    }

    /// A topic's configuration, if it exists.
    pub fn topic(&self, name: &TopicName) -> Option<TopicConfig> {
        self.inner.store.topic(name)
    }

    /// The offsets a queue holds (`min..next`).
    pub fn queue_range(&self, queue: &QueueRef) -> Result<OffsetRange> {
        Ok(self.inner.store.queue_range(queue)?)
    }

    /// Read a page of a queue without consuming it.
    pub async fn peek(
        &self,
        queue: &QueueRef,
        from: QueueOffset,
        limits: ReadLimits,
    ) -> Result<Vec<QueueMessage>> {
        Ok(self.inner.store.read(queue, from, limits).await?)
    }

    /// A message by id, while retention keeps it.
    pub async fn message(&self, id: MessageId) -> Result<Option<Arc<StoredMessage>>> {
        Ok(self.inner.store.message(id).await?)
    }

    /// Messages published to `topic` with `key` among their keys, oldest first.
    pub async fn messages_by_key(
        &self,
        topic: &TopicName,
        key: &str,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>> {
        Ok(self.inner.store.messages_by_key(topic, key, limit).await?)
    }

    /// An endpoint record.
    pub async fn record(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.inner.store.kv_get(namespace, key).await?)
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
        Ok(self
            .inner
            .store
            .kv_scan(namespace, prefix, after, limit)
            .await?)
    }

    /// Write endpoint records (one atomic batch, durable when it returns).
    pub async fn write_records(&self, records: Records) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = mqgate_store::WriteBatch::new();
        records.apply(&mut batch);
        self.inner.store.write(batch).await?;
        Ok(())
    }
}
