//! The forward relay over a real NATS cluster on loopback: a home shard on one gateway
//! forwards its outbox to destination shards served by another gateway's inboxes over
//! core NATS, with replies lost on the way and a destination briefly unserved. Every
//! destination ends with every message exactly once, in order.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_cluster::relay::forward::{Faults, ForwardServer, NatsForwardTarget};
use mqgate_core::outbox::{ensure_outboxes, stage, ForwardTarget, Forwarder, Inbox, ShardId};
use mqgate_core::CoreError;
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::{Message, RocksConfig, RocksStore, Store, TopicName, WriteBatch};

fn topic(name: &str) -> TopicName {
    TopicName::new(name).unwrap()
}

/// Drain a forwarder, asking again after each failed call (a lost reply times out).
async fn drain_with_retries(f: &Forwarder) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    loop {
        match f.drain().await {
            Ok(_) => return failures,
            Err(_) => {
                failures += 1;
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "drained within a minute"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_over_nats_survives_lost_replies_and_an_unserved_destination() {
    const N: usize = 300;
    let dests: Vec<ShardId> = (1..=4).collect();
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let gw_a = async_nats::connect(cluster.urls()).await.unwrap();
    let gw_b = async_nats::connect(cluster.urls()).await.unwrap();

    // Gateway A owns the home shard 0.
    let mut c = RocksConfig::new(dir.path().join("s00"));
    c.id_base = 0;
    let home: Arc<dyn Store> = Arc::new(RocksStore::open(c).unwrap());
    ensure_outboxes(home.as_ref(), dests.iter().copied())
        .await
        .unwrap();
    // Gateway B owns the destinations and serves their inboxes.
    let faults = Arc::new(Faults::default());
    faults.drop_every.store(3, Ordering::Relaxed);
    let mut stores = BTreeMap::new();
    let mut servers = BTreeMap::new();
    for d in &dests {
        let mut c = RocksConfig::new(dir.path().join(format!("s{d:02}")));
        c.id_base = u64::from(*d) << 44;
        let s: Arc<dyn Store> = Arc::new(RocksStore::open(c).unwrap());
        s.create_topic(&topic(&format!("q{d}")), 1).await.unwrap();
        let inbox = Arc::new(Inbox::new(*d, Arc::clone(&s)));
        let server = ForwardServer::start(
            gw_b.clone(),
            "relaytest",
            *d,
            Arc::clone(&inbox) as Arc<dyn ForwardTarget>,
            Arc::clone(&faults),
        )
        .await
        .unwrap();
        stores.insert(*d, (s, inbox));
        servers.insert(*d, server);
    }
    let plan: BTreeMap<ShardId, Vec<TopicName>> = dests
        .iter()
        .map(|d| (*d, vec![topic(&format!("q{d}"))]))
        .collect();
    for i in 0..N {
        let mut b = WriteBatch::new();
        stage(
            &mut b,
            Message::new(topic("addr"), Bytes::from(format!("m{i}"))),
            vec![],
            &plan,
        );
        home.write(b).await.unwrap();
    }
    let forwarder = |d: ShardId| {
        let target =
            NatsForwardTarget::new(gw_a.clone(), "relaytest", d, Duration::from_millis(300));
        let mut f = Forwarder::new(
            0,
            d,
            Arc::clone(&home),
            Arc::new(target) as Arc<dyn ForwardTarget>,
        );
        f.batch = 25;
        f
    };
    // Shard 4 is unserved for a while (its owner is moving): no responders, an error at
    // once, nothing applied; then served again.
    servers.remove(&4).unwrap().stop();
    let err = forwarder(4).pump().await.unwrap_err();
    // No responders (NotOwned), or, while the stopped server's subscription is still
    // being removed, a request that timed out.
    assert!(
        matches!(err, CoreError::NotOwned(4)) || err.to_string().contains("relaytest"),
        "{err}"
    );
    let mut failures = 0;
    for d in 1..=3 {
        failures += drain_with_retries(&forwarder(d)).await;
    }
    servers.insert(
        4,
        ForwardServer::start(
            gw_b.clone(),
            "relaytest",
            4,
            Arc::clone(&stores[&4].1) as Arc<dyn ForwardTarget>,
            Arc::clone(&faults),
        )
        .await
        .unwrap(),
    );
    failures += drain_with_retries(&forwarder(4)).await;
    assert!(
        faults.dropped.load(Ordering::Relaxed) > 0,
        "replies were lost"
    );
    assert!(
        failures > 0,
        "the forwarders saw the losses and asked again"
    );

    let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    for (d, (s, _)) in &stores {
        assert_eq!(
            common::bodies(s.as_ref(), &topic(&format!("q{d}"))).await,
            want,
            "shard {d}"
        );
    }
}

/// The admin relay carries a request and an answer larger than the NATS server's
/// payload limit (1 MiB by default) in parts: a 3 MiB record written through it and
/// read back whole (before, each had to fit one message: a retained message near a
/// megabyte never reached a subscriber on another gateway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_and_answers_larger_than_a_nats_message() {
    use mqgate_cluster::relay::admin::{AdminServer, NatsAdmin};
    use mqgate_core::shard::{AdminAnswer, AdminOp};
    use mqgate_core::{Broker, CoreConfig, Records, SystemClock};

    let cluster = NatsCluster::shared();
    let owner_client = async_nats::connect(cluster.urls()).await.unwrap();
    let caller = async_nats::connect(cluster.urls()).await.unwrap();
    let limit = caller.server_info().max_payload;
    let store: Arc<dyn Store> = Arc::new(mqgate_store::MemoryStore::new());
    let broker = Broker::start(store, CoreConfig::default(), Arc::new(SystemClock))
        .await
        .unwrap();
    let stream = "admin-parts";
    let _server = AdminServer::start(owner_client, stream, 0, broker.clone())
        .await
        .unwrap();
    let admin = NatsAdmin::new(caller, stream, Duration::from_secs(10));

    let t = topic("big-records");
    let value: Bytes = (0..3 * 1024 * 1024 + 7)
        .map(|i: usize| (i * 31 % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    assert!(
        value.len() > limit,
        "larger than one NATS message ({limit})"
    );
    let mut records = Records::new();
    records.put("test.big", Bytes::from_static(b"k"), value.clone());
    let done = admin
        .run(
            0,
            AdminOp::WriteRecords {
                topic: t.clone(),
                records,
            },
        )
        .await
        .unwrap();
    assert!(matches!(done, AdminAnswer::Done), "{done:?}");
    let read = admin
        .run(
            0,
            AdminOp::EndpointRecord {
                topic: t.clone(),
                namespace: "test.big".into(),
                key: Bytes::from_static(b"k"),
            },
        )
        .await
        .unwrap();
    match read {
        AdminAnswer::Record(Some(v)) => assert!(v == value, "read back whole"),
        other => panic!("{other:?}"),
    }
    // Small ones still go as one message, many at once.
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (admin, t) = (admin.clone(), t.clone());
        reads.spawn(async move {
            admin
                .run(
                    0,
                    AdminOp::EndpointRecord {
                        topic: t,
                        namespace: "test.big".into(),
                        key: Bytes::from_static(b"none"),
                    },
                )
                .await
                .unwrap()
        });
    }
    while let Some(r) = reads.join_next().await {
        assert!(matches!(r.unwrap(), AdminAnswer::Record(None)));
    }
}
