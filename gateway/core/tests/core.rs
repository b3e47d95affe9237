//! The broker core through its API, on both store backends, with a manual clock for
//! delays and retry ladders.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_core::router::{Binding, Destination, ExchangeDef, ExchangeKind, DEFAULT_VHOST};
use mqgate_core::{
    Broker, ConsumeMode, Consumer, CoreConfig, Delay, Delivery, GroupSpec, ManualClock,
    MemberOptions, OnFailure, Publish, Published, StartPosition,
};
use mqgate_store::{GroupName, MemoryStore, Message, RocksConfig, RocksStore, Store, TopicName};
use tempfile::TempDir;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Memory,
    Rocks,
}

struct Env {
    kind: Kind,
    dir: TempDir,
    clock: ManualClock,
    broker: Broker,
    config: CoreConfig,
}

const T0: u64 = 1_800_000_000_000;

fn open_store(kind: Kind, dir: &TempDir) -> Arc<dyn Store> {
    match kind {
        Kind::Memory => Arc::new(MemoryStore::new()),
        Kind::Rocks => {
            Arc::new(RocksStore::open(RocksConfig::new(dir.path().join("data"))).unwrap())
        }
    }
}

/// A broker of `env`'s kind and settings on a store of its own, which the test reads
/// beside it.
async fn broker_on_own_store(env: &Env, dir: &TempDir) -> (Arc<dyn Store>, Broker) {
    let store = open_store(env.kind, dir);
    let b = broker_on(env, &store).await;
    (store, b)
}

/// A broker started (again) on `store`, as `env`'s.
async fn broker_on(env: &Env, store: &Arc<dyn Store>) -> Broker {
    Broker::start(
        Arc::clone(store),
        env.config.clone(),
        Arc::new(env.clock.clone()),
    )
    .await
    .unwrap()
}

impl Env {
    async fn new(kind: Kind) -> Self {
        Self::with(kind, CoreConfig::default()).await
    }

    async fn with(kind: Kind, config: CoreConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let broker = Broker::start(
            open_store(kind, &dir),
            config.clone(),
            Arc::new(clock.clone()),
        )
        .await
        .unwrap();
        Self {
            kind,
            dir,
            clock,
            broker,
            config,
        }
    }

    /// Stop the broker and start a new one on the same data (RocksStore only).
    async fn restart(self) -> Self {
        assert_eq!(self.kind, Kind::Rocks);
        self.broker.shutdown().await;
        let Env {
            kind,
            dir,
            clock,
            broker,
            config,
        } = self;
        drop(broker);
        // The store closes when the last reference (held by tasks winding down) goes.
        let mut store = None;
        for _ in 0..100 {
            match RocksStore::open(RocksConfig::new(dir.path().join("data"))) {
                Ok(s) => {
                    store = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let store: Arc<dyn Store> = Arc::new(store.expect("store reopens"));
        let broker = Broker::start(store, config.clone(), Arc::new(clock.clone()))
            .await
            .unwrap();
        Env {
            kind,
            dir,
            clock,
            broker,
            config,
        }
    }
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

fn group(s: &str) -> GroupName {
    GroupName::new(s).unwrap()
}

fn msg(t: &str, body: impl Into<String>) -> Message {
    Message::new(topic(t), Bytes::from(body.into()))
}

fn body(d: &Delivery) -> String {
    String::from_utf8(d.message.message.body.to_vec()).unwrap()
}

async fn recv(c: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), c.recv())
        .await
        .expect("a delivery within 10 s")
        .expect("group alive")
}

async fn nothing(c: &mut Consumer) {
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.recv())
            .await
            .is_err(),
        "no delivery expected"
    );
}

/// Wait until the group's actor has settled every delivery (acks and nacks processed).
async fn settled(b: &Broker, g: &str) {
    for _ in 0..500 {
        let info = b.group_info(&group(g)).await.unwrap();
        if info.queues.iter().all(|q| q.in_flight == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("group {g} still has messages in flight");
}

async fn publish(b: &Broker, t: &str, body: impl Into<String>) -> Published {
    b.publish(Publish::new(msg(t, body))).await.unwrap()
}

fn spec(g: &str, t: &str, mode: ConsumeMode) -> GroupSpec {
    let mut s = GroupSpec::new(group(g), vec![topic(t)], mode);
    s.start = StartPosition::First;
    s
}

/// [`spec`] whose start is stored with its first delivery (`GroupSpec::lazy_start`).
fn lazy(g: &str, t: &str, mode: ConsumeMode) -> GroupSpec {
    GroupSpec {
        lazy_start: true,
        ..spec(g, t, mode)
    }
}

async fn order_per_sharding_key(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("orders"), Some(4)).await.unwrap();
    let mut s = spec("g", "orders", ConsumeMode::Clustering);
    s.orderly = true;
    let mut members = Vec::new();
    for i in 0..3 {
        members.push(
            b.subscribe(s.clone(), MemberOptions::new(format!("m{i}"), 16))
                .await
                .unwrap(),
        );
    }
    // 8 keys x 25 messages, interleaved.
    for n in 0..25 {
        for k in 0..8 {
            let mut p = Publish::new(msg("orders", format!("{k}:{n}")));
            p.sharding_key = Some(format!("key-{k}"));
            b.publish(p).await.unwrap();
        }
    }
    let mut seen: HashMap<String, Vec<u32>> = HashMap::new();
    let mut queue_of_key: HashMap<String, String> = HashMap::new();
    let mut got = 0;
    while got < 200 {
        for m in members.iter_mut() {
            while let Some(d) = m.try_recv() {
                let text = body(&d);
                let (k, n) = text.split_once(':').unwrap();
                let q = d.queue.to_string();
                assert_eq!(
                    queue_of_key.entry(k.into()).or_insert(q.clone()),
                    &q,
                    "one key, one queue"
                );
                seen.entry(k.into()).or_default().push(n.parse().unwrap());
                m.ack(d.ack_token());
                got += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (k, ns) in &seen {
        assert_eq!(ns, &(0..25).collect::<Vec<_>>(), "key {k} in order");
    }
    // Each queue was read by exactly one member.
    let info = b.group_info(&group("g")).await.unwrap();
    let owned: usize = info.members.iter().map(|m| m.queues.len()).sum();
    assert_eq!(owned, 4);
    assert!(info
        .members
        .iter()
        .all(|m| !m.queues.is_empty() && m.queues.len() <= 2));
}

/// A publisher that waits for each message to be consumed before the next (a burst hides
/// this): N members of a shared group take turns, with and without the retry queue the
/// group also reads. Looking for work in an empty queue used to move the round robin,
/// so one member got every message (200/0 with two, 0/0/0/60 with four).
async fn shared_group_rotates_with_a_paced_publisher(env: Env) {
    let b = &env.broker;
    for n in [2usize, 3, 4, 8] {
        for retry in [false, true] {
            let name = format!("rr{n}{}", if retry { "r" } else { "" });
            b.create_topic(&topic(&name), Some(1)).await.unwrap();
            let mut s = spec(&name, &name, ConsumeMode::Shared);
            if retry {
                s.on_failure = OnFailure::Retry;
            }
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut tasks = Vec::new();
            for i in 0..n {
                let mut c = b
                    .subscribe(s.clone(), MemberOptions::new(format!("m{i}"), 10))
                    .await
                    .unwrap();
                let tx = tx.clone();
                tasks.push(tokio::spawn(async move {
                    while let Some(d) = c.recv().await {
                        c.ack(d.ack_token());
                        if tx.send(i).is_err() {
                            break;
                        }
                    }
                }));
            }
            let rounds = 16 * n;
            let mut got = vec![0usize; n];
            for k in 0..rounds {
                publish(b, &name, k.to_string()).await;
                let i = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("a delivery within 10 s")
                    .expect("members alive");
                got[i] += 1;
            }
            // Each member 1/N of the messages, within 10%.
            for (i, g) in got.iter().enumerate() {
                assert!(
                    (*g as f64 - 16.0).abs() <= 1.6,
                    "{n} members, retry {retry}: member {i} got {g} of {rounds}: {got:?}"
                );
            }
            for t in tasks {
                t.abort();
            }
        }
    }
}

async fn rebalance_without_loss(env: Env) {
    let b = env.broker.clone();
    b.create_topic(&topic("t"), Some(8)).await.unwrap();
    let s = spec("g", "t", ConsumeMode::Clustering);
    let total = 600u32;
    let producer = tokio::spawn({
        let b = b.clone();
        async move {
            for i in 0..total {
                b.publish(Publish::new(msg("t", i.to_string())))
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    let mut got: BTreeMap<u32, u32> = BTreeMap::new();
    let mut members: Vec<Consumer> = vec![b
        .subscribe(s.clone(), MemberOptions::new("m0", 8))
        .await
        .unwrap()];
    let mut step = 0;
    while got.len() < total as usize {
        step += 1;
        // Members join and leave while the producer runs.
        if step == 20 || step == 40 {
            let id = format!("m{}", members.len() + step);
            members.push(
                b.subscribe(s.clone(), MemberOptions::new(id, 8))
                    .await
                    .unwrap(),
            );
        }
        if step == 60 && members.len() > 1 {
            drop(members.remove(0)); // leaves with whatever it had in flight
        }
        for m in members.iter_mut() {
            while let Some(d) = m.try_recv() {
                *got.entry(body(&d).parse().unwrap()).or_default() += 1;
                m.ack(d.ack_token());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(step < 3000, "stalled with {} of {total}", got.len());
    }
    producer.await.unwrap();
    assert_eq!(got.len() as u32, total, "nothing lost");
    let dups: u32 = got.values().map(|n| n - 1).sum();
    assert!(
        dups <= 8,
        "duplicates only for in-flight messages, got {dups}"
    );
}

async fn broadcast_to_every_member(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("news"), Some(3)).await.unwrap();
    let s = spec("bc", "news", ConsumeMode::Broadcast);
    let mut members = Vec::new();
    for i in 0..4 {
        members.push(
            b.subscribe(s.clone(), MemberOptions::new(format!("m{i}"), 100))
                .await
                .unwrap(),
        );
    }
    for i in 0..30 {
        publish(b, "news", i.to_string()).await;
    }
    for m in members.iter_mut() {
        let mut got = Vec::new();
        for _ in 0..30 {
            let d = recv(m).await;
            got.push(body(&d).parse::<u32>().unwrap());
            m.ack(d.ack_token());
        }
        got.sort_unstable();
        assert_eq!(got, (0..30).collect::<Vec<_>>());
        nothing(m).await;
    }
}

/// An unbounded member (AMQP's consumer without basic.qos) holds any number unacked:
/// its prefetch bounds only what waits in its mailbox. A member that takes nothing is
/// given its prefetch's worth; one that takes what it is given gets everything, paced
/// publishes as well as a burst, without acking any.
async fn unbounded_member_holds_any_number_unacked(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("many"), Some(1)).await.unwrap();
    let s = spec("takers", "many", ConsumeMode::Shared);
    let mut opts = MemberOptions::new("u", 10);
    opts.exact_prefetch = true;
    opts.unbounded = true;
    let mut u = b.subscribe(s.clone(), opts).await.unwrap();
    for i in 0..100 {
        publish(b, "many", i.to_string()).await;
    }
    // Nothing taken: the mailbox holds the prefetch's 10, the rest waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = b.group_info(&group("takers")).await.unwrap();
    assert_eq!(
        info.members[0].unacked, 10,
        "only the prefetch's worth given"
    );
    let mut held = Vec::new();
    for i in 0..100 {
        let d = recv(&mut u).await;
        assert_eq!(body(&d), i.to_string());
        held.push(d);
    }
    for i in 100..130 {
        publish(b, "many", i.to_string()).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        let d = recv(&mut u).await;
        assert_eq!(body(&d), i.to_string());
        held.push(d);
    }
    nothing(&mut u).await;
    let info = b.group_info(&group("takers")).await.unwrap();
    assert_eq!(info.members[0].unacked, 130, "all held unacked");
    for d in &held {
        u.ack(d.ack_token());
    }
    settled(b, "takers").await;
    // A bounded member of the same prefetch stops at 10 unacked.
    let s2 = spec("holders", "many", ConsumeMode::Shared);
    let mut h = b.subscribe(s2, MemberOptions::new("h", 10)).await.unwrap();
    for _ in 0..10 {
        recv(&mut h).await;
    }
    nothing(&mut h).await;
}

/// A consumer dropped with a full mailbox gives all of it back uncounted, bounded or
/// unbounded: the first release frees credit and the group sends again into the closed
/// mailbox; it used to remove the member then, and the consumer's later releases found
/// it gone, so those messages came back counted as deliveries (a delivery limit of 0,
/// as an AMQP quorum queue's `x-delivery-limit 0`, then dropped them unseen).
async fn dropped_consumer_gives_back_its_mailbox_uncounted(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("full"), Some(1)).await.unwrap();
    let mut s = spec("fullers", "full", ConsumeMode::Shared);
    s.on_failure = OnFailure::Discard;
    s.policy.delivery_limit = Some(0);
    const N: usize = 200;
    for i in 0..N {
        publish(b, "full", i.to_string()).await;
    }
    for round in 0..20 {
        let mut opts = MemberOptions::new(format!("r{round}"), 50);
        opts.exact_prefetch = true;
        opts.unbounded = round % 2 == 1;
        let c = b.subscribe(s.clone(), opts).await.unwrap();
        for _ in 0..200 {
            let info = b.group_info(&group("fullers")).await.unwrap();
            if info.members.iter().map(|m| m.unacked).sum::<usize>() >= 50 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.leave().await;
    }
    let mut reader = b
        .subscribe(s.clone(), MemberOptions::new("reader", 1000))
        .await
        .unwrap();
    let mut got = std::collections::BTreeSet::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), reader.recv()).await {
        got.insert(body(&d));
        reader.ack(d.ack_token());
    }
    assert_eq!(
        got.len(),
        N,
        "messages never taken were dropped as delivered"
    );
}

/// A consumer dropped after its member id joined again (an MQTT client reconnecting
/// under its client id, an id reused by an application) leaves only its own
/// membership, even when the new consumer has been dropped by then too: its leave used
/// to remove whichever member held the id once that member's mailbox was closed, so
/// the new consumer's acks, queued behind it, found no member and were lost, and what
/// they acknowledged came back. Shared and broadcast.
async fn stale_leave_keeps_a_rejoined_member(env: Env) {
    let b = &env.broker;
    for (g, mode) in [
        ("again-shared", ConsumeMode::Shared),
        ("again-broadcast", ConsumeMode::Broadcast),
    ] {
        b.create_topic(&topic(g), Some(1)).await.unwrap();
        let s = spec(g, g, mode);
        let mut old = b
            .subscribe(s.clone(), MemberOptions::new("c", 10))
            .await
            .unwrap();
        let body_of = format!("{g} m0");
        publish(b, g, body_of.clone()).await;
        assert_eq!(body(&recv(&mut old).await), body_of);
        let mut new = b
            .subscribe(s.clone(), MemberOptions::new("c", 10))
            .await
            .unwrap();
        let d = recv(&mut new).await;
        assert_eq!(body(&d), body_of);
        assert!(d.redelivered);
        // No await in between: on this test's one thread, the actor takes the old
        // consumer's leave once the new consumer's mailbox is closed, with its ack and
        // its own leave queued behind.
        drop(old);
        new.ack(d.ack_token());
        drop(new);
        let mut again = b
            .subscribe(s.clone(), MemberOptions::new("c", 10))
            .await
            .unwrap();
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), again.recv()).await {
            panic!("{mode:?}: {} was acknowledged, delivered again", body(&d));
        }
    }
}

async fn shared_group_redelivers_a_leavers_messages(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("work"), Some(1)).await.unwrap();
    let s = spec("workers", "work", ConsumeMode::Shared);
    let mut a = b
        .subscribe(s.clone(), MemberOptions::new("a", 2))
        .await
        .unwrap();
    for i in 0..4 {
        publish(b, "work", i.to_string()).await;
    }
    let d0 = recv(&mut a).await;
    let d1 = recv(&mut a).await;
    nothing(&mut a).await; // prefetch 2
    a.ack(d0.ack_token());
    let d2 = recv(&mut a).await;
    assert_eq!(
        (body(&d0), body(&d1), body(&d2)),
        ("0".into(), "1".into(), "2".into())
    );
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("c", 10))
        .await
        .unwrap();
    let d3 = recv(&mut c).await;
    assert_eq!(body(&d3), "3");
    assert!(!d3.redelivered);
    drop(a); // held 1 and 2 unacked
    let r1 = recv(&mut c).await;
    let r2 = recv(&mut c).await;
    assert_eq!((body(&r1), body(&r2)), ("1".into(), "2".into()));
    assert!(r1.redelivered && r2.redelivered);
    assert_eq!(r1.delivery_count, 2);
    // Nack with requeue: redelivered at once.
    c.nack(r1.ack_token(), true);
    let again = recv(&mut c).await;
    assert_eq!(body(&again), "1");
    for d in [again, r2, d3] {
        c.ack(d.ack_token());
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let info = b.group_info(&group("workers")).await.unwrap();
    let q = info
        .queues
        .iter()
        .find(|q| q.queue.topic == topic("work"))
        .unwrap();
    assert_eq!((q.committed, q.next, q.lag), (4, 4, 0));
}

async fn retry_ladder_to_dlq_and_resend(env: Env) {
    let mut config = env.config.clone();
    config.max_reconsume_times = 3;
    let env = Env::with(env.kind, config).await;
    let b = &env.broker;
    b.create_topic(&topic("pay"), Some(2)).await.unwrap();
    let s = spec("billing", "pay", ConsumeMode::Shared);
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("c", 10))
        .await
        .unwrap();
    let first = publish(b, "pay", "charge").await;
    let Published::Stored { id, .. } = first else {
        panic!("stored")
    };
    let d = recv(&mut c).await;
    assert_eq!(d.message.message.reconsume_times, 0);
    c.nack(d.ack_token(), false);
    // RocketMQ's ladder from level 3: 10s, 30s, 1m.
    for (i, wait) in [10u64, 30, 60].into_iter().enumerate() {
        settled(b, "billing").await;
        nothing(&mut c).await;
        env.clock.advance(Duration::from_secs(wait - 1));
        nothing(&mut c).await;
        env.clock.advance(Duration::from_secs(1));
        let d = recv(&mut c).await;
        assert_eq!(body(&d), "charge");
        assert_eq!(d.message.message.reconsume_times, i as u32 + 1);
        assert_eq!(
            d.message.message.topic,
            topic("pay"),
            "shows its original topic"
        );
        assert_eq!(d.queue.topic.as_str(), "%RETRY%billing");
        c.nack(d.ack_token(), false);
    }
    // The 4th failure: into the DLQ, not retried.
    settled(b, "billing").await;
    env.clock.advance(Duration::from_secs(3 * 3600));
    nothing(&mut c).await;
    let dlq = b.dlq(&group("billing"), 0, 10).await.unwrap();
    assert_eq!(dlq.len(), 1);
    let dead = &dlq[0].message.message;
    assert_eq!(dead.body, "charge");
    assert_eq!(dead.topic, topic("pay"));
    assert_eq!(dead.reconsume_times, 4);
    assert!(dead.property("ORIGIN_QUEUE").is_some());
    let _ = id;
    // Resend: back on the original topic with a fresh count.
    b.resend_dlq(&group("billing"), 0).await.unwrap();
    let d = recv(&mut c).await;
    assert_eq!(body(&d), "charge");
    assert_eq!(d.message.message.reconsume_times, 0);
    assert_eq!(d.queue.topic, topic("pay"));
    c.ack(d.ack_token());
}

async fn orderly_failure_retries_in_place(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("seq"), Some(1)).await.unwrap();
    let mut s = spec("ord", "seq", ConsumeMode::Clustering);
    s.orderly = true;
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    for i in 0..3 {
        publish(b, "seq", i.to_string()).await;
    }
    let d = recv(&mut c).await;
    assert_eq!(body(&d), "0");
    nothing(&mut c).await; // one at a time
    c.nack(d.ack_token(), false);
    settled(b, "ord").await;
    nothing(&mut c).await; // suspended
    env.clock.advance(env.config.orderly_suspend);
    let d = recv(&mut c).await;
    assert_eq!(body(&d), "0", "the failed message again, before the next");
    assert!(d.redelivered);
    c.ack(d.ack_token());
    for want in ["1", "2"] {
        let d = recv(&mut c).await;
        assert_eq!(body(&d), want);
        c.ack(d.ack_token());
    }
}

async fn delays_by_level_and_time(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("later"), Some(1)).await.unwrap();
    let mut c = b
        .subscribe(
            spec("g", "later", ConsumeMode::Shared),
            MemberOptions::new("c", 100),
        )
        .await
        .unwrap();
    let mut p = Publish::new(msg("later", "level2"));
    p.delay = Some(Delay::Level(2)); // 5 s
    assert!(matches!(
        b.publish(p).await.unwrap(),
        Published::Delayed { .. }
    ));
    let mut p = Publish::new(msg("later", "at+3s"));
    p.delay = Some(Delay::At(T0 + 3_000));
    b.publish(p).await.unwrap();
    let mut p = Publish::new(msg("later", "for1500ms"));
    p.delay = Some(Delay::For(Duration::from_millis(1500)));
    b.publish(p).await.unwrap();
    let mut p = Publish::new(msg("later", "in the past"));
    p.delay = Some(Delay::At(T0 - 1));
    assert!(matches!(
        b.publish(p).await.unwrap(),
        Published::Stored { .. }
    ));
    assert_eq!(body(&recv(&mut c).await), "in the past");
    assert_eq!(b.delayed_pending(), 3);
    nothing(&mut c).await;
    env.clock.advance(Duration::from_millis(1499));
    nothing(&mut c).await;
    env.clock.advance(Duration::from_millis(1));
    let d = recv(&mut c).await;
    assert_eq!(body(&d), "for1500ms");
    assert_eq!(d.message.message.deliver_at, Some(T0 + 1500));
    env.clock.advance(Duration::from_millis(1500));
    assert_eq!(body(&recv(&mut c).await), "at+3s");
    env.clock.advance(Duration::from_millis(1999));
    nothing(&mut c).await;
    env.clock.advance(Duration::from_millis(1));
    assert_eq!(body(&recv(&mut c).await), "level2");
    assert_eq!(b.delayed_pending(), 0);
    assert_eq!(b.delayed_released(), 3);
}

async fn delays_survive_restart(env: Env) {
    if env.kind == Kind::Memory {
        return; // nothing survives a MemoryStore restart by design
    }
    let b = &env.broker;
    b.create_topic(&topic("later"), Some(1)).await.unwrap();
    for (i, secs) in [5u64, 60, 3600].into_iter().enumerate() {
        let mut p = Publish::new(msg("later", format!("d{i}")));
        p.delay = Some(Delay::For(Duration::from_secs(secs)));
        b.publish(p).await.unwrap();
    }
    let mut env = env.restart().await;
    assert_eq!(env.broker.delayed_pending(), 3);
    // Down for a minute: the 5 s and 60 s ones are late, released at once, once.
    env.clock.advance(Duration::from_secs(61));
    let mut c = env
        .broker
        .subscribe(
            spec("g", "later", ConsumeMode::Shared),
            MemberOptions::new("c", 100),
        )
        .await
        .unwrap();
    let mut got = vec![body(&recv(&mut c).await), body(&recv(&mut c).await)];
    got.sort();
    assert_eq!(got, vec!["d0", "d1"]);
    nothing(&mut c).await;
    drop(c);
    env = env.restart().await;
    assert_eq!(
        env.broker.delayed_pending(),
        1,
        "released ones are not released twice"
    );
    env.clock.advance(Duration::from_secs(3600));
    let mut s = spec("g", "later", ConsumeMode::Shared);
    s.start = StartPosition::First;
    let mut c = env
        .broker
        .subscribe(s, MemberOptions::new("c", 100))
        .await
        .unwrap();
    let d = recv(&mut c).await;
    // The group resumes from its committed offset: d0 and d1 were never acked, so
    // they come again (at-least-once), then d2.
    let mut bodies = vec![body(&d)];
    c.ack(d.ack_token());
    for _ in 0..2 {
        let d = recv(&mut c).await;
        bodies.push(body(&d));
        c.ack(d.ack_token());
    }
    bodies.sort();
    assert_eq!(bodies, vec!["d0", "d1", "d2"]);
    assert_eq!(env.broker.delayed_pending(), 0);
}

async fn replay_to_a_timestamp(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("stream"), Some(2)).await.unwrap();
    let mut c = b
        .subscribe(
            spec("g", "stream", ConsumeMode::Clustering),
            MemberOptions::new("c", 1000),
        )
        .await
        .unwrap();
    let mut mid = 0;
    for i in 0..40 {
        if i == 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            mid = mqgate_store::now_millis();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        publish(b, "stream", i.to_string()).await;
    }
    for _ in 0..40 {
        let d = recv(&mut c).await;
        c.ack(d.ack_token());
    }
    nothing(&mut c).await;
    // Back to the middle, with the member connected.
    b.reset_group(&group("g"), StartPosition::Timestamp(mid))
        .await
        .unwrap();
    let mut again = Vec::new();
    for _ in 0..20 {
        let d = recv(&mut c).await;
        again.push(body(&d).parse::<u32>().unwrap());
        c.ack(d.ack_token());
    }
    again.sort_unstable();
    assert_eq!(again, (20..40).collect::<Vec<_>>());
    nothing(&mut c).await;
    // Forward past the end: nothing more; new messages still flow.
    b.reset_group(&group("g"), StartPosition::Last)
        .await
        .unwrap();
    publish(b, "stream", "new").await;
    assert_eq!(body(&recv(&mut c).await), "new");
}

async fn fan_out_to_ten_groups_stored_once(env: Env) {
    let b = &env.broker;
    b.router()
        .declare_exchange(
            DEFAULT_VHOST,
            ExchangeDef::new("events", ExchangeKind::Fanout),
        )
        .unwrap();
    let mut consumers = Vec::new();
    for i in 0..10 {
        let t = format!("q{i}");
        b.create_topic(&topic(&t), Some(1)).await.unwrap();
        b.router()
            .bind(
                DEFAULT_VHOST,
                Binding {
                    source: "events".into(),
                    destination: Destination::Topic(topic(&t)),
                    key: String::new(),
                    headers: None,
                    mqtt: false,
                    arguments: Bytes::new(),
                },
            )
            .unwrap();
        consumers.push(
            b.subscribe(
                spec(&format!("g{i}"), &t, ConsumeMode::Shared),
                MemberOptions::new("c", 10),
            )
            .await
            .unwrap(),
        );
    }
    let before = b.store_stats();
    let p = b
        .publish_exchange(
            DEFAULT_VHOST,
            "events",
            "",
            &[],
            msg("events", "x".repeat(1000)),
            None,
        )
        .await
        .unwrap();
    assert_eq!(p.routed(), 10);
    let after = b.store_stats();
    assert_eq!(
        after.messages - before.messages,
        1,
        "one record for ten queues"
    );
    assert!(after.log_bytes - before.log_bytes < 1200);
    let mut ids = Vec::new();
    for c in consumers.iter_mut() {
        let d = recv(c).await;
        ids.push(d.message.id);
        c.ack(d.ack_token());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every group got the same stored message");
}

async fn producer_groups_counted(env: Env) {
    let b = &env.broker;
    let mut m = msg("auto", "x");
    m.producer_group = "billing-svc".into();
    b.publish(Publish::new(m)).await.unwrap();
    publish(b, "auto", "y").await;
    publish(b, "auto", "z").await;
    assert_eq!(
        b.topics()
            .iter()
            .find(|t| t.name == topic("auto"))
            .unwrap()
            .queue_count,
        8
    );
    let stats = b.producer_stats();
    let count = |g: &str| {
        stats
            .iter()
            .find(|s| s.producer_group == g)
            .map(|s| s.messages)
    };
    assert_eq!(count("billing-svc"), Some(1));
    assert_eq!(count(&env.config.default_producer_group), Some(2));
}

async fn start_positions_and_committed_offsets(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("t"), Some(1)).await.unwrap();
    for i in 0..5 {
        publish(b, "t", i.to_string()).await;
    }
    // A new group starting at Last sees only new messages.
    let mut s = spec("late", "t", ConsumeMode::Shared);
    s.start = StartPosition::Last;
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("c", 10))
        .await
        .unwrap();
    nothing(&mut c).await;
    publish(b, "t", "5").await;
    let d = recv(&mut c).await;
    assert_eq!(body(&d), "5");
    c.ack(d.ack_token());
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // It resumes where it left off, not at its start position.
    publish(b, "t", "6").await;
    let mut c = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    assert_eq!(body(&recv(&mut c).await), "6");
    // Offset start.
    let mut s = spec("from2", "t", ConsumeMode::Shared);
    s.start = StartPosition::Offset(2);
    let mut c2 = b.subscribe(s, MemberOptions::new("c", 10)).await.unwrap();
    assert_eq!(body(&recv(&mut c2).await), "2");
    // A conflicting spec for a live group is refused.
    let mut other = spec("from2", "t", ConsumeMode::Broadcast);
    other.on_failure = OnFailure::Discard;
    assert!(b
        .subscribe(other, MemberOptions::new("x", 1))
        .await
        .is_err());
}

/// A group's delivered marks (what a restart flags redelivered) are written as it
/// delivers, one per queue, and go when the group is deleted: a short-lived group (an
/// MQTT clean session, an auto-deleted AMQP queue) leaves nothing behind.
async fn deleted_group_takes_its_delivered_marks(env: Env) {
    let dir = tempfile::tempdir().unwrap();
    let (store, b) = broker_on_own_store(&env, &dir).await;
    b.create_topic(&topic("marked"), Some(2)).await.unwrap();
    for i in 0..6 {
        publish(&b, "marked", i.to_string()).await;
    }
    let marks = || store.kv_scan("core.delivered", b"", None, 100);
    // A broadcast member's marks are under its own offsets group.
    let cases: [(&str, ConsumeMode, &str, &[u8]); 2] = [
        ("marker", ConsumeMode::Shared, "c", b"marker\0marked\0"),
        ("bcast", ConsumeMode::Broadcast, "b1", b"bcast%b1\0"),
    ];
    for (name, mode, member, prefix) in cases {
        let s = spec(name, "marked", mode);
        let mut c = b
            .subscribe(s.clone(), MemberOptions::new(member, 10))
            .await
            .unwrap();
        for _ in 0..6 {
            let d = recv(&mut c).await;
            c.ack(d.ack_token());
        }
        let before = marks().await.unwrap();
        assert!(
            !before.is_empty() && before.iter().all(|(k, _)| k.starts_with(prefix)),
            "{name}: a mark for each queue delivered from: {before:?}"
        );
        drop(c);
        b.delete_group(&s.name).await.unwrap();
        assert_eq!(
            marks().await.unwrap(),
            Vec::new(),
            "{name}: the deleted group's marks"
        );
    }
    b.shutdown().await;
}

/// A topic deleted under groups that live on takes their delivered marks on it, and
/// their actors do not write them again when they end; marks on their other topics stay.
async fn deleted_topic_takes_its_delivered_marks(env: Env) {
    let dir = tempfile::tempdir().unwrap();
    let (store, b) = broker_on_own_store(&env, &dir).await;
    for t in ["kept", "gone"] {
        b.create_topic(&topic(t), Some(2)).await.unwrap();
        for i in 0..4 {
            publish(&b, t, i.to_string()).await;
        }
    }
    let mut both = GroupSpec::new(
        group("both"),
        vec![topic("kept"), topic("gone")],
        ConsumeMode::Shared,
    );
    both.start = StartPosition::First;
    let mut shared = b
        .subscribe(both, MemberOptions::new("c", 20))
        .await
        .unwrap();
    let mut bcast = b
        .subscribe(
            spec("bc", "gone", ConsumeMode::Broadcast),
            MemberOptions::new("b1", 20),
        )
        .await
        .unwrap();
    for _ in 0..8 {
        let d = recv(&mut shared).await;
        shared.ack(d.ack_token());
    }
    for _ in 0..4 {
        let d = recv(&mut bcast).await;
        bcast.ack(d.ack_token());
    }
    let marks = || async {
        let mut keys: Vec<String> = store
            .kv_scan("core.delivered", b"", None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k[..k.len() - 4]).into_owned())
            .collect();
        keys.dedup();
        keys
    };
    assert_eq!(
        marks().await,
        ["bc%b1\0gone\0", "both\0gone\0", "both\0kept\0"],
        "a mark per group and topic delivered from"
    );
    assert!(b.delete_topic(&topic("gone")).await.unwrap());
    assert_eq!(marks().await, ["both\0kept\0"], "the deleted topic's marks");
    // The actors end and lower their marks: not the deleted topic's again.
    drop((shared, bcast));
    b.shutdown().await;
    assert_eq!(
        marks().await,
        ["both\0kept\0"],
        "after the groups' actors ended"
    );
    // Nor did they commit offsets on it: a topic of that name starts them afresh.
    for g in ["both", "bc%b1"] {
        let offsets = store.committed_offsets(&group(g)).await.unwrap();
        assert!(
            offsets.iter().all(|(q, _)| q.topic.as_str() != "gone"),
            "{g}: {offsets:?}"
        );
    }
    assert!(store
        .groups_on_topic(&topic("gone"))
        .await
        .unwrap()
        .is_empty());
}

/// A topic deleted and created again under groups that live across both: each starts
/// the new topic at its first offset, is woken by its publishes, and gets back the
/// credit of what it held unacknowledged from the old one (RocketMQ's deleteTopic takes
/// the groups' offsets on it; a consumer of a topic created again starts afresh).
async fn topic_created_again_under_a_live_group(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("again"), Some(2)).await.unwrap();
    // Prefetch 4: the one left unacknowledged must be given back for the 4 new ones. A
    // start at `Last`: the new topic's messages, published before the group's actor
    // sees it, are the group's all the same.
    let mut shared = b
        .subscribe(
            GroupSpec::new(group("sh"), vec![topic("again")], ConsumeMode::Shared),
            MemberOptions::new("c", 4),
        )
        .await
        .unwrap();
    for i in 0..4 {
        publish(b, "again", format!("old{i}")).await;
    }
    let mut bcast = b
        .subscribe(
            spec("bc", "again", ConsumeMode::Broadcast),
            MemberOptions::new("b1", 4),
        )
        .await
        .unwrap();
    for c in [&mut shared, &mut bcast] {
        for i in 0..4 {
            let d = recv(c).await;
            assert!(body(&d).starts_with("old"));
            if i < 3 {
                c.ack(d.ack_token());
            }
        }
    }
    // The three acks applied: one left in flight.
    for _ in 0..500 {
        let info = b.group_info(&group("sh")).await.unwrap();
        if info.queues.iter().map(|q| q.in_flight).sum::<usize>() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(b.delete_topic(&topic("again")).await.unwrap());
    b.create_topic(&topic("again"), Some(2)).await.unwrap();
    for i in 0..4 {
        publish(b, "again", format!("new{i}")).await;
    }
    for (name, c) in [("shared", &mut shared), ("broadcast", &mut bcast)] {
        let mut got = Vec::new();
        for _ in 0..4 {
            let d = recv(c).await;
            got.push(body(&d));
            assert!(!d.redelivered, "{name}: {got:?}");
            c.ack(d.ack_token());
        }
        got.sort();
        assert_eq!(got, ["new0", "new1", "new2", "new3"], "{name}");
        nothing(c).await;
    }
    settled(b, "sh").await;
    let info = b.group_info(&group("sh")).await.unwrap();
    let committed: u64 = info.queues.iter().map(|q| q.committed).sum();
    assert_eq!(committed, 4, "{info:?}");
}

/// A group with a lazy start at `First` (`GroupSpec::lazy_start`: an MQTT clean
/// session's) stores no offset until it delivers: its starts go in the batch of its
/// first delivered mark, every queue's (a mark without offsets would be taken for a
/// stale one), so an idle connect writes none. A group that starts at `Last` stores its
/// start at once (a restart must not move it), and so does one at `First` by default
/// (known to the store, listed, from its start).
async fn first_start_is_stored_with_the_first_delivery(env: Env) {
    let dir = tempfile::tempdir().unwrap();
    let (store, b) = broker_on_own_store(&env, &dir).await;
    b.create_topic(&topic("lazy"), Some(2)).await.unwrap();
    let mut shared = b
        .subscribe(
            lazy("lz", "lazy", ConsumeMode::Shared),
            MemberOptions::new("c", 10),
        )
        .await
        .unwrap();
    let mut bcast = b
        .subscribe(
            lazy("lzb", "lazy", ConsumeMode::Broadcast),
            MemberOptions::new("b1", 10),
        )
        .await
        .unwrap();
    let _last = b
        .subscribe(
            GroupSpec::new(group("now"), vec![topic("lazy")], ConsumeMode::Shared),
            MemberOptions::new("n", 10),
        )
        .await
        .unwrap();
    let _eager = b
        .subscribe(
            spec("eager", "lazy", ConsumeMode::Shared),
            MemberOptions::new("e", 10),
        )
        .await
        .unwrap();
    b.create_topic(&topic("quiet"), Some(2)).await.unwrap();
    let idle = b
        .subscribe(
            lazy("idle", "quiet", ConsumeMode::Shared),
            MemberOptions::new("i", 10),
        )
        .await
        .unwrap();
    nothing(&mut shared).await;
    for g in ["lz", "lzb%b1"] {
        assert_eq!(
            store.committed_offsets(&group(g)).await.unwrap(),
            Vec::new(),
            "{g}: nothing stored before a delivery"
        );
    }
    for g in ["now", "eager"] {
        let now = store.committed_offsets(&group(g)).await.unwrap();
        assert_eq!(
            now.iter()
                .filter(|(q, _)| q.topic.as_str() == "lazy")
                .count(),
            2,
            "{g}: a start at Last, or at First unless lazy, is stored when the group starts: {now:?}"
        );
    }
    publish(&b, "lazy", "m0").await;
    for (g, c) in [("lz", &mut shared), ("lzb%b1", &mut bcast)] {
        let d = recv(c).await;
        // In flight, not acknowledged: its queue's start is stored, with the mark, and
        // the other queue's with it (the store knows the whole group or none of it).
        let stored: Vec<(u32, u64)> = store
            .committed_offsets(&group(g))
            .await
            .unwrap()
            .into_iter()
            .filter(|(q, _)| q.topic.as_str() == "lazy")
            .map(|(q, o)| (q.queue.0, o.0))
            .collect();
        assert_eq!(stored, [(0, 0), (1, 0)], "{g}");
        let mut key = format!("{g}\0lazy\0").into_bytes();
        key.extend_from_slice(&d.queue.queue.0.to_be_bytes());
        assert!(
            store
                .kv_get("core.delivered", &key)
                .await
                .unwrap()
                .is_some(),
            "{g}: its delivered mark"
        );
        c.ack(d.ack_token());
    }
    assert_eq!(
        store.committed_offsets(&group("idle")).await.unwrap(),
        Vec::new(),
        "a topic with no message: nothing delivered, nothing stored"
    );
    drop(idle);
    b.shutdown().await;
    // Past the acknowledged message; the other queue's start stored with the first
    // delivery.
    let offsets = store.committed_offsets(&group("lz")).await.unwrap();
    let lazy: Vec<u64> = offsets
        .iter()
        .filter(|(q, _)| q.topic.as_str() == "lazy")
        .map(|(_, o)| o.0)
        .collect();
    assert_eq!(lazy.iter().sum::<u64>(), 1, "{offsets:?}");
    assert_eq!(lazy.len(), 2, "{offsets:?}");
    // An actor that ends stores the starts it had not stored: the group is known.
    let idle = store.committed_offsets(&group("idle")).await.unwrap();
    assert!(
        idle.iter()
            .filter(|(q, _)| q.topic.as_str() == "quiet")
            .count()
            == 2
            && idle.iter().all(|(_, o)| o.0 == 0),
        "{idle:?}"
    );
    assert!(store.groups().await.unwrap().contains(&group("idle")));
}

/// A reset (a purge) keeps the deliveries in flight from before it, as RabbitMQ keeps a
/// purged queue's unacknowledged messages: settled as usual while the group lives, and
/// delivered again (flagged) after its actor ends or the broker restarts, never lost
/// below the committed offset the reset stored; a later reset takes them like any
/// waiting message. Shared and broadcast groups.
async fn reset_keeps_unacked_deliveries_across_a_restart(env: Env) {
    let dir = tempfile::tempdir().unwrap();
    let (store, b) = broker_on_own_store(&env, &dir).await;
    b.create_topic(&topic("pq"), Some(1)).await.unwrap();
    let modes = [
        ("pg", ConsumeMode::Shared, "c"),
        ("pb", ConsumeMode::Broadcast, "b1"),
    ];
    let mut consumers = Vec::new();
    for (g, mode, member) in modes {
        let c = b
            .subscribe(spec(g, "pq", mode), MemberOptions::new(member, 2))
            .await
            .unwrap();
        consumers.push(c);
    }
    for i in 0..5 {
        publish(&b, "pq", format!("m{i}")).await;
    }
    for ((g, _, _), c) in modes.iter().zip(consumers.iter_mut()) {
        // The prefetch: m0 and m1 held unacknowledged, m2..m4 waiting.
        let d0 = recv(c).await;
        let d1 = recv(c).await;
        assert_eq!((body(&d0), body(&d1)), ("m0".into(), "m1".into()), "{g}");
        nothing(c).await;
        b.reset_group(&group(g), StartPosition::Last).await.unwrap();
        // m1 settled as usual; m0 still held.
        c.ack(d1.ack_token());
        std::mem::forget(d0);
    }
    publish(&b, "pq", "after").await;
    for ((g, _, _), c) in modes.iter().zip(consumers.iter_mut()) {
        let d = recv(c).await;
        assert_eq!(body(&d), "after", "{g}: the purged ones are gone");
        c.ack(d.ack_token());
        nothing(c).await;
    }
    drop(consumers);
    b.shutdown().await;

    // Started again on the same store: m0 comes back, flagged, and nothing else.
    let again = || broker_on(&env, &store);
    let b = again().await;
    let mut consumers = Vec::new();
    for (g, mode, member) in modes {
        let mut c = b
            .subscribe(spec(g, "pq", mode), MemberOptions::new(member, 2))
            .await
            .unwrap();
        let d = recv(&mut c).await;
        assert_eq!((body(&d), d.redelivered), ("m0".into(), true), "{g}");
        nothing(&mut c).await;
        consumers.push((c, d));
    }
    // Unacknowledged again when the broker stops: kept again. Then a reset takes it
    // for the shared group (waiting, not in flight); the broadcast member acks it.
    drop(consumers);
    b.shutdown().await;
    let b = again().await;
    b.reset_group(&group("pg"), StartPosition::Last)
        .await
        .unwrap();
    for (g, mode, member) in modes {
        let mut c = b
            .subscribe(spec(g, "pq", mode), MemberOptions::new(member, 2))
            .await
            .unwrap();
        if g == "pb" {
            let d = recv(&mut c).await;
            assert_eq!(body(&d), "m0", "{g}");
            c.ack(d.ack_token());
        }
        nothing(&mut c).await;
    }
    b.shutdown().await;
    let b = again().await;
    for (g, mode, member) in modes {
        let mut c = b
            .subscribe(spec(g, "pq", mode), MemberOptions::new(member, 2))
            .await
            .unwrap();
        nothing(&mut c).await;
        let _ = g;
    }
    b.shutdown().await;
}

/// Messages held below a reset's floor settle like any other: one requeued comes again
/// at once (flagged) and stays held, one rejected (discarded by the group's policy) or
/// acknowledged is gone for good, after a restart too, while the rest come back.
async fn held_messages_settle_like_any_other(env: Env) {
    let dir = tempfile::tempdir().unwrap();
    let (store, b) = broker_on_own_store(&env, &dir).await;
    b.create_topic(&topic("hq"), Some(1)).await.unwrap();
    let mut s = spec("hg", "hq", ConsumeMode::Shared);
    s.on_failure = OnFailure::Discard;
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("c", 4))
        .await
        .unwrap();
    for i in 0..6 {
        publish(&b, "hq", format!("m{i}")).await;
    }
    let mut held = Vec::new();
    for i in 0..4 {
        let d = recv(&mut c).await;
        assert_eq!(body(&d), format!("m{i}"));
        held.push(d);
    }
    b.reset_group(&group("hg"), StartPosition::Last)
        .await
        .unwrap();
    c.nack(held[0].ack_token(), true);
    let again = recv(&mut c).await;
    assert_eq!((body(&again), again.redelivered), ("m0".into(), true));
    c.nack(held[1].ack_token(), false);
    c.ack(held[2].ack_token());
    nothing(&mut c).await;
    publish(&b, "hq", "after").await;
    let d = recv(&mut c).await;
    assert_eq!(body(&d), "after", "m4 and m5 were purged");
    c.ack(d.ack_token());
    drop(c);
    b.shutdown().await;

    let start = || broker_on(&env, &store);
    let b = start().await;
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("c", 4))
        .await
        .unwrap();
    let mut back = Vec::new();
    for _ in 0..2 {
        let d = recv(&mut c).await;
        assert!(d.redelivered, "{}", body(&d));
        back.push(body(&d));
        c.ack(d.ack_token());
    }
    back.sort();
    assert_eq!(back, ["m0", "m3"], "the unacknowledged ones, and only they");
    nothing(&mut c).await;
    drop(c);
    b.shutdown().await;
    let b = start().await;
    let mut c = b.subscribe(s, MemberOptions::new("c", 4)).await.unwrap();
    nothing(&mut c).await;
    drop(c);
    b.shutdown().await;
}

/// What a group owes when it stops comes back whole, however long the list: 700 large
/// messages delivered, m0 and m350 acknowledged (the rest in runs of 349, each larger
/// than one store read's byte limit: `load_held` reads on where a read stopped), a clean
/// stop, and the 698 unacknowledged ones come back in order, flagged, and nothing
/// acknowledged.
async fn a_long_held_list_comes_back_whole(env: Env) {
    let dir = tempfile::tempdir().unwrap();
    let (store, b) = broker_on_own_store(&env, &dir).await;
    b.create_topic(&topic("long"), Some(1)).await.unwrap();
    let s = spec("lg", "long", ConsumeMode::Shared);
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("c", 700))
        .await
        .unwrap();
    let pad = "x".repeat(20 << 10);
    for i in 0..700 {
        publish(&b, "long", format!("m{i} {pad}")).await;
    }
    let mut owed = Vec::new();
    for i in 0..700 {
        let d = recv(&mut c).await;
        let name = body(&d).split(' ').next().unwrap().to_owned();
        assert_eq!(name, format!("m{i}"));
        if i % 350 == 0 {
            c.ack(d.ack_token());
        } else {
            owed.push(name);
        }
    }
    common::settled_to(&b, &group("lg"), 698).await;
    drop(c);
    b.shutdown().await;

    let b = broker_on(&env, &store).await;
    let mut c = b.subscribe(s, MemberOptions::new("c", 1000)).await.unwrap();
    let mut back = Vec::new();
    for _ in 0..698 {
        let d = recv(&mut c).await;
        assert!(d.redelivered, "{}", body(&d).split(' ').next().unwrap());
        back.push(body(&d).split(' ').next().unwrap().to_owned());
        c.ack(d.ack_token());
    }
    assert_eq!(back, owed, "the unacknowledged ones, in order");
    nothing(&mut c).await;
    drop(c);
    b.shutdown().await;
}

async fn group_behind_retention_skips_and_counts(env: Env) {
    // A store that keeps about 20 records of this size.
    let record = {
        let probe = MemoryStore::new();
        probe.create_topic(&topic("t"), 1).await.unwrap();
        let mut m = msg("t", "x".repeat(100));
        m.producer_group = env.config.default_producer_group.clone().into();
        let a = mqgate_store::StoreExt::append(&probe, m, vec![])
            .await
            .unwrap();
        u64::from(probe.message(a.id).await.unwrap().unwrap().size)
    };
    let retention = mqgate_store::Retention {
        max_age: None,
        max_bytes: Some(record * 20),
    };
    let store: Arc<dyn Store> = match env.kind {
        Kind::Memory => Arc::new(MemoryStore::with_retention(retention)),
        Kind::Rocks => {
            let mut cfg = RocksConfig::new(env.dir.path().join("retained"));
            cfg.retention = retention;
            Arc::new(RocksStore::open(cfg).unwrap())
        }
    };
    let b = Broker::start(store, env.config.clone(), Arc::new(env.clock.clone()))
        .await
        .unwrap();
    b.create_topic(&topic("t"), Some(1)).await.unwrap();
    let mut c = b
        .subscribe(
            spec("slow", "t", ConsumeMode::Shared),
            MemberOptions::new("c", 5),
        )
        .await
        .unwrap();
    for i in 0..50 {
        b.publish(Publish::new(msg("t", format!("{i:0>100}"))))
            .await
            .unwrap();
    }
    // The member holds 5 unacked; the rest waits in the store, where retention drops it.
    let held: Vec<Delivery> = vec![recv(&mut c).await, recv(&mut c).await];
    for _ in 0..200 {
        let info = b.group_info(&group("slow")).await.unwrap();
        if info.queues.iter().map(|q| q.in_flight).sum::<usize>() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = b.enforce_retention().await.unwrap();
    assert_eq!(report.messages_deleted, 30);
    for d in held {
        c.ack(d.ack_token());
    }
    let mut rest = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
        rest.push(body(&d).parse::<u32>().unwrap());
        c.ack(d.ack_token());
    }
    // The three still in flight (held in memory) come, then it continues at offset 30.
    let mut want = vec![2, 3, 4];
    want.extend(30..50);
    assert_eq!(rest, want);
    let info = b.group_info(&group("slow")).await.unwrap();
    assert_eq!(info.skipped, 25, "offsets 5..30 were deleted unread");
    b.shutdown().await;
}

async fn silent_member_is_removed_and_its_messages_redelivered(env: Env) {
    let mut config = env.config.clone();
    config.heartbeat_timeout = Duration::from_millis(300);
    let env = Env::with(env.kind, config).await;
    let b = &env.broker;
    b.create_topic(&topic("t"), Some(2)).await.unwrap();
    let s = spec("hb", "t", ConsumeMode::Clustering);
    let mut opts = MemberOptions::new("quiet", 10);
    opts.heartbeat = true;
    let mut quiet = b.subscribe(s.clone(), opts).await.unwrap();
    let mut opts = MemberOptions::new("steady", 10);
    opts.heartbeat = true;
    let mut steady = b.subscribe(s, opts).await.unwrap();
    for i in 0..4 {
        publish(b, "t", i.to_string()).await;
    }
    // Each owns one queue: two messages each.
    let held = [recv(&mut quiet).await, recv(&mut quiet).await];
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = recv(&mut steady).await;
        got.push(body(&d));
        steady.ack(d.ack_token());
    }
    // steady heartbeats, quiet does not: quiet is removed, its queue and its two
    // unacked messages move to steady.
    for _ in 0..400 {
        steady.heartbeat();
        while let Some(d) = steady.try_recv() {
            assert!(d.redelivered);
            got.push(body(&d));
            steady.ack(d.ack_token());
        }
        if got.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    got.sort();
    assert_eq!(got, vec!["0", "1", "2", "3"]);
    let mut held_bodies: Vec<String> = held.iter().map(body).collect();
    held_bodies.sort();
    assert!(got.iter().filter(|b| held_bodies.contains(b)).count() == 2);
    let info = b.group_info(&group("hb")).await.unwrap();
    assert_eq!(info.members.len(), 1);
    assert_eq!(info.members[0].id, "steady");
    assert_eq!(
        info.members[0].queues.len(),
        3,
        "both queues of t and the group's retry queue"
    );
}

async fn durable_routing_survives_restart(env: Env) {
    if env.kind == Kind::Memory {
        return; // nothing survives a MemoryStore restart by design
    }
    let b = &env.broker;
    b.add_vhost("prod").await.unwrap();
    let mut durable = ExchangeDef::new("orders", ExchangeKind::Topic);
    durable.alternate = Some("amq.fanout".into());
    b.declare_exchange("prod", durable.clone()).await.unwrap();
    let mut transient = ExchangeDef::new("scratch", ExchangeKind::Fanout);
    transient.durable = false;
    b.declare_exchange("prod", transient).await.unwrap();
    let bind = |source: &str, t: &str, key: &str| Binding {
        source: source.into(),
        destination: Destination::Topic(topic(t)),
        key: key.into(),
        headers: None,
        mqtt: false,
        arguments: Bytes::new(),
    };
    b.bind("prod", bind("orders", "eu", "order.eu.*"), true)
        .await
        .unwrap();
    b.bind("prod", bind("orders", "gone", "order.#"), true)
        .await
        .unwrap();
    b.bind("prod", bind("orders", "tmp", "order.us.*"), false)
        .await
        .unwrap();
    b.bind("prod", bind("scratch", "eu", ""), false)
        .await
        .unwrap();
    b.unbind("prod", &bind("orders", "gone", "order.#"))
        .await
        .unwrap();

    let env = env.restart().await;
    let b = &env.broker;
    assert!(b.router().vhosts().contains(&"prod".to_string()));
    assert_eq!(b.router().exchange("prod", "orders"), Some(durable));
    assert!(
        b.router().exchange("prod", "scratch").is_none(),
        "transient exchange gone"
    );
    let routed = |key: &str| -> Vec<String> {
        b.router()
            .route("prod", "orders", key, &[])
            .unwrap()
            .topics
            .iter()
            .map(|t| t.to_string())
            .collect()
    };
    assert_eq!(routed("order.eu.paris"), vec!["eu"]);
    assert!(
        routed("order.us.nyc").is_empty(),
        "transient binding gone, unbound one too"
    );
    // Deleting the exchange removes its stored bindings as well.
    b.delete_exchange("prod", "orders", false).await.unwrap();
    let env = env.restart().await;
    assert!(env.broker.router().exchange("prod", "orders").is_none());
    assert!(env.broker.router().bindings("prod", None).is_empty());
}

/// Wait until `n` group actors are parked.
async fn parked(b: &Broker, n: u64) {
    for _ in 0..1000 {
        if b.groups_parked() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} groups parked, not {n}", b.groups_parked());
}

/// An idle group's actor parks (its task ends) and comes back for each new message,
/// for a command, and for a member leaving; a paced publisher (each message finds the
/// group parked) and a burst both get through whole and in order.
async fn idle_group_parks_and_resumes(env: Env) {
    let b = &env.broker;
    b.create_topic(&topic("quiet"), Some(1)).await.unwrap();
    let s = spec("q", "quiet", ConsumeMode::Shared);
    let mut c = b
        .subscribe(s.clone(), MemberOptions::new("m", 100))
        .await
        .unwrap();
    parked(b, 1).await;
    for i in 0..5 {
        publish(b, "quiet", format!("p{i}")).await;
        let d = recv(&mut c).await;
        assert_eq!(body(&d), format!("p{i}"));
        c.ack(d.ack_token());
        parked(b, 1).await;
    }
    // A command goes through the actor.
    let info = b.group_info(&group("q")).await.unwrap();
    assert_eq!(info.members.len(), 1);
    let q = info.queues.iter().find(|q| q.queue.topic == topic("quiet"));
    assert_eq!(q.map(|q| q.committed), Some(5));
    parked(b, 1).await;
    // A second member joins a parked group, and both share a burst.
    let mut c2 = b.subscribe(s, MemberOptions::new("m2", 100)).await.unwrap();
    for i in 0..200 {
        publish(b, "quiet", format!("b{i}")).await;
    }
    let mut got = Vec::new();
    while got.len() < 200 {
        tokio::select! {
            d = recv(&mut c) => { got.push(body(&d)); c.ack(d.ack_token()); }
            d = recv(&mut c2) => { got.push(body(&d)); c2.ack(d.ack_token()); }
        }
    }
    got.sort_by_key(|b| b[1..].parse::<u32>().unwrap());
    assert_eq!(got, (0..200).map(|i| format!("b{i}")).collect::<Vec<_>>());
    nothing(&mut c).await;
    parked(b, 1).await;
    // Members leaving wake it; memberless, it ends.
    drop(c);
    drop(c2);
    parked(b, 0).await;
}

/// Publishers racing a group that parks between their messages (offsets committed every
/// 2 ms, so it parks in most gaps): no message is left waiting for a wake-up that was
/// lost between the actor's last pass and its parking.
async fn parking_races_publishers(env: Env) {
    let mut config = env.config.clone();
    config.offset_commit_interval = Duration::from_millis(2);
    let env = Env::with(env.kind, config).await;
    let b = env.broker.clone();
    b.create_topic(&topic("race"), Some(2)).await.unwrap();
    let mut c = b
        .subscribe(
            spec("r", "race", ConsumeMode::Shared),
            MemberOptions::new("m", 1000),
        )
        .await
        .unwrap();
    let seen_parked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for p in 0..2u64 {
        let b = b.clone();
        let seen = Arc::clone(&seen_parked);
        tasks.push(tokio::spawn(async move {
            for i in 0..400u64 {
                if b.groups_parked() > 0 {
                    seen.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                publish(&b, "race", format!("{p}-{i}")).await;
                // Gaps from none to 4 ms: some inside the actor's pass, some after it parked.
                let gap = (i * 7 + p * 3) % 5;
                if gap > 0 {
                    tokio::time::sleep(Duration::from_millis(gap)).await;
                }
            }
        }));
    }
    let mut got = std::collections::HashSet::new();
    while got.len() < 800 {
        let d = recv(&mut c).await;
        assert!(got.insert(body(&d)), "a duplicate: {}", body(&d));
        c.ack(d.ack_token());
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        seen_parked.load(std::sync::atomic::Ordering::Relaxed),
        "the group never parked: the race was not run"
    );
    nothing(&mut c).await;
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Env::new(super::Kind::Memory).await).await
                }
            )*
        }
        mod rocks {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Env::new(super::Kind::Rocks).await).await
                }
            )*
        }
    };
}

/// [`stale_leave_keeps_a_rejoined_member`] on one thread: what it sends without an
/// await reaches the actor as one run of commands.
mod one_thread {
    #[tokio::test(flavor = "current_thread")]
    async fn stale_leave_keeps_a_rejoined_member_memory() {
        super::stale_leave_keeps_a_rejoined_member(super::Env::new(super::Kind::Memory).await).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stale_leave_keeps_a_rejoined_member_rocks() {
        super::stale_leave_keeps_a_rejoined_member(super::Env::new(super::Kind::Rocks).await).await
    }
}

both_backends!(
    idle_group_parks_and_resumes,
    parking_races_publishers,
    order_per_sharding_key,
    shared_group_rotates_with_a_paced_publisher,
    rebalance_without_loss,
    broadcast_to_every_member,
    shared_group_redelivers_a_leavers_messages,
    unbounded_member_holds_any_number_unacked,
    dropped_consumer_gives_back_its_mailbox_uncounted,
    retry_ladder_to_dlq_and_resend,
    orderly_failure_retries_in_place,
    delays_by_level_and_time,
    delays_survive_restart,
    replay_to_a_timestamp,
    fan_out_to_ten_groups_stored_once,
    producer_groups_counted,
    start_positions_and_committed_offsets,
    group_behind_retention_skips_and_counts,
    silent_member_is_removed_and_its_messages_redelivered,
    durable_routing_survives_restart,
    deleted_group_takes_its_delivered_marks,
    deleted_topic_takes_its_delivered_marks,
    topic_created_again_under_a_live_group,
    first_start_is_stored_with_the_first_delivery,
    reset_keeps_unacked_deliveries_across_a_restart,
    held_messages_settle_like_any_other,
    a_long_held_list_comes_back_whole,
);
