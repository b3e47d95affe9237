//! The one publish path: a batch of messages (each to a topic, to resolved topics, or
//! through an exchange; now or delayed) and the endpoint records that go with them, in
//! one atomic store write.
//!
//! Adapters translate what they read from a connection in one go into a
//! [`PublishBatch`]; [`Broker::publish_batch`](crate::Broker::publish_batch) routes what
//! is not routed yet, turns delayed items into timers (routed at release), appends the
//! rest (the body once, an index entry per destination queue), adds the records (an MQTT
//! retained message goes in the same batch as its publish), writes once, wakes the groups
//! consuming the destinations as soon as the write is readable and answers once it is
//! durable.

use std::sync::Arc;

use bytes::Bytes;
use mqgate_store::{Message, ProducerGroup, QueueId, QueueList, QueueRef, TopicName, WriteBatch};

use std::time::Duration;

use mqgate_store::{MessageId, Millis, QueueOffset, TimerKey};

use crate::broker::{ShardCore, TopicHandle};
use crate::delay::Route;
use crate::error::Result;
use crate::props;
use crate::router::HeaderValue;
use crate::topics::PublishedRuns;

/// When a delayed message becomes visible.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Delay {
    /// One of the configured levels (1-based; RocketMQ: 1s 5s 10s 30s 1m ... 2h).
    Level(u8),
    /// After this long.
    For(Duration),
    /// At this wall-clock time (ms).
    At(Millis),
}

/// A publish straight to a topic (RocketMQ's producer API).
#[derive(Clone, Debug)]
pub struct Publish {
    /// The message; `message.topic` is the topic published to.
    pub message: Message,
    /// Messages with the same key go to the same queue, in order.
    pub sharding_key: Option<String>,
    /// Or an explicit queue.
    pub queue: Option<QueueId>,
    /// Deliver later.
    pub delay: Option<Delay>,
}

impl Publish {
    /// Publish `message` to its topic, round robin over the topic's queues.
    pub fn new(message: Message) -> Self {
        Self {
            message,
            sharding_key: None,
            queue: None,
            delay: None,
        }
    }
}

/// What happened to a publish.
#[derive(Clone, Debug, PartialEq)]
pub enum Published {
    /// Stored and indexed into these queues.
    Stored {
        /// The message id.
        id: MessageId,
        /// Where it went.
        offsets: Vec<(QueueRef, QueueOffset)>,
        /// Destinations that refused it: full endpoints with `reject-publish`.
        refused: Vec<TopicName>,
        /// Destinations in other shards of a sharded broker: stored in this message's
        /// home shard and forwarded to theirs (each once); empty with one shard.
        forwarded: Vec<TopicName>,
    },
    /// Stored as a timer; it will be released at `due`.
    Delayed {
        /// The timer.
        timer: TimerKey,
    },
    /// Not stored: every destination was a full endpoint with `reject-publish`.
    Refused {
        /// The destinations that refused it.
        by: Vec<TopicName>,
    },
}

impl Published {
    /// How many queues indexed it (0 when delayed or refused).
    pub fn routed(&self) -> usize {
        match self {
            Published::Stored {
                offsets, forwarded, ..
            } => offsets.len() + forwarded.len(),
            Published::Delayed { .. } | Published::Refused { .. } => 0,
        }
    }

    /// Whether some destination refused it (a full endpoint with `reject-publish`): the
    /// publisher is told (AMQP: basic.nack).
    pub fn refused(&self) -> bool {
        match self {
            Published::Stored { refused, .. } => !refused.is_empty(),
            Published::Refused { .. } => true,
            Published::Delayed { .. } => false,
        }
    }
}

/// Where one message of a batch goes.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A topic (RocketMQ's producer API): an explicit queue, the queue of a sharding key,
    /// or round robin.
    Topic {
        /// The topic.
        topic: TopicName,
        /// An explicit queue.
        queue: Option<QueueId>,
        /// Messages with the same key go to the same queue, in order.
        sharding_key: Option<String>,
    },
    /// Topics already resolved with [`Router::route`](crate::Router::route): one queue of
    /// each, round robin. None: the message is not stored (`None` in the answer).
    Topics(TopicList),
    /// Through an exchange of a virtual host: routed now, or at release when delayed.
    Exchange {
        /// The virtual host.
        vhost: String,
        /// The exchange.
        exchange: String,
        /// The routing key.
        key: String,
        /// Headers for a headers exchange.
        headers: Vec<(String, HeaderValue)>,
    },
}

/// The topics a message was routed to: one is kept inline (a route to one topic, the
/// common case, is remembered and handed on without allocating), more on the heap.
pub type TopicList = smallvec::SmallVec<[TopicName; 1]>;

/// One message of a batch.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The message.
    pub message: Message,
    /// Where it goes.
    pub to: Destination,
    /// Deliver later (a timer in the store; routed when due).
    pub delay: Option<Delay>,
    /// Also make it the retained message of this MQTT topic (an empty body clears it),
    /// in the same write (or when a delayed one is released).
    pub retain: Option<String>,
}

impl Outgoing {
    /// A message to resolved topics, now.
    pub fn routed(message: Message, topics: impl Into<TopicList>) -> Self {
        Self {
            message,
            to: Destination::Topics(topics.into()),
            delay: None,
            retain: None,
        }
    }
}

/// Changes to endpoints' durable records (keyed-area entries an adapter owns: AMQP queue
/// declarations, MQTT sessions and retained messages), written with a publish batch or
/// on their own, atomically.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Records {
    ops: Vec<RecordOp>,
}

#[derive(Clone, Debug, PartialEq)]
enum RecordOp {
    Put(String, Bytes, Bytes),
    Delete(String, Bytes),
}

impl Records {
    /// No changes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `value` at `key` of `namespace`.
    pub fn put(
        &mut self,
        namespace: &str,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> &mut Self {
        self.ops.push(RecordOp::Put(
            namespace.to_owned(),
            key.into(),
            value.into(),
        ));
        self
    }

    /// Delete `key` of `namespace`.
    pub fn delete(&mut self, namespace: &str, key: impl Into<Bytes>) -> &mut Self {
        self.ops
            .push(RecordOp::Delete(namespace.to_owned(), key.into()));
        self
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The changes: (namespace, key, the new value or `None` to delete).
    pub fn into_ops(self) -> Vec<(String, Bytes, Option<Bytes>)> {
        self.ops
            .into_iter()
            .map(|op| match op {
                RecordOp::Put(ns, k, v) => (ns, k, Some(v)),
                RecordOp::Delete(ns, k) => (ns, k, None),
            })
            .collect()
    }

    pub(crate) fn push_op(&mut self, ns: String, key: Bytes, value: Option<Bytes>) {
        self.ops.push(match value {
            Some(v) => RecordOp::Put(ns, key, v),
            None => RecordOp::Delete(ns, key),
        });
    }

    /// Add every change to `batch`.
    pub(crate) fn apply(self, batch: &mut WriteBatch) {
        for op in self.ops {
            match op {
                RecordOp::Put(ns, k, v) => batch.kv_put(ns, k, v),
                RecordOp::Delete(ns, k) => batch.kv_delete(ns, k),
            };
        }
    }
}

/// What a connection publishes in one go.
#[derive(Clone, Debug)]
pub struct PublishBatch {
    /// The messages, answered in this order.
    pub items: Vec<Outgoing>,
    /// Records written in the same atomic write.
    pub records: Records,
    /// `false`: the messages may be lost in a crash (AMQP delivery mode 1); the write
    /// does not wait for an fsync of its own.
    pub durable: bool,
}

impl PublishBatch {
    /// An empty durable batch.
    pub fn new() -> Self {
        Self {
            items: Vec::new(),
            records: Records::new(),
            durable: true,
        }
    }

    /// Add a message.
    pub fn push(&mut self, item: Outgoing) -> &mut Self {
        self.items.push(item);
        self
    }
}

impl Default for PublishBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// What one item became before the write.
enum Staged {
    Skipped,
    Appended,
    Timer,
}

/// A part of a publish batch written together: the store batch, what each item became,
/// the topics to wake and count, and the retained settings awaiting the write.
struct Part<'a> {
    batch: WriteBatch,
    staged: Vec<Staged>,
    touched: Vec<Arc<TopicHandle>>,
    /// Per item stored or delayed: its address and producer group, counted once written.
    published: PublishedRuns,
    retained: Vec<crate::retained::Staged<'a>>,
    earliest_timer: Option<u64>,
    /// Shards this part stages outbox entries for (their forwarders are kicked once
    /// it is written).
    forwards: Vec<crate::shard::ShardId>,
}

impl Part<'_> {
    fn new(durable: bool) -> Self {
        let mut batch = WriteBatch::new();
        if !durable {
            batch.no_sync();
        }
        Self {
            batch,
            staged: Vec::new(),
            touched: Vec::new(),
            published: PublishedRuns::default(),
            retained: Vec::new(),
            earliest_timer: None,
            forwards: Vec::new(),
        }
    }

    /// Append `message` into `queues` here and into `remote`'s shards (through this
    /// shard's outboxes).
    fn append(&mut self, message: Message, queues: QueueList, remote: &Remote) {
        if remote.is_empty() {
            self.batch.append(message, queues);
        } else {
            for d in remote.keys() {
                if !self.forwards.contains(d) {
                    self.forwards.push(*d);
                }
            }
            crate::outbox::stage(&mut self.batch, message, queues, remote);
        }
    }
}

/// Destinations of a message in other shards (shard -> its topics).
pub(crate) type Remote = std::collections::BTreeMap<crate::shard::ShardId, Vec<TopicName>>;

impl ShardCore {
    /// [`Broker::publish_submit`](crate::Broker::publish_submit) in one shard. Items
    /// are staged into one part, written once; an item routed to an endpoint with a
    /// length limit ends the part (written first, so the limit counts it) and is
    /// written on its own. Everything up to the store write's queueing happens here;
    /// the rest (waking the destinations, counting,
    /// flow control) in the returned [`Submitted`].
    pub(crate) async fn publish_submit(self: &Arc<Self>, b: PublishBatch) -> Result<Submitted> {
        self.submit_planned(b, Vec::new()).await
    }

    /// [`ShardCore::publish_submit`] with, per item, its destinations in other shards
    /// (`remotes[i]`; missing: none): stored here once, with an outbox entry per shard.
    pub(crate) async fn submit_planned(
        self: &Arc<Self>,
        b: PublishBatch,
        remotes: Vec<Remote>,
    ) -> Result<Submitted> {
        let mut remotes = remotes.into_iter();
        let PublishBatch {
            items,
            records,
            durable,
        } = b;
        let mut answers = Vec::with_capacity(items.len());
        let mut flow: Vec<Arc<TopicHandle>> = Vec::new();
        let mut part = Part::new(durable);
        records.apply(&mut part.batch);
        for Outgoing {
            mut message,
            to,
            delay,
            retain,
        } in items
        {
            let remote = remotes.next().unwrap_or_default();
            self.stamp(&mut message);
            if let Some(due) = self.due(delay) {
                let route = match to {
                    Destination::Topic {
                        topic,
                        queue,
                        sharding_key,
                    } => Route::Topic {
                        topic,
                        queue: queue.map(|q| q.0),
                        sharding_key,
                    },
                    Destination::Exchange {
                        vhost,
                        exchange,
                        key,
                        headers,
                    } => {
                        // Unknown exchanges are refused now, not at release.
                        if self.router.exchange(&vhost, &exchange).is_none() {
                            return Err(crate::CoreError::NoSuchExchange(exchange));
                        }
                        Route::Exchange {
                            vhost,
                            exchange,
                            key,
                            headers,
                        }
                    }
                    Destination::Topics(topics) => match topics.as_slice() {
                        [] => {
                            part.staged.push(Staged::Skipped);
                            continue;
                        }
                        [one] => Route::Topic {
                            topic: one.clone(),
                            queue: None,
                            sharding_key: None,
                        },
                        _ => {
                            return Err(crate::CoreError::Invalid(
                                "a delayed message goes to one topic or through an exchange".into(),
                            ))
                        }
                    },
                };
                if message.keys.is_empty() {
                    let payload = crate::delay::encode_named_timer(
                        None,
                        retain.as_deref(),
                        &route,
                        &message,
                    )?;
                    part.batch.timer_put(due, payload);
                } else {
                    // Cancellable by key.
                    crate::delay::stage_keyed(
                        self,
                        due,
                        retain.as_deref(),
                        &route,
                        &message,
                        &mut part.batch,
                    )?;
                }
                part.earliest_timer = Some(part.earliest_timer.map_or(due, |e| e.min(due)));
                part.published.note(&message.topic, &message.producer_group);
                part.staged.push(Staged::Timer);
                continue;
            }
            // This item's topics go straight into the part's list (no list of its own
            // per message); `touched_from` is where they start, until the item is known
            // to be appended to the part.
            let touched_from = part.touched.len();
            let queues = match to {
                Destination::Topic {
                    topic,
                    queue,
                    sharding_key,
                } => {
                    let h = self.topic_handle(&topic).await?;
                    let q = h.select(queue.map(|q| q.0), sharding_key.as_deref())?;
                    part.touched.push(h);
                    QueueList::from_buf([QueueRef::new(topic, q)])
                }
                Destination::Topics(topics) => {
                    self.one_queue_each(&topics, &message, &mut part.touched)
                        .await?
                }
                Destination::Exchange {
                    vhost,
                    exchange,
                    key,
                    headers,
                } => {
                    let routed = self.router.route(&vhost, &exchange, &key, &headers)?;
                    self.one_queue_each(&routed.topics, &message, &mut part.touched)
                        .await?
                }
            };
            if self.config.consumer_lag_limit.is_some() {
                for h in &part.touched[touched_from..] {
                    if !flow.iter().any(|f| Arc::ptr_eq(f, h)) {
                        flow.push(Arc::clone(h));
                    }
                }
            }
            let limited: Vec<crate::GroupSpec> = if self.endpoints.any_limited() {
                queues
                    .iter()
                    .filter_map(|q| self.endpoints.limits_for(&q.topic))
                    .collect()
            } else {
                Vec::new()
            };
            if !limited.is_empty() {
                let touched = part.touched.split_off(touched_from);
                // Everything before it first, so the limit counts it.
                let done = std::mem::replace(&mut part, Part::new(durable));
                answers.extend(self.write_part(done).await?);
                answers.push(
                    self.publish_limited(
                        message, queues, &remote, touched, retain, &limited, durable,
                    )
                    .await?,
                );
                continue;
            }
            if let Some(topic) = &retain {
                part.retained
                    .extend(self.retained.stage(topic, &message, &mut part.batch));
            }
            if queues.is_empty() && remote.is_empty() {
                part.touched.truncate(touched_from);
                part.staged.push(Staged::Skipped);
                continue;
            }
            // A run of messages to one topic keeps it listed once.
            if touched_from > 0
                && part.touched.len() == touched_from + 1
                && Arc::ptr_eq(&part.touched[touched_from - 1], &part.touched[touched_from])
            {
                part.touched.pop();
            }
            part.published.note(&message.topic, &message.producer_group);
            part.append(message, queues, &remote);
            part.staged.push(Staged::Appended);
        }
        if !part.retained.is_empty() {
            // Retained settings borrow the broker's index: written before returning.
            answers.extend(self.write_part(part).await?);
            self.flow_wait(&flow).await;
            return Ok(Submitted::ready(Ok(answers)));
        }
        let written = self.queue_part(part).await?;
        let inner = Arc::clone(self);
        Ok(Submitted(Box::pin(async move {
            answers.extend(written.await?);
            inner.flow_wait(&flow).await;
            Ok(answers)
        })))
    }

    /// Flow control by consumer lag ([`crate::CoreConfig::consumer_lag_limit`]): wait
    /// while a topic just published to holds more than the limit unconsumed and its
    /// group's members are making progress, until it is back under half the limit, or
    /// [`crate::config::FLOW_MAX_WAIT`] has passed.
    async fn flow_wait(&self, topics: &[Arc<TopicHandle>]) {
        let Some(limit) = self.config.consumer_lag_limit else {
            return;
        };
        let deadline = tokio::time::Instant::now() + crate::config::FLOW_MAX_WAIT;
        for h in topics {
            let mut threshold = limit;
            loop {
                let moved = h.flow.moved.notified();
                let progress = h
                    .flow
                    .progress_at
                    .load(std::sync::atomic::Ordering::Acquire);
                if progress == 0
                    || h.watcher_count() != 1
                    || self.clock.now().saturating_sub(progress) > 1_000
                {
                    break;
                }
                let committed = h.flow.committed.load(std::sync::atomic::Ordering::Acquire);
                let next: u64 = (0..h.queue_count())
                    .filter_map(|q| {
                        self.store
                            .queue_range(&QueueRef::new(h.name.clone(), q))
                            .ok()
                    })
                    .map(|r| r.next.0)
                    .sum();
                if next.saturating_sub(committed) <= threshold {
                    break;
                }
                self.flow_waits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if tokio::time::timeout_at(deadline, moved).await.is_err() {
                    return;
                }
                threshold = limit / 2;
            }
        }
    }

    /// Write a part; the answers of its items, in order. Its retained settings are
    /// confirmed in memory once the write holding them has succeeded.
    async fn write_part(self: &Arc<Self>, mut part: Part<'_>) -> Result<Vec<Option<Published>>> {
        let mut retained = std::mem::take(&mut part.retained);
        let answers = match self.queue_part(part).await {
            Ok(written) => written.await,
            Err(e) => Err(e),
        };
        if answers.is_ok() {
            retained
                .iter_mut()
                .for_each(crate::retained::Staged::confirm);
        }
        drop(retained);
        answers
    }

    /// Queue a part without retained settings for its store write (in call order);
    /// the returned future answers as [`ShardCore::write_part`] once it is durable.
    async fn queue_part(self: &Arc<Self>, part: Part<'_>) -> Result<PartWrite> {
        let Part {
            batch,
            staged,
            touched,
            published,
            retained,
            earliest_timer,
            forwards,
        } = part;
        debug_assert!(retained.is_empty());
        drop(retained);
        if batch.is_empty() {
            let none = staged.into_iter().map(|_| None).collect();
            return Ok(Box::pin(std::future::ready(Ok(none))));
        }
        // The groups consuming what it touched are woken by the store as soon as the
        // batch is readable (before its fsync), not through this task.
        let write = self
            .store
            .write_queued(batch, Box::new(move || wake_topics(&touched)))
            .await?;
        let inner = Arc::clone(self);
        Ok(Box::pin(async move {
            let receipt = write.await?;
            for d in forwards {
                inner.routes[usize::from(d)].kick.notify_one();
            }
            Ok(inner.written(receipt, staged, &published, earliest_timer))
        }))
    }

    /// A part's write succeeded: count it, note its timers; the answers of its items.
    fn written(
        &self,
        receipt: mqgate_store::WriteReceipt,
        staged: Vec<Staged>,
        published: &PublishedRuns,
        earliest_timer: Option<u64>,
    ) -> Vec<Option<Published>> {
        if let Some(due) = earliest_timer {
            self.timer_added(due);
        }
        self.producers.count(published);
        let mut appended = receipt.appended.into_iter();
        let mut timers = receipt.timers.into_iter();
        staged
            .into_iter()
            .map(|s| match s {
                Staged::Skipped => None,
                Staged::Appended => appended.next().map(|a| {
                    let (offsets, forwarded) = crate::outbox::split_offsets(a.offsets);
                    Published::Stored {
                        id: a.id,
                        offsets,
                        refused: Vec::new(),
                        forwarded,
                    }
                }),
                Staged::Timer => timers.next().map(|timer| Published::Delayed { timer }),
            })
            .collect()
    }

    /// A message routed to endpoints with length limits, stored on its own: full
    /// `reject-publish` endpoints are left out (and named in the answer), `drop-head`
    /// ones are trimmed after the write.
    #[allow(clippy::too_many_arguments)]
    async fn publish_limited(
        self: &Arc<Self>,
        message: Message,
        mut queues: QueueList,
        remote: &Remote,
        mut touched: Vec<Arc<TopicHandle>>,
        retain: Option<String>,
        limited: &[crate::GroupSpec],
        durable: bool,
    ) -> Result<Option<Published>> {
        use crate::endpoint::Overflow;
        let size = message.body.len() as u64;
        let mut refused = Vec::new();
        // reject-publish-dlx: the refused message is dead-lettered (`maxlen`), in the
        // same write as its other destinations.
        let mut dead_letters = Vec::new();
        for spec in limited {
            let rejects = matches!(
                spec.policy.overflow,
                Overflow::RejectPublish | Overflow::RejectPublishDlx
            );
            if rejects && self.is_full(spec, size).await {
                refused.extend(spec.topics.iter().cloned());
                if let (Overflow::RejectPublishDlx, Some(dl)) =
                    (spec.policy.overflow, &spec.policy.dead_letter)
                {
                    dead_letters.push(dl.clone());
                }
            }
        }
        queues.retain(|q| !refused.contains(&q.topic));
        touched.retain(|h| !refused.contains(&h.name));
        let mut part = Part::new(durable);
        // A retained setting holds whatever its destinations said (MQTT acknowledges it).
        if let Some(topic) = &retain {
            part.retained
                .extend(self.retained.stage(topic, &message, &mut part.batch));
        }
        let as_stored = (!dead_letters.is_empty()).then(|| mqgate_store::StoredMessage {
            id: MessageId(0),
            store_timestamp: mqgate_store::now_millis(),
            size: 0,
            message: message.clone(),
        });
        let stored = !queues.is_empty() || !remote.is_empty();
        if stored {
            // The message's own append first: the answer describes it, not a copy.
            part.touched = touched;
            part.published.note(&message.topic, &message.producer_group);
            part.append(message, queues, remote);
            part.staged.push(Staged::Appended);
        }
        let mut dead_woken = Vec::new();
        if let Some(original) = &as_stored {
            for dl in &dead_letters {
                dead_woken.extend(
                    crate::endpoint::stage(
                        self,
                        dl,
                        original,
                        crate::endpoint::DeathReason::MaxLen,
                        &mut part.batch,
                    )
                    .await?,
                );
            }
        }
        let written = self.write_part(part).await?;
        let mut answer = if stored {
            written.into_iter().next().flatten()
        } else {
            Some(Published::Refused {
                by: refused.clone(),
            })
        };
        if !dead_woken.is_empty() {
            self.dead_lettered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        for t in &dead_woken {
            self.wake_topic(t);
        }
        if let Some(Published::Stored { refused: r, .. }) = &mut answer {
            *r = refused;
        }
        for spec in limited {
            if spec.policy.overflow == Overflow::DropHead {
                self.trim(spec).await;
            }
        }
        Ok(answer)
    }

    /// One queue (round robin) of each topic.
    async fn one_queue_each(
        &self,
        topics: &[TopicName],
        message: &Message,
        touched: &mut Vec<Arc<TopicHandle>>,
    ) -> Result<QueueList> {
        let mut queues = QueueList::with_capacity(topics.len());
        for t in topics {
            let h = self.topic_handle(t).await?;
            queues.push(QueueRef::new(t.clone(), h.select_for(message)?));
            touched.push(h);
        }
        Ok(queues)
    }
}

/// Wake the groups watching each topic once (a batch names a topic per message).
fn wake_topics(touched: &[Arc<TopicHandle>]) {
    let mut woken: Vec<&Arc<TopicHandle>> = Vec::new();
    for h in touched {
        if !woken.iter().any(|w| Arc::ptr_eq(w, h)) {
            h.wake();
            woken.push(h);
        }
    }
}

/// A part's queued write and what follows it.
type PartWrite = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<Option<Published>>>> + Send + 'static>,
>;

/// A publish batch whose store write is queued ([`crate::Broker::publish_submit`]):
/// resolves to the batch's answers, as [`crate::Broker::publish_batch`] returns them,
/// once the write is durable (and flow control, if on, lets the publisher go on).
#[must_use = "a submitted batch is answered only when awaited"]
pub struct Submitted(PartWrite);

impl Submitted {
    pub(crate) fn boxed(f: PartWrite) -> Self {
        Self(f)
    }

    /// A submitted batch answered by `answers` (a relay's reply, awaited there).
    pub fn new(
        answers: impl std::future::Future<Output = Result<Vec<Option<Published>>>> + Send + 'static,
    ) -> Self {
        Self(Box::pin(answers))
    }

    fn ready(r: Result<Vec<Option<Published>>>) -> Self {
        Self(Box::pin(std::future::ready(r)))
    }
}

impl std::fmt::Debug for Submitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Submitted")
    }
}

impl std::future::Future for Submitted {
    type Output = Result<Vec<Option<Published>>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl crate::Broker {
    /// Publishes that waited for consumers to catch up (flow control by consumer lag).
    pub fn flow_waits(&self) -> u64 {
        self.inner
            .flow_waits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publish a batch: every message (to a topic, to resolved topics, or through an
    /// exchange; now or delayed) and the records with them in one atomic store write
    /// (one fsync when durable). Answers, in order: where each message was stored, its
    /// timer when delayed, `None` when it went nowhere. An exchange that does not exist
    /// fails the whole batch. See [`crate::publish`].
    pub async fn publish_batch(&self, batch: PublishBatch) -> Result<Vec<Option<Published>>> {
        self.inner.publish_batch(batch).await
    }

    /// [`Broker::publish_batch`] in two steps, so a connection can read and route its
    /// next publishes while earlier ones sync. When this returns, the batch's store
    /// write is queued: batches submitted one after another by one caller are stored
    /// in that order. The [`Submitted`] resolves to the same answers once the write is
    /// durable; until then nothing may be acknowledged. The store syncs batches in the
    /// order they were queued, so a caller takes the answers in that order too
    /// ([`crate::Pipeline`] does).
    pub async fn publish_submit(&self, batch: PublishBatch) -> Result<Submitted> {
        self.inner.publish_submit(batch).await
    }

    /// Publish one message to a topic: round robin, by sharding key, or to a given
    /// queue; now or after a delay. Returns once stored as durably as the store's policy
    /// promises. A one-message [`Broker::publish_batch`].
    pub async fn publish(&self, p: Publish) -> Result<Published> {
        let Publish {
            message,
            sharding_key,
            queue,
            delay,
        } = p;
        let to = Destination::Topic {
            topic: message.topic.clone(),
            queue,
            sharding_key,
        };
        self.publish_one(Outgoing {
            message,
            to,
            delay,
            retain: None,
        })
        .await
    }

    /// Publish one message through an exchange of `vhost`: stored once and indexed into
    /// one queue of every topic the exchange routes to (none: `routed() == 0`). A
    /// one-message [`Broker::publish_batch`].
    pub async fn publish_exchange(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        headers: &[(String, HeaderValue)],
        message: Message,
        delay: Option<Delay>,
    ) -> Result<Published> {
        let to = Destination::Exchange {
            vhost: vhost.to_owned(),
            exchange: exchange.to_owned(),
            key: routing_key.to_owned(),
            headers: headers.to_vec(),
        };
        self.publish_one(Outgoing {
            message,
            to,
            delay,
            retain: None,
        })
        .await
    }

    async fn publish_one(&self, item: Outgoing) -> Result<Published> {
        let mut batch = PublishBatch::new();
        batch.push(item);
        Ok(self
            .publish_batch(batch)
            .await?
            .pop()
            .flatten()
            .unwrap_or(Published::Stored {
                id: MessageId(0),
                offsets: Vec::new(),
                refused: Vec::new(),
                forwarded: Vec::new(),
            }))
    }
}

impl crate::broker::Common {
    /// The due time of a delay, or `None` when it is due now.
    pub(crate) fn due(&self, delay: Option<Delay>) -> Option<Millis> {
        let delay = delay?;
        let now = self.clock.now();
        let due = match delay {
            Delay::Level(l) => now.saturating_add(
                u64::try_from(self.config.level_delay(l).as_millis()).unwrap_or(u64::MAX),
            ),
            Delay::For(d) => now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Delay::At(t) => t,
        };
        (due > now).then_some(due)
    }
}

impl ShardCore {
    /// What the core reads from a message's user headers before storing it: its keys
    /// (`x-keys`) and producer group (`x-producer-group`), then the default group.
    pub(crate) fn stamp(&self, message: &mut Message) {
        if message.keys.is_empty() {
            if let Some(k) = props::get(&message.properties, props::KEYS_HEADER) {
                message.keys = props::split_keys(k);
            }
        }
        if let Some(g) = props::get(&message.properties, props::PRODUCER_GROUP_HEADER)
            .and_then(|g| props::producer_group_name(&String::from_utf8_lossy(g)))
        {
            message.producer_group = g.into();
        }
        if message.producer_group.is_empty() {
            // The configured default is shared, not copied into every message, when it
            // is the built-in one.
            let default = &self.config.default_producer_group;
            message.producer_group = if default == crate::config::DEFAULT_PRODUCER_GROUP {
                ProducerGroup::Borrowed(crate::config::DEFAULT_PRODUCER_GROUP)
            } else {
                ProducerGroup::Owned(default.clone())
            };
        }
    }
}
