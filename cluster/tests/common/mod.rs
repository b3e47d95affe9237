//! What the cluster tests share: reading a queue, waiting for the ranking, connecting
//! a gateway.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mqgate_cluster::gateway::Gateway;
use mqgate_core::shard::shard_of;
use mqgate_core::{Broker, CoreConfig, SystemClock};

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
        run: 0,
    }
}

/// `f`, or a panic naming `what` after `secs` seconds (a hang fails the test).
pub(crate) async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {secs} s"))
}

/// Gateway `name` of the cluster of `stream`: a broker core of `shards` shards.
pub(crate) async fn start_gateway(
    cluster: &NatsCluster,
    stream: &str,
    shards: u16,
    name: &str,
    dir: &Path,
) -> Gateway {
    start_gateway_with(cluster, stream, shards, name, dir, RELAY_TIMEOUT).await
}

/// The relay timeout of these tests' gateways.
pub(crate) const RELAY_TIMEOUT: Duration = Duration::from_millis(500);

/// [`start_gateway`] with another relay timeout.
pub(crate) async fn start_gateway_with(
    cluster: &NatsCluster,
    stream: &str,
    shards: u16,
    name: &str,
    dir: &Path,
    relay_timeout: Duration,
) -> Gateway {
    let nats = connect(cluster, stream, name, dir).await;
    Gateway::start(
        nats,
        manager_config(shards),
        CoreConfig::default(),
        Arc::new(SystemClock),
        relay_timeout,
    )
    .await
    .expect("start the gateway")
}

/// A deadlock of the runtime's threads stops its timers too: a plain thread ends the
/// test process after `secs` rather than let `test` hang.
pub(crate) fn watchdog(test: &'static str, secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        eprintln!("{test}: still running after {secs} s");
        std::process::exit(101);
    });
}

/// Gateways `names` of the cluster of `stream` (views under `dir`), started one after
/// another; returned once every shard is owned where rendezvous puts it.
pub(crate) async fn start_balanced(
    cluster: &NatsCluster,
    stream: &str,
    shards: u16,
    names: &[&str],
    dir: &Path,
) -> Vec<(String, Gateway)> {
    start_balanced_with(cluster, stream, shards, names, dir, RELAY_TIMEOUT).await
}

/// [`start_balanced`] with another relay timeout.
pub(crate) async fn start_balanced_with(
    cluster: &NatsCluster,
    stream: &str,
    shards: u16,
    names: &[&str],
    dir: &Path,
    relay_timeout: Duration,
) -> Vec<(String, Gateway)> {
    let mut gws = Vec::new();
    for name in names {
        let g = start_gateway_with(cluster, stream, shards, name, dir, relay_timeout).await;
        gws.push(((*name).to_owned(), g));
    }
    wait_balanced(shards, &gws).await;
    gws
}

/// Wait until every shard is owned where rendezvous puts it among `gws`.
pub(crate) async fn wait_balanced(shards: u16, gws: &[(String, Gateway)]) {
    let live: Vec<&str> = gws.iter().map(|(n, _)| n.as_str()).collect();
    wait_ranked(shards, &live, |s| {
        gws.iter()
            .filter(|(_, g)| g.broker().owned_shards().contains(&s))
            .map(|(n, _)| n.clone())
            .collect()
    })
    .await
}

/// The broker owning shard `s` now.
pub(crate) fn owner(gws: &[(String, Gateway)], s: u16) -> Option<&Broker> {
    gws.iter()
        .map(|(_, g)| g.broker())
        .find(|b| b.owned_shards().contains(&s))
}

/// The bodies queue 0 of `t` holds, read on its shard's owner (`None`: owned nowhere
/// right now).
pub(crate) async fn queue_bodies(
    gws: &[(String, Gateway)],
    shards: u16,
    t: &TopicName,
) -> Option<Vec<String>> {
    let b = owner(gws, shard_of(t.as_str(), shards))?;
    let q = QueueRef::new(t.clone(), 0);
    let range = b.queue_range(&q).ok()?;
    let read = b
        .peek(&q, range.min, ReadLimits::count(100_000))
        .await
        .ok()?;
    Some(
        read.iter()
            .map(|m| String::from_utf8_lossy(&m.message.message.body).into_owned())
            .collect(),
    )
}
