//! Model-based property tests: random operation sequences run against each backend and
//! against a deliberately naive reference model (plain `Vec`s and `BTreeMap`s), and
//! every answer the backend gives is compared with the model's.
//!
//! The universe is small on purpose so that operations collide: topics `t0`..`t3`
//! (plus `nope`, never created) with 1-5 queues, groups `g1`/`g2`, kv namespaces
//! `a`/`b` with a handful of keys, timers due at small times.
//!
//! What the model knows only from the store (it cannot predict them) it learns from the
//! `WriteReceipt`: message ids and timer sequence numbers (checked to increase across
//! the whole run, reopen included) and store timestamps (wall clock; checked never to
//! decrease along a queue, and then used as the truth for `offset_for_timestamp`).
//! Everything else — offsets, ranges, sizes, tag hashes, counters, kv, timers, groups —
//! the model predicts and the test compares exactly.
//!
//! After every op the test also compares `stats()`, `topics()`, `topic()` and every
//! queue's range; at the end of a case it reads everything back in full (every queue,
//! every message id, offsets, groups, kv, timers), and for RocksStore does so again
//! after a final reopen. `Reopen` ops (drop the store, open the same folder) are real
//! restarts on RocksStore and no-ops on MemoryStore.
//!
//! Run: `cargo test -p mqgate-store --test model`. Failure persistence is off (this
//! file is the only artefact); a failing case prints its shrunk op list, and anything
//! found is pinned down as a plain test in `regressions` below.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use mqgate_store::{
    tag_hash, GroupName, MemoryStore, Message, MessageId, Millis, OffsetRange, QueueEntry,
    QueueOffset, QueueRef, ReadLimits, RocksConfig, RocksStore, Store, StoreError, StoreStats,
    StoredMessage, TimerKey, TopicConfig, TopicName, WriteBatch, WriteOp, WriteReceipt,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------
// The universe
// ---------------------------------------------------------------------------------------

/// Topic names ops may create; index 4 (`nope`) is never created.
const TOPICS: [&str; 5] = ["t0", "t1", "t2", "t3", "nope"];
const GROUPS: [&str; 2] = ["g1", "g2"];
const NAMESPACES: [&str; 2] = ["a", "b"];
const KV_KEYS: [&str; 7] = ["", "k", "k1", "k2", "ka", "x", "z"];
const KV_PREFIXES: [&str; 6] = ["", "k", "k1", "ka", "x", "y"];
const MSG_KEYS: [&str; 4] = ["k1", "k2", "k3", "kx"];
const TAGS: [&str; 2] = ["red", "blue"];
const PROP_NAMES: [&str; 2] = ["p", "q"];

fn topic(name: &str) -> TopicName {
    TopicName::new(name).unwrap()
}

fn group(i: u8) -> GroupName {
    GroupName::new(GROUPS[i as usize % GROUPS.len()]).unwrap()
}

// ---------------------------------------------------------------------------------------
// Generated operations (selectors are resolved against the model when the op runs)
// ---------------------------------------------------------------------------------------

/// Which queue an op names.
#[derive(Clone, Debug)]
enum QSel {
    /// One of the queues the model says exist now (or `t0#0` when there is none).
    Known(Index),
    /// One of the queues holding entries now (or as `Known` when there is none).
    Busy(Index),
    /// Any (topic, queue id) of the universe: may be unknown to the store.
    Any(u8, u32),
}

/// An offset, mostly relative to the queue's current min so that reads and truncations
/// land inside the queue; sometimes absolute (below min, or beyond next).
#[derive(Clone, Debug)]
enum OSel {
    /// The queue's min offset plus this (saturating at 0).
    Min(i8),
    Abs(u64),
}

/// A read's byte limit.
#[derive(Clone, Debug)]
enum BSel {
    Abs(usize),
    /// The size of the first `k` entries the read would reach, plus -1, 0 or +1: the
    /// boundary of the "about this many bytes" rule.
    Fit(u8, i8),
    Max,
}

/// Which timer key a `TimerDelete` or `timers_due(after)` names.
#[derive(Clone, Debug)]
enum TSel {
    /// One of the keys the store returned earlier (possibly deleted since).
    Known(Index),
    /// A made-up key.
    Raw(Millis, u64),
}

/// A message's shape.
#[derive(Clone, Debug)]
struct MsgSpec {
    topic: u8,
    producer_group: bool,
    keys: Vec<u8>,
    tags: Option<u8>,
    props: Vec<(u8, Vec<u8>)>,
    body_len: usize,
    body_byte: u8,
    born: Millis,
    reconsume: u32,
    delay: u8,
    deliver_at: Option<Millis>,
}

impl MsgSpec {
    fn build(&self) -> Message {
        Message {
            topic: topic(TOPICS[self.topic as usize % TOPICS.len()]),
            producer_group: if self.producer_group { "pg" } else { "" }.into(),
            keys: self
                .keys
                .iter()
                .map(|k| MSG_KEYS[*k as usize].to_string())
                .collect(),
            tags: self.tags.map(|t| TAGS[t as usize].to_string()),
            properties: self
                .props
                .iter()
                .map(|(n, v)| (PROP_NAMES[*n as usize].into(), Bytes::from(v.clone())))
                .collect(),
            body: Bytes::from(vec![self.body_byte; self.body_len]),
            born_timestamp: self.born,
            reconsume_times: self.reconsume,
            delay_level: self.delay,
            deliver_at: self.deliver_at,
        }
    }
}

/// One operation inside a write batch.
#[derive(Clone, Debug)]
enum BOp {
    Append(MsgSpec, Vec<QSel>),
    Commit(u8, QSel, u64),
    DeleteOffsets(u8, Option<u8>),
    Truncate(QSel, OSel),
    KvPut(u8, u8, Vec<u8>),
    KvDelete(u8, u8),
    TimerPut(Millis, Vec<u8>),
    TimerDelete(TSel),
}

/// How `offset_for_timestamp` picks its timestamp.
#[derive(Clone, Debug)]
enum TsSel {
    /// A store timestamp seen in a receipt, moved by -1, 0 or +1.
    Known(Index, i8),
    Zero,
    Max,
}

/// How `message(id)` picks its id.
#[derive(Clone, Debug)]
enum IdSel {
    Known(Index),
    Raw(u64),
}

#[derive(Clone, Debug)]
enum Op {
    Write(Vec<BOp>),
    CreateTopic(u8, u32),
    DeleteTopic(u8),
    Read(QSel, OSel, usize, BSel),
    OffsetForTimestamp(QSel, TsSel),
    QueueRange(QSel),
    Message(IdSel),
    MessagesByKey(u8, u8, usize),
    CommittedOffset(u8, QSel),
    CommittedOffsets(u8),
    Groups,
    KvGet(u8, u8),
    KvScan(u8, u8, Option<u8>, usize),
    TimersDue(Millis, Option<TSel>, usize),
    NextTimer,
    Stats,
    /// RocksStore: drop and reopen on the same folder. MemoryStore: a no-op.
    Reopen,
}

#[derive(Clone, Debug)]
struct Case {
    /// Queue counts of t0, t1 and (maybe) t2, created before the ops.
    initial: Vec<(u8, u32)>,
    ops: Vec<Op>,
    /// RocksStore: a tiny tail cache, so reads go to RocksDB and decode records.
    small_tail_cache: bool,
}

fn qsel() -> impl Strategy<Value = QSel> {
    prop_oneof![
        8 => any::<Index>().prop_map(QSel::Known),
        2 => (0u8..5, 0u32..5).prop_map(|(t, q)| QSel::Any(t, q)),
    ]
}

/// A queue for a query: mostly one that holds entries, so answers are not all empty.
fn query_qsel() -> impl Strategy<Value = QSel> {
    prop_oneof![
        5 => any::<Index>().prop_map(QSel::Busy),
        3 => any::<Index>().prop_map(QSel::Known),
        2 => (0u8..5, 0u32..5).prop_map(|(t, q)| QSel::Any(t, q)),
    ]
}

fn osel(max_delta: i8) -> impl Strategy<Value = OSel> {
    prop_oneof![
        3 => (-2i8..=max_delta).prop_map(OSel::Min),
        1 => (0u64..25).prop_map(OSel::Abs),
    ]
}

fn tsel() -> impl Strategy<Value = TSel> {
    prop_oneof![
        3 => any::<Index>().prop_map(TSel::Known),
        1 => (0u64..20, 0u64..80).prop_map(|(d, s)| TSel::Raw(d, s)),
    ]
}

fn msg_spec() -> impl Strategy<Value = MsgSpec> {
    (
        prop_oneof![3 => 0u8..2, 1 => 0u8..5],
        any::<bool>(),
        prop::collection::vec(0u8..4, 0..3),
        prop::option::of(0u8..2),
        prop::collection::vec((0u8..2, prop::collection::vec(any::<u8>(), 0..6)), 0..3),
        0usize..80,
        any::<u8>(),
        (0u64..1_000, 0u32..3, 0u8..3, prop::option::of(0u64..1_000)),
    )
        .prop_map(
            |(
                topic,
                producer_group,
                keys,
                tags,
                props,
                body_len,
                body_byte,
                (born, reconsume, delay, deliver_at),
            )| {
                MsgSpec {
                    topic,
                    producer_group,
                    keys,
                    tags,
                    props,
                    body_len,
                    body_byte,
                    born,
                    reconsume,
                    delay,
                    deliver_at,
                }
            },
        )
}

fn batch_op() -> impl Strategy<Value = BOp> {
    prop_oneof![
        8 => (msg_spec(), prop_oneof![
            1 => prop::collection::vec(qsel(), 0..1),
            9 => prop::collection::vec(qsel(), 1..4),
        ])
            .prop_map(|(m, q)| BOp::Append(m, q)),
        2 => (0u8..2, qsel(), 0u64..20).prop_map(|(g, q, o)| BOp::Commit(g, q, o)),
        1 => (0u8..2, prop::option::of(0u8..5)).prop_map(|(g, t)| BOp::DeleteOffsets(g, t)),
        1 => (qsel(), osel(3)).prop_map(|(q, b)| BOp::Truncate(q, b)),
        3 => (0u8..2, 0u8..7, prop::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(n, k, v)| BOp::KvPut(n, k, v)),
        1 => (0u8..2, 0u8..7).prop_map(|(n, k)| BOp::KvDelete(n, k)),
        2 => (0u64..20, prop::collection::vec(any::<u8>(), 0..4)).prop_map(|(d, p)| BOp::TimerPut(d, p)),
        2 => tsel().prop_map(BOp::TimerDelete),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let max_bytes = prop_oneof![
        2 => (0usize..400).prop_map(BSel::Abs),
        2 => (1u8..4, -1i8..=1).prop_map(|(k, d)| BSel::Fit(k, d)),
        1 => Just(BSel::Max),
    ];
    let ts = prop_oneof![
        6 => (any::<Index>(), -1i8..=1).prop_map(|(i, d)| TsSel::Known(i, d)),
        1 => Just(TsSel::Zero),
        1 => Just(TsSel::Max),
    ];
    let id = prop_oneof![
        4 => any::<Index>().prop_map(IdSel::Known),
        1 => prop_oneof![0u64..80, Just(u64::MAX)].prop_map(IdSel::Raw),
    ];
    let until = prop_oneof![4 => 0u64..25, 1 => Just(u64::MAX)];
    prop_oneof![
        20 => prop::collection::vec(batch_op(), 1..5).prop_map(Op::Write),
        2 => (0u8..4, 0u32..6).prop_map(|(t, n)| Op::CreateTopic(t, n)),
        1 => (0u8..5).prop_map(Op::DeleteTopic),
        4 => (query_qsel(), osel(1), prop_oneof![1 => Just(0usize), 5 => 1usize..6], max_bytes)
            .prop_map(|(q, f, c, b)| Op::Read(q, f, c, b)),
        2 => (query_qsel(), ts).prop_map(|(q, t)| Op::OffsetForTimestamp(q, t)),
        1 => query_qsel().prop_map(Op::QueueRange),
        2 => id.prop_map(Op::Message),
        2 => (prop_oneof![3 => 0u8..2, 1 => 0u8..5], 0u8..4, 0usize..5).prop_map(|(t, k, l)| Op::MessagesByKey(t, k, l)),
        1 => (0u8..2, qsel()).prop_map(|(g, q)| Op::CommittedOffset(g, q)),
        1 => (0u8..2).prop_map(Op::CommittedOffsets),
        1 => Just(Op::Groups),
        1 => (0u8..2, 0u8..7).prop_map(|(n, k)| Op::KvGet(n, k)),
        2 => (0u8..2, 0u8..6, prop::option::of(0u8..7), 0usize..5)
            .prop_map(|(n, p, a, l)| Op::KvScan(n, p, a, l)),
        2 => (until, prop::option::of(tsel()), 0usize..5).prop_map(|(u, a, l)| Op::TimersDue(u, a, l)),
        1 => Just(Op::NextTimer),
        1 => Just(Op::Stats),
        2 => Just(Op::Reopen),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        1u32..=3,
        1u32..=3,
        prop::option::of(1u32..=3),
        prop::collection::vec(op(), 1..60),
        any::<bool>(),
    )
        .prop_map(|(c0, c1, c2, ops, small_tail_cache)| {
            let mut initial = vec![(0, c0), (1, c1)];
            if let Some(c2) = c2 {
                initial.push((2, c2));
            }
            Case {
                initial,
                ops,
                small_tail_cache,
            }
        })
}

// ---------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MEntry {
    id: u64,
    ts: Millis,
}

/// A queue: `entries[i]` is offset `i` (every entry ever appended since the topic was
/// created); offsets below `min` are gone.
#[derive(Clone, Debug, Default)]
struct MQueue {
    min: u64,
    entries: Vec<MEntry>,
}

impl MQueue {
    fn next(&self) -> u64 {
        self.entries.len() as u64
    }
}

#[derive(Debug, Default)]
struct Model {
    /// id -> (store timestamp, encoded size, message)
    log: BTreeMap<u64, (Millis, u32, Message)>,
    /// topic -> its queues
    topics: BTreeMap<String, Vec<MQueue>>,
    /// (group, topic, queue) -> offset
    offsets: BTreeMap<(String, String, u32), u64>,
    /// (namespace, key) -> value
    kv: BTreeMap<(String, Vec<u8>), Vec<u8>>,
    /// (due, seq) -> payload
    timers: BTreeMap<(Millis, u64), Vec<u8>>,
    /// The highest id or timer seq the store has handed out.
    max_seq: Option<u64>,
    /// Every id the store returned, in order.
    ids: Vec<u64>,
    /// Every timer key the store returned, in order.
    timer_keys: Vec<TimerKey>,
    /// Every store timestamp the store returned.
    timestamps: Vec<Millis>,
}

/// The encoded record size, written from the record layout in `codec.rs`'s documentation.
fn model_size(m: &Message) -> u32 {
    let mut n = 1 + 1 + 8 + 8 + 4 + 1; // version, flags, store ts, born ts, reconsume, delay
    if m.deliver_at.is_some() {
        n += 8;
    }
    n += 2 + m.topic.as_str().len();
    n += 2 + m.producer_group.len();
    if let Some(t) = &m.tags {
        n += 2 + t.len();
    }
    n += 2;
    for k in &m.keys {
        n += 2 + k.len();
    }
    n += 4;
    for (name, value) in &m.properties {
        n += 2 + name.len() + 4 + value.len();
    }
    n += 4 + m.body.len();
    n as u32
}

impl Model {
    /// Every existing queue, sorted.
    fn queue_list(&self) -> Vec<QueueRef> {
        let mut out = Vec::new();
        for (t, qs) in &self.topics {
            for i in 0..qs.len() {
                out.push(QueueRef::new(topic(t), i as u32));
            }
        }
        out
    }

    fn queue(&self, q: &QueueRef) -> Option<&MQueue> {
        self.topics
            .get(q.topic.as_str())
            .and_then(|qs| qs.get(q.queue.0 as usize))
    }

    fn queue_mut(&mut self, q: &QueueRef) -> Option<&mut MQueue> {
        self.topics
            .get_mut(q.topic.as_str())
            .and_then(|qs| qs.get_mut(q.queue.0 as usize))
    }

    fn resolve_q(&self, sel: &QSel) -> QueueRef {
        match sel {
            QSel::Known(i) => {
                let all = self.queue_list();
                if all.is_empty() {
                    QueueRef::new(topic("t0"), 0)
                } else {
                    i.get(&all).clone()
                }
            }
            QSel::Busy(i) => {
                let busy: Vec<QueueRef> = self
                    .queue_list()
                    .into_iter()
                    .filter(|q| !self.range(q).unwrap().is_empty())
                    .collect();
                if busy.is_empty() {
                    self.resolve_q(&QSel::Known(*i))
                } else {
                    i.get(&busy).clone()
                }
            }
            QSel::Any(t, q) => QueueRef::new(topic(TOPICS[*t as usize % TOPICS.len()]), *q),
        }
    }

    fn resolve_o(&self, q: &QueueRef, sel: &OSel) -> u64 {
        match sel {
            OSel::Min(d) => self
                .queue(q)
                .map_or(0, |mq| mq.min)
                .saturating_add_signed(i64::from(*d)),
            OSel::Abs(o) => *o,
        }
    }

    fn resolve_b(&self, q: &QueueRef, from: u64, sel: &BSel) -> usize {
        match sel {
            BSel::Abs(b) => *b,
            BSel::Max => usize::MAX,
            BSel::Fit(k, d) => {
                let Some(mq) = self.queue(q) else { return 0 };
                let sizes: usize = (from.max(mq.min)..mq.next())
                    .take(*k as usize)
                    .map(|o| self.entry(mq, o).size as usize)
                    .sum();
                sizes.saturating_add_signed(isize::from(*d))
            }
        }
    }

    fn resolve_t(&self, sel: &TSel) -> TimerKey {
        match sel {
            TSel::Known(i) if !self.timer_keys.is_empty() => *i.get(&self.timer_keys),
            TSel::Known(_) => TimerKey { due: 0, seq: 0 },
            TSel::Raw(due, seq) => TimerKey {
                due: *due,
                seq: *seq,
            },
        }
    }

    fn range(&self, q: &QueueRef) -> Option<OffsetRange> {
        self.queue(q).map(|mq| OffsetRange {
            min: QueueOffset(mq.min),
            next: QueueOffset(mq.next()),
        })
    }

    fn stored(&self, id: u64) -> Option<StoredMessage> {
        self.log.get(&id).map(|(ts, size, m)| StoredMessage {
            id: MessageId(id),
            store_timestamp: *ts,
            size: *size,
            message: m.clone(),
        })
    }

    fn entry(&self, q: &MQueue, offset: u64) -> QueueEntry {
        let e = &q.entries[offset as usize];
        let (_, size, m) = &self.log[&e.id];
        QueueEntry {
            offset: QueueOffset(offset),
            id: MessageId(e.id),
            size: *size,
            tag_hash: tag_hash(m.tags.as_deref()),
            timestamp: e.ts,
        }
    }

    /// The entries `read` must return.
    fn read(
        &self,
        q: &QueueRef,
        from: u64,
        limits: ReadLimits,
    ) -> Option<Vec<(QueueEntry, StoredMessage)>> {
        let mq = self.queue(q)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for offset in from.max(mq.min)..mq.next() {
            if out.len() >= limits.max_count {
                break;
            }
            let e = self.entry(mq, offset);
            if !out.is_empty() && bytes + e.size as usize > limits.max_bytes {
                break;
            }
            bytes += e.size as usize;
            out.push((e, self.stored(e.id.0).unwrap()));
        }
        Some(out)
    }

    fn offset_for_timestamp(&self, q: &QueueRef, ts: Millis) -> Option<u64> {
        let mq = self.queue(q)?;
        for offset in mq.min..mq.next() {
            if mq.entries[offset as usize].ts >= ts {
                return Some(offset);
            }
        }
        Some(mq.next())
    }

    fn messages_by_key(&self, t: &str, key: &str, limit: usize) -> Vec<StoredMessage> {
        self.log
            .keys()
            .filter(|id| {
                let m = &self.log[*id].2;
                m.topic.as_str() == t && m.keys.iter().any(|k| k == key)
            })
            .take(limit)
            .map(|id| self.stored(*id).unwrap())
            .collect()
    }

    fn committed_offsets(&self, g: &str) -> Vec<(QueueRef, QueueOffset)> {
        self.offsets
            .iter()
            .filter(|((gg, _, _), _)| gg == g)
            .map(|((_, t, q), o)| (QueueRef::new(topic(t), *q), QueueOffset(*o)))
            .collect()
    }

    fn groups(&self) -> Vec<GroupName> {
        let mut out: Vec<GroupName> = Vec::new();
        for (g, _, _) in self.offsets.keys() {
            let g = GroupName::new(g).unwrap();
            if !out.contains(&g) {
                out.push(g);
            }
        }
        out.sort();
        out
    }

    fn kv_scan(
        &self,
        ns: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Vec<(Bytes, Bytes)> {
        self.kv
            .iter()
            .filter(|((n, k), _)| {
                n == ns && k.starts_with(prefix) && after.is_none_or(|a| k.as_slice() > a)
            })
            .take(limit)
            .map(|((_, k), v)| (Bytes::from(k.clone()), Bytes::from(v.clone())))
            .collect()
    }

    fn timers_due(
        &self,
        until: Millis,
        after: Option<TimerKey>,
        limit: usize,
    ) -> Vec<(TimerKey, Bytes)> {
        self.timers
            .iter()
            .map(|((due, seq), p)| {
                (
                    TimerKey {
                        due: *due,
                        seq: *seq,
                    },
                    p,
                )
            })
            .filter(|(k, _)| k.due <= until && after.is_none_or(|a| *k > a))
            .take(limit)
            .map(|(k, p)| (k, Bytes::from(p.clone())))
            .collect()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            messages: self.log.len() as u64,
            log_bytes: self.log.values().map(|(_, s, _)| u64::from(*s)).sum(),
            timers: self.timers.len() as u64,
            topics: self.topics.len() as u64,
            cold_reads: 0,
        }
    }

    fn topics(&self) -> Vec<TopicConfig> {
        self.topics
            .iter()
            .map(|(n, qs)| TopicConfig {
                name: topic(n),
                queue_count: qs.len() as u32,
            })
            .collect()
    }

    fn create_topic(&mut self, name: &str, count: u32) -> Result<TopicConfig, ()> {
        if count == 0 || count > mqgate_store::MAX_QUEUES_PER_TOPIC {
            return Err(());
        }
        let qs = self.topics.entry(name.to_string()).or_default();
        if (qs.len() as u32) > count {
            return Err(());
        }
        qs.resize(count as usize, MQueue::default());
        Ok(TopicConfig {
            name: topic(name),
            queue_count: count,
        })
    }

    fn delete_topic(&mut self, name: &str) -> bool {
        // "Delete a topic, its queues' entries and every group's offsets on it." Offsets
        // are committed on existing topics only, so none are left when it did not exist
        // (`regressions::delete_topic_of_missing_topic_drops_its_offsets`).
        self.offsets.retain(|(_, t, _), _| t != name);
        self.topics.remove(name).is_some()
    }

    /// Learn an id or timer seq: it must exceed everything handed out before.
    fn learn_seq(&mut self, seq: u64, what: &str) -> Result<(), TestCaseError> {
        if let Some(max) = self.max_seq {
            prop_assert!(
                seq > max,
                "{what} {seq} does not exceed the previous id/seq {max}"
            );
        }
        self.max_seq = Some(seq);
        Ok(())
    }

    /// The first queue in `batch` that does not exist (the batch must then fail whole).
    fn first_unknown(&self, batch: &WriteBatch) -> Option<QueueRef> {
        for op in &batch.ops {
            match op {
                WriteOp::Append { queues, .. } => {
                    if let Some(q) = queues.iter().find(|q| self.queue(q).is_none()) {
                        return Some(q.clone());
                    }
                }
                WriteOp::Truncate { queue, .. } if self.queue(queue).is_none() => {
                    return Some(queue.clone())
                }
                _ => {}
            }
        }
        None
    }

    /// Apply a batch the store accepted, learning ids, seqs and timestamps from `receipt`
    /// and checking everything in it the model can predict.
    fn apply(&mut self, batch: &WriteBatch, receipt: &WriteReceipt) -> Result<(), TestCaseError> {
        let appends = batch
            .ops
            .iter()
            .filter(|o| matches!(o, WriteOp::Append { .. }))
            .count();
        let puts = batch
            .ops
            .iter()
            .filter(|o| matches!(o, WriteOp::TimerPut { .. }))
            .count();
        prop_assert_eq!(receipt.appended.len(), appends, "one Appended per Append");
        prop_assert_eq!(receipt.timers.len(), puts, "one TimerKey per TimerPut");
        let (mut ai, mut ti) = (0, 0);
        for op in &batch.ops {
            match op {
                WriteOp::Append { message, queues } => {
                    let a = &receipt.appended[ai];
                    ai += 1;
                    self.learn_seq(a.id.0, "message id")?;
                    self.ids.push(a.id.0);
                    self.timestamps.push(a.store_timestamp);
                    let size = model_size(message);
                    self.log
                        .insert(a.id.0, (a.store_timestamp, size, message.clone()));
                    prop_assert_eq!(a.offsets.len(), queues.len(), "one offset per queue");
                    for (q, (rq, ro)) in queues.iter().zip(&a.offsets) {
                        prop_assert_eq!(rq, q, "offsets in the order the queues were given");
                        let mq = self.queue_mut(q).unwrap();
                        prop_assert_eq!(
                            ro.0,
                            mq.next(),
                            "an append takes the queue's next offset ({})",
                            q
                        );
                        if let Some(last) = mq.entries.last() {
                            prop_assert!(
                                a.store_timestamp >= last.ts,
                                "entry timestamps decrease along {}: {} after {}",
                                q,
                                a.store_timestamp,
                                last.ts
                            );
                        }
                        mq.entries.push(MEntry {
                            id: a.id.0,
                            ts: a.store_timestamp,
                        });
                    }
                }
                WriteOp::CommitOffset {
                    group,
                    queue,
                    offset,
                } => {
                    // "No offsets outlive a topic": a commit on a topic that does not
                    // exist is left out.
                    if !self.topics.contains_key(queue.topic.as_str()) {
                        continue;
                    }
                    self.offsets.insert(
                        (
                            group.as_str().to_string(),
                            queue.topic.as_str().to_string(),
                            queue.queue.0,
                        ),
                        offset.0,
                    );
                }
                WriteOp::DeleteOffsets { group, topic } => {
                    self.offsets.retain(|(g, t, _), _| {
                        !(g == group.as_str() && topic.as_ref().is_none_or(|tt| tt.as_str() == t))
                    });
                }
                WriteOp::Truncate { queue, before } => {
                    let mq = self.queue_mut(queue).unwrap();
                    mq.min = before.0.clamp(mq.min, mq.next());
                }
                WriteOp::KvPut {
                    namespace,
                    key,
                    value,
                } => {
                    self.kv
                        .insert((namespace.clone(), key.to_vec()), value.to_vec());
                }
                WriteOp::KvDelete { namespace, key } => {
                    self.kv.remove(&(namespace.clone(), key.to_vec()));
                }
                WriteOp::TimerPut { due, payload } => {
                    let k = receipt.timers[ti];
                    ti += 1;
                    prop_assert_eq!(k.due, *due, "a timer key keeps its due time");
                    self.learn_seq(k.seq, "timer seq")?;
                    self.timer_keys.push(k);
                    self.timers.insert((k.due, k.seq), payload.to_vec());
                }
                WriteOp::TimerDelete { key } => {
                    self.timers.remove(&(key.due, key.seq));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Memory,
    Rocks,
}

struct Backend {
    kind: Kind,
    small_tail_cache: bool,
    dir: TempDir,
    store: Option<Box<dyn Store>>,
}

impl Backend {
    fn new(kind: Kind, small_tail_cache: bool) -> Self {
        let mut b = Self {
            kind,
            small_tail_cache,
            dir: tempfile::tempdir().expect("tempdir"),
            store: None,
        };
        b.store = Some(b.open());
        b
    }

    fn open(&self) -> Box<dyn Store> {
        match self.kind {
            Kind::Memory => Box::new(MemoryStore::new()),
            Kind::Rocks => {
                let mut cfg = RocksConfig::new(self.dir.path().join("data"));
                cfg.block_cache_bytes = 1 << 20;
                cfg.write_buffer_bytes = 8 << 20;
                if self.small_tail_cache {
                    cfg.tail_cache_bytes = 200;
                }
                Box::new(RocksStore::open(cfg).expect("open rocks"))
            }
        }
    }

    fn s(&self) -> &dyn Store {
        self.store.as_deref().expect("open")
    }

    fn reopen(&mut self) {
        if self.kind == Kind::Rocks {
            drop(self.store.take());
            self.store = Some(self.open());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------

fn limits(max_count: usize, max_bytes: usize) -> ReadLimits {
    ReadLimits {
        max_count,
        max_bytes,
    }
}

fn unknown_queue<T: std::fmt::Debug>(
    r: mqgate_store::Result<T>,
    q: &QueueRef,
    what: &str,
) -> Result<(), TestCaseError> {
    match r {
        Err(StoreError::UnknownQueue(got)) => {
            prop_assert_eq!(&got, q, "{} names the wrong queue", what);
            Ok(())
        }
        other => Err(TestCaseError::fail(format!(
            "{what} on unknown queue {q}: expected UnknownQueue, got {other:?}"
        ))),
    }
}

fn check_read(
    got: &[mqgate_store::QueueMessage],
    want: &[(QueueEntry, StoredMessage)],
    ctx: &str,
) -> Result<(), TestCaseError> {
    let got_entries: Vec<QueueEntry> = got.iter().map(|m| m.entry).collect();
    let want_entries: Vec<QueueEntry> = want.iter().map(|(e, _)| *e).collect();
    prop_assert_eq!(got_entries, want_entries, "{}: entries", ctx);
    for (g, (_, w)) in got.iter().zip(want) {
        prop_assert_eq!(&*g.message, w, "{}: message", ctx);
    }
    Ok(())
}

fn check_messages(
    got: &[Arc<StoredMessage>],
    want: &[StoredMessage],
    ctx: &str,
) -> Result<(), TestCaseError> {
    let got: Vec<StoredMessage> = got.iter().map(|m| (**m).clone()).collect();
    prop_assert_eq!(got, want, "{}", ctx);
    Ok(())
}

/// Cheap checks after every op: counters, topics, every queue's range.
fn check_shape(s: &dyn Store, m: &Model) -> Result<(), TestCaseError> {
    // `cold_reads` counts reads RocksDB could not answer from memory, which is not
    // state the model has: after a `Reopen` the data is in table files not yet in the
    // block cache, and whether a read goes there depends on what was read before
    // (store/tests/cold_reads.rs checks the counter itself).
    let got = StoreStats {
        cold_reads: 0,
        ..s.stats()
    };
    prop_assert_eq!(got, m.stats(), "stats");
    prop_assert_eq!(s.topics(), m.topics(), "topics()");
    for name in TOPICS {
        let want = m.topics.get(name).map(|qs| TopicConfig {
            name: topic(name),
            queue_count: qs.len() as u32,
        });
        prop_assert_eq!(s.topic(&topic(name)), want, "topic({})", name);
    }
    for q in m.queue_list() {
        prop_assert_eq!(s.queue_range(&q).ok(), m.range(&q), "queue_range({})", q);
    }
    Ok(())
}

/// Everything, read back in full (at the end of a case).
async fn check_deep(s: &dyn Store, m: &Model) -> Result<(), TestCaseError> {
    check_shape(s, m)?;
    for q in m.queue_list() {
        let got = s
            .read(&q, QueueOffset(0), ReadLimits::count(usize::MAX))
            .await
            .unwrap();
        check_read(
            &got,
            &m.read(&q, 0, ReadLimits::count(usize::MAX)).unwrap(),
            &format!("full read of {q}"),
        )?;
    }
    for id in &m.ids {
        let got = s
            .message(MessageId(*id))
            .await
            .unwrap()
            .map(|a| (*a).clone());
        prop_assert_eq!(got, m.stored(*id), "message({})", id);
    }
    for g in 0..2 {
        let g = group(g);
        prop_assert_eq!(
            s.committed_offsets(&g).await.unwrap(),
            m.committed_offsets(g.as_str()),
            "committed_offsets({})",
            g
        );
    }
    prop_assert_eq!(s.groups().await.unwrap(), m.groups(), "groups()");
    for ns in NAMESPACES {
        prop_assert_eq!(
            s.kv_scan(ns, b"", None, usize::MAX).await.unwrap(),
            m.kv_scan(ns, b"", None, usize::MAX),
            "kv_scan({})",
            ns
        );
    }
    prop_assert_eq!(
        s.timers_due(u64::MAX, None, usize::MAX).await.unwrap(),
        m.timers_due(u64::MAX, None, usize::MAX),
        "all timers"
    );
    Ok(())
}

async fn step(b: &mut Backend, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match op {
        Op::Write(bops) => {
            let mut batch = WriteBatch::new();
            for bop in bops {
                match bop {
                    BOp::Append(spec, qs) => {
                        batch.append(
                            spec.build(),
                            qs.iter().map(|q| m.resolve_q(q)).collect::<Vec<_>>(),
                        );
                    }
                    BOp::Commit(g, q, o) => {
                        batch.commit_offset(group(*g), m.resolve_q(q), QueueOffset(*o));
                    }
                    BOp::DeleteOffsets(g, t) => {
                        batch.delete_offsets(group(*g), t.map(|t| topic(TOPICS[t as usize])));
                    }
                    BOp::Truncate(q, before) => {
                        let q = m.resolve_q(q);
                        let before = m.resolve_o(&q, before);
                        batch.truncate(q, QueueOffset(before));
                    }
                    BOp::KvPut(n, k, v) => {
                        batch.kv_put(
                            NAMESPACES[*n as usize],
                            KV_KEYS[*k as usize].as_bytes().to_vec(),
                            v.clone(),
                        );
                    }
                    BOp::KvDelete(n, k) => {
                        batch.kv_delete(
                            NAMESPACES[*n as usize],
                            KV_KEYS[*k as usize].as_bytes().to_vec(),
                        );
                    }
                    BOp::TimerPut(due, p) => {
                        batch.timer_put(*due, p.clone());
                    }
                    BOp::TimerDelete(t) => {
                        batch.timer_delete(m.resolve_t(t));
                    }
                }
            }
            let result = b.s().write(batch.clone()).await;
            match (m.first_unknown(&batch), result) {
                (None, Ok(receipt)) => m.apply(&batch, &receipt)?,
                (Some(q), Err(StoreError::UnknownQueue(got))) => {
                    prop_assert!(
                        m.queue(&got).is_none(),
                        "batch refused for {} which exists (first unknown: {})",
                        got,
                        q
                    );
                }
                (None, Err(e)) => {
                    return Err(TestCaseError::fail(format!("valid batch refused: {e:?}")))
                }
                (Some(q), other) => {
                    return Err(TestCaseError::fail(format!(
                        "batch naming unknown queue {q} must fail with UnknownQueue, got {other:?}"
                    )))
                }
            }
        }
        Op::CreateTopic(t, n) => {
            let name = TOPICS[*t as usize];
            let got = b.s().create_topic(&topic(name), *n).await;
            match (m.create_topic(name, *n), got) {
                (Ok(want), Ok(got)) => prop_assert_eq!(got, want, "create_topic({}, {})", name, n),
                (Err(()), Err(StoreError::Invalid(_))) => {}
                (want, got) => {
                    return Err(TestCaseError::fail(format!(
                        "create_topic({name}, {n}): model {want:?}, store {got:?}"
                    )))
                }
            }
        }
        Op::DeleteTopic(t) => {
            let name = TOPICS[*t as usize];
            let got = b.s().delete_topic(&topic(name)).await.unwrap();
            prop_assert_eq!(got, m.delete_topic(name), "delete_topic({}) existed", name);
        }
        Op::Read(q, from, count, bytes) => {
            let q = m.resolve_q(q);
            let from = &m.resolve_o(&q, from);
            let l = limits(*count, m.resolve_b(&q, *from, bytes));
            let got = b.s().read(&q, QueueOffset(*from), l).await;
            match m.read(&q, *from, l) {
                Some(want) => {
                    check_read(&got.unwrap(), &want, &format!("read({q}, {from}, {l:?})"))?
                }
                None => unknown_queue(got, &q, "read")?,
            }
        }
        Op::OffsetForTimestamp(q, ts) => {
            let q = m.resolve_q(q);
            let ts = match ts {
                TsSel::Known(i, d) if !m.timestamps.is_empty() => {
                    i.get(&m.timestamps).saturating_add_signed(i64::from(*d))
                }
                TsSel::Known(..) | TsSel::Zero => 0,
                TsSel::Max => u64::MAX,
            };
            let got = b.s().offset_for_timestamp(&q, ts).await;
            match m.offset_for_timestamp(&q, ts) {
                Some(want) => prop_assert_eq!(
                    got.unwrap(),
                    QueueOffset(want),
                    "offset_for_timestamp({}, {})",
                    q,
                    ts
                ),
                None => unknown_queue(got, &q, "offset_for_timestamp")?,
            }
        }
        Op::QueueRange(q) => {
            let q = m.resolve_q(q);
            let got = b.s().queue_range(&q);
            match m.range(&q) {
                Some(want) => prop_assert_eq!(got.unwrap(), want, "queue_range({})", q),
                None => unknown_queue(got, &q, "queue_range")?,
            }
        }
        Op::Message(id) => {
            let id = match id {
                IdSel::Known(i) if !m.ids.is_empty() => *i.get(&m.ids),
                IdSel::Known(_) => 0,
                IdSel::Raw(id) => *id,
            };
            let got = b
                .s()
                .message(MessageId(id))
                .await
                .unwrap()
                .map(|a| (*a).clone());
            prop_assert_eq!(got, m.stored(id), "message({})", id);
        }
        Op::MessagesByKey(t, k, limit) => {
            let (t, k) = (TOPICS[*t as usize], MSG_KEYS[*k as usize]);
            let got = b.s().messages_by_key(&topic(t), k, *limit).await.unwrap();
            check_messages(
                &got,
                &m.messages_by_key(t, k, *limit),
                &format!("messages_by_key({t}, {k}, {limit})"),
            )?;
        }
        Op::CommittedOffset(g, q) => {
            let (g, q) = (group(*g), m.resolve_q(q));
            let want = m
                .offsets
                .get(&(
                    g.as_str().to_string(),
                    q.topic.as_str().to_string(),
                    q.queue.0,
                ))
                .map(|o| QueueOffset(*o));
            prop_assert_eq!(
                b.s().committed_offset(&g, &q).await.unwrap(),
                want,
                "committed_offset({}, {})",
                g,
                q
            );
        }
        Op::CommittedOffsets(g) => {
            let g = group(*g);
            prop_assert_eq!(
                b.s().committed_offsets(&g).await.unwrap(),
                m.committed_offsets(g.as_str()),
                "committed_offsets({})",
                g
            );
        }
        Op::Groups => {
            prop_assert_eq!(b.s().groups().await.unwrap(), m.groups(), "groups()");
        }
        Op::KvGet(n, k) => {
            let (ns, key) = (NAMESPACES[*n as usize], KV_KEYS[*k as usize].as_bytes());
            let want =
                m.kv.get(&(ns.to_string(), key.to_vec()))
                    .map(|v| Bytes::from(v.clone()));
            prop_assert_eq!(
                b.s().kv_get(ns, key).await.unwrap(),
                want,
                "kv_get({}, {:?})",
                ns,
                key
            );
        }
        Op::KvScan(n, p, after, limit) => {
            let ns = NAMESPACES[*n as usize];
            let prefix = KV_PREFIXES[*p as usize].as_bytes();
            let after = after.map(|a| KV_KEYS[a as usize].as_bytes());
            prop_assert_eq!(
                b.s().kv_scan(ns, prefix, after, *limit).await.unwrap(),
                m.kv_scan(ns, prefix, after, *limit),
                "kv_scan({}, {:?}, {:?}, {})",
                ns,
                prefix,
                after,
                limit
            );
        }
        Op::TimersDue(until, after, limit) => {
            let after = after.as_ref().map(|t| m.resolve_t(t));
            prop_assert_eq!(
                b.s().timers_due(*until, after, *limit).await.unwrap(),
                m.timers_due(*until, after, *limit),
                "timers_due({}, {:?}, {})",
                until,
                after,
                limit
            );
        }
        Op::NextTimer => {
            let want = m.timers.keys().next().map(|(due, seq)| TimerKey {
                due: *due,
                seq: *seq,
            });
            prop_assert_eq!(b.s().next_timer().await.unwrap(), want, "next_timer()");
        }
        Op::Stats => {
            prop_assert_eq!(b.s().stats(), m.stats(), "stats()");
        }
        Op::Reopen => b.reopen(),
    }
    Ok(())
}

fn run_case(kind: Kind, case: &Case) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut b = Backend::new(kind, case.small_tail_cache);
        let mut m = Model::default();
        for (t, n) in &case.initial {
            let name = TOPICS[*t as usize];
            let got = b.s().create_topic(&topic(name), *n).await.unwrap();
            prop_assert_eq!(got, m.create_topic(name, *n).unwrap());
        }
        check_shape(b.s(), &m)?;
        for (i, op) in case.ops.iter().enumerate() {
            step(&mut b, &mut m, op)
                .await
                .map_err(|e| TestCaseError::fail(format!("op #{i} {op:?}: {e}")))?;
            check_shape(b.s(), &m)
                .map_err(|e| TestCaseError::fail(format!("after op #{i} {op:?}: {e}")))?;
        }
        check_deep(b.s(), &m)
            .await
            .map_err(|e| TestCaseError::fail(format!("final check: {e}")))?;
        if kind == Kind::Rocks {
            b.reopen();
            check_deep(b.s(), &m)
                .await
                .map_err(|e| TestCaseError::fail(format!("final check after reopen: {e}")))?;
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn memory_store_matches_model(case in case()) {
        run_case(Kind::Memory, &case)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        max_shrink_iters: 400,
        ..ProptestConfig::default()
    })]

    #[test]
    fn rocks_store_matches_model(case in case()) {
        run_case(Kind::Rocks, &case)?;
    }
}

// ---------------------------------------------------------------------------------------
// Regressions: minimal reproductions of what the properties found, on both backends
// ---------------------------------------------------------------------------------------

mod regressions {
    use super::*;

    fn backend(kind: Kind) -> Backend {
        Backend::new(kind, false)
    }

    /// `timers_due(.., limit = 0)` must return nothing. (RocksStore returned one timer: it
    /// pushed before checking the limit.)
    async fn timers_due_with_limit_zero_is_empty(kind: Kind) {
        let b = backend(kind);
        let s = b.s();
        let mut batch = WriteBatch::new();
        batch.timer_put(5, Bytes::from_static(b"p"));
        s.write(batch).await.unwrap();
        assert_eq!(s.timers_due(10, None, 0).await.unwrap(), vec![], "limit 0");
        assert_eq!(s.timers_due(10, None, 1).await.unwrap().len(), 1, "limit 1");
    }

    /// Deleting the same pending timer twice in one batch removes one timer: the count
    /// must drop by one, not two. (RocksStore decremented twice before the writer's
    /// `timers_deleted` tracking was added.)
    async fn double_timer_delete_in_one_batch_counts_once(kind: Kind) {
        let b = backend(kind);
        let s = b.s();
        let mut batch = WriteBatch::new();
        batch.timer_put(1, Bytes::new()).timer_put(2, Bytes::new());
        let keys = s.write(batch).await.unwrap().timers;
        let mut batch = WriteBatch::new();
        batch.timer_delete(keys[0]).timer_delete(keys[0]);
        s.write(batch).await.unwrap();
        assert_eq!(
            s.stats().timers,
            1,
            "stats().timers after deleting one of two timers"
        );
        assert_eq!(s.timers_due(u64::MAX, None, 10).await.unwrap().len(), 1);
    }

    /// The same with a single timer: the count must reach 0 (RocksStore used to underflow
    /// the u64 in the writer thread, which panics in debug builds and closes the store).
    async fn double_timer_delete_of_last_timer_keeps_store_usable(kind: Kind) {
        let b = backend(kind);
        let s = b.s();
        let mut batch = WriteBatch::new();
        batch.timer_put(1, Bytes::new());
        let keys = s.write(batch).await.unwrap().timers;
        let mut batch = WriteBatch::new();
        batch.timer_delete(keys[0]).timer_delete(keys[0]);
        s.write(batch).await.expect("double delete of one timer");
        assert_eq!(s.stats().timers, 0);
        let mut batch = WriteBatch::new();
        batch.kv_put("a", &b"k"[..], &b"v"[..]);
        s.write(batch).await.expect("store still writable");
    }

    /// `delete_topic` removes every group's offsets on the topic; both backends must agree
    /// when the topic does not exist (a commit on a missing topic is left out: before,
    /// offsets could be committed on any queue, and outlive a topic deleted while a
    /// consumer was still committing).
    async fn delete_topic_of_missing_topic_drops_its_offsets(kind: Kind) {
        let b = backend(kind);
        let s = b.s();
        let q = QueueRef::new(topic("gone"), 0);
        let mut batch = WriteBatch::new();
        batch.commit_offset(group(0), q.clone(), QueueOffset(3));
        s.write(batch).await.unwrap();
        assert!(
            !s.delete_topic(&topic("gone")).await.unwrap(),
            "never existed"
        );
        assert_eq!(
            s.committed_offset(&group(0), &q).await.unwrap(),
            None,
            "offset on the deleted topic"
        );
        assert_eq!(s.groups().await.unwrap(), vec![], "groups()");
    }

    macro_rules! both {
        ($($name:ident),* $(,)?) => {
            mod memory {
                $(
                    #[tokio::test]
                    async fn $name() {
                        super::$name(super::Kind::Memory).await
                    }
                )*
            }
            mod rocks {
                $(
                    #[tokio::test]
                    async fn $name() {
                        super::$name(super::Kind::Rocks).await
                    }
                )*
            }
        };
    }

    both!(
        timers_due_with_limit_zero_is_empty,
        double_timer_delete_in_one_batch_counts_once,
        double_timer_delete_of_last_timer_keeps_store_usable,
        delete_topic_of_missing_topic_drops_its_offsets,
    );
}
