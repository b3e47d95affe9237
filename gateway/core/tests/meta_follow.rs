//! A router kept by following another broker's replicated log (issue 16: every gateway
//! of a cluster follows the meta stream into its own router). A broker on the jetstream
//! backend changes its routing state through the public API, paced and in bursts; a
//! follower on another node tails the same log and applies each record's keyed-area
//! changes with `apply_routing_change`. At each checkpoint the follower's router has the
//! same vhosts, exchanges and bindings, and routes the same keys to the same topics.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_core::router::{
    Binding, Destination, ExchangeDef, ExchangeKind, HeaderMatch, HeaderValue, DEFAULT_VHOST,
};
use mqgate_core::{apply_routing_change, Broker, CoreConfig, Router, SystemClock};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::jetstream::{open, JetStreamConfig, Nats, ReplicaSpec, ShardReplica};
use mqgate_store::{RocksConfig, Store, TopicName};

fn binding(source: &str, topic: &str, key: &str) -> Binding {
    Binding {
        source: source.into(),
        destination: Destination::Topic(TopicName::new(topic).unwrap()),
        key: key.into(),
        headers: None,
        mqtt: false,
        arguments: Bytes::new(),
    }
}

fn exchange(name: &str, kind: ExchangeKind) -> ExchangeDef {
    let mut d = ExchangeDef::new(name, kind);
    d.durable = true;
    d
}

/// Everything a router holds, comparable.
fn snapshot(r: &Router) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for v in r.vhosts() {
        out.insert(format!("vhost {v}"));
        for e in r.exchanges(&v) {
            out.insert(format!("exchange {v} {e:?}"));
        }
        for b in r.bindings(&v, None) {
            out.insert(format!("binding {v} {b:?}"));
        }
    }
    out
}

fn routes(r: &Router, vhost: &str, exchange: &str, keys: &[&str]) -> Vec<Vec<TopicName>> {
    keys.iter()
        .map(|k| {
            r.route(vhost, exchange, k, &[("h".into(), HeaderValue::Int(1))])
                .map(|x| x.topics)
                .unwrap_or_default()
        })
        .collect()
}

struct Follower {
    replica: ShardReplica,
    router: Router,
}

impl Follower {
    /// Apply every record up to the stream's last one.
    async fn catch_up(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let last = self.replica.last().await.unwrap();
        let router = &self.router;
        while self.replica.applied() < last {
            assert!(tokio::time::Instant::now() < deadline, "caught up");
            let mut errors = Vec::new();
            self.replica
                .follow_with(
                    tokio::time::Instant::now() + Duration::from_millis(200),
                    &mut |_, changes| {
                        for c in changes {
                            if let Err(e) = apply_routing_change(router, &c) {
                                errors.push(e.to_string());
                            }
                        }
                    },
                )
                .await
                .unwrap();
            assert!(errors.is_empty(), "{errors:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_keeps_the_same_router() {
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let cfg = |node: &str| {
        let mut c = JetStreamConfig::new(
            cluster.urls(),
            node,
            RocksConfig::new(dir.path().join(node)),
        );
        c.stream = "metafollow".into();
        c
    };
    let (store, _replication) = tokio::time::timeout(Duration::from_secs(60), open(cfg("gw-a")))
        .await
        .expect("opened within a minute")
        .expect("open");
    let store: Arc<dyn Store> = Arc::new(store);
    let broker = Broker::start(store, CoreConfig::default(), Arc::new(SystemClock))
        .await
        .unwrap();
    let a = broker.router();

    let nats = Nats::connect(cfg("gw-b")).await.unwrap();
    let spec = ReplicaSpec::single(nats.config());
    let router = Router::new();
    // A gateway starts as the broker does: the default vhost with its standard exchanges.
    router.add_vhost(DEFAULT_VHOST);
    let mut f = Follower {
        replica: ShardReplica::open(&nats, spec).await.unwrap(),
        router,
    };

    // Paced: one change at a time, of every kind.
    broker.add_vhost("v1").await.unwrap();
    for (name, kind) in [
        ("d", ExchangeKind::Direct),
        ("t", ExchangeKind::Topic),
        ("f", ExchangeKind::Fanout),
        ("h", ExchangeKind::Headers),
    ] {
        broker
            .declare_exchange("v1", exchange(name, kind))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut ad = exchange("ad", ExchangeKind::Topic);
    ad.auto_delete = true;
    broker.declare_exchange("v1", ad).await.unwrap();
    broker
        .bind("v1", binding("ad", "qa", "a.#"), true)
        .await
        .unwrap();
    let mut hb = binding("h", "qh", "");
    hb.headers = Some(HeaderMatch {
        all: true,
        headers: vec![("h".into(), HeaderValue::Int(1))],
    });
    broker.bind("v1", hb.clone(), true).await.unwrap();
    let mut e2e = binding("f", "unused", "");
    e2e.destination = Destination::Exchange("t".into());
    broker.bind("v1", e2e, true).await.unwrap();
    f.catch_up().await;
    assert_eq!(snapshot(&f.router), snapshot(a));

    // A burst: many bindings in one call, MQTT filters among them, then some removed,
    // an auto-delete exchange emptied (it goes, and its stored record with it), an
    // exchange deleted with its bindings (cascade).
    let mut many = Vec::new();
    for i in 0..200 {
        many.push(binding("t", &format!("q{}", i % 20), &format!("s.{i}.*")));
        let mut m = binding("amq.topic", &format!("m{}", i % 10), &format!("dev/{i}/+"));
        m.mqtt = true;
        many.push(m);
        many.push(binding("d", &format!("q{}", i % 20), &format!("k{i}")));
    }
    broker.bind_many("v1", many.clone(), true).await.unwrap();
    broker
        .bind_many(DEFAULT_VHOST, many[..60].to_vec(), true)
        .await
        .unwrap();
    broker.unbind_many("v1", &many[..90]).await.unwrap();
    broker
        .unbind("v1", &binding("ad", "qa", "a.#"))
        .await
        .unwrap();
    assert!(
        a.exchange("v1", "ad").is_none(),
        "auto-delete went with its last binding"
    );
    broker.delete_exchange("v1", "d", false).await.unwrap();
    broker.unbind("v1", &hb).await.unwrap();
    broker
        .unbind_topic("v1", &TopicName::new("q3").unwrap())
        .await
        .unwrap();
    f.catch_up().await;
    assert_eq!(snapshot(&f.router), snapshot(a));
    let keys = ["s.5.x", "s.150.y", "k7", "dev.3.x", "nothing", "a.b"];
    for (vhost, ex) in [
        ("v1", "t"),
        ("v1", "f"),
        ("v1", "amq.topic"),
        ("/", "t"),
        ("v1", "h"),
    ] {
        assert_eq!(
            routes(&f.router, vhost, ex, &keys),
            routes(a, vhost, ex, &keys),
            "{vhost} {ex}"
        );
    }
    broker.shutdown().await;
}
