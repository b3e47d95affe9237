//! A broker over several shards in one process (issue 16, slice 4): topics spread over
//! 8 shard stores by the hash of their names, a publish reaching several shards stored
//! once in its home and forwarded to the others exactly once, in the publisher's order;
//! delayed releases and dead letters crossing shards the same way; records, groups and
//! views across the shards. On the in-memory and RocksDB stores, with publishers paced
//! and in bursts.

mod common;

use common::Tagging;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_core::outbox::{ForwardReply, ForwardReq, ForwardTarget};
use mqgate_core::router::{Binding, Destination as BindTo, ExchangeDef, ExchangeKind};
use mqgate_core::shard::{one_name_per_shard, shard_of, ClusterLink};
use mqgate_core::{
    Broker, ConsumeMode, CoreConfig, DeadLetter, Delay, GroupSpec, ManualClock, MemberOptions,
    OnFailure, Outgoing, PublishBatch, Published, Records, StartPosition,
};
use mqgate_store::{
    GroupName, MemoryStore, Message, QueueRef, ReadLimits, RocksConfig, RocksStore, Store,
    StoredMessage, TopicName,
};
use tempfile::TempDir;

const SHARDS: u16 = 8;
const VHOST: &str = "/";
const T0: u64 = 1_800_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Memory,
    Rocks,
}

struct Env {
    kind: Kind,
    dir: TempDir,
    /// The in-memory stores, kept to start a broker again over them.
    memory: Vec<Arc<dyn Store>>,
    clock: ManualClock,
    broker: Broker,
}

fn open(kind: Kind, dir: &TempDir) -> Vec<Arc<dyn Store>> {
    (0..SHARDS)
        .map(|s| {
            let base = u64::from(s) << 44;
            let store: Arc<dyn Store> = match kind {
                Kind::Memory => Arc::new(MemoryStore::new().with_id_base(base)),
                Kind::Rocks => {
                    let mut c = RocksConfig::new(dir.path().join(format!("s{s:02}")));
                    c.id_base = base;
                    Arc::new(RocksStore::open(c).unwrap())
                }
            };
            store
        })
        .collect()
}

fn config() -> CoreConfig {
    CoreConfig {
        offset_commit_interval: Duration::from_millis(100),
        expiry_interval: Duration::from_secs(3600),
        ..CoreConfig::default()
    }
}

impl Env {
    async fn new(kind: Kind) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stores = open(kind, &dir);
        let clock = ManualClock::new(T0);
        let broker = Broker::start_sharded(stores.clone(), config(), Arc::new(clock.clone()))
            .await
            .unwrap();
        Self {
            kind,
            dir,
            memory: if kind == Kind::Memory {
                stores
            } else {
                Vec::new()
            },
            clock,
            broker,
        }
    }

    /// Stop the broker at once and start another over the same shards.
    async fn restart(self) -> Self {
        let Env {
            kind,
            dir,
            memory,
            clock,
            broker,
        } = self;
        broker.shutdown().await;
        drop(broker);
        let stores = match kind {
            Kind::Memory => {
                // As a process would: the old broker's tasks winding down (a forwarder
                // mid-apply) let go of the stores before the next broker starts on
                // them; two brokers on one store would apply a forwarded run twice.
                for _ in 0..400 {
                    if memory.iter().all(|s| Arc::strong_count(s) == 1) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                memory.clone()
            }
            Kind::Rocks => {
                // The stores close when the tasks winding down let go of them.
                let mut opened = None;
                for _ in 0..200 {
                    if let Ok(s) = std::panic::catch_unwind(|| open(kind, &dir)) {
                        opened = Some(s);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                opened.expect("the shard stores reopen")
            }
        };
        let broker = Broker::start_sharded(stores, config(), Arc::new(clock.clone()))
            .await
            .unwrap();
        Self {
            kind,
            dir,
            memory,
            clock,
            broker,
        }
    }
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

/// One queue name per shard.
fn one_per_shard(prefix: &str) -> Vec<String> {
    one_name_per_shard(prefix, SHARDS)
}

/// A name of `prefix` in shard `s`.
fn name_in(prefix: &str, s: u16) -> String {
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|name| shard_of(name, SHARDS) == s)
        .unwrap()
}

fn binding(exchange: &str, to: &str, key: &str) -> Binding {
    Binding {
        source: exchange.into(),
        destination: BindTo::Topic(topic(to)),
        key: key.into(),
        headers: None,
        mqtt: false,
        arguments: Bytes::new(),
    }
}

/// A fanout exchange bound to one-queue topics `queues`.
async fn fanout(b: &Broker, exchange: &str, queues: &[String]) {
    b.declare_exchange(VHOST, ExchangeDef::new(exchange, ExchangeKind::Fanout))
        .await
        .unwrap();
    for q in queues {
        b.create_topic(&topic(q), Some(1)).await.unwrap();
        b.bind(VHOST, binding(exchange, q, ""), true).await.unwrap();
    }
}

fn text(m: &StoredMessage) -> String {
    String::from_utf8(m.message.body.to_vec()).unwrap()
}

/// The bodies queue 0 of `t` holds, in order.
async fn bodies(b: &Broker, t: &str) -> Vec<String> {
    let q = QueueRef::new(topic(t), 0);
    let range = b.queue_range(&q).unwrap();
    b.peek(&q, range.min, ReadLimits::count(100_000))
        .await
        .unwrap()
        .iter()
        .map(|m| text(&m.message))
        .collect()
}

/// Poll until `t` holds `n` messages (10 s at most); its bodies.
async fn wait_bodies(b: &Broker, t: &str, n: usize) -> Vec<String> {
    for _ in 0..1000 {
        let got = bodies(b, t).await;
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{t} holds {} messages, expected {n}",
        bodies(b, t).await.len()
    );
}

fn expected(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

fn through(exchange: &str, body: String) -> Outgoing {
    Outgoing {
        message: Message::new(topic(exchange), Bytes::from(body)),
        to: mqgate_core::Destination::Exchange {
            vhost: VHOST.into(),
            exchange: exchange.into(),
            key: String::new(),
            headers: Vec::new(),
        },
        delay: None,
        retain: None,
    }
}

/// Publish `n` messages through `exchange`: one at a time, waiting for each (paced),
/// or 20 per batch with 8 batches in flight (burst).
async fn publish_through(b: &Broker, exchange: &str, n: usize, burst: bool) -> Vec<Published> {
    let mut answers = Vec::with_capacity(n);
    if !burst {
        for i in 0..n {
            let mut batch = PublishBatch::new();
            batch.push(through(exchange, format!("m{i}")));
            answers.extend(b.publish_batch(batch).await.unwrap().into_iter().flatten());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        return answers;
    }
    let mut pipe = b.publish_pipeline::<()>(8);
    let mut i = 0;
    while i < n || !pipe.is_empty() {
        if i < n && !pipe.must_drain() {
            let mut batch = PublishBatch::new();
            for _ in 0..20.min(n - i) {
                batch.push(through(exchange, format!("m{i}")));
                i += 1;
            }
            pipe.submit(batch, ()).await.unwrap();
            continue;
        }
        let ((), r) = pipe.next().await;
        answers.extend(r.unwrap().into_iter().flatten());
    }
    answers
}

async fn fanout_reaches_every_shard_once(kind: Kind, burst: bool) {
    let env = Env::new(kind).await;
    let b = &env.broker;
    let queues = one_per_shard("fan");
    let shards: Vec<u16> = queues.iter().map(|q| b.shard_of_topic(&topic(q))).collect();
    assert_eq!(
        shards,
        (0..SHARDS).collect::<Vec<_>>(),
        "one queue per shard"
    );
    fanout(b, "fan", &queues).await;
    let n = 300;
    let answers = publish_through(b, "fan", n, burst).await;
    assert_eq!(answers.len(), n);
    for a in &answers {
        let Published::Stored {
            offsets, forwarded, ..
        } = a
        else {
            panic!("stored: {a:?}");
        };
        assert_eq!(a.routed(), 8, "every queue counts: {a:?}");
        assert_eq!(offsets.len(), 1, "its home's own queue: {a:?}");
        assert_eq!(forwarded.len(), 7, "the other seven forwarded: {a:?}");
    }
    for q in &queues {
        assert_eq!(
            wait_bodies(b, q, n).await,
            expected(n),
            "{q}: each once, in order"
        );
    }
    // Nothing more arrives later (no duplicate from a second forwarding).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for q in &queues {
        assert_eq!(bodies(b, q).await.len(), n, "{q}");
    }
    // The forwarders dropped what every destination has.
    let restarted = env.restart().await;
    let b = &restarted.broker;
    for q in &queues {
        assert_eq!(bodies(b, q).await, expected(n), "{q} after a restart");
    }
    // The outboxes are the broker's own: not listed.
    assert!(b
        .topics()
        .iter()
        .all(|t| !t.name.as_str().starts_with("%OUTBOX%")));
    assert_eq!(kind, restarted.kind);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_to_8_shards_exactly_once_memory_paced() {
    fanout_reaches_every_shard_once(Kind::Memory, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_to_8_shards_exactly_once_memory_burst() {
    fanout_reaches_every_shard_once(Kind::Memory, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_to_8_shards_exactly_once_rocks_paced() {
    fanout_reaches_every_shard_once(Kind::Rocks, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_to_8_shards_exactly_once_rocks_burst() {
    fanout_reaches_every_shard_once(Kind::Rocks, true).await;
}

/// One publisher alternates messages for queue A alone (stored in A's shard) with
/// messages for A and two queues of another shard (stored there, A's copy forwarded):
/// A must still receive them in publish order.
async fn order_kept_across_homes(kind: Kind, burst: bool) {
    let env = Env::new(kind).await;
    let b = &env.broker;
    let a = name_in("a", 1);
    let (c1, c2) = (name_in("c", 5), name_in("cc", 5));
    for t in [&a, &c1, &c2] {
        b.create_topic(&topic(t), Some(1)).await.unwrap();
    }
    let item = |i: usize| {
        let to = if i.is_multiple_of(3) {
            vec![topic(&a), topic(&c1), topic(&c2)]
        } else {
            vec![topic(&a)]
        };
        Outgoing::routed(Message::new(topic("x"), Bytes::from(format!("m{i}"))), to)
    };
    let n = 240;
    if burst {
        let mut pipe = b.publish_pipeline::<()>(8);
        let mut i = 0;
        while i < n || !pipe.is_empty() {
            if i < n && !pipe.must_drain() {
                let mut batch = PublishBatch::new();
                for _ in 0..7.min(n - i) {
                    batch.push(item(i));
                    i += 1;
                }
                pipe.submit(batch, ()).await.unwrap();
                continue;
            }
            pipe.next().await.1.unwrap();
        }
    } else {
        for i in 0..n {
            let mut batch = PublishBatch::new();
            batch.push(item(i));
            b.publish_batch(batch).await.unwrap();
        }
    }
    assert_eq!(
        wait_bodies(b, &a, n).await,
        expected(n),
        "A in publish order"
    );
    let every_third: Vec<String> = (0..n).step_by(3).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(b, &c1).await, every_third);
    assert_eq!(bodies(b, &c2).await, every_third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_kept_across_homes_memory_burst() {
    order_kept_across_homes(Kind::Memory, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_kept_across_homes_rocks_burst() {
    order_kept_across_homes(Kind::Rocks, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_kept_across_homes_memory_paced() {
    order_kept_across_homes(Kind::Memory, false).await;
}

/// Delayed publishes through an exchange are released by shard 0's scheduler into
/// queues of every shard; a restart right after the release still forwards each once.
async fn delayed_fanout_released_into_every_shard(kind: Kind) {
    let env = Env::new(kind).await;
    let b = &env.broker;
    let queues = one_per_shard("later");
    fanout(b, "later", &queues).await;
    let n = 50;
    let mut batch = PublishBatch::new();
    for i in 0..n {
        let mut item = through("later", format!("m{i}"));
        item.delay = Some(Delay::For(Duration::from_secs(10)));
        batch.push(item);
    }
    let answers = b.publish_batch(batch).await.unwrap();
    assert!(answers
        .iter()
        .all(|a| matches!(a, Some(Published::Delayed { .. }))));
    assert_eq!(b.delayed_pending(), n as u64);
    assert_eq!(
        b.delayed(None, 1000, None, None)
            .await
            .unwrap()
            .timers
            .len(),
        n
    );
    env.clock.advance(Duration::from_secs(11));
    // Released (the timers gone) ...
    for _ in 0..500 {
        if b.delayed_pending() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.delayed_pending(), 0);
    // ... and a restart at once: what was not forwarded yet is forwarded by the next run.
    let env = env.restart().await;
    let b = &env.broker;
    for q in &queues {
        assert_eq!(wait_bodies(b, q, n).await, expected(n), "{q}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for q in &queues {
        assert_eq!(bodies(b, q).await.len(), n, "{q}: no duplicate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_fanout_released_into_every_shard_memory() {
    delayed_fanout_released_into_every_shard(Kind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_fanout_released_into_every_shard_rocks() {
    delayed_fanout_released_into_every_shard(Kind::Rocks).await;
}

/// A consumer in shard 1 rejects messages; its dead-letter exchange routes them to a
/// queue in shard 6. Retries of a RocketMQ-style group stay in the group's shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_retries_across_shards() {
    for kind in [Kind::Memory, Kind::Rocks] {
        let env = Env::new(kind).await;
        let b = &env.broker;
        let work = name_in("work", 1);
        let dead = name_in("dead", 6);
        b.declare_exchange(VHOST, ExchangeDef::new("dlx", ExchangeKind::Direct))
            .await
            .unwrap();
        b.create_topic(&topic(&dead), Some(1)).await.unwrap();
        b.bind(VHOST, binding("dlx", &dead, "dead"), true)
            .await
            .unwrap();
        b.create_topic(&topic(&work), Some(1)).await.unwrap();
        let mut s = GroupSpec::new(
            GroupName::new(&work).unwrap(),
            vec![topic(&work)],
            ConsumeMode::Shared,
        );
        s.start = StartPosition::First;
        s.on_failure = OnFailure::Discard;
        s.policy.dead_letter = Some(Box::new(DeadLetter {
            vhost: VHOST.into(),
            exchange: "dlx".into(),
            routing_key: None,
            endpoint: work.clone(),
            format: Arc::new(Tagging),
        }));
        let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
        for i in 0..20 {
            b.publish(mqgate_core::Publish::new(Message::new(
                topic(&work),
                Bytes::from(format!("m{i}")),
            )))
            .await
            .unwrap();
        }
        for _ in 0..20 {
            let d = tokio::time::timeout(Duration::from_secs(5), c.recv())
                .await
                .unwrap()
                .unwrap();
            c.nack(d.ack_token(), false);
        }
        assert_eq!(wait_bodies(b, &dead, 20).await, expected(20), "{kind:?}");

        // A group over a topic of shard 3: its retry topic is created beside it.
        let orders = name_in("orders", 3);
        b.create_topic(&topic(&orders), Some(1)).await.unwrap();
        let mut g = GroupSpec::new(
            GroupName::new("billing").unwrap(),
            vec![topic(&orders)],
            ConsumeMode::Clustering,
        );
        g.start = StartPosition::First;
        g.on_failure = OnFailure::Retry;
        let _m = b.subscribe(g, MemberOptions::new("m", 10)).await.unwrap();
        assert_eq!(b.shard_of_topic(&topic("%RETRY%billing")), 3);
        assert!(b.topic(&topic("%RETRY%billing")).is_some(), "{kind:?}");
        // A group whose topics are in two shards is refused, not half served.
        let other = name_in("orders", 4);
        b.create_topic(&topic(&other), Some(1)).await.unwrap();
        let split = GroupSpec::new(
            GroupName::new("both").unwrap(),
            vec![topic(&orders), topic(&other)],
            ConsumeMode::Clustering,
        );
        let err = b.subscribe(split, MemberOptions::new("m", 10)).await.err();
        assert!(
            matches!(err, Some(mqgate_core::CoreError::Invalid(_))),
            "{err:?}"
        );
        b.shutdown().await;
    }
}

/// An endpoint's records live with its topic; reads and scans see every shard; a
/// change goes where the key is, so there is only ever one copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_live_with_their_endpoint() {
    for kind in [Kind::Memory, Kind::Rocks] {
        let env = Env::new(kind).await;
        let b = &env.broker;
        let mut names = Vec::new();
        for s in [2u16, 5, 7] {
            let q = name_in("q", s);
            let mut r = Records::new();
            r.put(
                "test.queue",
                q.clone().into_bytes(),
                Bytes::from_static(b"v1"),
            );
            b.declare_endpoint(&topic(&q), 1, &GroupName::new(&q).unwrap(), r)
                .await
                .unwrap();
            names.push(q);
        }
        // One not anchored by an endpoint: shard 0.
        let mut r = Records::new();
        r.put("test.queue", &b"zz-loose"[..], Bytes::from_static(b"v1"));
        b.write_records(r).await.unwrap();
        for q in &names {
            assert_eq!(
                b.record("test.queue", q.as_bytes())
                    .await
                    .unwrap()
                    .as_deref(),
                Some(&b"v1"[..])
            );
            let mut r = Records::new();
            r.put(
                "test.queue",
                q.clone().into_bytes(),
                Bytes::from_static(b"v2"),
            );
            b.write_records(r).await.unwrap();
        }
        let mut all = names.clone();
        all.push("zz-loose".into());
        all.sort();
        let scanned = b.records("test.queue", b"", None, 100).await.unwrap();
        let keys: Vec<String> = scanned
            .iter()
            .map(|(k, _)| String::from_utf8(k.to_vec()).unwrap())
            .collect();
        assert_eq!(keys, all, "{kind:?}: each once, in key order");
        assert!(scanned
            .iter()
            .filter(|(k, _)| &k[..] != b"zz-loose")
            .all(|(_, v)| &v[..] == b"v2"));
        // Paging across shards.
        let first = b.records("test.queue", b"", None, 2).await.unwrap();
        let rest = b
            .records("test.queue", b"", Some(&first[1].0), 100)
            .await
            .unwrap();
        assert_eq!(first.len() + rest.len(), all.len());
        // Deleting removes the one copy.
        let mut r = Records::new();
        r.delete("test.queue", names[0].clone().into_bytes());
        b.write_records(r).await.unwrap();
        assert!(b
            .record("test.queue", names[0].as_bytes())
            .await
            .unwrap()
            .is_none());
        b.shutdown().await;
    }
}

/// Links brokers of one cluster in one process: a shard's inbox is asked of whichever
/// of them owns it now.
#[derive(Debug, Default)]
struct Loopback {
    peers: parking_lot::Mutex<Vec<Broker>>,
}

struct PeerTarget {
    link: Arc<Loopback>,
    dest: u16,
}

impl PeerTarget {
    fn find(&self) -> mqgate_core::Result<Arc<dyn ForwardTarget>> {
        self.link
            .peers
            .lock()
            .iter()
            .find_map(|b| b.inbox(self.dest))
            .ok_or(mqgate_core::CoreError::NotOwned(self.dest))
    }
}

#[async_trait::async_trait]
impl ForwardTarget for PeerTarget {
    async fn next(&self, source: u16) -> mqgate_core::Result<u64> {
        self.find()?.next(source).await
    }

    async fn apply(&self, req: ForwardReq) -> mqgate_core::Result<ForwardReply> {
        self.find()?.apply(req).await
    }
}

#[derive(Debug)]
struct LinkHandle(Arc<Loopback>);

#[async_trait::async_trait]
impl ClusterLink for LinkHandle {
    fn forward_target(&self, dest: u16) -> Arc<dyn ForwardTarget> {
        Arc::new(PeerTarget {
            link: Arc::clone(&self.0),
            dest,
        })
    }

    /// The publish relay in one process: submitted to the owner's broker; while
    /// the shard moves (owned by none), wait for its next owner, as the NATS relay
    /// does on *no responders*.
    async fn publish(
        &self,
        shard: u16,
        batch: PublishBatch,
    ) -> mqgate_core::Result<mqgate_core::Submitted> {
        for _ in 0..200 {
            let owner = self
                .0
                .peers
                .lock()
                .iter()
                .find(|b| b.owned_shards().contains(&shard))
                .cloned();
            if let Some(owner) = owner {
                return owner.publish_submit(batch).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(mqgate_core::CoreError::NotOwned(shard))
    }
}

/// Whichever broker owns `t`'s shard.
fn owner_of<'a>(brokers: &'a [Broker], t: &str) -> &'a Broker {
    let s = brokers[0].shard_of_topic(&topic(t));
    brokers
        .iter()
        .find(|b| b.owned_shards().contains(&s))
        .expect("some broker owns it")
}

/// Two gateways of one cluster in one process, shards 0-3 on the first and 4-7 on the
/// second: a fan-out through the first reaches queues in all 8 shards exactly once and
/// in order while shards move between them (a destination, then shard 0 with the
/// routing state, after which the first relays its publishes to the second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_move_between_brokers_under_a_fanout() {
    for kind in [Kind::Memory, Kind::Rocks] {
        let dir = tempfile::tempdir().unwrap();
        let stores = open(kind, &dir);
        let link = Arc::new(Loopback::default());
        let clock = ManualClock::new(T0);
        let start = || {
            Broker::start_cluster(
                SHARDS,
                Arc::new(LinkHandle(Arc::clone(&link))),
                config(),
                Arc::new(clock.clone()),
            )
            .unwrap()
        };
        let brokers = vec![start(), start()];
        *link.peers.lock() = brokers.clone();
        for s in 0..SHARDS {
            let b = &brokers[usize::from(s / 4)];
            b.attach_shard(s, Arc::clone(&stores[usize::from(s)]))
                .await
                .unwrap();
        }
        assert_eq!(brokers[0].owned_shards(), vec![0, 1, 2, 3]);
        assert_eq!(brokers[1].owned_shards(), vec![4, 5, 6, 7]);
        let (a, b) = (&brokers[0], &brokers[1]);
        let queues = one_per_shard("moved");
        // Each queue is created by its shard's owner; the routing state is shard 0's.
        for q in &queues {
            owner_of(&brokers, q)
                .create_topic(&topic(q), Some(1))
                .await
                .unwrap();
        }
        a.declare_exchange(VHOST, ExchangeDef::new("fan", ExchangeKind::Fanout))
            .await
            .unwrap();
        for q in &queues {
            a.bind(VHOST, binding("fan", q, ""), true).await.unwrap();
        }
        // The second gateway does not own shard 0: asking it fails plainly.
        assert!(matches!(
            b.declare_exchange(
                VHOST,
                ExchangeDef {
                    durable: true,
                    ..ExchangeDef::new("other", ExchangeKind::Fanout)
                }
            )
            .await,
            Err(mqgate_core::CoreError::NotOwned(0))
        ));
        let n = 3000;
        let publisher = {
            let a = a.clone();
            tokio::spawn(async move { publish_through(&a, "fan", n, true).await })
        };
        // Until the queue in shard 1 (on the first gateway throughout) holds `k`
        // messages.
        let home_queue = QueueRef::new(topic(&queues[1]), 0);
        let reached = |k: u64| {
            let a = a.clone();
            let q = home_queue.clone();
            async move {
                while a.queue_range(&q).map_or(0, |r| r.next.0) < k {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        // A destination moves from the second gateway to the first ...
        reached(n as u64 / 5).await;
        assert!(!publisher.is_finished(), "{kind:?}: mid-stream");
        assert!(b.detach_shard(5).await);
        tokio::time::sleep(Duration::from_millis(30)).await;
        a.attach_shard(5, Arc::clone(&stores[5])).await.unwrap();
        // ... and shard 0 (the routing state) from the first to the second: the
        // first relays its exchange publishes to the second from then on.
        reached(2 * n as u64 / 5).await;
        assert!(!publisher.is_finished(), "{kind:?}: mid-stream");
        assert!(a.detach_shard(0).await);
        b.attach_shard(0, Arc::clone(&stores[0])).await.unwrap();
        let answers = publisher.await.unwrap();
        assert_eq!(answers.len(), n, "{kind:?}");
        assert!(answers.iter().all(|p| p.routed() == 8), "{kind:?}");
        for q in &queues {
            let owner = owner_of(&brokers, q);
            let got = wait_bodies(owner, q, n).await;
            let want = expected(n);
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            assert!(
                got == want,
                "{kind:?} {q}: each once, in order; {} held, first difference at {first:?}: {:?}",
                got.len(),
                first.map(|i| &got[i.saturating_sub(2)..(i + 3).min(got.len())])
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for q in &queues {
            assert_eq!(
                bodies(owner_of(&brokers, q), q).await.len(),
                n,
                "{kind:?} {q}"
            );
        }
        // (Counted by the shard that applied them: a detached shard's count goes with it.)
        assert!(a.forwarded() + b.forwarded() > 0);
        for b in &brokers {
            b.shutdown().await;
        }
        link.peers.lock().clear();
    }
}
