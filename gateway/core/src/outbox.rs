//! Cross-shard effects exactly once (issue 16, `docs/design/sharding.md` section 5).
//!
//! A publish whose destinations live in several shards commits once, atomically, in its
//! **home** shard H: one append of the message into H's own queues and into an
//! **outbox queue** per destination shard D (topic `%OUTBOX%<D>`, one queue). The
//! message carries, in the property [`PROP_FORWARD`], which of D's topics it goes to.
//! The body is stored once in H (the outbox entries point at it, as any queue entry
//! does), and the outbox queue's dense offsets are the sequence numbers of H's effects
//! on D, in commit order.
//!
//! A **forwarder** (one per (H, D), on H's owner) reads the outbox queue from D's
//! high-water mark for H and hands the entries to D's [`Inbox`]. D applies them in one
//! batch: each message (without the property) appended into its topics, and
//! `core.inbox[H]` = the next offset to apply, in the same batch. D has one fenced
//! writer and applies under a lock per source, so an entry is applied at most once
//! whoever sends it (a replay, a paused old owner of H, a retry after a lost reply),
//! and at least once because H keeps it until D's mark covers it: then the forwarder
//! truncates the outbox queue below the mark. A new owner of H (after a crash between
//! the commit and the forwarding) finds the entries in H's log and forwards what is
//! above each D's mark.
//!
//! Retention: [`retention_floor`] is the oldest message an outbox queue still points at;
//! the home shard's owner sets it on its store (`Store::set_retention_floor`) so
//! retention never deletes a message before every destination has it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{BufMut, Bytes};
use mqgate_store::{
    Message, MessageId, QueueList, QueueOffset, QueueRef, ReadLimits, Store, StoredMessage,
    TopicName, WriteBatch,
};

use crate::error::{CoreError, Result};
use crate::wire::{put_str, Reader};

/// A shard's number.
pub type ShardId = u16;

/// The message property that says which topics of which shards a message goes to
/// (an internal name: adapters deliver only the properties they know).
pub const PROP_FORWARD: &str = "core.fwd";

/// Where D keeps, per source shard H, the next outbox offset of H to apply.
pub const NS_INBOX: &str = "core.inbox";

/// The outbox topic of a home shard for destination `dest`.
pub fn outbox_topic(dest: ShardId) -> TopicName {
    TopicName::new(format!("%OUTBOX%{dest:03}")).expect("a valid topic name")
}

/// Entries below a destination's mark gathered in an outbox before a forwarder drops
/// them (see [`Forwarder::drain_to`]).
pub const TRIM_EVERY: u64 = 256;

/// The destination shard of an outbox topic.
pub fn outbox_dest(topic: &TopicName) -> Option<ShardId> {
    topic.as_str().strip_prefix("%OUTBOX%")?.parse().ok()
}

/// A stored message's queue offsets split into its own queues and the topics it was
/// forwarded to (the [`PROP_FORWARD`] plan is not at hand here: the outbox entries
/// stand for their shards, named `%OUTBOX%<shard>`).
pub(crate) fn split_offsets(
    offsets: Vec<(QueueRef, QueueOffset)>,
) -> (Vec<(QueueRef, QueueOffset)>, Vec<TopicName>) {
    if !offsets.iter().any(|(q, _)| is_outbox(&q.topic)) {
        return (offsets, Vec::new());
    }
    let (fwd, own): (Vec<_>, Vec<_>) = offsets.into_iter().partition(|(q, _)| is_outbox(&q.topic));
    (own, fwd.into_iter().map(|(q, _)| q.topic).collect())
}

/// Whether `topic` is an outbox (the broker's own, not listed to users).
pub fn is_outbox(topic: &TopicName) -> bool {
    topic.as_str().starts_with("%OUTBOX%")
}

pub(crate) fn outbox_ref(dest: ShardId) -> QueueRef {
    outbox_queue(dest)
}

fn outbox_queue(dest: ShardId) -> QueueRef {
    QueueRef::new(outbox_topic(dest), 0)
}

fn encode_forward(remote: &BTreeMap<ShardId, Vec<TopicName>>) -> Bytes {
    let mut out = Vec::new();
    out.put_u32_le(remote.len() as u32);
    for (dest, topics) in remote {
        out.put_u32_le(u32::from(*dest));
        out.put_u32_le(topics.len() as u32);
        for t in topics {
            put_str(&mut out, t.as_str());
        }
    }
    Bytes::from(out)
}

fn decode_forward(v: &Bytes) -> Result<BTreeMap<ShardId, Vec<TopicName>>> {
    let mut r = Reader(v.clone());
    let n = r.u32()?;
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let dest = ShardId::try_from(r.u32()?)
            .map_err(|_| CoreError::Invalid("forward: shard out of range".into()))?;
        let count = r.u32()?;
        let mut topics = Vec::new();
        for _ in 0..count {
            topics.push(TopicName::new(r.string()?)?);
        }
        out.insert(dest, topics);
    }
    Ok(out)
}

/// Create the home shard's outbox topics for `dests` (idempotent).
pub async fn ensure_outboxes(
    store: &dyn Store,
    dests: impl IntoIterator<Item = ShardId>,
) -> Result<()> {
    for d in dests {
        let t = outbox_topic(d);
        if store.topic(&t).is_none() {
            store.create_topic(&t, 1).await?;
        }
    }
    Ok(())
}

/// Stage in `batch` the publish of `message` into the home shard's `local` queues and
/// into `remote` (destination shard -> its topics): one append, atomic with whatever
/// else the batch holds. The outbox topics must exist ([`ensure_outboxes`]).
pub fn stage(
    batch: &mut WriteBatch,
    mut message: Message,
    local: impl Into<QueueList>,
    remote: &BTreeMap<ShardId, Vec<TopicName>>,
) {
    let mut local = local.into();
    message.properties.retain(|(k, _)| k != PROP_FORWARD);
    if !remote.is_empty() {
        message
            .properties
            .push((PROP_FORWARD.into(), encode_forward(remote)));
        local.extend(remote.keys().map(|d| outbox_queue(*d)));
    }
    batch.append(message, local);
}

/// The oldest message an outbox queue of `store` still points at (for
/// `Store::set_retention_floor`); `None` when every outbox is empty.
pub async fn retention_floor(store: &dyn Store, dests: &[ShardId]) -> Result<Option<MessageId>> {
    let mut floor: Option<MessageId> = None;
    for d in dests {
        let q = outbox_queue(*d);
        let Ok(range) = store.queue_range(&q) else {
            continue;
        };
        if range.min >= range.next {
            continue;
        }
        if let Some(first) = store
            .read(&q, range.min, ReadLimits::count(1))
            .await?
            .first()
        {
            let id = first.message.id;
            floor = Some(floor.map_or(id, |f| f.min(id)));
        }
    }
    Ok(floor)
}

/// A batch of a home shard's effects on one destination: the outbox entries from
/// offset `first` on, in order.
#[derive(Clone, Debug)]
pub struct ForwardReq {
    /// The home shard.
    pub source: ShardId,
    /// The outbox offset of the first entry.
    pub first: u64,
    /// The messages, at offsets `first`, `first + 1`, ...
    pub entries: Vec<Arc<StoredMessage>>,
}

/// What the destination answers: the next offset of the source it will apply. Below
/// `first` of a request: the request is applied (or was before); above: entries are
/// missing before `first`, and the forwarder resends from the mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardReply {
    /// The destination's mark for the source after the request.
    pub next: u64,
    /// How many entries of the request it applied now (the rest: duplicates).
    pub applied: usize,
}

/// A destination shard as a forwarder reaches it: its owner in this process (the
/// [`Inbox`] itself), or over the cluster's relay.
#[async_trait]
pub trait ForwardTarget: Send + Sync {
    /// The destination's mark for `source`.
    async fn next(&self, source: ShardId) -> Result<u64>;
    /// Apply a request (see [`Inbox::apply`]).
    async fn apply(&self, req: ForwardReq) -> Result<ForwardReply>;
}

/// The destination side: applies forwarded effects into its shard's store, each once.
pub struct Inbox {
    shard: ShardId,
    store: Arc<dyn Store>,
    locks: parking_lot::Mutex<HashMap<ShardId, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// The inbox of `shard`, whose store is `store`.
    pub fn new(shard: ShardId, store: Arc<dyn Store>) -> Self {
        Self {
            shard,
            store,
            locks: parking_lot::Mutex::default(),
        }
    }

    async fn mark(&self, source: ShardId) -> Result<u64> {
        Ok(
            match self.store.kv_get(NS_INBOX, &source.to_be_bytes()).await? {
                Some(v) if v.len() == 8 => u64::from_be_bytes(v[..].try_into().expect("8 bytes")),
                Some(v) => {
                    return Err(CoreError::Invalid(format!(
                        "inbox mark of shard {source}: {} bytes",
                        v.len()
                    )))
                }
                None => 0,
            },
        )
    }

    /// Apply `req`: entries below this shard's mark for the source are dropped, the
    /// rest appended to their topics here (a topic this shard does not have is skipped
    /// and logged: its endpoint was deleted), with the new mark, in one batch.
    pub async fn apply(&self, req: ForwardReq) -> Result<ForwardReply> {
        Ok(self.apply_touched(req).await?.0)
    }

    /// This shard's mark for `source`: the next outbox offset of it to apply.
    pub async fn next_for(&self, source: ShardId) -> Result<u64> {
        self.mark(source).await
    }

    /// [`Inbox::apply`], also naming the topics it appended to (to wake their readers).
    ///
    /// Runs as a task of its own, holding the source's lock until its write is done:
    /// a caller that gives up waiting (a forwarder stopped because its home shard
    /// moved) must not release the lock while the write it queued can still land, or
    /// the next request would read the old mark and apply the same entries again.
    pub async fn apply_touched(&self, req: ForwardReq) -> Result<(ForwardReply, Vec<TopicName>)> {
        let lock = Arc::clone(self.locks.lock().entry(req.source).or_default());
        let inbox = Inbox {
            shard: self.shard,
            store: Arc::clone(&self.store),
            locks: parking_lot::Mutex::default(),
        };
        tokio::spawn(async move {
            let _held = lock.lock_owned().await;
            inbox.apply_locked(req).await
        })
        .await
        .map_err(|e| CoreError::Invalid(format!("applying forwarded entries: {e}")))?
    }

    /// The body of [`Inbox::apply_touched`], under the source's lock.
    async fn apply_locked(&self, req: ForwardReq) -> Result<(ForwardReply, Vec<TopicName>)> {
        let next = self.mark(req.source).await?;
        if req.first > next {
            return Ok((ForwardReply { next, applied: 0 }, Vec::new()));
        }
        let skip = (next - req.first) as usize;
        if skip >= req.entries.len() {
            return Ok((ForwardReply { next, applied: 0 }, Vec::new()));
        }
        let mut batch = WriteBatch::new();
        let mut applied = 0;
        let mut touched: Vec<TopicName> = Vec::new();
        for stored in &req.entries[skip..] {
            let mut m = stored.message.clone();
            let Some(fwd) = crate::props::get(&m.properties, PROP_FORWARD) else {
                return Err(CoreError::Invalid(format!(
                    "forwarded message {:?} has no {PROP_FORWARD}",
                    stored.id
                )));
            };
            let mut plan = decode_forward(fwd)?;
            m.properties.retain(|(k, _)| k != PROP_FORWARD);
            let topics = plan.remove(&self.shard).unwrap_or_default();
            let mut queues = Vec::with_capacity(topics.len());
            for t in topics {
                match self.store.topic(&t) {
                    Some(cfg) => {
                        if !touched.contains(&t) {
                            touched.push(t.clone());
                        }
                        queues.push(QueueRef::new(
                            t,
                            crate::topics::queue_for(&m, cfg.queue_count),
                        ))
                    }
                    None => tracing::warn!(
                        shard = self.shard,
                        source = req.source,
                        topic = %t,
                        "core: a forwarded message's topic is not in this shard (deleted?); skipped"
                    ),
                }
            }
            if !queues.is_empty() {
                batch.append(m, queues);
            }
            applied += 1;
        }
        let next = req.first + req.entries.len() as u64;
        batch.kv_put(
            NS_INBOX,
            Bytes::copy_from_slice(&req.source.to_be_bytes()),
            Bytes::copy_from_slice(&next.to_be_bytes()),
        );
        self.store.write(batch).await?;
        Ok((ForwardReply { next, applied }, touched))
    }
}

#[async_trait]
impl ForwardTarget for Inbox {
    async fn next(&self, source: ShardId) -> Result<u64> {
        self.mark(source).await
    }

    async fn apply(&self, req: ForwardReq) -> Result<ForwardReply> {
        Inbox::apply(self, req).await
    }
}

/// The home side for one destination: moves the outbox queue's entries to it.
pub struct Forwarder {
    home: ShardId,
    dest: ShardId,
    store: Arc<dyn Store>,
    target: Arc<dyn ForwardTarget>,
    /// Entries per request.
    pub batch: usize,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("home", &self.home)
            .field("dest", &self.dest)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Forward `home`'s effects on `dest` from `store` (the home shard's) to `target`.
    pub fn new(
        home: ShardId,
        dest: ShardId,
        store: Arc<dyn Store>,
        target: Arc<dyn ForwardTarget>,
    ) -> Self {
        Self {
            home,
            dest,
            store,
            target,
            batch: 256,
        }
    }

    /// Send the next request (from the destination's mark) and drop what it covers
    /// from the outbox. Returns how many entries the destination applied now; 0 and
    /// an empty outbox: nothing to do.
    pub async fn pump(&self) -> Result<usize> {
        let q = outbox_queue(self.dest);
        let range = self.store.queue_range(&q)?;
        let mark = self.target.next(self.home).await?;
        if mark > range.min.0 {
            self.trim(&q, mark.min(range.next.0)).await?;
        }
        if mark < range.min.0 {
            // Only this forwarder truncates, and only below the mark: a destination
            // whose mark went back lost a committed write of its own.
            return Err(CoreError::Invalid(format!(
                "shard {} reports mark {mark} for shard {}, whose outbox starts at {}",
                self.dest, self.home, range.min.0
            )));
        }
        let from = mark;
        if from >= range.next.0 {
            return Ok(0);
        }
        let read = self
            .store
            .read(&q, QueueOffset(from), ReadLimits::count(self.batch))
            .await?;
        let Some(first) = read.first() else {
            return Ok(0);
        };
        let req = ForwardReq {
            source: self.home,
            first: first.entry.offset.0,
            entries: read.iter().map(|m| Arc::clone(&m.message)).collect(),
        };
        let reply = self.target.apply(req).await?;
        self.trim(&q, reply.next).await?;
        Ok(reply.applied)
    }

    /// Forward everything there is now.
    pub async fn drain(&self) -> Result<usize> {
        let mut total = 0;
        loop {
            let n = self.pump().await?;
            total += n;
            if n == 0 {
                let r = self.store.queue_range(&outbox_queue(self.dest))?;
                if self.target.next(self.home).await? >= r.next.0 {
                    return Ok(total);
                }
            }
        }
    }

    /// Forward everything there is now; the destination's mark after it (every entry
    /// below it is applied there). One `next` question, then one request per page,
    /// each answer giving the new mark. Entries below the mark are dropped from the
    /// outbox once at least [`TRIM_EVERY`] have gathered, or all of them with `trim`
    /// (an idle moment): a truncation is a store write, not worth one per message.
    pub async fn drain_to(&self, trim: bool) -> Result<u64> {
        let q = outbox_queue(self.dest);
        let mut mark = self.target.next(self.home).await?;
        loop {
            let range = self.store.queue_range(&q)?;
            if mark < range.min.0 {
                return Err(CoreError::Invalid(format!(
                    "shard {} reports mark {mark} for shard {}, whose outbox starts at {}",
                    self.dest, self.home, range.min.0
                )));
            }
            if mark >= range.next.0 {
                if mark > range.min.0 && (trim || mark - range.min.0 >= TRIM_EVERY) {
                    self.trim(&q, mark).await?;
                }
                return Ok(mark);
            }
            let read = self
                .store
                .read(&q, QueueOffset(mark), ReadLimits::count(self.batch))
                .await?;
            let Some(first) = read.first() else {
                return Err(CoreError::Invalid(format!(
                    "outbox of shard {} for {}: nothing readable at {mark} below {}",
                    self.home, self.dest, range.next.0
                )));
            };
            let req = ForwardReq {
                source: self.home,
                first: first.entry.offset.0,
                entries: read.iter().map(|m| Arc::clone(&m.message)).collect(),
            };
            let reply = self.target.apply(req).await?;
            if reply.next <= mark {
                // Refused (a gap: the destination is behind what it said) or nothing
                // new: ask again next round rather than spin.
                return Ok(reply.next);
            }
            mark = reply.next;
        }
    }

    async fn trim(&self, q: &QueueRef, before: u64) -> Result<()> {
        let range = self.store.queue_range(q)?;
        if before <= range.min.0 {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        batch.truncate(q.clone(), QueueOffset(before.min(range.next.0)));
        self.store.write(batch).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_plan_round_trips() {
        let mut plan = BTreeMap::new();
        plan.insert(
            3,
            vec![
                TopicName::new("q1").unwrap(),
                TopicName::new("%AMQP%/q2").unwrap(),
            ],
        );
        plan.insert(7, vec![]);
        assert_eq!(decode_forward(&encode_forward(&plan)).unwrap(), plan);
        assert!(decode_forward(&encode_forward(&plan).slice(..5)).is_err());
    }
}
