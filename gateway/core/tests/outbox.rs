//! Cross-shard fan-out exactly once (issue 16): a home shard commits each publish once,
//! with an outbox entry per destination shard; forwarders move the entries; each
//! destination applies them under its per-source mark. Every destination queue must
//! hold every message exactly once, in publish order, whatever is replayed, restarted
//! or killed in between. On the in-memory and RocksDB stores, then with the home
//! shard's owner killed between its commit and the forwarding on the jetstream backend.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use mqgate_core::outbox::{
    ensure_outboxes, outbox_topic, retention_floor, stage, ForwardReply, ForwardReq, ForwardTarget,
    Forwarder, Inbox, ShardId,
};
use mqgate_core::Result;
use mqgate_store::{
    MemoryStore, Message, QueueOffset, QueueRef, ReadLimits, RocksConfig, RocksStore, Store,
    TopicName, WriteBatch,
};
use parking_lot::Mutex;
use tempfile::TempDir;

const DESTS: std::ops::RangeInclusive<ShardId> = 1..=8;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Rocks,
}

fn open(kind: Kind, dir: &TempDir, shard: ShardId) -> Arc<dyn Store> {
    let base = u64::from(shard) << 44;
    match kind {
        Kind::Memory => Arc::new(MemoryStore::new().with_id_base(base)),
        Kind::Rocks => {
            let mut c = RocksConfig::new(dir.path().join(format!("s{shard:02}")));
            c.id_base = base;
            Arc::new(RocksStore::open(c).unwrap())
        }
    }
}

fn topic(name: &str) -> TopicName {
    TopicName::new(name).unwrap()
}

fn dest_topic(d: ShardId) -> TopicName {
    topic(&format!("q{d}"))
}

/// Shard 8's queue has 4 queues: forwarded messages spread by their address.
fn dest_queues(d: ShardId) -> u32 {
    if d == 8 {
        4
    } else {
        1
    }
}

/// Records every request it passes on, so a test can replay them.
struct Recording {
    inner: Arc<Inbox>,
    sent: Mutex<Vec<ForwardReq>>,
}

#[async_trait]
impl ForwardTarget for Recording {
    async fn next(&self, source: ShardId) -> Result<u64> {
        self.inner.next(source).await
    }
    async fn apply(&self, req: ForwardReq) -> Result<ForwardReply> {
        self.sent.lock().push(req.clone());
        self.inner.apply(req).await
    }
}

/// The bodies in `t`'s queues; on a destination shard, without the forwarding plan
/// (the home's own copy keeps it: it is the outbox's record; adapters deliver only the
/// properties they know).
async fn bodies(s: &dyn Store, t: &TopicName, queues: u32) -> Vec<String> {
    let mut out = Vec::new();
    for q in 0..queues {
        let q = QueueRef::new(t.clone(), q);
        let mut from = s.queue_range(&q).unwrap().min.0;
        loop {
            let r = s
                .read(&q, QueueOffset(from), ReadLimits::count(500))
                .await
                .unwrap();
            if r.is_empty() {
                break;
            }
            for m in r {
                from = m.entry.offset.0 + 1;
                assert!(
                    t.as_str() == "local"
                        || mqgate_core::props::get(&m.message.message.properties, "core.fwd")
                            .is_none(),
                    "the forwarding plan stays in the home shard"
                );
                out.push(String::from_utf8_lossy(&m.message.message.body).into_owned());
            }
        }
    }
    out
}

fn plan() -> BTreeMap<ShardId, Vec<TopicName>> {
    DESTS.map(|d| (d, vec![dest_topic(d)])).collect()
}

/// Publish `range` through the home shard: paced one by one, then in bursts of 20 per
/// batch (a burst hides ordering bugs a paced run shows, and the other way round).
async fn publish(home: &dyn Store, range: std::ops::Range<usize>) {
    let plan = plan();
    let mut i = range.start;
    while i < range.end {
        let burst = if (i / 50).is_multiple_of(2) { 1 } else { 20 };
        let mut batch = WriteBatch::new();
        for j in i..(i + burst).min(range.end) {
            let m = Message::new(
                topic(&format!("addr/{}", j % 7)),
                Bytes::from(format!("m{j}")),
            );
            stage(&mut batch, m, vec![QueueRef::new(topic("local"), 0)], &plan);
        }
        home.write(batch).await.unwrap();
        i += burst;
        if burst == 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

async fn setup_dests(kind: Kind, dir: &TempDir) -> BTreeMap<ShardId, (Arc<dyn Store>, Arc<Inbox>)> {
    let mut out = BTreeMap::new();
    for d in DESTS {
        let s = open(kind, dir, d);
        s.create_topic(&dest_topic(d), dest_queues(d))
            .await
            .unwrap();
        let inbox = Arc::new(Inbox::new(d, Arc::clone(&s)));
        out.insert(d, (s, inbox));
    }
    out
}

/// A forwarder from the home shard 0 straight to destination `d`'s inbox (both owned
/// in this process).
fn to_inbox(
    home: &Arc<dyn Store>,
    dests: &BTreeMap<ShardId, (Arc<dyn Store>, Arc<Inbox>)>,
    d: ShardId,
) -> Forwarder {
    Forwarder::new(
        0,
        d,
        Arc::clone(home),
        Arc::clone(&dests[&d].1) as Arc<dyn ForwardTarget>,
    )
}

async fn check_dests(dests: &BTreeMap<ShardId, (Arc<dyn Store>, Arc<Inbox>)>, n: usize) {
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    for (d, (s, _)) in dests {
        let mut got = bodies(s.as_ref(), &dest_topic(*d), dest_queues(*d)).await;
        if dest_queues(*d) > 1 {
            // Several queues: order holds per queue (per address), not across them.
            got.sort_by_key(|b| b[1..].parse::<usize>().unwrap());
        }
        assert_eq!(got.len(), n, "shard {d} holds {} of {n}", got.len());
        assert_eq!(got, want, "shard {d}: every message once, in order");
    }
}

async fn fanout_to_8_shards_exactly_once(kind: Kind) {
    const N: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let home = open(kind, &dir, 0);
    home.create_topic(&topic("local"), 1).await.unwrap();
    ensure_outboxes(home.as_ref(), DESTS).await.unwrap();
    let dests = setup_dests(kind, &dir).await;
    let targets: BTreeMap<ShardId, Arc<Recording>> = dests
        .iter()
        .map(|(d, (_, inbox))| {
            (
                *d,
                Arc::new(Recording {
                    inner: Arc::clone(inbox),
                    sent: Mutex::default(),
                }),
            )
        })
        .collect();
    let forwarder = |d: ShardId, batch: usize| {
        let mut f = Forwarder::new(
            0,
            d,
            Arc::clone(&home),
            Arc::clone(&targets[&d]) as Arc<dyn ForwardTarget>,
        );
        f.batch = batch;
        f
    };

    // Forwarders run while the publisher commits; half of them are replaced midway by
    // new ones (a new owner of the home shard starts its own), with another page size.
    let publisher = {
        let home = Arc::clone(&home);
        tokio::spawn(async move { publish(home.as_ref(), 0..N).await })
    };
    let mut rounds = 0;
    while !publisher.is_finished() {
        for d in DESTS {
            let batch = if rounds > 5 && d <= 4 { 7 } else { 64 };
            forwarder(d, batch).pump().await.unwrap();
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    publisher.await.unwrap();
    for d in DESTS {
        forwarder(d, 50).drain().await.unwrap();
    }
    check_dests(&dests, N).await;

    // Every request replayed (a paused old owner, a retry after a lost reply): nothing
    // is applied twice.
    for d in DESTS {
        let sent = targets[&d].sent.lock().clone();
        assert!(!sent.is_empty());
        for req in sent {
            assert_eq!(dests[&d].1.apply(req).await.unwrap().applied, 0);
        }
    }
    check_dests(&dests, N).await;

    // The outboxes are empty: the home keeps no message for them, and retention may go.
    for d in DESTS {
        let r = home
            .queue_range(&QueueRef::new(outbox_topic(d), 0))
            .unwrap();
        assert_eq!(r.min, r.next, "outbox of shard {d} trimmed");
    }
    let dests_list: Vec<ShardId> = DESTS.collect();
    assert_eq!(
        retention_floor(home.as_ref(), &dests_list).await.unwrap(),
        None
    );
    assert_eq!(bodies(home.as_ref(), &topic("local"), 1).await.len(), N);
}

/// The id of the message at `offset` of the home's local queue.
async fn local_id(home: &dyn Store, offset: u64) -> mqgate_store::MessageId {
    home.read(
        &QueueRef::new(topic("local"), 0),
        QueueOffset(offset),
        ReadLimits::count(1),
    )
    .await
    .unwrap()[0]
        .message
        .id
}

/// While a destination is behind, the home's retention floor holds the oldest message
/// it still needs.
async fn retention_floor_follows_the_slowest_destination(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let home = open(kind, &dir, 0);
    home.create_topic(&topic("local"), 1).await.unwrap();
    ensure_outboxes(home.as_ref(), DESTS).await.unwrap();
    let dests = setup_dests(kind, &dir).await;
    publish(home.as_ref(), 0..30).await;
    let list: Vec<ShardId> = DESTS.collect();
    let first = local_id(home.as_ref(), 0).await;
    assert_eq!(
        retention_floor(home.as_ref(), &list).await.unwrap(),
        Some(first)
    );
    for d in DESTS.filter(|d| *d != 5) {
        to_inbox(&home, &dests, d).drain().await.unwrap();
    }
    assert_eq!(
        retention_floor(home.as_ref(), &list).await.unwrap(),
        Some(first),
        "shard 5 has nothing yet"
    );
    let mut f5 = to_inbox(&home, &dests, 5);
    f5.batch = 10;
    f5.pump().await.unwrap();
    let eleventh = local_id(home.as_ref(), 10).await;
    assert_eq!(
        retention_floor(home.as_ref(), &list).await.unwrap(),
        Some(eleventh)
    );
    f5.drain().await.unwrap();
    assert_eq!(retention_floor(home.as_ref(), &list).await.unwrap(), None);
}

/// Each scenario on each backend.
macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Memory).await
                }
            )*
        }
        mod rocks {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Rocks).await
                }
            )*
        }
    };
}

per_backend!(
    fanout_to_8_shards_exactly_once,
    retention_floor_follows_the_slowest_destination,
);

/// The home shard on the jetstream backend; its owner commits 300 fanned-out messages,
/// forwards part of them, and dies (its renewals stop, its store is gone) before the
/// rest. Another node takes the shard over once the lease expires, finds the outbox in
/// the log and forwards what each destination's mark says is missing. A request the
/// old owner had prepared and sends late (it was only paused) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_owner_killed_between_commit_and_forward() {
    use mqgate_store::jetstream::testing::NatsCluster;
    use mqgate_store::jetstream::{JetStreamConfig, Nats, ReplicaSpec, ShardReplica};

    const N: usize = 300;
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let nats = |node: &str| {
        let mut c = JetStreamConfig::new(
            cluster.urls(),
            node,
            RocksConfig::new(dir.path().join(node)),
        );
        c.stream = "outboxkill".into();
        c.lease_ttl = Duration::from_secs(2);
        Nats::connect(c)
    };
    let a = nats("gw-a").await.unwrap();
    let mut ra = ShardReplica::open(&a, ReplicaSpec::shard(a.config(), 0))
        .await
        .unwrap();
    assert!(ra.try_acquire().await.unwrap());
    let (store_a, owned_a) = ra.take_over().await.unwrap();
    let home: Arc<dyn Store> = Arc::new(store_a);
    home.create_topic(&topic("local"), 1).await.unwrap();
    ensure_outboxes(home.as_ref(), DESTS).await.unwrap();
    let dests = setup_dests(Kind::Rocks, &dir).await;
    publish(home.as_ref(), 0..N).await;
    // What a paused owner prepared before forwarding and sends much later: the first
    // 50 entries for shard 2, and a page for shard 3 that skips ahead.
    let page = |q: ShardId, from: u64| {
        let home = Arc::clone(&home);
        async move {
            ForwardReq {
                source: 0,
                first: from,
                entries: home
                    .read(
                        &QueueRef::new(outbox_topic(q), 0),
                        QueueOffset(from),
                        ReadLimits::count(50),
                    )
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|m| m.message)
                    .collect(),
            }
        }
    };
    let stale = page(2, 0).await;
    let ahead = page(3, 250).await;
    // Part forwarded: shards 1-4 get a page each, 5-8 nothing.
    for d in 1..=4 {
        let mut f = to_inbox(&home, &dests, d);
        f.batch = 40 * usize::from(d);
        f.pump().await.unwrap();
    }
    // A page that skips entries is refused, whoever sends it.
    let reply = dests[&3].1.apply(ahead.clone()).await.unwrap();
    assert_eq!((reply.applied, reply.next), (0, 120));
    // Killed: nothing more from gw-a (its store closes, its lease is not renewed).
    drop(home);
    drop(owned_a);

    let b = nats("gw-b").await.unwrap();
    let rb = ShardReplica::open(&b, ReplicaSpec::shard(b.config(), 0))
        .await
        .unwrap();
    let (store_b, _owned_b) = tokio::time::timeout(Duration::from_secs(60), rb.acquire())
        .await
        .expect("gw-b takes the shard once the lease expires")
        .unwrap();
    let home: Arc<dyn Store> = Arc::new(store_b);
    let list: Vec<ShardId> = DESTS.collect();
    assert!(retention_floor(home.as_ref(), &list)
        .await
        .unwrap()
        .is_some());
    for d in DESTS {
        to_inbox(&home, &dests, d).drain().await.unwrap();
    }
    check_dests(&dests, N).await;
    // The paused owner wakes: its pages change nothing.
    assert_eq!(dests[&2].1.apply(stale).await.unwrap().applied, 0);
    assert_eq!(dests[&3].1.apply(ahead).await.unwrap().applied, 0);
    check_dests(&dests, N).await;
    assert_eq!(retention_floor(home.as_ref(), &list).await.unwrap(), None);
    assert_eq!(bodies(home.as_ref(), &topic("local"), 1).await.len(), N);
}
