//! The backend conformance suite: every scenario runs against every backend.
//! Scenarios that restart the store are meaningful on RocksStore; on MemoryStore the
//! "restart" keeps the same instance, which checks the same invariants trivially.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_store::{
    FsyncPolicy, GroupName, MemoryStore, Message, MessageId, QueueOffset, QueueRef, ReadLimits,
    Retention, RocksConfig, RocksStore, Store, StoreError, StoreExt, TopicName, WriteBatch,
};
use tempfile::TempDir;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Memory,
    Rocks,
    /// RocksStore as a view of a log on a 3-node NATS JetStream cluster the test starts.
    #[cfg(feature = "jetstream")]
    JetStream,
}

struct Harness {
    kind: Kind,
    store: Option<Arc<dyn Store>>,
    dir: TempDir,
    retention: Retention,
    fsync: FsyncPolicy,
    /// The first id of a fresh store (a shard's `id_base`).
    id_base: u64,
    /// The jetstream kind's stream (its own in the test process's shared cluster).
    #[cfg(feature = "jetstream")]
    stream: String,
}

impl Harness {
    fn new(kind: Kind) -> Self {
        Self::with(kind, Retention::default(), FsyncPolicy::EveryBatch)
    }

    fn with(kind: Kind, retention: Retention, fsync: FsyncPolicy) -> Self {
        Self::with_base(kind, retention, fsync, 0)
    }

    fn with_base(kind: Kind, retention: Retention, fsync: FsyncPolicy, id_base: u64) -> Self {
        let mut h = Self {
            kind,
            store: None,
            dir: tempfile::tempdir().expect("tempdir"),
            retention,
            fsync,
            id_base,
            #[cfg(feature = "jetstream")]
            stream: {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                format!(
                    "conf{}",
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                )
            },
        };
        h.store = Some(h.open());
        h
    }

    fn open(&self) -> Arc<dyn Store> {
        match self.kind {
            Kind::Memory => {
                Arc::new(MemoryStore::with_retention(self.retention).with_id_base(self.id_base))
            }
            Kind::Rocks => {
                let mut cfg = RocksConfig::new(self.dir.path().join("data"));
                cfg.retention = self.retention;
                cfg.fsync = self.fsync;
                cfg.id_base = self.id_base;
                Arc::new(RocksStore::open(cfg).expect("open rocks"))
            }
            #[cfg(feature = "jetstream")]
            Kind::JetStream => {
                use mqgate_store::jetstream::{open, JetStreamConfig};
                let mut view = RocksConfig::new(self.dir.path().join("view"));
                view.retention = self.retention;
                view.fsync = self.fsync;
                view.id_base = self.id_base;
                // One 3-node cluster for the whole test binary, a stream per harness.
                let cluster = tokio::task::block_in_place(
                    mqgate_store::jetstream::testing::NatsCluster::shared,
                );
                let mut cfg = JetStreamConfig::new(cluster.urls(), "node-a", view);
                cfg.stream = self.stream.clone();
                let (store, _replication) = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(open(cfg))
                })
                .expect("open the jetstream store");
                Arc::new(store)
            }
        }
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.store.as_ref().expect("open")
    }

    /// Close and reopen the store (RocksStore: a real restart; MemoryStore: no-op).
    fn restart(&mut self) {
        if self.kind != Kind::Memory {
            let old = self.store.take().expect("open");
            assert_eq!(Arc::strong_count(&old), 1, "a test still holds the store");
            drop(old);
            self.store = Some(self.open());
        }
    }
}

fn topic(name: &str) -> TopicName {
    TopicName::new(name).unwrap()
}

fn q(t: &str, id: u32) -> QueueRef {
    QueueRef::new(topic(t), id)
}

fn group(name: &str) -> GroupName {
    GroupName::new(name).unwrap()
}

fn msg(t: &str, body: &str) -> Message {
    Message::new(topic(t), Bytes::copy_from_slice(body.as_bytes()))
}

async fn bodies(s: &dyn Store, queue: &QueueRef, from: u64) -> Vec<(u64, String)> {
    s.read(queue, QueueOffset(from), ReadLimits::count(10_000))
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                m.entry.offset.0,
                String::from_utf8(m.message.message.body.to_vec()).unwrap(),
            )
        })
        .collect()
}

async fn append_round_trip(h: Harness) {
    let s = h.store();
    s.create_topic(&topic("orders"), 4).await.unwrap();
    let mut m = msg("orders", "hello");
    m.producer_group = "pg-1".into();
    m.keys = vec!["order-17".into(), "customer-9".into()];
    m.tags = Some("paid".into());
    m.properties = vec![
        ("content-type".into(), Bytes::from_static(b"text/plain")),
        ("bin".into(), Bytes::from_static(&[0, 255, 1])),
        (
            "content-type".into(),
            Bytes::from_static(b"dup kept in order"),
        ),
    ];
    m.reconsume_times = 3;
    m.delay_level = 4;
    m.deliver_at = Some(1_700_000_000_000);
    let a = s.append(m.clone(), vec![q("orders", 2)]).await.unwrap();
    assert_eq!(a.offsets, vec![(q("orders", 2), QueueOffset(0))]);

    let read = s
        .read(&q("orders", 2), QueueOffset(0), ReadLimits::count(10))
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    let got = &read[0];
    assert_eq!(got.entry.offset, QueueOffset(0));
    assert_eq!(got.entry.id, a.id);
    assert_eq!(got.entry.timestamp, a.store_timestamp);
    assert_eq!(got.entry.tag_hash, mqgate_store::tag_hash(Some("paid")));
    assert_eq!(got.message.id, a.id);
    assert_eq!(got.message.store_timestamp, a.store_timestamp);
    assert_eq!(
        got.message.message, m,
        "every field comes back as it went in"
    );
    assert_eq!(got.message.size, got.entry.size);

    // Many more, in order, with ids increasing.
    let mut last = a.id;
    for i in 1..50 {
        let a = s
            .append(msg("orders", &format!("m{i}")), vec![q("orders", 2)])
            .await
            .unwrap();
        assert!(a.id > last, "ids increase in append order");
        last = a.id;
        assert_eq!(a.offsets[0].1, QueueOffset(i));
    }
    let all = bodies(s.as_ref(), &q("orders", 2), 0).await;
    assert_eq!(all.len(), 50);
    for (i, (off, body)) in all.iter().enumerate().skip(1) {
        assert_eq!(*off, i as u64);
        assert_eq!(body, &format!("m{i}"));
    }
    // Reading from the middle, at the end, beyond the end, with limits.
    assert_eq!(bodies(s.as_ref(), &q("orders", 2), 45).await.len(), 5);
    assert!(bodies(s.as_ref(), &q("orders", 2), 50).await.is_empty());
    assert!(bodies(s.as_ref(), &q("orders", 2), 5000).await.is_empty());
    let r = s
        .read(&q("orders", 2), QueueOffset(10), ReadLimits::count(7))
        .await
        .unwrap();
    assert_eq!(
        r.iter().map(|m| m.entry.offset.0).collect::<Vec<_>>(),
        (10..17).collect::<Vec<_>>()
    );
    let one_size = r[0].entry.size as usize;
    let r = s
        .read(
            &q("orders", 2),
            QueueOffset(10),
            ReadLimits {
                max_count: 100,
                max_bytes: one_size * 3,
            },
        )
        .await
        .unwrap();
    assert!(
        (1..=3).contains(&r.len()),
        "byte limit respected, got {}",
        r.len()
    );
    let r = s
        .read(
            &q("orders", 2),
            QueueOffset(0),
            ReadLimits {
                max_count: 100,
                max_bytes: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(r.len(), 1, "the first message is returned however large");
    // Other queues are untouched.
    assert!(s.queue_range(&q("orders", 0)).unwrap().is_empty());
    // Unknown queues are errors.
    assert!(matches!(
        s.queue_range(&q("orders", 4)),
        Err(StoreError::UnknownQueue(_))
    ));
    assert!(matches!(
        s.read(&q("nope", 0), QueueOffset(0), ReadLimits::count(1))
            .await,
        Err(StoreError::UnknownQueue(_))
    ));
    // Look-ups by id and by key.
    assert_eq!(s.message(a.id).await.unwrap().unwrap().message, m);
    assert!(s.message(MessageId(u64::MAX)).await.unwrap().is_none());
    let by_key = s
        .messages_by_key(&topic("orders"), "order-17", 10)
        .await
        .unwrap();
    assert_eq!(by_key.len(), 1);
    assert_eq!(by_key[0].id, a.id);
    assert!(s
        .messages_by_key(&topic("orders"), "order-1", 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .messages_by_key(&topic("other"), "order-17", 10)
        .await
        .unwrap()
        .is_empty());
}

async fn fan_out_stores_once(h: Harness) {
    let s = h.store();
    for t in ["a", "b", "c"] {
        s.create_topic(&topic(t), 2).await.unwrap();
    }
    let before = s.stats();
    let targets = vec![q("a", 0), q("a", 1), q("b", 1), q("c", 0)];
    let body = "x".repeat(4096);
    let a = s.append(msg("ex", &body), targets.clone()).await.unwrap();
    let after = s.stats();
    assert_eq!(after.messages - before.messages, 1, "one commit-log record");
    let record = s.message(a.id).await.unwrap().unwrap();
    assert_eq!(after.log_bytes - before.log_bytes, u64::from(record.size));
    assert!(
        u64::from(record.size) < 4096 + 200,
        "the body is stored once"
    );
    assert_eq!(a.offsets.len(), 4);
    for t in &targets {
        let r = s
            .read(t, QueueOffset(0), ReadLimits::count(10))
            .await
            .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].entry.id, a.id, "every queue points at the same record");
        assert_eq!(r[0].message.message.body.len(), 4096);
    }
    // Fan-out of many messages keeps each queue's offsets dense and independent.
    for i in 0..10 {
        let tq = if i % 2 == 0 {
            vec![q("a", 0), q("b", 0)]
        } else {
            vec![q("a", 0)]
        };
        s.append(msg("ex", &format!("{i}")), tq).await.unwrap();
    }
    assert_eq!(s.queue_range(&q("a", 0)).unwrap().next, QueueOffset(11));
    assert_eq!(s.queue_range(&q("b", 0)).unwrap().next, QueueOffset(5));
    // An append indexed nowhere is still stored and found by id.
    let a = s.append(msg("ex", "orphan"), vec![]).await.unwrap();
    assert!(a.offsets.is_empty());
    assert_eq!(
        s.message(a.id).await.unwrap().unwrap().message.body,
        "orphan"
    );
}

async fn timestamp_lookup(h: Harness) {
    let s = h.store();
    s.create_topic(&topic("t"), 1).await.unwrap();
    let queue = q("t", 0);
    // Empty queue: the next offset.
    assert_eq!(
        s.offset_for_timestamp(&queue, 0).await.unwrap(),
        QueueOffset(0)
    );
    // Three batches, several messages each (equal timestamps within a batch).
    let mut stamps = Vec::new();
    for round in 0..3 {
        let mut b = WriteBatch::new();
        for i in 0..4 {
            b.append(msg("t", &format!("{round}-{i}")), vec![queue.clone()]);
        }
        let r = s.write(b).await.unwrap();
        let ts: Vec<u64> = r.appended.iter().map(|a| a.store_timestamp).collect();
        assert!(
            ts.windows(2).all(|w| w[0] == w[1]),
            "one batch, one timestamp"
        );
        stamps.push(ts[0]);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(stamps.windows(2).all(|w| w[0] < w[1]));
    let entries = s
        .read(&queue, QueueOffset(0), ReadLimits::count(100))
        .await
        .unwrap();
    assert!(entries
        .windows(2)
        .all(|w| w[0].entry.timestamp <= w[1].entry.timestamp));
    // Exactly at a batch: its first entry (equal timestamps resolve to the first).
    assert_eq!(
        s.offset_for_timestamp(&queue, stamps[0]).await.unwrap(),
        QueueOffset(0)
    );
    assert_eq!(
        s.offset_for_timestamp(&queue, stamps[1]).await.unwrap(),
        QueueOffset(4)
    );
    assert_eq!(
        s.offset_for_timestamp(&queue, stamps[2]).await.unwrap(),
        QueueOffset(8)
    );
    // Between batches: the next batch's first.
    assert_eq!(
        s.offset_for_timestamp(&queue, stamps[0] + 1).await.unwrap(),
        QueueOffset(4)
    );
    // Before the first: the min offset; after the last: the next offset.
    assert_eq!(
        s.offset_for_timestamp(&queue, 0).await.unwrap(),
        QueueOffset(0)
    );
    assert_eq!(
        s.offset_for_timestamp(&queue, stamps[2] + 1).await.unwrap(),
        QueueOffset(12)
    );
    assert_eq!(
        s.offset_for_timestamp(&queue, u64::MAX).await.unwrap(),
        QueueOffset(12)
    );
    // After truncation, "before the first" is the new min.
    let mut b = WriteBatch::new();
    b.truncate(queue.clone(), QueueOffset(6));
    s.write(b).await.unwrap();
    assert_eq!(
        s.offset_for_timestamp(&queue, 0).await.unwrap(),
        QueueOffset(6)
    );
    assert_eq!(
        s.offset_for_timestamp(&queue, stamps[1]).await.unwrap(),
        QueueOffset(6)
    );
}

async fn truncate_moves_min_only(mut h: Harness) {
    let s = h.store().clone();
    s.create_topic(&topic("t"), 2).await.unwrap();
    for i in 0..10 {
        s.append(msg("t", &format!("{i}")), vec![q("t", 0)])
            .await
            .unwrap();
    }
    let mut b = WriteBatch::new();
    b.truncate(q("t", 0), QueueOffset(4));
    s.write(b).await.unwrap();
    let r = s.queue_range(&q("t", 0)).unwrap();
    assert_eq!((r.min.0, r.next.0), (4, 10));
    // A read below min starts at min.
    assert_eq!(
        bodies(s.as_ref(), &q("t", 0), 0).await.first().unwrap(),
        &(4, "4".to_string())
    );
    // Truncate never moves min down, and clamps at next.
    let mut b = WriteBatch::new();
    b.truncate(q("t", 0), QueueOffset(2));
    s.write(b).await.unwrap();
    assert_eq!(s.queue_range(&q("t", 0)).unwrap().min, QueueOffset(4));
    let mut b = WriteBatch::new();
    b.truncate(q("t", 0), QueueOffset(1000));
    s.write(b).await.unwrap();
    let r = s.queue_range(&q("t", 0)).unwrap();
    assert_eq!((r.min.0, r.next.0), (10, 10));
    assert!(bodies(s.as_ref(), &q("t", 0), 0).await.is_empty());
    // An emptied queue keeps its numbering across a restart.
    drop(s);
    h.restart();
    let s = h.store().clone();
    let r = s.queue_range(&q("t", 0)).unwrap();
    assert_eq!((r.min.0, r.next.0), (10, 10));
    let a = s.append(msg("t", "after"), vec![q("t", 0)]).await.unwrap();
    assert_eq!(a.offsets[0].1, QueueOffset(10));
}

async fn atomic_batches(h: Harness) {
    let s = h.store();
    s.create_topic(&topic("t"), 1).await.unwrap();
    let before = s.stats();
    let mut b = WriteBatch::new();
    b.append(msg("t", "ok"), vec![q("t", 0)]);
    b.kv_put("ns", "k", "v");
    b.commit_offset(group("g"), q("t", 0), QueueOffset(1));
    b.timer_put(10, "timer");
    b.append(msg("t", "bad"), vec![q("t", 7)]);
    assert!(matches!(s.write(b).await, Err(StoreError::UnknownQueue(_))));
    assert_eq!(s.stats(), before, "a refused batch leaves no trace");
    assert!(s.queue_range(&q("t", 0)).unwrap().is_empty());
    assert!(s.kv_get("ns", b"k").await.unwrap().is_none());
    assert!(s
        .committed_offset(&group("g"), &q("t", 0))
        .await
        .unwrap()
        .is_none());
    assert!(s.next_timer().await.unwrap().is_none());

    // The same batch without the bad op applies whole.
    let mut b = WriteBatch::new();
    b.append(msg("t", "ok"), vec![q("t", 0)]);
    b.kv_put("ns", "k", "v");
    b.commit_offset(group("g"), q("t", 0), QueueOffset(1));
    b.timer_put(10, "timer");
    let r = s.write(b).await.unwrap();
    assert_eq!(r.appended.len(), 1);
    assert_eq!(r.timers.len(), 1);
    assert_eq!(s.kv_get("ns", b"k").await.unwrap().unwrap(), "v");
    assert_eq!(
        s.committed_offset(&group("g"), &q("t", 0)).await.unwrap(),
        Some(QueueOffset(1))
    );
    assert_eq!(s.next_timer().await.unwrap(), Some(r.timers[0]));
    // An oversized field is refused, not truncated.
    let mut m = msg("t", "x");
    m.tags = Some("t".repeat(70_000));
    assert!(matches!(
        s.append(m, vec![q("t", 0)]).await,
        Err(StoreError::Invalid(_))
    ));
    // An empty batch is fine.
    assert_eq!(s.write(WriteBatch::new()).await.unwrap().appended.len(), 0);
}

async fn topics_lifecycle(mut h: Harness) {
    let s = h.store().clone();
    assert!(s.topics().is_empty());
    assert_eq!(s.create_topic(&topic("t"), 2).await.unwrap().queue_count, 2);
    assert_eq!(
        s.create_topic(&topic("t"), 2).await.unwrap().queue_count,
        2,
        "idempotent"
    );
    assert_eq!(
        s.create_topic(&topic("t"), 4).await.unwrap().queue_count,
        4,
        "grows"
    );
    assert!(matches!(
        s.create_topic(&topic("t"), 3).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.create_topic(&topic("z"), 0).await,
        Err(StoreError::Invalid(_))
    ));
    s.create_topic(&topic("a"), 1).await.unwrap();
    let names: Vec<String> = s.topics().iter().map(|t| t.name.to_string()).collect();
    assert_eq!(names, vec!["a", "t"]);
    for i in 0..4 {
        s.append(msg("t", "x"), vec![q("t", i)]).await.unwrap();
    }
    let mut b = WriteBatch::new();
    b.commit_offset(group("g1"), q("t", 0), QueueOffset(1));
    b.commit_offset(group("g1"), q("a", 0), QueueOffset(0));
    b.commit_offset(group("g2"), q("t", 3), QueueOffset(1));
    s.write(b).await.unwrap();

    drop(s);
    h.restart();
    let s = h.store().clone();
    assert_eq!(s.topic(&topic("t")).unwrap().queue_count, 4);
    assert_eq!(s.queue_range(&q("t", 3)).unwrap().next, QueueOffset(1));
    assert_eq!(
        s.groups_on_topic(&topic("t")).await.unwrap(),
        vec![group("g1"), group("g2")]
    );
    assert_eq!(
        s.groups_on_topic(&topic("a")).await.unwrap(),
        vec![group("g1")]
    );
    assert!(s.groups_on_topic(&topic("z")).await.unwrap().is_empty());

    assert!(s.delete_topic(&topic("t")).await.unwrap());
    assert!(s.groups_on_topic(&topic("t")).await.unwrap().is_empty());
    // A group that lived on across the deletion commits nothing for the deleted
    // topic; its other commits in the same batch stand.
    let mut b = WriteBatch::new();
    b.commit_offset(group("g2"), q("t", 3), QueueOffset(7));
    b.commit_offset(group("g2"), q("a", 0), QueueOffset(0));
    s.write(b).await.unwrap();
    assert_eq!(
        s.committed_offsets(&group("g2")).await.unwrap(),
        vec![(q("a", 0), QueueOffset(0))]
    );
    assert_eq!(
        s.groups_on_topic(&topic("a")).await.unwrap(),
        vec![group("g1"), group("g2")]
    );
    assert!(!s.delete_topic(&topic("t")).await.unwrap());
    assert!(s.topic(&topic("t")).is_none());
    assert!(s.queue_range(&q("t", 0)).is_err());
    assert_eq!(
        s.committed_offsets(&group("g1")).await.unwrap(),
        vec![(q("a", 0), QueueOffset(0))],
        "offsets on the deleted topic go with it"
    );
    assert_eq!(
        s.committed_offsets(&group("g2")).await.unwrap(),
        vec![(q("a", 0), QueueOffset(0))]
    );
    // Re-created, it starts from offset 0 and holds none of the old entries; no
    // group has an offset on it.
    s.create_topic(&topic("t"), 1).await.unwrap();
    assert!(s.groups_on_topic(&topic("t")).await.unwrap().is_empty());
    assert_eq!(
        s.committed_offset(&group("g2"), &q("t", 3)).await.unwrap(),
        None
    );
    assert!(s.queue_range(&q("t", 0)).unwrap().is_empty());
    assert_eq!(
        s.append(msg("t", "new"), vec![q("t", 0)])
            .await
            .unwrap()
            .offsets[0]
            .1,
        QueueOffset(0)
    );
    drop(s);
    h.restart();
    let s = h.store();
    assert_eq!(
        bodies(s.as_ref(), &q("t", 0), 0).await,
        vec![(0, "new".to_string())]
    );
}

async fn offsets_and_metadata_persist(mut h: Harness) {
    let s = h.store().clone();
    s.create_topic(&topic("t"), 3).await.unwrap();
    let mut b = WriteBatch::new();
    b.commit_offset(group("g1"), q("t", 0), QueueOffset(5));
    b.commit_offset(group("g1"), q("t", 2), QueueOffset(7));
    b.commit_offset(group("g2"), q("t", 1), QueueOffset(9));
    b.kv_put("amqp.queues", "/|orders", "durable");
    b.kv_put("amqp.queues", "/|payments", "durable");
    b.kv_put("mqtt.sessions", "client-1", Bytes::from_static(&[1, 2, 3]));
    b.timer_put(500, "later");
    b.timer_put(100, "sooner");
    b.timer_put(100, "sooner too");
    let r = s.write(b).await.unwrap();
    let mut b = WriteBatch::new();
    b.commit_offset(group("g1"), q("t", 0), QueueOffset(6));
    b.kv_delete("amqp.queues", "/|payments");
    b.timer_delete(r.timers[0]);
    s.write(b).await.unwrap();
    let stats = s.stats();

    drop(s);
    h.restart();
    let s = h.store();
    assert_eq!(s.stats(), stats);
    assert_eq!(
        s.committed_offsets(&group("g1")).await.unwrap(),
        vec![(q("t", 0), QueueOffset(6)), (q("t", 2), QueueOffset(7))]
    );
    assert_eq!(
        s.committed_offset(&group("g2"), &q("t", 1)).await.unwrap(),
        Some(QueueOffset(9))
    );
    assert_eq!(
        s.committed_offset(&group("g3"), &q("t", 1)).await.unwrap(),
        None
    );
    assert_eq!(s.groups().await.unwrap(), vec![group("g1"), group("g2")]);
    let queues = s.kv_scan("amqp.queues", b"", None, 10).await.unwrap();
    assert_eq!(
        queues,
        vec![(Bytes::from("/|orders"), Bytes::from("durable"))]
    );
    assert_eq!(
        s.kv_get("mqtt.sessions", b"client-1")
            .await
            .unwrap()
            .unwrap(),
        Bytes::from_static(&[1, 2, 3])
    );
    assert!(s
        .kv_get("mqtt.sessions", b"client-2")
        .await
        .unwrap()
        .is_none());
    let timers = s.timers_due(u64::MAX, None, 10).await.unwrap();
    let payloads: Vec<&[u8]> = timers.iter().map(|(_, p)| p.as_ref()).collect();
    assert_eq!(payloads, vec![&b"sooner"[..], b"sooner too"]);
    assert_eq!(s.stats().timers, 2);
    // Deleting offsets: one topic, then all.
    let mut b = WriteBatch::new();
    b.delete_offsets(group("g1"), Some(topic("t")));
    b.delete_offsets(group("g2"), None);
    s.write(b).await.unwrap();
    assert!(s.committed_offsets(&group("g1")).await.unwrap().is_empty());
    assert!(s.groups().await.unwrap().is_empty());
}

async fn kv_scan_pages(h: Harness) {
    let s = h.store();
    let mut b = WriteBatch::new();
    for i in 0..25u32 {
        b.kv_put("ns", format!("p/{i:03}"), i.to_string());
    }
    b.kv_put("ns", "q/1", "other prefix");
    b.kv_put("ns2", "p/000", "other namespace");
    b.kv_put("n", "s\0p/000", "a prefix of the namespace");
    s.write(b).await.unwrap();
    let mut seen = Vec::new();
    let mut after: Option<Bytes> = None;
    loop {
        let page = s.kv_scan("ns", b"p/", after.as_deref(), 10).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().0.clone());
        seen.extend(
            page.into_iter()
                .map(|(k, _)| String::from_utf8(k.to_vec()).unwrap()),
        );
    }
    let expected: Vec<String> = (0..25).map(|i| format!("p/{i:03}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(s.kv_scan("ns", b"", None, 100).await.unwrap().len(), 26);
    assert_eq!(s.kv_scan("ns2", b"", None, 100).await.unwrap().len(), 1);
    assert!(s.kv_scan("ns", b"zz", None, 100).await.unwrap().is_empty());
}

async fn timers_in_time_order(h: Harness) {
    let s = h.store();
    let mut b = WriteBatch::new();
    for due in [300u64, 100, 200, 100, 1_000_000] {
        b.timer_put(due, due.to_string());
    }
    let r = s.write(b).await.unwrap();
    assert_eq!(r.timers.len(), 5);
    assert_eq!(s.stats().timers, 5);
    let due = s.timers_due(250, None, 100).await.unwrap();
    assert_eq!(
        due.iter().map(|(k, _)| k.due).collect::<Vec<_>>(),
        vec![100, 100, 200]
    );
    assert!(
        due[0].0.seq < due[1].0.seq,
        "same due time: in insertion order"
    );
    // Paging with `after`.
    let page = s.timers_due(250, Some(due[0].0), 1).await.unwrap();
    assert_eq!(page[0].0, due[1].0);
    assert_eq!(s.next_timer().await.unwrap(), Some(due[0].0));
    // Deleting the due ones (twice: the second is a no-op) leaves the rest.
    let mut b = WriteBatch::new();
    for (k, _) in &due {
        b.timer_delete(*k);
        b.timer_delete(*k);
    }
    s.write(b).await.unwrap();
    assert_eq!(s.stats().timers, 2);
    assert_eq!(s.next_timer().await.unwrap().unwrap().due, 300);
    assert_eq!(s.timers_due(u64::MAX, None, 100).await.unwrap().len(), 2);
}

async fn concurrent_appenders_dense(h: Harness) {
    let s = h.store().clone();
    s.create_topic(&topic("t"), 2).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..100u32 {
                let mut b = WriteBatch::new();
                for j in 0..(1 + i % 3) {
                    b.append(
                        msg("t", &format!("{w}-{i}-{j}")),
                        vec![q("t", 0), q("t", 1)],
                    );
                }
                for a in s.write(b).await.unwrap().appended {
                    got.push((a.offsets[0].1 .0, a.offsets[1].1 .0, a.id));
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let n = all.len() as u64;
    assert_eq!(n, 8 * (34 + 33 * 2 + 33 * 3));
    let mut q0: Vec<u64> = all.iter().map(|x| x.0).collect();
    q0.sort_unstable();
    assert_eq!(q0, (0..n).collect::<Vec<_>>(), "dense and unique");
    // Both queues saw the appends in the same order (one total order of batches), and
    // ids increase with offsets.
    let mut by_q0 = all.clone();
    by_q0.sort_unstable();
    assert!(by_q0.windows(2).all(|w| w[0].1 < w[1].1 && w[0].2 < w[1].2));
    let read = s
        .read(&q("t", 0), QueueOffset(0), ReadLimits::count(10_000))
        .await
        .unwrap();
    assert_eq!(read.len() as u64, n);
    let mut seen: Vec<_> = read
        .iter()
        .map(|m| m.message.message.body.clone())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len() as u64, n, "every message once");
}

/// Callers that queue their next batch before the last is durable (as a connection
/// does), paced and in bursts, with small and large batches: the RocksDB store writes
/// some on the caller's thread and queues others for its writer thread, and each
/// caller's batches still land in the order it queued them, offsets dense and unique.
async fn queued_writes_keep_caller_order(h: Harness) {
    let s = h.store().clone();
    s.create_topic(&topic("t"), 1).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for i in 0..120u32 {
                let mut b = WriteBatch::new();
                // Every 10th batch is over 8 KiB: never written inline.
                let body = if i % 10 == 3 {
                    format!("{w}-{i}-{}", "x".repeat(9000))
                } else {
                    format!("{w}-{i}")
                };
                b.append(msg("t", &body), vec![q("t", 0)]);
                if i % 4 == 0 {
                    b.no_sync();
                }
                pending.push(s.write_queued(b, Box::new(|| {})).await.unwrap());
                // Bursts of 12, then a pause long enough for the writer to go idle.
                if i % 12 == 11 {
                    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                }
            }
            let mut offsets = Vec::new();
            for p in pending {
                offsets.push(p.await.unwrap().appended[0].offsets[0].1 .0);
            }
            offsets
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let offsets = t.await.unwrap();
        assert!(
            offsets.windows(2).all(|p| p[0] < p[1]),
            "one caller's batches in the order queued: {offsets:?}"
        );
        all.extend(offsets);
    }
    all.sort_unstable();
    assert_eq!(all, (0..480).collect::<Vec<u64>>(), "dense and unique");
    let read = s
        .read(&q("t", 0), QueueOffset(0), ReadLimits::count(10_000))
        .await
        .unwrap();
    for m in &read {
        let body = String::from_utf8_lossy(&m.message.message.body).into_owned();
        let mut parts = body.split('-');
        let (w, i): (u32, u32) = (
            parts.next().unwrap().parse().unwrap(),
            parts.next().unwrap().parse().unwrap(),
        );
        assert!(w < 4 && i < 120, "{body}");
    }
    assert_eq!(read.len(), 480);
}

fn sized_message(i: usize) -> Message {
    let mut m = msg("t", &format!("{i:0>1000}"));
    m.keys = vec![format!("k{i:02}")];
    m
}

async fn retention_by_bytes(h: Harness) {
    // Every record has the same size; learn it from a probe store.
    let probe = MemoryStore::new();
    let id = probe.append(sized_message(0), vec![]).await.unwrap().id;
    let size = u64::from(probe.message(id).await.unwrap().unwrap().size);
    let mut h = Harness::with(
        h.kind,
        Retention {
            max_age: None,
            max_bytes: Some(size * 30),
        },
        FsyncPolicy::EveryBatch,
    );
    let s = h.store().clone();
    s.create_topic(&topic("t"), 2).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(
            s.append(sized_message(i), vec![q("t", (i % 2) as u32)])
                .await
                .unwrap()
                .id,
        );
    }
    assert_eq!(
        s.stats().log_bytes,
        size * 100,
        "both backends count the same record size"
    );
    let report = s
        .enforce_retention(mqgate_store::now_millis())
        .await
        .unwrap();
    assert_eq!(report.messages_deleted, 70);
    assert_eq!(report.bytes_deleted, 70 * size);
    assert_eq!(report.entries_deleted, 70);
    check_after_byte_retention(s.as_ref(), &ids).await;
    assert_eq!(
        s.enforce_retention(mqgate_store::now_millis())
            .await
            .unwrap()
            .messages_deleted,
        0
    );
    drop(s);
    h.restart();
    check_after_byte_retention(h.store().as_ref(), &ids).await;
}

async fn check_after_byte_retention(s: &dyn Store, ids: &[MessageId]) {
    assert_eq!(s.stats().messages, 30);
    // Messages 70..100 remain: queue 0 had the even ones (offset i/2), queue 1 the odd.
    let r0 = s.queue_range(&q("t", 0)).unwrap();
    let r1 = s.queue_range(&q("t", 1)).unwrap();
    assert_eq!(
        (r0.min.0, r0.next.0),
        (35, 50),
        "min moved up, next unchanged"
    );
    assert_eq!((r1.min.0, r1.next.0), (35, 50));
    let read = s
        .read(&q("t", 0), QueueOffset(0), ReadLimits::count(100))
        .await
        .unwrap();
    assert_eq!(read.len(), 15);
    assert_eq!(read[0].entry.offset, QueueOffset(35));
    assert_eq!(read[0].message.id, ids[70]);
    assert!(s.message(ids[69]).await.unwrap().is_none());
    assert!(s.message(ids[70]).await.unwrap().is_some());
    assert!(s
        .messages_by_key(&topic("t"), "k03", 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.messages_by_key(&topic("t"), "k99", 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.offset_for_timestamp(&q("t", 1), 0).await.unwrap(),
        QueueOffset(35)
    );
}

async fn retention_by_age(h: Harness) {
    let h = Harness::with(
        h.kind,
        Retention {
            max_age: Some(Duration::from_millis(200)),
            max_bytes: None,
        },
        FsyncPolicy::EveryBatch,
    );
    let s = h.store();
    s.create_topic(&topic("t"), 1).await.unwrap();
    for i in 0..20 {
        s.append(msg("t", &format!("old{i}")), vec![q("t", 0)])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut newest = None;
    for i in 0..5 {
        newest = Some(
            s.append(msg("t", &format!("new{i}")), vec![q("t", 0)])
                .await
                .unwrap(),
        );
    }
    let report = s
        .enforce_retention(mqgate_store::now_millis())
        .await
        .unwrap();
    assert_eq!(report.messages_deleted, 20);
    let r = s.queue_range(&q("t", 0)).unwrap();
    assert_eq!((r.min.0, r.next.0), (20, 25));
    assert_eq!(
        bodies(s.as_ref(), &q("t", 0), 0).await.first().unwrap().1,
        "new0"
    );
    assert_eq!(s.stats().messages, 5);
    // Appends continue numbering.
    let a = s.append(msg("t", "later"), vec![q("t", 0)]).await.unwrap();
    assert_eq!(a.offsets[0].1, QueueOffset(25));
    assert!(a.id > newest.unwrap().id);
    // Everything old: the queue empties but keeps its numbering.
    let report = s
        .enforce_retention(mqgate_store::now_millis() + 10_000)
        .await
        .unwrap();
    assert_eq!(report.messages_deleted, 6);
    let r = s.queue_range(&q("t", 0)).unwrap();
    assert_eq!((r.min.0, r.next.0), (26, 26));
}

async fn restart_loses_nothing(mut h: Harness) {
    let s = h.store().clone();
    s.create_topic(&topic("t"), 4).await.unwrap();
    let mut last_id = MessageId(0);
    for i in 0..200u32 {
        let mut b = WriteBatch::new();
        b.append(msg("t", &format!("{i}")), vec![q("t", i % 4)]);
        last_id = s.write(b).await.unwrap().appended[0].id;
    }
    let stats = s.stats();
    drop(s);
    h.restart();
    let s = h.store().clone();
    assert_eq!(s.stats(), stats);
    for qi in 0..4 {
        let got = bodies(s.as_ref(), &q("t", qi), 0).await;
        assert_eq!(got.len(), 50);
        for (off, body) in got {
            assert_eq!(body, (off as u32 * 4 + qi).to_string());
        }
    }
    // Offsets and ids continue after the restart.
    let a = s.append(msg("t", "after"), vec![q("t", 1)]).await.unwrap();
    assert_eq!(a.offsets[0].1, QueueOffset(50));
    assert!(a.id > last_id);
    drop(s);
    h.restart();
    let s = h.store();
    assert_eq!(
        bodies(s.as_ref(), &q("t", 1), 50).await,
        vec![(50, "after".to_string())]
    );
}

async fn periodic_fsync_policy(mut h: Harness) {
    // Under the default policy a durable write's answer waits on an fsync (RocksDB) or
    // a quorum (jetstream); in memory it comes at once.
    assert_eq!(h.store().answers_wait(), h.kind != Kind::Memory);
    if h.kind != Kind::Memory {
        h = Harness::with(
            h.kind,
            Retention::default(),
            FsyncPolicy::Periodic {
                interval: Duration::from_millis(20),
            },
        );
    }
    let s = h.store().clone();
    // Periodic: answered once in the OS; the replicated log still waits on its quorum.
    assert_eq!(
        s.answers_wait(),
        h.kind != Kind::Memory && h.kind != Kind::Rocks
    );
    s.create_topic(&topic("t"), 1).await.unwrap();
    for i in 0..100 {
        s.append(msg("t", &i.to_string()), vec![q("t", 0)])
            .await
            .unwrap();
    }
    s.flush().await.unwrap();
    drop(s);
    h.restart();
    assert_eq!(
        h.store().queue_range(&q("t", 0)).unwrap().next,
        QueueOffset(100)
    );
}

async fn large_and_empty_bodies(h: Harness) {
    let s = h.store();
    s.create_topic(&topic("t"), 1).await.unwrap();
    let big = Bytes::from(vec![7u8; 5 << 20]);
    let mut m = msg("t", "");
    m.body = big.clone();
    s.append(m, vec![q("t", 0)]).await.unwrap();
    s.append(msg("t", ""), vec![q("t", 0)]).await.unwrap();
    let r = s
        .read(&q("t", 0), QueueOffset(0), ReadLimits::count(10))
        .await
        .unwrap();
    assert_eq!(
        r.len(),
        1,
        "the large one alone fills the default byte limit"
    );
    assert_eq!(r[0].message.message.body, big);
    let r = s
        .read(&q("t", 0), QueueOffset(1), ReadLimits::count(10))
        .await
        .unwrap();
    assert!(r[0].message.message.body.is_empty());
}

/// `write_notify` says "readable" no later than the write's answer (RocksStore: before
/// the fsync), and what it announced can be read then. Batches marked `no_sync` from
/// several writers, mixed with synced ones, all land in each writer's order and
/// survive a clean restart.
async fn visible_then_durable_and_no_sync(mut h: Harness) {
    let s = h.store().clone();
    s.create_topic(&topic("t"), 1).await.unwrap();
    for i in 0..50u64 {
        let mut b = WriteBatch::new();
        b.append(msg("t", &i.to_string()), vec![q("t", 0)]);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s2 = s.clone();
        let w = tokio::spawn(async move { s2.write_notify(b, tx).await });
        rx.await.expect("visible is sent");
        assert_eq!(
            s.queue_range(&q("t", 0)).unwrap().next,
            QueueOffset(i + 1),
            "readable once announced"
        );
        w.await.unwrap().unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..4u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100u32 {
                let mut b = WriteBatch::new();
                b.append(msg("t", &format!("{w}:{i}")), vec![q("t", 0)]);
                if i % 3 != 0 {
                    b.no_sync();
                }
                s.write(b).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(s);
    h.restart();
    let got = bodies(h.store().as_ref(), &q("t", 0), 50).await;
    assert_eq!(got.len(), 400);
    for w in 0..4 {
        let prefix = format!("{w}:");
        let seq: Vec<u32> = got
            .iter()
            .filter_map(|(_, b)| b.strip_prefix(&prefix).map(|x| x.parse().unwrap()))
            .collect();
        assert_eq!(seq, (0..100).collect::<Vec<_>>(), "writer {w} in order");
    }
}

/// A shard's store gives ids from its base (messages and timers alike), keeps giving
/// increasing ones after a restart, and finds messages by them.
async fn ids_from_a_base(h: Harness) {
    const BASE: u64 = 5 << 44;
    let mut h = Harness::with_base(h.kind, Retention::default(), FsyncPolicy::EveryBatch, BASE);
    let s = h.store().clone();
    s.create_topic(&topic("t"), 1).await.unwrap();
    let first = s.append(msg("t", "a"), vec![q("t", 0)]).await.unwrap();
    // RocksStore gives topic uids from the same sequence, so the first message may
    // not have the base itself.
    assert!(
        (BASE..BASE + 4).contains(&first.id.0),
        "{:?} starts at the base {BASE}",
        first.id
    );
    assert_eq!(
        first.offsets,
        vec![(q("t", 0), QueueOffset(0))],
        "offsets stay dense from 0"
    );
    let mut timer = WriteBatch::new();
    timer.timer_put(1, Bytes::from_static(b"due"));
    s.write(timer).await.unwrap();
    let timers = s.timers_due(u64::MAX, None, 10).await.unwrap();
    assert_eq!(
        timers[0].0.seq,
        first.id.0 + 1,
        "timers take ids from the same sequence"
    );
    let second = s.append(msg("t", "b"), vec![q("t", 0)]).await.unwrap();
    assert_eq!(second.id, MessageId(first.id.0 + 2));
    drop(s);
    h.restart();
    let s = h.store().clone();
    let third = s.append(msg("t", "c"), vec![q("t", 0)]).await.unwrap();
    assert_eq!(
        third.id,
        MessageId(second.id.0 + 1),
        "a restart goes on, not back to the base"
    );
    assert_eq!(
        s.message(first.id).await.unwrap().unwrap().message.body,
        Bytes::from_static(b"a")
    );
    assert_eq!(
        bodies(s.as_ref(), &q("t", 0), 0).await,
        vec![(0, "a".into()), (1, "b".into()), (2, "c".into())]
    );
}

/// Retention deletes nothing at or after the floor, whatever the policy; lifting the
/// floor lets it catch up.
async fn retention_floor_holds_messages(h: Harness) {
    // Every record has the same size; the policy keeps one.
    let probe = MemoryStore::new();
    let id = probe.append(sized_message(0), vec![]).await.unwrap().id;
    let size = u64::from(probe.message(id).await.unwrap().unwrap().size);
    let h = Harness::with(
        h.kind,
        Retention {
            max_age: None,
            max_bytes: Some(size),
        },
        FsyncPolicy::EveryBatch,
    );
    let s = h.store().clone();
    s.create_topic(&topic("t"), 1).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            s.append(sized_message(i), vec![q("t", 0)])
                .await
                .unwrap()
                .id,
        );
    }
    s.set_retention_floor(Some(ids[4]));
    let report = s
        .enforce_retention(mqgate_store::now_millis())
        .await
        .unwrap();
    assert_eq!(
        report.messages_deleted, 4,
        "only the ids below the floor go"
    );
    assert!(s.message(ids[3]).await.unwrap().is_none());
    assert!(s.message(ids[4]).await.unwrap().is_some());
    assert_eq!(s.queue_range(&q("t", 0)).unwrap().min, QueueOffset(4));
    // A floor at the first kept id: nothing more goes.
    assert_eq!(
        s.enforce_retention(mqgate_store::now_millis())
            .await
            .unwrap()
            .messages_deleted,
        0
    );
    s.set_retention_floor(None);
    let report = s
        .enforce_retention(mqgate_store::now_millis())
        .await
        .unwrap();
    assert_eq!(
        report.messages_deleted, 5,
        "the policy keeps only the newest record"
    );
    assert!(s.message(ids[9]).await.unwrap().is_some());
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::new(super::Kind::Memory)).await
                }
            )*
        }
        mod rocks {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::new(super::Kind::Rocks)).await
                }
            )*
        }
        #[cfg(feature = "jetstream")]
        mod jetstream {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::new(super::Kind::JetStream)).await
                }
            )*
        }
    };
}

conformance!(
    append_round_trip,
    fan_out_stores_once,
    timestamp_lookup,
    truncate_moves_min_only,
    atomic_batches,
    topics_lifecycle,
    offsets_and_metadata_persist,
    kv_scan_pages,
    timers_in_time_order,
    concurrent_appenders_dense,
    queued_writes_keep_caller_order,
    retention_by_bytes,
    retention_by_age,
    restart_loses_nothing,
    visible_then_durable_and_no_sync,
    periodic_fsync_policy,
    large_and_empty_bodies,
    ids_from_a_base,
    retention_floor_holds_messages,
);
