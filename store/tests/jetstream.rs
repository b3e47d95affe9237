//! The jetstream backend's own guarantees, against a 3-node NATS cluster on loopback
//! that each test starts: a new node rebuilds its view from the log, a stale owner is
//! fenced and writes nothing after the fence, and writes wait (not fail) while the log
//! has no quorum. The store conformance suite runs on this backend too
//! (`conformance.rs`, module `jetstream`).
#![cfg(feature = "jetstream")]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::jetstream::{open, JetStreamConfig, Replication, Role};
use mqgate_store::{
    GroupName, Message, QueueOffset, QueueRef, ReadLimits, RocksConfig, RocksStore, Store,
    StoreExt, TopicName, WriteBatch,
};

fn topic(name: &str) -> TopicName {
    TopicName::new(name).unwrap()
}

fn q(t: &str, id: u32) -> QueueRef {
    QueueRef::new(topic(t), id)
}

fn msg(t: &str, body: &str) -> Message {
    Message::new(topic(t), Bytes::from(body.to_string()))
}

fn config(
    cluster: &NatsCluster,
    node: &str,
    dir: &std::path::Path,
    ttl: Duration,
) -> JetStreamConfig {
    let mut cfg = JetStreamConfig::new(cluster.urls(), node, RocksConfig::new(dir.join(node)));
    cfg.lease_ttl = ttl;
    cfg
}

async fn open_node(cfg: JetStreamConfig) -> (Arc<RocksStore>, Replication) {
    let (s, r) = tokio::time::timeout(Duration::from_secs(60), open(cfg))
        .await
        .expect("opened within a minute")
        .expect("open the jetstream store");
    (Arc::new(s), r)
}

async fn bodies(s: &dyn Store, queue: &QueueRef) -> Vec<String> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let r = s
            .read(queue, QueueOffset(from), ReadLimits::count(500))
            .await
            .unwrap();
        if r.is_empty() {
            return out;
        }
        for m in r {
            from = m.entry.offset.0 + 1;
            out.push(String::from_utf8_lossy(&m.message.message.body).into_owned());
        }
    }
}

/// A call of the test's own NATS client, retried while it fails for up to a minute:
/// on two busy cores a JetStream request can time out while the cluster settles
/// (the store itself retries the same way, see `open`).
async fn retried<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut call: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("{what}: {e:?}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

async fn in_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Everything one node wrote (messages in bursts and paced, offsets, kv, timers, a
/// topic deleted) is there on a node that starts with an empty view folder, and ids
/// and offsets go on from where the first node stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_rebuilds_its_view_from_the_log() {
    let cluster = in_blocking(|| NatsCluster::start(3)).await;
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(2);
    let (a, ra) = open_node(config(&cluster, "node-a", dir.path(), ttl)).await;
    assert!(matches!(ra.role(), Role::Owner { .. }));
    a.create_topic(&topic("t"), 2).await.unwrap();
    a.create_topic(&topic("gone"), 1).await.unwrap();
    // A burst from several writers (grouped), then paced single writes.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                a.append(msg("t", &format!("{w}:{i}")), vec![q("t", 0)])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..20 {
        a.append(msg("t", &format!("paced:{i}")), vec![q("t", 1)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let big = Bytes::from(vec![9u8; 3 << 20]);
    let mut m = msg("t", "");
    m.body = big.clone();
    a.append(m, vec![q("t", 1)]).await.unwrap();
    let g = GroupName::new("g").unwrap();
    let mut b = WriteBatch::new();
    b.commit_offset(g.clone(), q("t", 0), QueueOffset(123))
        .kv_put("ns", Bytes::from_static(b"k"), Bytes::from_static(b"v"))
        .timer_put(4_000_000_000_000, Bytes::from_static(b"later"));
    a.write(b).await.unwrap();
    assert!(a.delete_topic(&topic("gone")).await.unwrap());
    let stats = a.stats();
    let q0 = bodies(a.as_ref(), &q("t", 0)).await;
    assert_eq!(q0.len(), 400);
    drop(a);
    drop(ra);

    // node-b: an empty view; it waits for node-a's lease to expire, then rebuilds.
    let (b, rb) = open_node(config(&cluster, "node-b", dir.path(), ttl)).await;
    assert!(matches!(rb.role(), Role::Owner { .. }));
    assert_eq!(b.stats(), stats);
    assert!(b.topic(&topic("gone")).is_none());
    assert_eq!(bodies(b.as_ref(), &q("t", 0)).await, q0);
    let q1 = b
        .read(&q("t", 1), QueueOffset(0), ReadLimits::count(100))
        .await
        .unwrap();
    assert_eq!(q1.len(), 21);
    for (i, m) in q1[..20].iter().enumerate() {
        assert_eq!(m.message.message.body, format!("paced:{i}").as_bytes());
    }
    assert_eq!(q1[20].message.message.body, big, "a record split in parts");
    assert_eq!(
        b.committed_offset(&g, &q("t", 0)).await.unwrap(),
        Some(QueueOffset(123))
    );
    assert_eq!(
        b.kv_get("ns", b"k").await.unwrap(),
        Some(Bytes::from_static(b"v"))
    );
    assert_eq!(
        b.next_timer().await.unwrap().map(|k| k.due),
        Some(4_000_000_000_000)
    );
    let next = b.append(msg("t", "after"), vec![q("t", 0)]).await.unwrap();
    assert_eq!(next.offsets[0].1, QueueOffset(400));
    let status = rb.status().await.unwrap();
    assert_eq!(status.owner.as_ref().map(|o| o.0.as_str()), Some("node-b"));
    assert_eq!(status.replicas.len(), 3);
    assert_eq!(status.applied, status.last_seq);
}

/// node-a owns the log; its lease goes (as if it had been paused past its time to live)
/// and node-b takes the log over. node-a's next write fails, it steps down, and the log
/// holds nothing of it after node-b's fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_is_fenced_and_steps_down() {
    let cluster = in_blocking(|| NatsCluster::start(3)).await;
    let dir = tempfile::tempdir().unwrap();
    // A long lease: node-a does not renew during the test, as if it were paused.
    let ttl = Duration::from_secs(120);
    let (a, mut ra) = open_node(config(&cluster, "node-a", dir.path(), ttl)).await;
    a.create_topic(&topic("t"), 1).await.unwrap();
    for i in 0..10 {
        a.append(msg("t", &format!("a{i}")), vec![q("t", 0)])
            .await
            .unwrap();
    }
    // The lease expires (deleted here, as its max age would).
    let nats = async_nats::connect(cluster.urls()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let lease = retried("get the lease bucket", || js.get_key_value("mqgate-lease")).await;
    retried("purge the lease", || lease.purge("owner")).await;

    let (b, rb) = open_node(config(&cluster, "node-b", dir.path(), ttl)).await;
    assert!(matches!(rb.role(), Role::Owner { .. }));
    assert_eq!(bodies(b.as_ref(), &q("t", 0)).await.len(), 10);

    // node-a still believes it owns the log: its write is refused, not confirmed.
    let refused = a.append(msg("t", "stale"), vec![q("t", 0)]).await;
    assert!(refused.is_err(), "a fenced owner confirmed a write");
    let why = tokio::time::timeout(Duration::from_secs(5), ra.stepped_down())
        .await
        .expect("node-a stepped down");
    assert!(why.contains("another node appended"), "{why}");
    assert!(a.append(msg("t", "again"), vec![q("t", 0)]).await.is_err());

    b.append(msg("t", "b0"), vec![q("t", 0)]).await.unwrap();
    let got = bodies(b.as_ref(), &q("t", 0)).await;
    assert_eq!(got.last().map(String::as_str), Some("b0"));
    assert!(!got.iter().any(|m| m == "stale" || m == "again"));
    // No record after node-b's fence comes from node-a.
    let mut stream = retried("get the stream", || js.get_stream("mqgate")).await;
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut fenced_at = None;
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_string();
        if m.headers
            .get("Mqgate-Fence")
            .is_some_and(|v| v.as_str().starts_with("node-b/"))
        {
            fenced_at = Some(seq);
        } else if fenced_at.is_some() {
            assert!(
                id.starts_with("node-b."),
                "record {seq} after the fence is {id}"
            );
        }
    }
    assert!(fenced_at.is_some(), "node-b appended a fence");
}

/// Two of three NATS servers die: a write waits (nothing is confirmed without a
/// quorum), reads go on; once they are back the write completes and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_a_quorum_and_resume() {
    let mut cluster = in_blocking(|| NatsCluster::start(3)).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, _ra) = open_node(config(
        &cluster,
        "node-a",
        dir.path(),
        Duration::from_secs(10),
    ))
    .await;
    a.create_topic(&topic("t"), 1).await.unwrap();
    for i in 0..20 {
        a.append(msg("t", &i.to_string()), vec![q("t", 0)])
            .await
            .unwrap();
    }
    let mut cluster = in_blocking(move || {
        cluster.kill(1);
        cluster.kill(2);
        cluster
    })
    .await;
    let a2 = a.clone();
    let pending = tokio::spawn(async move { a2.append(msg("t", "20"), vec![q("t", 0)]).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !pending.is_finished(),
        "a write was confirmed without a quorum"
    );
    assert_eq!(
        bodies(a.as_ref(), &q("t", 0)).await.len(),
        20,
        "reads go on"
    );
    let _cluster = in_blocking(move || {
        cluster.restart(1);
        cluster.restart(2);
        cluster
    })
    .await;
    let done = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("the write completes once the quorum is back")
        .unwrap()
        .unwrap();
    assert_eq!(done.offsets[0].1, QueueOffset(20));
    let got = bodies(a.as_ref(), &q("t", 0)).await;
    assert_eq!(got, (0..=20).map(|i| i.to_string()).collect::<Vec<_>>());
}

/// A store let go on its runtime's only worker while a write waits for NATS (every
/// server paused) closes within seconds: its writer thread gives the write up,
/// unconfirmed, instead of waiting for an answer that only the worker joining it could
/// bring in. (Its wait in `Handle::block_on` ended only with the answer: a conformance
/// run hung for an hour on a store dropped as its test's runtime shut down.)
#[test]
fn a_store_closed_on_the_only_worker_while_a_write_waits_closes() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cluster = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&cluster, "node-a", dir.path(), Duration::from_secs(10));
    let a = rt.block_on(async {
        let (a, _r) = open_node(cfg).await;
        a.create_topic(&topic("t"), 1).await.unwrap();
        a.append(msg("t", "0"), vec![q("t", 0)]).await.unwrap();
        a
    });
    for i in 0..3 {
        cluster.pause(i, true);
    }
    let pending = {
        let a = a.clone();
        rt.spawn(async move { a.append(msg("t", "1"), vec![q("t", 0)]).await })
    };
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !pending.is_finished(),
        "a write was confirmed without a quorum"
    );
    pending.abort();
    let _ = rt.block_on(pending);
    assert_eq!(Arc::strong_count(&a), 1);
    // The last handle, let go on the worker: the store's drop joins its writer there.
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        drop(a);
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        // The worker is stuck for good: dropping the runtime would wait for it.
        std::mem::forget(rt);
        panic!("the store did not close within 30 s of its last handle going");
    }
    for i in 0..3 {
        cluster.pause(i, false);
    }
}

/// Retention on the replicated log: after the store deletes old messages, the records
/// that held only them (and state since rewritten) are purged from the stream, their
/// live state copied forward first; a node that starts with an empty view rebuilds
/// exactly what is live (messages kept, offsets, keyed area, timers, counters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_the_log_and_a_new_node_rebuilds_what_is_live() {
    let cluster = in_blocking(|| NatsCluster::start(3)).await;
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(2);
    let mut cfg = config(&cluster, "node-a", dir.path(), ttl);
    cfg.view.retention = mqgate_store::Retention {
        max_age: None,
        max_bytes: Some(100 << 10),
    };
    let (a, ra) = open_node(cfg).await;
    a.create_topic(&topic("t"), 1).await.unwrap();
    // State written early, in records that retention will drop.
    let g = GroupName::new("g").unwrap();
    let mut b = WriteBatch::new();
    b.commit_offset(g.clone(), q("t", 0), QueueOffset(7))
        .kv_put(
            "ns",
            Bytes::from_static(b"early"),
            Bytes::from_static(b"kept"),
        )
        .timer_put(4_000_000_000_000, Bytes::from_static(b"later"));
    a.write(b).await.unwrap();
    let body = "x".repeat(1000);
    for i in 0..400 {
        a.append(msg("t", &format!("{i:04}{body}")), vec![q("t", 0)])
            .await
            .unwrap();
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let report = a
        .enforce_retention(mqgate_store::now_millis())
        .await
        .unwrap();
    assert!(report.messages_deleted > 250, "{report:?}");
    let nats = async_nats::connect(cluster.urls()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let mut stream = retried("get the stream", || js.get_stream("mqgate")).await;
    let first = stream.info().await.unwrap().state.first_sequence;
    assert!(
        first > 100,
        "the stream was purged up to the checkpoint: first {first}"
    );
    let stats = a.stats();
    let live = bodies(a.as_ref(), &q("t", 0)).await;
    assert_eq!(live.len() as u64, 400 - report.messages_deleted);
    let range = a.queue_range(&q("t", 0)).unwrap();
    drop(a);
    drop(ra);

    let (b, _rb) = open_node(config(&cluster, "node-b", dir.path(), ttl)).await;
    assert_eq!(b.stats(), stats);
    assert_eq!(b.queue_range(&q("t", 0)).unwrap(), range);
    assert_eq!(bodies(b.as_ref(), &q("t", 0)).await, live);
    assert_eq!(
        b.committed_offset(&g, &q("t", 0)).await.unwrap(),
        Some(QueueOffset(7))
    );
    assert_eq!(
        b.kv_get("ns", b"early").await.unwrap(),
        Some(Bytes::from_static(b"kept"))
    );
    assert_eq!(
        b.next_timer().await.unwrap().map(|k| k.due),
        Some(4_000_000_000_000)
    );
    let next = b.append(msg("t", "after"), vec![q("t", 0)]).await.unwrap();
    assert_eq!(next.offsets[0].1, range.next);
}

// ---------------------------------------------------------------------------------
// Shards (issue 16): one replica per (node, shard), the same fenced writer per shard.
// ---------------------------------------------------------------------------------

use mqgate_store::jetstream::{Nats, OwnedShard, ReplicaSpec, ShardReplica, SHARD_ID_SHIFT};
use mqgate_store::KvChange;

async fn nats_node(cluster: &NatsCluster, stream: &str, node: &str, dir: &std::path::Path) -> Nats {
    let mut cfg = config(cluster, node, dir, Duration::from_secs(10));
    cfg.stream = stream.into();
    tokio::time::timeout(Duration::from_secs(60), Nats::connect(cfg))
        .await
        .expect("connected within a minute")
        .expect("connect")
}

async fn replica(nats: &Nats, shard: u16) -> ShardReplica {
    let spec = ReplicaSpec::shard(&nats_cfg_of(nats), shard);
    tokio::time::timeout(Duration::from_secs(60), ShardReplica::open(nats, spec))
        .await
        .expect("opened within a minute")
        .expect("open the replica")
}

/// The config a `Nats` was made with (the spec of a shard derives from it).
fn nats_cfg_of(nats: &Nats) -> JetStreamConfig {
    nats.config().clone()
}

async fn own(mut r: ShardReplica) -> (Arc<RocksStore>, OwnedShard) {
    assert!(
        r.try_acquire().await.unwrap(),
        "nobody else holds {}",
        r.spec().lease_key
    );
    let (s, o) = tokio::time::timeout(Duration::from_secs(60), r.take_over())
        .await
        .expect("took over within a minute")
        .expect("take over");
    (Arc::new(s), o)
}

/// Follow until the view has the stream's last record.
async fn catch_up(r: &mut ShardReplica) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last = r.last().await.unwrap();
        let applied = r
            .follow(tokio::time::Instant::now() + Duration::from_millis(200))
            .await
            .unwrap();
        if applied >= last {
            return applied;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "caught up: {applied} of {last}"
        );
    }
}

/// Two nodes each own one shard and follow the other's: each shard is its own stream,
/// lease key and id range, and a node cannot take a shard another holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_two_nodes() {
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let a = nats_node(cluster, "twoshards", "node-a", dir.path()).await;
    let b = nats_node(cluster, "twoshards", "node-b", dir.path()).await;
    let (a0, _o0) = own(replica(&a, 0).await).await;
    let (b1, _o1) = own(replica(&b, 1).await).await;
    let mut b_follows_0 = replica(&b, 0).await;
    let mut a_follows_1 = replica(&a, 1).await;
    assert_eq!(b_follows_0.spec().stream, "twoshards-s00");
    assert_eq!(a_follows_1.spec().lease_key, "shard.01");
    assert!(
        !b_follows_0.try_acquire().await.unwrap(),
        "shard 0 is node-a's"
    );
    assert!(
        !a_follows_1.try_acquire().await.unwrap(),
        "shard 1 is node-b's"
    );

    for (n, s) in [(0u64, &a0), (1, &b1)] {
        let t = format!("t{n}");
        s.create_topic(&topic(&t), 1).await.unwrap();
        for i in 0..50 {
            let id = s
                .append(msg(&t, &format!("{n}-{i}")), vec![q(&t, 0)])
                .await
                .unwrap()
                .id;
            assert_eq!(id.0 >> SHARD_ID_SHIFT, n, "an id names its shard");
        }
    }
    // Each follower's view holds its shard's log, and only that.
    catch_up(&mut b_follows_0).await;
    catch_up(&mut a_follows_1).await;
    assert_eq!(bodies(a0.as_ref(), &q("t0", 0)).await.len(), 50);
    assert_eq!(bodies(b1.as_ref(), &q("t1", 0)).await.len(), 50);
    assert!(
        a0.queue_range(&q("t1", 0)).is_err(),
        "shard 0 does not hold t1"
    );
}

/// A planned move: the owner hands the shard over; the successor takes the lease at
/// once, has every message, offset and keyed entry, and appends after its own fence;
/// the old owner's store takes no write after the hand-over record. Then back again,
/// through the same folders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_over_loses_nothing_and_fences_the_old_owner() {
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let a = nats_node(cluster, "handover", "node-a", dir.path()).await;
    let b = nats_node(cluster, "handover", "node-b", dir.path()).await;
    let (sa, mut oa) = own(replica(&a, 3).await).await;
    let mut rb = replica(&b, 3).await;
    sa.create_topic(&topic("t"), 2).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(
            sa.append(msg("t", &format!("m{i}")), vec![q("t", i % 2)])
                .await
                .unwrap()
                .id,
        );
        if i % 50 == 0 {
            // Paced and in bursts: a hand-over mid-stream must not depend on batching.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut wb = WriteBatch::new();
    wb.commit_offset(GroupName::new("g").unwrap(), q("t", 0), QueueOffset(40));
    wb.kv_put(
        "amqp.queue",
        Bytes::from_static(b"q1"),
        Bytes::from_static(b"spec"),
    );
    sa.write(wb).await.unwrap();
    catch_up(&mut rb).await;
    assert!(!rb.try_acquire().await.unwrap());

    let seq = oa.hand_over(Some("node-b")).await.unwrap();
    let refused = sa.append(msg("t", "late"), vec![q("t", 0)]).await;
    assert!(
        refused.is_err(),
        "the old owner confirmed a write after handing over"
    );
    let sa = Arc::try_unwrap(sa).expect("the test holds the only handle");
    let mut ra = oa.into_replica(sa).await.unwrap();

    // The key names node-b: it takes the lease without waiting for an expiry.
    let (sb, mut ob) = own(rb).await;
    assert!(ob.epoch() > 0);
    let mut got = bodies(sb.as_ref(), &q("t", 0)).await;
    got.extend(bodies(sb.as_ref(), &q("t", 1)).await);
    assert_eq!(got.len(), 200);
    assert!(!got.iter().any(|m| m == "late"));
    assert_eq!(
        sb.message(ids[199]).await.unwrap().unwrap().message.body,
        Bytes::from_static(b"m199")
    );
    assert_eq!(
        sb.committed_offset(&GroupName::new("g").unwrap(), &q("t", 0))
            .await
            .unwrap(),
        Some(QueueOffset(40))
    );
    assert_eq!(
        sb.kv_get("amqp.queue", b"q1").await.unwrap().as_deref(),
        Some(&b"spec"[..])
    );
    let next = sb.append(msg("t", "b0"), vec![q("t", 0)]).await.unwrap().id;
    assert!(next > ids[199], "ids go on after the hand-over");

    // In the stream: the hand-over record, then node-b's fence, then only node-b.
    let js = b.jetstream().clone();
    let mut stream = retried("get the stream", || js.get_stream("handover-s03")).await;
    let h = stream.get_raw_message(seq).await.unwrap();
    let handover = h
        .headers
        .get("Mqgate-Handover")
        .unwrap()
        .as_str()
        .to_string();
    assert!(
        handover.starts_with("node-a/") && handover.ends_with(" node-b"),
        "{handover}"
    );
    let fence = stream.get_raw_message(seq + 1).await.unwrap();
    assert!(fence
        .headers
        .get("Mqgate-Fence")
        .is_some_and(|v| v.as_str().starts_with("node-b/")));
    let last = stream.info().await.unwrap().state.last_sequence;
    for s in seq + 1..=last {
        let m = stream.get_raw_message(s).await.unwrap();
        let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_string();
        assert!(
            id.starts_with("node-b."),
            "record {s} after the hand-over is {id}"
        );
    }

    // And back: node-a follows again from its own folder and takes the shard.
    catch_up(&mut ra).await;
    assert!(!ra.try_acquire().await.unwrap());
    ob.hand_over(Some("node-a")).await.unwrap();
    let sb = Arc::try_unwrap(sb).expect("the test holds the only handle");
    let _rb = ob.into_replica(sb).await.unwrap();
    let (sa, _oa) = own(ra).await;
    let mut got = bodies(sa.as_ref(), &q("t", 0)).await;
    got.extend(bodies(sa.as_ref(), &q("t", 1)).await);
    assert_eq!(got.len(), 201);
    assert!(got.iter().any(|m| m == "b0"));
}

/// A follower hears, record by record, what each one changed in the keyed area: how
/// every gateway keeps its router in step with the meta stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_sees_kv_changes() {
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let a = nats_node(cluster, "kvfollow", "node-a", dir.path()).await;
    let b = nats_node(cluster, "kvfollow", "node-b", dir.path()).await;
    let (sa, _oa) = own(replica(&a, 0).await).await;
    let mut rb = replica(&b, 0).await;

    let mut wb = WriteBatch::new();
    wb.kv_put(
        "core.binding",
        Bytes::from_static(b"x"),
        Bytes::from_static(b"1"),
    );
    sa.write(wb).await.unwrap();
    sa.create_topic(&topic("t"), 1).await.unwrap();
    sa.append(msg("t", "not kv"), vec![q("t", 0)])
        .await
        .unwrap();
    let mut wb = WriteBatch::new();
    wb.kv_put(
        "core.binding",
        Bytes::from_static(b"y"),
        Bytes::from_static(b"2"),
    );
    wb.kv_delete("core.binding", Bytes::from_static(b"x"));
    sa.write(wb).await.unwrap();

    let mut seen: Vec<(u64, KvChange)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let last = rb.last().await.unwrap();
    while rb.applied() < last {
        assert!(tokio::time::Instant::now() < deadline, "caught up");
        rb.follow_with(
            tokio::time::Instant::now() + Duration::from_millis(200),
            &mut |seq, changes| seen.extend(changes.into_iter().map(|c| (seq, c))),
        )
        .await
        .unwrap();
    }
    let change = |k: &'static [u8], v: Option<&'static [u8]>| KvChange {
        namespace: "core.binding".into(),
        key: Bytes::from_static(k),
        value: v.map(Bytes::from_static),
    };
    let changes: Vec<KvChange> = seen.iter().map(|(_, c)| c.clone()).collect();
    assert_eq!(
        changes,
        vec![
            change(b"x", Some(b"1")),
            change(b"y", Some(b"2")),
            change(b"x", None)
        ]
    );
    assert!(seen[0].0 < seen[1].0, "two records");
    assert_eq!(seen[1].0, seen[2].0, "one record, in its order");
}
