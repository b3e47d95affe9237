//! Topics as the core holds them: a handle per topic (queue count, round robin,
//! the groups to wake after an append, producer counts), created on first use when
//! auto-creation is on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use mqgate_store::{TopicConfig, TopicName};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::broker::{Broker, ShardCore};
use crate::error::{CoreError, Result};
use crate::group::GroupWake;

/// Per-topic state the publish path needs without touching the store's topic map.
#[derive(Debug)]
pub(crate) struct TopicHandle {
    pub(crate) name: TopicName,
    queue_count: AtomicU32,
    /// Moves when the topic is deleted: the groups watching it let go of their state on
    /// its queues (`Actor::refresh_queues`). A topic of that name created again gets
    /// this handle back (`ShardCore::retired`), so they see it.
    generation: AtomicU32,
    round_robin: AtomicU64,
    /// Groups consuming this topic: woken after each append.
    watchers: RwLock<Vec<Arc<GroupWake>>>,
    /// Flow control by consumer lag: what the consuming group reports.
    pub(crate) flow: FlowState,
}

impl TopicHandle {
    pub(crate) fn new(cfg: &TopicConfig) -> Self {
        Self {
            name: cfg.name.clone(),
            queue_count: AtomicU32::new(cfg.queue_count),
            generation: AtomicU32::new(0),
            round_robin: AtomicU64::new(0),
            watchers: RwLock::default(),
            flow: FlowState::default(),
        }
    }

    pub(crate) fn queue_count(&self) -> u32 {
        self.queue_count.load(Ordering::Acquire)
    }

    /// How many times the topic was deleted under this handle.
    pub(crate) fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// The topic was deleted: no queues, a new generation, its watchers woken to let go
    /// of their state on it.
    fn retire(&self) {
        self.queue_count.store(0, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.wake();
    }

    /// A retired handle's topic exists again with `queue_count` queues: its watchers
    /// are woken to pick them up.
    fn revive(&self, queue_count: u32) {
        self.queue_count.store(queue_count, Ordering::Release);
        self.wake();
    }

    pub(crate) fn select(&self, queue: Option<u32>, sharding_key: Option<&str>) -> Result<u32> {
        let n = self.queue_count();
        match (queue, sharding_key) {
            (Some(q), _) if q < n => Ok(q),
            (Some(q), _) => Err(CoreError::Invalid(format!(
                "topic {} has {n} queues, no queue {q}",
                self.name
            ))),
            (None, Some(key)) => Ok((key_hash(key) % u64::from(n)) as u32),
            (None, None) => {
                Ok((self.round_robin.fetch_add(1, Ordering::Relaxed) % u64::from(n)) as u32)
            }
        }
    }

    /// The queue a routed message (through an exchange, to resolved topics, a dead
    /// letter) goes to: by its `x-sharding-key`, so one key stays in one queue; without
    /// one, a topic of several queues (an orderly endpoint) takes the message's address
    /// as its key (an MQTT topic keeps its order, as EMQX's `hash_topic`), a topic of
    /// one queue takes it.
    pub(crate) fn select_for(&self, message: &mqgate_store::Message) -> Result<u32> {
        Ok(queue_for(message, self.queue_count()))
    }

    pub(crate) fn watch(&self, wake: Arc<GroupWake>) {
        self.watchers.write().push(wake);
    }

    pub(crate) fn unwatch(&self, wake: &Arc<GroupWake>) {
        self.watchers.write().retain(|w| !Arc::ptr_eq(w, wake));
    }

    pub(crate) fn wake(&self) {
        for w in self.watchers.read().iter() {
            w.notify();
        }
    }
}

/// What a topic's consuming group tells publishers for flow control
/// ([`crate::CoreConfig::consumer_lag_limit`]).
#[derive(Debug, Default)]
pub(crate) struct FlowState {
    /// The sum of the group's committed offsets over the topic's queues.
    pub(crate) committed: AtomicU64,
    /// When (ms on the broker's clock) the committed sum last moved; 0: no live group
    /// with members (nobody to wait for).
    pub(crate) progress_at: AtomicU64,
    /// Told when the committed sum moves.
    pub(crate) moved: Notify,
}

impl TopicHandle {
    /// How many watchers (groups) it has.
    pub(crate) fn watcher_count(&self) -> usize {
        self.watchers.read().len()
    }
}

/// Messages published per (address, producer group). At most
/// [`MAX_PRODUCER_ENTRIES`] pairs (MQTT topics can be countless: one per device); a
/// new pair beyond that counts under the address `_other`.
#[derive(Debug, Default)]
pub(crate) struct ProducerCounts {
    map: Mutex<HashMap<(TopicName, String), u64>>,
}

/// The most (address, producer group) pairs counted one by one.
pub(crate) const MAX_PRODUCER_ENTRIES: usize = 10_000;

/// Messages published per (address, producer group), in runs: a batch mostly repeats
/// one pair, and a run names it once (no copy of the names per message).
#[derive(Debug, Default)]
pub(crate) struct PublishedRuns(Vec<(TopicName, String, u64)>);

impl PublishedRuns {
    /// One more message to `topic` from `group`.
    pub(crate) fn note(&mut self, topic: &TopicName, group: &str) {
        match self.0.last_mut() {
            Some((t, g, n)) if t == topic && g == group => *n += 1,
            _ => self.0.push((topic.clone(), group.to_owned(), 1)),
        }
    }
}

impl ProducerCounts {
    pub(crate) fn count(&self, published: &PublishedRuns) {
        if published.0.is_empty() {
            return;
        }
        let mut map = self.map.lock();
        for (topic, group, run) in &published.0 {
            let key = (topic.clone(), group.clone());
            if let Some(n) = map.get_mut(&key) {
                *n += run;
            } else if map.len() < MAX_PRODUCER_ENTRIES {
                map.insert(key, *run);
            } else {
                let other = (TopicName::new("_other").expect("valid"), group.clone());
                *map.entry(other).or_default() += run;
            }
        }
    }
}

/// The queue a routed message takes in a topic of `queues` queues: by its
/// `x-sharding-key`, else by its address when there are several (see
/// `TopicHandle::select_for`; a shard applying forwarded messages uses it too).
pub(crate) fn queue_for(message: &mqgate_store::Message, queues: u32) -> u32 {
    if let Some(k) = crate::props::get(&message.properties, crate::props::SHARDING_KEY_HEADER) {
        return (key_hash(&String::from_utf8_lossy(k)) % u64::from(queues.max(1))) as u32;
    }
    if queues > 1 {
        return (key_hash(message.topic.as_str()) % u64::from(queues)) as u32;
    }
    0
}

/// The queue hash of a sharding key: 64-bit FNV-1a, stable across builds and versions
/// (a key must map to the same queue after an upgrade, or its order breaks).
pub(crate) fn key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What a producer group has written to a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerStat {
    /// The topic.
    pub topic: TopicName,
    /// The producer group.
    pub producer_group: String,
    /// Messages published.
    pub messages: u64,
}

impl Broker {
    /// Create a topic (or grow its queue count); `None` takes the default count.
    pub async fn create_topic(
        &self,
        name: &TopicName,
        queue_count: Option<u32>,
    ) -> Result<TopicConfig> {
        let local = match self.inner.of_topic(name) {
            Ok(shard) => shard.create_topic(name, queue_count).await,
            Err(e) => Err(e),
        };
        self.or_relay(
            local,
            || crate::shard::AdminOp::CreateTopic(name.clone(), queue_count),
            |a| match a {
                crate::shard::AdminAnswer::Topic(t) => Some(t),
                _ => None,
            },
        )
        .await
    }

    /// Delete a topic: its queues, and every group's offsets on it.
    pub async fn delete_topic(&self, name: &TopicName) -> Result<bool> {
        let shard = match self.inner.of_topic(name) {
            Ok(shard) => shard,
            Err(e) => {
                return self
                    .or_relay(
                        Err(e),
                        || crate::shard::AdminOp::DeleteTopic(name.clone()),
                        |a| match a {
                            crate::shard::AdminAnswer::Deleted(d) => Some(d),
                            _ => None,
                        },
                    )
                    .await
            }
        };
        // The groups with offsets on it, asked while its offsets are there: their
        // delivered marks on it go too (a hint: not finding them fails no deletion).
        let queue_count = shard.store.topic(name).map(|t| t.queue_count);
        let groups = match queue_count {
            Some(_) => shard.store.groups_on_topic(name).await.unwrap_or_else(|e| {
                tracing::warn!(topic = %name, error = %e, "core: the groups on a deleted topic were not found; their delivered marks on it stay");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let existed = shard.store.delete_topic(name).await?;
        if let Some(n) = queue_count {
            crate::group::delete_topic_marks(shard.store.as_ref(), name, n, &groups).await;
        }
        shard.forget_topic(name);
        self.inner.placement.topic_gone(name);
        Ok(existed)
    }

    /// Every topic.
    pub fn topics(&self) -> Vec<TopicConfig> {
        let owned = self.inner.owned();
        if !self.inner.sharded() {
            return owned.first().map(|s| s.store.topics()).unwrap_or_default();
        }
        let mut all: Vec<TopicConfig> = owned
            .iter()
            .flat_map(|s| s.store.topics())
            .filter(|t| !crate::outbox::is_outbox(&t.name))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Messages published per (address, producer group) since the broker started,
    /// sorted: the address is the topic a producer wrote to (MQTT topic, AMQP exchange,
    /// RocketMQ topic), counted once per message however many queues it reached.
    pub fn producer_stats(&self) -> Vec<ProducerStat> {
        let mut out: Vec<ProducerStat> = self
            .inner
            .producers
            .map
            .lock()
            .iter()
            .map(|((topic, g), n)| ProducerStat {
                topic: topic.clone(),
                producer_group: g.clone(),
                messages: *n,
            })
            .collect();
        out.sort_by(|a, b| (&a.topic, &a.producer_group).cmp(&(&b.topic, &b.producer_group)));
        out
    }
}

impl ShardCore {
    pub(crate) async fn create_topic(
        &self,
        name: &TopicName,
        queue_count: Option<u32>,
    ) -> Result<TopicConfig> {
        let count = queue_count.unwrap_or(self.config.default_queue_count);
        let cfg = self.store.create_topic(name, count).await?;
        self.placement.topic_is_in(name, self.id);
        let mut topics = self.topics.write();
        match topics.get(name) {
            Some(h) => h.queue_count.store(cfg.queue_count, Ordering::Release),
            None => {
                let h = self.handle_for(&cfg);
                topics.insert(name.clone(), h);
            }
        }
        Ok(cfg)
    }

    /// A new handle for topic `cfg`, or the handle a deleted topic of that name left to
    /// the groups still watching it: they are woken to pick up its queues.
    fn handle_for(&self, cfg: &TopicConfig) -> Arc<TopicHandle> {
        match self.retired.lock().remove(&cfg.name) {
            Some(h) => {
                h.revive(cfg.queue_count);
                h
            }
            None => Arc::new(TopicHandle::new(cfg)),
        }
    }

    /// Topic `name` was deleted: its handle goes, retired (its watchers let go of their
    /// state on it) and kept for a topic of that name created again. Handles no group
    /// watches any more are dropped from the kept ones here.
    pub(crate) fn forget_topic(&self, name: &TopicName) {
        // Under the map's lock: a topic of that name created meanwhile finds it retired.
        let mut topics = self.topics.write();
        let Some(h) = topics.remove(name) else {
            return;
        };
        h.retire();
        if let Some(cfg) = self.store.topic(name) {
            // Created again between the store's deletion and this: the same handle
            // serves the new topic (its watchers start it afresh all the same).
            h.revive(cfg.queue_count);
            topics.insert(name.clone(), h);
            return;
        }
        // Kept even without watchers: a group may be starting on it (its handle taken,
        // not yet watched). Those no group watches go at the next deletion.
        let mut retired = self.retired.lock();
        retired.retain(|_, h| h.watcher_count() > 0);
        retired.insert(name.clone(), h);
    }

    /// The handle of a topic, created on first use when auto-creation is on.
    pub(crate) async fn topic_handle(&self, name: &TopicName) -> Result<Arc<TopicHandle>> {
        if let Some(h) = self.topics.read().get(name) {
            return Ok(Arc::clone(h));
        }
        if let Some(cfg) = self.store.topic(name) {
            let mut topics = self.topics.write();
            return Ok(Arc::clone(
                topics
                    .entry(name.clone())
                    .or_insert_with(|| self.handle_for(&cfg)),
            ));
        }
        if !self.config.auto_create_topics && !crate::retry::is_system_topic(name) {
            return Err(CoreError::NoSuchTopic(name.to_string()));
        }
        let queues = crate::retry::is_system_topic(name).then_some(1);
        self.create_topic(name, queues).await?;
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| CoreError::NoSuchTopic(name.to_string()))
    }

    /// Wake the groups consuming `topic` after a write that reached it; a topic of
    /// another shard (reached through an outbox) kicks the forwarder to that shard.
    pub(crate) fn wake_topic(&self, topic: &TopicName) {
        if let Some(h) = self.topics.read().get(topic) {
            h.wake();
            return;
        }
        if self.routes.len() > 1 {
            let s = self.placement.topic(topic);
            if s != self.id {
                self.routes[usize::from(s)].kick.notify_one();
            }
        }
    }

    /// Routed `topics` split into this shard's and the other shards'.
    pub(crate) fn split_topics(
        &self,
        topics: Vec<TopicName>,
    ) -> (Vec<TopicName>, crate::publish::Remote) {
        let mut remote = crate::publish::Remote::new();
        if self.routes.len() <= 1 {
            return (topics, remote);
        }
        let mut local = Vec::with_capacity(topics.len());
        for t in topics {
            match self.placement.topic(&t) {
                s if s == self.id => local.push(t),
                s => remote.entry(s).or_default().push(t),
            }
        }
        (local, remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs of one pair count as one look-up; pairs apart count apart, in any order.
    #[test]
    fn producer_counts_add_runs_and_strays() {
        let (a, b) = (TopicName::new("a").unwrap(), TopicName::new("b").unwrap());
        let pairs = [(&a, "g"), (&a, "g"), (&b, "g"), (&a, "g"), (&a, "h")];
        let mut all = PublishedRuns::default();
        for (t, g) in pairs {
            all.note(t, g);
        }
        assert_eq!(all.0.len(), 4, "the first two make one run");
        let mut first = PublishedRuns::default();
        first.note(&a, "g");
        let c = ProducerCounts::default();
        c.count(&all);
        c.count(&first);
        c.count(&PublishedRuns::default());
        let map = c.map.lock();
        assert_eq!(map[&(a.clone(), "g".to_string())], 4);
        assert_eq!(map[&(b, "g".to_string())], 1);
        assert_eq!(map[&(a, "h".to_string())], 1);
        assert_eq!(map.len(), 3);
    }
}
