//! What the cluster tests share: reading a queue, waiting for the ranking, connecting
//! a gateway.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use mqgate_cluster::manager::ManagerConfig;
use mqgate_cluster::rendezvous::assignment;
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::jetstream::{JetStreamConfig, Nats};
use mqgate_store::{QueueOffset, QueueRef, ReadLimits, RocksConfig, Store, TopicName};

/// The bodies in queue 0 of `t`, in offset order.
pub(crate) async fn bodies(s: &dyn Store, t: &TopicName) -> Vec<String> {
    let q = QueueRef::new(t.clone(), 0);
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let r = s
            .read(&q, QueueOffset(from), ReadLimits::count(500))
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

/// Wait (up to 90 s) until each of `shards` is held by exactly the gateway rendezvous
/// ranks first among `live`; `holders(shard)` names the gateways holding it now.
pub(crate) async fn wait_ranked(shards: u16, live: &[&str], holders: impl Fn(u16) -> Vec<String>) {
    let want = assignment(live, shards);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let now: Vec<Vec<String>> = (0..shards).map(&holders).collect();
        let ok = now
            .iter()
            .zip(&want)
            .all(|(h, (owner, _))| h.len() == 1 && Some(h[0].as_str()) == *owner);
        if ok {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shards not where rendezvous puts them over {live:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gateway `name`'s connection to the cluster of `stream` (views under `dir/name`).
pub(crate) async fn connect(cluster: &NatsCluster, stream: &str, name: &str, dir: &Path) -> Nats {
    let mut cfg = JetStreamConfig::new(cluster.urls(), name, RocksConfig::new(dir.join(name)));
    cfg.stream = stream.into();
    cfg.lease_ttl = Duration::from_secs(3);
    tokio::time::timeout(Duration::from_secs(60), Nats::connect(cfg))
        .await
        .expect("connected within a minute")
        .expect("connect")
}

/// The managers' settings in these tests: short times, small move lag.
pub(crate) fn manager_config(shards: u16) -> ManagerConfig {
    ManagerConfig {
        shards,
        node_ttl: Duration::from_millis(1500),
        tick: Duration::from_millis(150),
        move_lag: 100,
    }
}
