//! What operators look at, over every shard wherever it is owned (issue 16): topic and
//! group listings are gathered from each shard (this gateway's own, the others' over
//! the admin relay: [`AdminOp::ShardTopics`], [`AdminOp::ShardGroups`]; all shards
//! asked at once); reads of one
//! shard (a message by id, by key, a queue's or a DLQ's page, a topic) go to its owner.
//! A shard nobody answers for (moving, its owner just lost) is named in
//! [`Gathered::missing`] rather than failing the whole view.

use mqgate_store::{
    GroupName, MessageId, OffsetRange, QueueMessage, QueueOffset, QueueRef, ReadLimits,
    StoredMessage, TopicConfig, TopicName,
};
use std::sync::Arc;

use crate::error::Result;
use crate::shard::{AdminAnswer, AdminOp, ShardId};

/// A topic as listings show it: its configuration and each queue's offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicView {
    /// Name and queue count.
    pub config: TopicConfig,
    /// Per queue (index: queue id), the offsets it holds.
    pub ranges: Vec<OffsetRange>,
}

/// A listing gathered from every shard, and the shards that could not be asked.
#[derive(Clone, Debug)]
pub struct Gathered<T> {
    /// What the shards answered, sorted.
    pub items: Vec<T>,
    /// Shards nobody answered for.
    pub missing: Vec<ShardId>,
}

impl<T> Default for Gathered<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            missing: Vec::new(),
        }
    }
}

/// Relayed reads of messages answer at most this many bytes of them (the first one
/// always, whatever its size: an answer larger than a NATS message goes in parts); the
/// caller asks again from where it ended.
pub const RELAYED_READ_BYTES: usize = 512 << 10;

fn other(what: &str, a: AdminAnswer) -> crate::CoreError {
    crate::CoreError::Invalid(format!("the admin relay answered {what} with {a:?}"))
}

impl crate::Broker {
    /// `op(shard)` run for every shard at once (each here or on its owner), answers in
    /// shard order.
    async fn each_shard(
        &self,
        op: impl Fn(ShardId) -> AdminOp,
    ) -> Vec<(ShardId, Result<AdminAnswer>)> {
        let mut set = tokio::task::JoinSet::new();
        for s in 0..self.inner.count {
            let (broker, op) = (self.clone(), op(s));
            set.spawn(async move { (s, broker.admin(op).await) });
        }
        let mut out = Vec::with_capacity(usize::from(self.inner.count));
        while let Some(r) = set.join_next().await {
            if let Ok(r) = r {
                out.push(r);
            }
        }
        out.sort_by_key(|(s, _)| *s);
        out
    }

    /// `op(shard)` run for every shard at once, the items `take` finds in each answer
    /// gathered (in shard order); a shard that does not answer, or answers with
    /// something else, is left out and named in `missing`.
    async fn gather<T>(
        &self,
        what: &str,
        op: impl Fn(ShardId) -> AdminOp,
        take: impl Fn(AdminAnswer) -> std::result::Result<Vec<T>, AdminAnswer>,
    ) -> Gathered<T> {
        let mut out = Gathered::default();
        for (s, answer) in self.each_shard(op).await {
            match answer.map(&take) {
                Ok(Ok(items)) => out.items.extend(items),
                Ok(Err(a)) => {
                    tracing::warn!(shard = s, answer = ?a, what, "core: a shard answered a listing with another kind");
                    out.missing.push(s);
                }
                Err(e) => {
                    tracing::debug!(shard = s, error = %e, what, "core: a shard could not be listed");
                    out.missing.push(s);
                }
            }
        }
        out
    }

    /// Every topic of every shard (internal outbox topics left out), by name.
    pub async fn topic_views(&self) -> Gathered<TopicView> {
        let mut out = self
            .gather("topics", AdminOp::ShardTopics, |a| match a {
                AdminAnswer::Topics(t) => Ok(t),
                a => Err(a),
            })
            .await;
        out.items.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        out
    }

    /// Every consumer group of every shard, by name.
    pub async fn group_names(&self) -> Gathered<GroupName> {
        let mut out = self
            .gather("groups", AdminOp::ShardGroups, |a| match a {
                AdminAnswer::Groups(g) => Ok(g),
                a => Err(a),
            })
            .await;
        out.items.sort();
        out.items.dedup();
        out
    }

    /// Records of `namespace` whose key starts with `prefix`, after `after`, at most
    /// `limit`, in key order, over every shard (each shard's first `limit`, merged):
    /// a keyed-area scan of the whole cluster (RabbitMQ's queue list).
    pub async fn records_everywhere(
        &self,
        namespace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Gathered<(bytes::Bytes, bytes::Bytes)> {
        let (prefix, after) = (
            bytes::Bytes::copy_from_slice(prefix),
            after.map(bytes::Bytes::copy_from_slice),
        );
        let op = |s| AdminOp::ShardRecords {
            shard: s,
            namespace: namespace.to_owned(),
            prefix: prefix.clone(),
            after: after.clone(),
            limit: limit.min(u32::MAX as usize) as u32,
        };
        let mut out = self
            .gather("records", op, |a| match a {
                AdminAnswer::Records(r) => Ok(r),
                a => Err(a),
            })
            .await;
        out.items.sort_by(|a, b| a.0.cmp(&b.0));
        out.items.dedup_by(|a, b| a.0 == b.0);
        out.items.truncate(limit);
        out
    }

    /// [`Broker::records_everywhere`] for shard `s` owned here.
    pub(crate) async fn local_records(
        &self,
        s: ShardId,
        namespace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(bytes::Bytes, bytes::Bytes)>> {
        let shard = self.inner.shard(s)?;
        Ok(shard.store.kv_scan(namespace, prefix, after, limit).await?)
    }

    /// One topic's view, from the shard holding it (`None`: no such topic).
    pub async fn topic_view(&self, topic: &TopicName) -> Result<Option<TopicView>> {
        match self.admin(AdminOp::TopicView(topic.clone())).await? {
            AdminAnswer::Topics(mut t) => Ok(t.pop()),
            a => Err(other("a topic view", a)),
        }
    }

    /// The topics of shard `s` owned here, with their queues' offsets.
    pub(crate) fn local_topic_views(&self, s: ShardId) -> Result<Vec<TopicView>> {
        let shard = self.inner.shard(s)?;
        let mut v: Vec<TopicView> = shard
            .store
            .topics()
            .into_iter()
            .filter(|t| !crate::outbox::is_outbox(&t.name))
            .map(|config| view_of(&*shard.store, config))
            .collect();
        v.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        Ok(v)
    }

    /// [`Broker::topic_view`] on the shard's owner.
    pub(crate) fn local_topic_view(&self, topic: &TopicName) -> Result<Option<TopicView>> {
        let shard = self.inner.of_topic(topic)?;
        Ok(shard
            .store
            .topic(topic)
            .map(|config| view_of(&*shard.store, config)))
    }

    /// The consumer groups of shard `s` owned here.
    pub(crate) async fn local_groups(&self, s: ShardId) -> Result<Vec<GroupName>> {
        let shard = self.inner.shard(s)?;
        let mut g = shard.store.groups().await?;
        g.extend(shard.groups.lock().keys().cloned());
        g.sort();
        g.dedup();
        Ok(g)
    }

    /// A message by id, while retention keeps it, from the shard its id names.
    pub async fn message(&self, id: MessageId) -> Result<Option<Arc<StoredMessage>>> {
        let shard = crate::shard::shard_of_id(id.0);
        let local = match self.inner.local(shard) {
            Some(s) => Ok(s.store.message(id).await?),
            None => Err(crate::CoreError::NotOwned(shard)),
        };
        let found = self
            .or_relay(
                local.map(|m| m.map(|m| vec![StoredMessage::clone(&m)])),
                || AdminOp::Message(id),
                |a| match a {
                    AdminAnswer::Stored(m) => Some(Some(m)),
                    _ => None,
                },
            )
            .await;
        match found {
            Ok(m) => Ok(m.and_then(|mut v| v.pop()).map(Arc::new)),
            // A shard nobody owns now: not found (yet).
            Err(crate::CoreError::NotOwned(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Messages published to `topic` with `key` among their keys, oldest first (from
    /// another gateway: as many as fit one relay answer).
    pub async fn messages_by_key(
        &self,
        topic: &TopicName,
        key: &str,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>> {
        let local = match self.inner.of_topic(topic) {
            Ok(s) => Ok(s.store.messages_by_key(topic, key, limit).await?),
            Err(e) => Err(e),
        };
        match local {
            Ok(v) => Ok(v),
            Err(e) => {
                let v = self
                    .or_relay(
                        Err(e),
                        || AdminOp::ByKey {
                            topic: topic.clone(),
                            key: key.to_owned(),
                            limit: limit as u32,
                        },
                        |a| match a {
                            AdminAnswer::Stored(m) => Some(m),
                            _ => None,
                        },
                    )
                    .await?;
                Ok(v.into_iter().map(Arc::new).collect())
            }
        }
    }

    /// Read a page of a queue without consuming it (from another gateway: as many as
    /// fit one relay answer).
    pub async fn peek(
        &self,
        queue: &QueueRef,
        from: QueueOffset,
        limits: ReadLimits,
    ) -> Result<Vec<QueueMessage>> {
        let local = match self.inner.of_topic(&queue.topic) {
            Ok(s) => return Ok(s.store.read(queue, from, limits).await?),
            Err(e) => Err(e),
        };
        self.or_relay(
            local,
            || AdminOp::Peek {
                queue: queue.clone(),
                from,
                limit: limits.max_count.min(u32::MAX as usize) as u32,
            },
            |a| match a {
                AdminAnswer::Queue(m) => Some(m),
                _ => None,
            },
        )
        .await
    }
}

fn view_of(store: &dyn mqgate_store::Store, config: TopicConfig) -> TopicView {
    let ranges = (0..config.queue_count)
        .map(|q| {
            store
                .queue_range(&QueueRef::new(config.name.clone(), q))
                .unwrap_or_default()
        })
        .collect();
    TopicView { config, ranges }
}
