//! A consumer group against a model of what it owes, under random sequences of
//! publishes, acks, requeues, rejects, purges, a consumer that leaves and joins again
//! (at once, or after its group's actor ended),
//! clean restarts and crashes (the runtime dropped with the broker running, its store
//! opened again), on both backends, shared and broadcast.
//!
//! What the model holds the broker to:
//! - nothing owed is lost: every message published and neither settled nor purged is
//!   delivered (again), across restarts and crashes;
//! - nothing is delivered twice at once, nothing settled comes back while the broker
//!   runs, and nothing purged ever comes back (a purge keeps only what is in flight);
//! - a message delivered before is flagged `redelivered`; a first delivery is not
//!   (until a crash: the delivered mark runs ahead of what was delivered), and first
//!   deliveries come in publish order;
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
use mqgate_store::{GroupName, MemoryStore, Message, RocksConfig, RocksStore, Store, TopicName};
use proptest::prelude::*;
use tempfile::TempDir;

const T0: u64 = 1_800_000_000_000;

/// The groups' commit interval, which is also how long a group without members lives.
const COMMIT_INTERVAL: Duration = Duration::from_millis(20);

fn core_config() -> CoreConfig {
    CoreConfig {
        offset_commit_interval: COMMIT_INTERVAL,
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
    Publish(u8),
    Ack(usize),
    Requeue(usize),
    Reject(usize),
    Purge,
    Rejoin,
    Away,
    Restart,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..=6).prop_map(Op::Publish),
        6 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::Requeue),
        1 => any::<usize>().prop_map(Op::Reject),
        1 => Just(Op::Purge),
        1 => Just(Op::Rejoin),
        1 => Just(Op::Away),
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
    /// In flight to the consumer, in the order received.
    held: Vec<(u64, Delivery)>,
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
    /// Take one delivery and check it against what is owed.
    fn take(&mut self, d: Delivery) {
        let body = std::str::from_utf8(&d.message.message.body).expect("utf-8");
        let n: u64 = body[1..].parse().expect("m<number>");
        assert!(
            !self.held.iter().any(|(h, _)| *h == n),
            "{body} delivered while it is in flight"
        );
        if let Some(before) = self.ready.remove(&n) {
            if before {
                assert!(d.redelivered, "{body} was delivered before: flagged");
            } else {
                let first = self.ready.iter().find(|(_, b)| !**b).map(|(k, _)| *k);
                assert!(
                    first.is_none_or(|f| f > n),
                    "first deliveries in publish order: {body} before m{}",
                    first.unwrap_or_default()
                );
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
        self.held.push((n, d));
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

    async fn subscribe(&self, b: &Broker) -> Consumer {
        b.subscribe(self.spec(), MemberOptions::new("c", self.prefetch))
            .await
            .unwrap()
    }

    /// Deliveries until the consumer holds its prefetch or nothing is owed.
    async fn fill(&self, c: &mut Consumer, m: &mut Model) {
        while m.held.len() < self.prefetch && m.owed() > 0 {
            let d =
                tokio::time::timeout(Duration::from_secs(10), c.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                        "owed {:?} (+{} settled) and holding {} of {}: nothing delivered in 10 s",
                        m.ready, m.extra, m.held.len(), self.prefetch
                    )
                    })
                    .expect("group alive");
            m.take(d);
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
    ) -> Option<Option<(Broker, Consumer)>> {
        let b = start(store).await;
        if first {
            b.create_topic(&topic(), Some(1)).await.unwrap();
        }
        let mut c = self.subscribe(&b).await;
        if !first {
            Self::recount(&b, m).await;
        }
        self.fill(&mut c, m).await;
        for op in ops.by_ref() {
            match op {
                Op::Publish(k) => {
                    for _ in 0..k {
                        let n = m.next;
                        m.next += 1;
                        let msg = Message::new(topic(), Bytes::from(format!("m{n}")));
                        b.publish(Publish::new(msg)).await.unwrap();
                        m.ready.insert(n, false);
                    }
                }
                Op::Ack(i) | Op::Requeue(i) | Op::Reject(i) if !m.held.is_empty() => {
                    let (n, d) = m.held.remove(i % m.held.len());
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
                Op::Rejoin => {
                    drop(c);
                    for (n, _) in m.held.drain(..) {
                        m.ready.insert(n, true);
                    }
                    c = self.subscribe(&b).await;
                }
                Op::Away => {
                    // Long enough without a member that the group's actor ends (its
                    // last commit, `QueueState::close`); the next one starts from what
                    // it stored.
                    drop(c);
                    for (n, _) in m.held.drain(..) {
                        m.ready.insert(n, true);
                    }
                    tokio::time::sleep(COMMIT_INTERVAL * 10).await;
                    c = self.subscribe(&b).await;
                }
                Op::Restart => {
                    b.shutdown().await;
                    drop(c);
                    for (n, _) in m.held.drain(..) {
                        m.ready.insert(n, true);
                    }
                    m.killed = false;
                    return Some(None);
                }
                Op::Crash => {
                    for (n, _) in m.held.drain(..) {
                        m.ready.insert(n, true);
                    }
                    m.crashed = true;
                    m.killed = true;
                    return Some(Some((b, c)));
                }
            }
            self.fill(&mut c, m).await;
        }
        // The end: everything acknowledged, nothing more comes, and a clean restart
        // brings back nothing.
        while m.owed() > 0 || !m.held.is_empty() {
            for (n, d) in m.held.drain(..) {
                c.ack(d.ack_token());
                m.settled.insert(n);
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

async fn start(store: Arc<dyn Store>) -> Broker {
    Broker::start(store, core_config(), Arc::new(ManualClock::new(T0)))
        .await
        .unwrap()
}

/// Nothing delivered for a while (`what` if something is), then a clean stop.
async fn stop_after_nothing(b: Broker, mut c: Consumer, what: &str) {
    let quiet = tokio::time::timeout(Duration::from_millis(200), c.recv()).await;
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
    let mut m = Model::default();
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
        let b = start(store).await;
        let c = case.subscribe(&b).await;
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
                fn $name(prefetch in 1usize..=4, ops in prop::collection::vec(op(), 1..40)) {
                    run(&Case { kind: $kind, mode: $mode, prefetch }, ops);
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
