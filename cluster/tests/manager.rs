//! Shards spread over live gateways and move between them (issue 16), at the store
//! level: three gateways in this process, each with its own `Nats` connection, view
//! folders and `ShardManager`, on a 3-node NATS cluster on loopback. The test plays the
//! broker core: it holds each acquired store, writes through whichever gateway owns a
//! shard now, and gives the store back when asked.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_cluster::manager::{ShardEvent, ShardManager};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::jetstream::SHARD_ID_SHIFT;
use mqgate_store::{Message, QueueRef, RocksStore, Store, StoreExt, TopicName};
use parking_lot::Mutex;
use tokio::sync::mpsc;

const SHARDS: u16 = 8;

type Stores = Arc<Mutex<HashMap<u16, Arc<RocksStore>>>>;

struct Gateway {
    name: String,
    manager: Option<ShardManager>,
    stores: Stores,
    core: tokio::task::JoinHandle<()>,
}

async fn gateway(
    cluster: &NatsCluster,
    stream: &str,
    name: &str,
    dir: &std::path::Path,
) -> Gateway {
    let nats = common::connect(cluster, stream, name, dir).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stores: Stores = Arc::default();
    let held = Arc::clone(&stores);
    // The "core": keeps what it acquires, gives it back when asked.
    let core = tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            match e {
                ShardEvent::Acquired { shard, store, .. } => {
                    store
                        .create_topic(&topic(shard), 1)
                        .await
                        .expect("create the shard's topic");
                    held.lock().insert(shard, store);
                }
                ShardEvent::Release { shard, done, .. } => {
                    held.lock().remove(&shard);
                    let _ = done.send(());
                }
                ShardEvent::Lost { shard, .. } => {
                    held.lock().remove(&shard);
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
        stores,
        core,
    }
}

impl Gateway {
    /// A planned leave (SIGTERM): every shard handed over, then the key deleted.
    async fn leave(&mut self) -> bool {
        let handed = self
            .manager
            .take()
            .expect("running")
            .leave(Duration::from_secs(30))
            .await;
        self.core.abort();
        handed
    }

    /// As SIGKILL looks to the others: no hand-over, keys left to expire.
    fn kill(&mut self) {
        self.manager.take().expect("running").abort();
        self.core.abort();
        self.stores.lock().clear();
    }
}

fn topic(shard: u16) -> TopicName {
    TopicName::new(format!("t{shard}")).unwrap()
}

/// Wait until each shard is held by exactly the gateway rendezvous names among `live`.
async fn wait_balanced(gws: &[&Gateway], live: &[&str]) {
    common::wait_ranked(SHARDS, live, |s| {
        gws.iter()
            .filter(|g| g.stores.lock().contains_key(&s))
            .map(|g| g.name.clone())
            .collect()
    })
    .await
}

fn owner(gws: &[&Gateway], shard: u16) -> Option<Arc<RocksStore>> {
    gws.iter()
        .find_map(|g| g.stores.lock().get(&shard).cloned())
}

/// Every message a writer saw confirmed is in its shard exactly once.
async fn check(gws: &[&Gateway], confirmed: &BTreeMap<u16, Vec<String>>) {
    for (shard, want) in confirmed {
        let store = owner(gws, *shard).expect("the shard has an owner");
        let got = common::bodies(store.as_ref(), &topic(*shard)).await;
        let mut seen = std::collections::HashSet::new();
        for b in &got {
            assert!(seen.insert(b.clone()), "shard {shard} holds {b} twice");
        }
        for b in want {
            assert!(seen.contains(b), "shard {shard} lost the confirmed {b}");
        }
    }
}

/// Three gateways on `stream`, balanced, and a writer through all of them.
async fn three_under_load(
    stream: &str,
    dir: &std::path::Path,
) -> (
    [Gateway; 3],
    Arc<AtomicBool>,
    tokio::task::JoinHandle<BTreeMap<u16, Vec<String>>>,
) {
    let cluster = NatsCluster::shared();
    let a = gateway(cluster, stream, "gw-a", dir).await;
    let b = gateway(cluster, stream, "gw-b", dir).await;
    let c = gateway(cluster, stream, "gw-c", dir).await;
    wait_balanced(&[&a, &b, &c], &["gw-a", "gw-b", "gw-c"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(
        Arc::new(Mutex::new(vec![
            a.stores.clone(),
            b.stores.clone(),
            c.stores.clone(),
        ])),
        Arc::clone(&stop),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    ([a, b, c], stop, w)
}

/// Let the writer go on a little, stop it, and check every confirmed write on `gws`.
async fn stop_and_check(
    stop: &AtomicBool,
    w: tokio::task::JoinHandle<BTreeMap<u16, Vec<String>>>,
    gws: &[&Gateway],
) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    let confirmed = w.await.unwrap();
    assert_eq!(
        confirmed.len(),
        usize::from(SHARDS),
        "every shard took writes"
    );
    eprintln!(
        "confirmed {} messages over {SHARDS} shards",
        confirmed.values().map(Vec::len).sum::<usize>()
    );
    check(gws, &confirmed).await;
}

/// Write to every shard through whichever gateway owns it now, until `stop`; returns
/// what was confirmed. Paced: a message per shard every few milliseconds.
fn writer(
    gws: Arc<Mutex<Vec<Stores>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<BTreeMap<u16, Vec<String>>> {
    tokio::spawn(async move {
        let mut confirmed: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Acquire) {
            for shard in 0..SHARDS {
                let store = gws
                    .lock()
                    .iter()
                    .find_map(|g| g.lock().get(&shard).cloned());
                let Some(store) = store else { continue };
                let body = format!("{shard}-{i}");
                let m = Message::new(topic(shard), Bytes::from(body.clone()));
                if let Ok(a) = store.append(m, vec![QueueRef::new(topic(shard), 0)]).await {
                    assert_eq!(
                        a.id.0 >> SHARD_ID_SHIFT,
                        u64::from(shard),
                        "ids name their shard"
                    );
                    confirmed.entry(shard).or_default().push(body);
                }
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        confirmed
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_spread_over_live_gateways_and_move_when_one_dies() {
    let dir = tempfile::tempdir().unwrap();
    let ([a, b, mut c], stop, w) = three_under_load("spread", dir.path()).await;
    // The status every gateway can read: owners as ranked, standbys reporting.
    let nats = common::connect(NatsCluster::shared(), "spread", "observer", dir.path()).await;
    let status = mqgate_cluster::status::shards(&nats, SHARDS).await;
    for s in &status {
        let owner = s.owner.as_ref().map(|(n, _)| n.clone());
        assert_eq!(owner, s.ranked_owner, "shard {}: {s:?}", s.shard);
        assert!(s.standby.is_some() && s.standby != owner, "{s:?}");
        let by_owner = s.reports.iter().find(|r| Some(&r.node) == owner.as_ref());
        assert!(by_owner.is_some_and(|r| r.role == "owner"), "{s:?}");
    }
    eprintln!("status of shard 0: {:?}", status[0]);
    let killed = std::time::Instant::now();
    c.kill();
    // c's shards go to their standbys once its node key and its leases expire.
    wait_balanced(&[&a, &b, &c], &["gw-a", "gw-b"]).await;
    eprintln!(
        "rebalanced over gw-a and gw-b {:?} after gw-c was killed (node ttl 1.5 s, lease ttl 3 s)",
        killed.elapsed()
    );
    stop_and_check(&stop, w, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_gateway_takes_its_share_under_load_without_loss() {
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let a = gateway(cluster, "join", "gw-a", dir.path()).await;
    let b = gateway(cluster, "join", "gw-b", dir.path()).await;
    wait_balanced(&[&a, &b], &["gw-a", "gw-b"]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let targets = Arc::new(Mutex::new(vec![a.stores.clone(), b.stores.clone()]));
    let w = writer(Arc::clone(&targets), Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let joined = std::time::Instant::now();
    let mut c = gateway(cluster, "join", "gw-c", dir.path()).await;
    targets.lock().push(c.stores.clone());
    wait_balanced(&[&a, &b, &c], &["gw-a", "gw-b", "gw-c"]).await;
    eprintln!(
        "gw-c took its {} shards {:?} after joining",
        c.stores.lock().len(),
        joined.elapsed()
    );
    let moved = c.stores.lock().len();
    assert!(moved > 0, "gw-c took no shard");
    stop_and_check(&stop, w, &[&a, &b, &c]).await;
    c.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_gateway_hands_its_shards_over_under_load_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let ([a, b, mut c], stop, w) = three_under_load("leave", dir.path()).await;
    assert!(!c.stores.lock().is_empty(), "gw-c owns shards to hand over");
    let left = std::time::Instant::now();
    assert!(c.leave().await, "every shard handed over within 30 s");
    let handed = left.elapsed();
    assert!(c.stores.lock().is_empty(), "gw-c released everything");
    wait_balanced(&[&a, &b, &c], &["gw-a", "gw-b"]).await;
    eprintln!(
        "gw-c handed its shards over in {handed:?}; balanced over gw-a and gw-b {:?} after it began leaving",
        left.elapsed()
    );
    stop_and_check(&stop, w, &[&a, &b]).await;
}
