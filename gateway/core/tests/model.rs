//! A consumer group against a model of what it owes, under random sequences of
//! publishes, acks, requeues, rejects, purges, a consumer that leaves and joins again
//! (at once, or after its group's actor ended),
//! clean restarts and crashes (the runtime dropped with the broker running, its store
//! opened again), on both backends, shared and broadcast, over a topic of one or
//! several queues, with one consumer or (shared) several.
//!
//! What the model holds the broker to:
//! - nothing owed is lost: every message published and neither settled nor purged is
//!   delivered (again), across restarts and crashes;
//! - nothing is delivered twice at once, nothing settled comes back while the broker
//!   runs, and nothing purged ever comes back (a purge keeps only what is in flight);
//! - a message delivered before is flagged `redelivered`; a first delivery is not
//!   (until a crash: the delivered mark runs ahead of what was delivered), and first
//!   deliveries of a queue come in publish order (to each consumer, when several
//!   share the group);
//! - a clean restart, or a broadcast member that leaves and joins again, brings back
//!   exactly what is owed, not what was acknowledged after an older message still
//!   unacknowledged (as RabbitMQ); after a crash, what comes back beyond what is owed
//!   (settlements not stored yet: at-least-once) is counted by the group itself and is
//!   only ever messages that were settled;
//! - once everything is acknowledged and settled, a clean restart delivers nothing.
//!
//! `PROPTEST_CASES` runs more cases (the default keeps CI short).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_core::{
    Broker, ConsumeMode, Consumer, CoreConfig, Delivery, GroupSpec, ManualClock, MemberOptions,
    OnFailure, Publish, StartPosition,
};
use mqgate_store::{
    GroupName, MemoryStore, Message, QueueId, RocksConfig, RocksStore, Store, TopicName,
};
use proptest::prelude::*;
use tempfile::TempDir;

const T0: u64 = 1_800_000_000_000;

/// The groups' commit interval, which is also how long a group without members lives.
const COMMIT_INTERVAL: Duration = Duration::from_millis(20);

/// `checkpoint`: acknowledgements above a held message that make a running group's
/// commit a checkpoint (`CoreConfig::checkpoint_settled`; it also needs a gap of twice
/// what is owed more): 1 makes one of most commits after a few acks out of order.
fn core_config(checkpoint: u64) -> CoreConfig {
    CoreConfig {
        offset_commit_interval: COMMIT_INTERVAL,
        checkpoint_settled: checkpoint,
        ..CoreConfig::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Memory,
    Rocks,
}

#[derive(Clone, Debug)]
enum Op {
    /// This many messages, to the queue of this index (modulo the topic's queues).
    Publish(u8, u32),
    /// Of all deliveries held by the consumers, the one of this index (modulo).
    Ack(usize),
    Requeue(usize),
    Reject(usize),
    Purge,
    /// The consumer of this index (modulo) leaves and joins again at once.
    Rejoin(usize),
    /// Every consumer leaves, long enough for the group's actor to end.
    Away,
    /// A few commit intervals pass (commits, checkpoints).
    Pause,
    Restart,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..=6, any::<u32>()).prop_map(|(k, q)| Op::Publish(k, q)),
        6 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::Requeue),
        1 => any::<usize>().prop_map(Op::Reject),
        1 => Just(Op::Purge),
        1 => any::<usize>().prop_map(Op::Rejoin),
        1 => Just(Op::Away),
        1 => Just(Op::Pause),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
    ]
}

/// What the group owes, as the model sees it.
#[derive(Default)]
struct Model {
    /// The next message's number (its body is `m<number>`).
    next: u64,
    /// Owed and not in flight: number -> delivered before.
    ready: BTreeMap<u64, bool>,
    /// The queue of each message.
    queue: BTreeMap<u64, QueueId>,
    /// In flight to each consumer, in the order received.
    held: Vec<Vec<(u64, Delivery)>>,
    /// Per consumer and queue, the last first delivery (when several consumers share
    /// the group, the order each sees is what can be checked: the test reads their
    /// channels one after another).
    last_first: BTreeMap<(usize, QueueId), u64>,
    /// Acknowledged or rejected (and not purged since): after a restart or a crash the
    /// group may deliver some of them again (at-least-once), as many as it counts.
    settled: BTreeSet<u64>,
    /// How many settled messages the group counts as owed again in this life.
    extra: u64,
    /// Delivered at least once (in any life).
    delivered: BTreeSet<u64>,
    /// A crash happened: first deliveries may be flagged from then on.
    crashed: bool,
    /// The last life ended in a crash (not a clean stop).
    killed: bool,
    /// Settled messages delivered again after a restart or crash (reported).
    again: u64,
}

impl Model {
    /// Take one delivery to consumer `to` and check it against what is owed.
    fn take(&mut self, to: usize, d: Delivery) {
        let body = std::str::from_utf8(&d.message.message.body).expect("utf-8");
        let n: u64 = body[1..].parse().expect("m<number>");
        assert!(
            !self.held.iter().flatten().any(|(h, _)| *h == n),
            "{body} delivered while it is in flight"
        );
        let q = self.queue[&n];
        assert_eq!(d.queue.queue, q, "{body} comes from the queue it went to");
        if let Some(before) = self.ready.remove(&n) {
            if before {
                assert!(d.redelivered, "{body} was delivered before: flagged");
            } else {
                if self.held.len() == 1 {
                    let first = self
                        .ready
                        .iter()
                        .find(|(k, b)| !**b && self.queue[k] == q)
                        .map(|(k, _)| *k);
                    assert!(
                        first.is_none_or(|f| f > n),
                        "first deliveries in publish order: {body} before m{}",
                        first.unwrap_or_default()
                    );
                } else if let Some(last) = self.last_first.insert((to, q), n) {
                    assert!(
                        last < n,
                        "first deliveries to a consumer in publish order: {body} after m{last}"
                    );
                }
                assert!(
                    self.crashed || !d.redelivered,
                    "{body}: a first delivery is not flagged"
                );
            }
        } else {
            assert!(
                self.extra > 0 && self.settled.remove(&n),
                "{body} is not owed (settled {}, extra {})",
                self.settled.contains(&n),
                self.extra
            );
            assert!(
                d.redelivered,
                "{body}: delivered again after a restart, flagged"
            );
            self.extra -= 1;
            self.again += 1;
        }
        self.delivered.insert(n);
        self.held[to].push((n, d));
    }

    /// How many deliveries the consumers hold.
    fn holding(&self) -> usize {
        self.held.iter().map(Vec::len).sum()
    }

    /// Everything in flight goes back, owed again (flagged): the consumers left.
    fn give_back(&mut self) {
        for (n, _) in self.held.iter_mut().flat_map(|h| h.drain(..)) {
            self.ready.insert(n, true);
        }
    }

    /// What the group is to deliver now.
    fn owed(&self) -> u64 {
        self.ready.len() as u64 + self.extra
    }
}

#[derive(Debug)]
struct Case {
    kind: Kind,
    mode: ConsumeMode,
    prefetch: usize,
    /// Consumers in the group (several only when shared).
    members: usize,
    /// The topic's queues.
    queues: u32,
    /// [`core_config`]'s checkpoint threshold.
    checkpoint: u64,
}

fn topic() -> TopicName {
    TopicName::new("t").unwrap()
}

fn group() -> GroupName {
    GroupName::new("g").unwrap()
}

impl Case {
    fn spec(&self) -> GroupSpec {
        let mut s = GroupSpec::new(group(), vec![topic()], self.mode);
        s.start = StartPosition::First;
        s.on_failure = OnFailure::Discard;
        s
    }

    fn open(&self, dir: &TempDir, memory: &Arc<MemoryStore>) -> Arc<dyn Store> {
        match self.kind {
            Kind::Memory => Arc::clone(memory) as Arc<dyn Store>,
            Kind::Rocks => {
                // The last life's store closes once the tasks that held it are gone.
                for _ in 0..200 {
                    if let Ok(s) = RocksStore::open(RocksConfig::new(dir.path().join("data"))) {
                        return Arc::new(s);
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
                panic!("the store did not open again");
            }
        }
    }

    async fn subscribe(&self, b: &Broker, i: usize) -> Consumer {
        b.subscribe(
            self.spec(),
            MemberOptions::new(format!("c{i}"), self.prefetch),
        )
        .await
        .unwrap()
    }

    async fn subscribe_all(&self, b: &Broker) -> Vec<Consumer> {
        let mut cs = Vec::new();
        for i in 0..self.members {
            cs.push(self.subscribe(b, i).await);
        }
        cs
    }

    /// Deliveries until every consumer holds its prefetch or nothing is owed.
    async fn fill(&self, cs: &mut [Consumer], m: &mut Model) {
        while m.holding() < self.prefetch * self.members && m.owed() > 0 {
            let (to, d) = tokio::time::timeout(Duration::from_secs(10), recv_any(cs))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "owed {:?} (+{} settled) and holding {} of {} × {}: nothing delivered in 10 s",
                        m.ready,
                        m.extra,
                        m.holding(),
                        self.prefetch,
                        self.members
                    )
                });
            m.take(to, d.expect("group alive"));
        }
    }

    /// The group's own count of what it owes (waiting and in flight).
    async fn counted(b: &Broker) -> u64 {
        let info = b.group_info(&group()).await.unwrap();
        info.queues
            .iter()
            .map(|q| q.ready + q.in_flight as u64)
            .sum()
    }

    /// What comes back beyond what is owed, once the consumer has joined again after a
    /// crash: settled messages whose settlement was not stored yet (at-least-once). The
    /// group's own count, taken before anything more is acknowledged. After a clean
    /// stop, exactly what is owed.
    async fn recount(b: &Broker, m: &mut Model) {
        let counted = Self::counted(b).await;
        let owed = m.ready.len() as u64;
        if m.killed {
            assert!(
                counted >= owed,
                "the group counts {counted} after a crash, {owed} are owed: {:?}",
                m.ready
            );
            m.extra = counted - owed;
        } else {
            assert_eq!(
                counted,
                m.owed(),
                "after a clean stop the group counts what is owed: {:?} and {} settled before a crash",
                m.ready,
                m.extra
            );
        }
    }

    /// One life of the broker: ops until a restart or a crash (`Some`, with what the
    /// crash leaves behind), or until they run out (`None`, after the last checks).
    async fn life(
        &self,
        store: Arc<dyn Store>,
        first: bool,
        m: &mut Model,
        ops: &mut std::vec::IntoIter<Op>,
    ) -> Option<Option<(Broker, Vec<Consumer>)>> {
        let b = start(store, self.checkpoint).await;
        if first {
            b.create_topic(&topic(), Some(self.queues)).await.unwrap();
        }
        let mut c = self.subscribe_all(&b).await;
        if !first {
            Self::recount(&b, m).await;
        }
        self.fill(&mut c, m).await;
        for op in ops.by_ref() {
            match op {
                Op::Publish(k, q) => {
                    let q = QueueId(q % self.queues);
                    for _ in 0..k {
                        let n = m.next;
                        m.next += 1;
                        let msg = Message::new(topic(), Bytes::from(format!("m{n}")));
                        let mut p = Publish::new(msg);
                        p.queue = Some(q);
                        b.publish(p).await.unwrap();
                        m.ready.insert(n, false);
                        m.queue.insert(n, q);
                    }
                }
                Op::Ack(i) | Op::Requeue(i) | Op::Reject(i) if m.holding() > 0 => {
                    let mut i = i % m.holding();
                    let to = m
                        .held
                        .iter()
                        .position(|h| {
                            let here = i < h.len();
                            if !here {
                                i -= h.len();
                            }
                            here
                        })
                        .expect("an index below the count");
                    let (n, d) = m.held[to].remove(i);
                    let c = &c[to];
                    match op {
                        Op::Ack(_) => {
                            c.ack(d.ack_token());
                            m.settled.insert(n);
                        }
                        Op::Requeue(_) => {
                            c.nack(d.ack_token(), true);
                            m.ready.insert(n, true);
                        }
                        _ => {
                            c.nack(d.ack_token(), false);
                            m.settled.insert(n);
                        }
                    }
                }
                Op::Ack(_) | Op::Requeue(_) | Op::Reject(_) => {}
                Op::Purge => {
                    b.reset_group(&group(), StartPosition::Last).await.unwrap();
                    // What waited is gone for good, settled or not; what is in flight
                    // stays owed.
                    m.ready.clear();
                    m.settled.clear();
                    m.extra = 0;
                }
                Op::Rejoin(i) => {
                    let i = i % self.members;
                    let gone = std::mem::replace(&mut c[i], self.subscribe(&b, i).await);
                    drop(gone);
                    for (n, _) in m.held[i].drain(..) {
                        m.ready.insert(n, true);
                    }
                }
                Op::Away => {
                    // Long enough without a member that the group's actor ends (its
                    // last commit, `QueueState::close`); the next one starts from what
                    // it stored.
                    drop(c);
                    m.give_back();
                    tokio::time::sleep(COMMIT_INTERVAL * 10).await;
                    c = self.subscribe_all(&b).await;
                }
                Op::Pause => tokio::time::sleep(COMMIT_INTERVAL * 3).await,
                Op::Restart => {
                    b.shutdown().await;
                    drop(c);
                    m.give_back();
                    m.killed = false;
                    return Some(None);
                }
                Op::Crash => {
                    m.give_back();
                    m.crashed = true;
                    m.killed = true;
                    return Some(Some((b, c)));
                }
            }
            self.fill(&mut c, m).await;
        }
        // The end: everything acknowledged, nothing more comes, and a clean restart
        // brings back nothing.
        while m.owed() > 0 || m.holding() > 0 {
            for (to, held) in m.held.iter_mut().enumerate() {
                for (n, d) in held.drain(..) {
                    c[to].ack(d.ack_token());
                    m.settled.insert(n);
                }
            }
            self.fill(&mut c, m).await;
        }
        let mut settled = false;
        for _ in 0..500 {
            if Self::counted(&b).await == 0 {
                settled = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            settled,
            "the group still counts messages owed: {:?}",
            b.group_info(&group()).await.unwrap()
        );
        stop_after_nothing(b, c, "nothing more once everything is acknowledged").await;
        None
    }
}

async fn start(store: Arc<dyn Store>, checkpoint: u64) -> Broker {
    Broker::start(
        store,
        core_config(checkpoint),
        Arc::new(ManualClock::new(T0)),
    )
    .await
    .unwrap()
}

/// The next delivery to any of the consumers, and to which.
async fn recv_any(cs: &mut [Consumer]) -> (usize, Option<Delivery>) {
    std::future::poll_fn(|cx| {
        for (i, c) in cs.iter_mut().enumerate() {
            if let std::task::Poll::Ready(d) = c.poll_recv(cx) {
                return std::task::Poll::Ready((i, d));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Nothing delivered for a while (`what` if something is), then a clean stop.
async fn stop_after_nothing(b: Broker, mut c: Vec<Consumer>, what: &str) {
    let quiet = tokio::time::timeout(Duration::from_millis(200), recv_any(&mut c)).await;
    assert!(quiet.is_err(), "{what}");
    b.shutdown().await;
    drop(c);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn run(case: &Case, ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(MemoryStore::new());
    let mut m = Model {
        held: (0..case.members).map(|_| Vec::new()).collect(),
        ..Model::default()
    };
    let mut ops = ops.into_iter();
    let mut first = true;
    loop {
        let store = case.open(&dir, &memory);
        let rt = runtime();
        let end = rt.block_on(case.life(store, first, &mut m, &mut ops));
        first = false;
        match end {
            Some(Some(crashed)) => {
                // Killed: the runtime's tasks are dropped where they stand (no commit,
                // no mark written at the end), then what the test held goes.
                rt.shutdown_timeout(Duration::from_secs(5));
                drop(crashed);
            }
            Some(None) => drop(rt),
            None => {
                drop(rt);
                break;
            }
        }
    }
    // Started once more after the clean stop: nothing is owed.
    let store = case.open(&dir, &memory);
    let rt = runtime();
    rt.block_on(async {
        let b = start(store, case.checkpoint).await;
        let c = case.subscribe_all(&b).await;
        assert_eq!(Case::counted(&b).await, 0, "owed after a clean stop");
        stop_after_nothing(
            b,
            c,
            "delivered after everything was acknowledged and the broker stopped cleanly",
        )
        .await;
    });
    if m.again > 0 {
        eprintln!(
            "{} settled messages delivered again ({:?})",
            m.again, case.mode
        );
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

macro_rules! model_tests {
    ($($name:ident: $kind:expr, $mode:expr;)*) => {
        $(
            proptest! {
                #![proptest_config(config())]
                #[test]
                fn $name(
                    prefetch in 1usize..=4,
                    members in 1usize..=3,
                    queues in 1u32..=3,
                    checkpoint in prop_oneof![Just(1u64), Just(256)],
                    ops in prop::collection::vec(op(), 1..40),
                ) {
                    let mode = $mode;
                    // Broadcast members each consume everything: one, against a
                    // model of one cursor.
                    let members = if mode == ConsumeMode::Broadcast { 1 } else { members };
                    run(&Case { kind: $kind, mode, prefetch, members, queues, checkpoint }, ops);
                }
            }
        )*
    };
}

model_tests! {
    shared_memory: Kind::Memory, ConsumeMode::Shared;
    shared_rocks: Kind::Rocks, ConsumeMode::Shared;
    broadcast_memory: Kind::Memory, ConsumeMode::Broadcast;
    broadcast_rocks: Kind::Rocks, ConsumeMode::Broadcast;
}
