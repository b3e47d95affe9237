//! Cross-shard fan-out exactly once across gateways (issue 16's fault test, at the
//! store level): 3 gateways, shard 0 the home of a fan-out to 8 queues in shards 1-8,
//! shards placed by rendezvous over the live gateways. Each gateway runs what the
//! sharded core will run for the shards the manager gives it: for a destination shard,
//! its inbox served over the forward relay; for the home shard, a forwarder per
//! destination over NATS. The gateway owning the home shard is killed right after the
//! publisher's last confirm, before it forwarded anything (forwarding held back as
//! `forward_delay` would); the home shard moves to its standby, which forwards the
//! outbox it finds in the log. Every destination queue ends with every confirmed
//! message exactly once, in order, whichever gateways its shard moved between.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_cluster::manager::{ShardEvent, ShardManager};
use mqgate_cluster::relay::forward::{Faults, ForwardServer, NatsForwardTarget};
use mqgate_core::outbox::{ensure_outboxes, stage, ForwardTarget, Forwarder, Inbox, ShardId};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::{Message, RocksStore, Store, TopicName, WriteBatch};
use parking_lot::Mutex;
use tokio::sync::mpsc;

const STREAM: &str = "fanoutkill";
const SHARDS: u16 = 9;
const HOME: ShardId = 0;

fn dest_topic(d: ShardId) -> TopicName {
    TopicName::new(format!("q{d}")).unwrap()
}

/// What a gateway runs for one shard it owns.
struct Owned {
    store: Arc<RocksStore>,
    /// A destination: its inbox, served over the relay.
    server: Option<ForwardServer>,
    /// The home: its forwarders.
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

impl Owned {
    fn stop(self) {
        if let Some(s) = &self.server {
            s.stop();
        }
        for f in &self.forwarders {
            f.abort();
        }
    }
}

type Shards = Arc<Mutex<HashMap<ShardId, Owned>>>;

struct Gateway {
    name: String,
    manager: Option<ShardManager>,
    shards: Shards,
    core: tokio::task::JoinHandle<()>,
}

async fn gateway(
    cluster: &NatsCluster,
    name: &str,
    dir: &std::path::Path,
    forwarding: Arc<AtomicBool>,
) -> Gateway {
    let nats = common::connect(cluster, STREAM, name, dir).await;
    let client = nats.jetstream().client();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let shards: Shards = Arc::default();
    let held = Arc::clone(&shards);
    let core = tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            match e {
                ShardEvent::Acquired { shard, store, .. } => {
                    let dyn_store: Arc<dyn Store> = Arc::clone(&store) as Arc<dyn Store>;
                    let mut owned = Owned {
                        store,
                        server: None,
                        forwarders: Vec::new(),
                    };
                    if shard == HOME {
                        ensure_outboxes(dyn_store.as_ref(), 1..SHARDS)
                            .await
                            .unwrap();
                        for d in 1..SHARDS {
                            let target = NatsForwardTarget::new(
                                client.clone(),
                                STREAM,
                                d,
                                Duration::from_millis(500),
                            );
                            let f = Forwarder::new(
                                HOME,
                                d,
                                Arc::clone(&dyn_store),
                                Arc::new(target) as Arc<dyn ForwardTarget>,
                            );
                            let on = Arc::clone(&forwarding);
                            owned.forwarders.push(tokio::spawn(async move {
                                loop {
                                    if on.load(Ordering::Acquire) {
                                        // Errors (a destination moving, no responders)
                                        // are retried: the mark makes it safe.
                                        let _ = f.pump().await;
                                    }
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                            }));
                        }
                    } else {
                        if dyn_store.topic(&dest_topic(shard)).is_none() {
                            dyn_store.create_topic(&dest_topic(shard), 1).await.unwrap();
                        }
                        let inbox = Arc::new(Inbox::new(shard, Arc::clone(&dyn_store)));
                        owned.server = Some(
                            ForwardServer::start(
                                client.clone(),
                                STREAM,
                                shard,
                                inbox,
                                Arc::new(Faults::default()),
                            )
                            .await
                            .unwrap(),
                        );
                    }
                    held.lock().insert(shard, owned);
                }
                ShardEvent::Release { shard, done, .. } => {
                    if let Some(o) = held.lock().remove(&shard) {
                        o.stop();
                    }
                    // The stopped tasks drop their handles on the store as they end.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    let _ = done.send(());
                }
                ShardEvent::Lost { shard, .. } => {
                    if let Some(o) = held.lock().remove(&shard) {
                        o.stop();
                    }
                }
            }
        }
    });
    let manager = ShardManager::start(nats, common::manager_config(SHARDS), tx)
        .await
        .expect("start the manager");
    Gateway {
        name: name.into(),
        manager: Some(manager),
        shards,
        core,
    }
}

impl Gateway {
    fn kill(&mut self) {
        self.manager.take().expect("running").abort();
        self.core.abort();
        for (_, o) in self.shards.lock().drain() {
            o.stop();
        }
    }

    fn store(&self, shard: ShardId) -> Option<Arc<RocksStore>> {
        self.shards.lock().get(&shard).map(|o| Arc::clone(&o.store))
    }
}

async fn wait_balanced(gws: &[&Gateway], live: &[&str]) {
    common::wait_ranked(SHARDS, live, |s| {
        gws.iter()
            .filter(|g| g.shards.lock().contains_key(&s))
            .map(|g| g.name.clone())
            .collect()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_to_8_shards_exactly_once_when_the_home_owner_dies_before_forwarding() {
    const N: usize = 200;
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let forwarding = Arc::new(AtomicBool::new(false));
    let mut gws = Vec::new();
    for name in ["gw-a", "gw-b", "gw-c"] {
        gws.push(gateway(cluster, name, dir.path(), Arc::clone(&forwarding)).await);
    }
    let all: Vec<&Gateway> = gws.iter().collect();
    wait_balanced(&all, &["gw-a", "gw-b", "gw-c"]).await;

    // Publish through the home shard's owner, paced and in bursts, each message to the
    // 8 destination queues; nothing is forwarded yet.
    let home_gw = gws.iter().position(|g| g.store(HOME).is_some()).unwrap();
    let home = gws[home_gw].store(HOME).unwrap();
    let plan: BTreeMap<ShardId, Vec<TopicName>> =
        (1..SHARDS).map(|d| (d, vec![dest_topic(d)])).collect();
    let mut i = 0;
    while i < N {
        let burst = if i < N / 2 { 1 } else { 25 };
        let mut b = WriteBatch::new();
        for j in i..i + burst {
            let m = Message::new(
                TopicName::new("fanout").unwrap(),
                Bytes::from(format!("m{j}")),
            );
            stage(&mut b, m, vec![], &plan);
        }
        home.write(b).await.expect("confirmed");
        i += burst;
    }
    drop(home);
    // Killed after its last confirm, before forwarding anything.
    let killed = gws[home_gw].name.clone();
    gws[home_gw].kill();
    forwarding.store(true, Ordering::Release);

    let live: Vec<&str> = ["gw-a", "gw-b", "gw-c"]
        .into_iter()
        .filter(|n| *n != killed)
        .collect();
    let alive: Vec<&Gateway> = gws.iter().filter(|g| g.name != killed).collect();
    wait_balanced(&alive, &live).await;

    let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for d in 1..SHARDS {
        loop {
            let store = alive.iter().find_map(|g| g.store(d)).expect("an owner");
            let got = common::bodies(store.as_ref(), &dest_topic(d)).await;
            assert!(
                got.len() <= N,
                "shard {d} holds {} > {N}: duplicates",
                got.len()
            );
            if got.len() == N {
                assert_eq!(got, want, "shard {d}: every message once, in order");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "shard {d} has {} of {N}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Nothing arrives twice later either (forwarders keep running).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for d in 1..SHARDS {
        let store = alive.iter().find_map(|g| g.store(d)).unwrap();
        assert_eq!(
            common::bodies(store.as_ref(), &dest_topic(d)).await,
            want,
            "shard {d}"
        );
    }
    for g in &mut gws {
        if g.manager.is_some() {
            g.kill();
        }
    }
}
