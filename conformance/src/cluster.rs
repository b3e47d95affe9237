//! The `cluster` variant's broker: three in-process gateways of one sharded cluster
//! (8 shards over the shared 3-node NATS cluster, loopback), each with its AMQP and
//! MQTT adapters, started once per test process and shared by every scenario of the
//! variant (scenarios use names of their own). A target connects each client to the
//! next gateway, so a scenario's publisher and consumer usually meet across gateways
//! (an MQTT session is spliced to the gateway owning its shard).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mqgate_amqp::AmqpServer;
use mqgate_cluster::gateway::Gateway;
use mqgate_cluster::manager::ManagerConfig;
use mqgate_core::{CoreConfig, SystemClock};
use mqgate_mqtt::{MqttConfig, MqttServer};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::jetstream::{JetStreamConfig, Nats};
use mqgate_store::RocksConfig;

/// How many shards the `cluster` variant has.
pub const SHARDS: u16 = 8;
/// Its gateways.
const GATEWAYS: [&str; 3] = ["gw1", "gw2", "gw3"];

/// The shared cluster's listeners, by gateway.
#[derive(Debug, Clone)]
pub struct ClusterPorts {
    /// AMQP ports.
    pub amqp: Vec<u16>,
    /// MQTT ports.
    pub mqtt: Vec<u16>,
}

/// The cluster, started on first use (in a runtime of its own, on a thread of its
/// own: it outlives each test's runtime). Panics if it cannot start within 3 minutes.
pub fn shared() -> &'static ClusterPorts {
    static SHARED: OnceLock<ClusterPorts> = OnceLock::new();
    SHARED.get_or_init(|| {
        let nats = NatsCluster::shared();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("conformance-cluster".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    let held = start(nats).await;
                    let _ = tx.send(held.0.clone());
                    // Held for the life of the process.
                    let _keep = held;
                    std::future::pending::<()>().await;
                });
            })
            .expect("a thread");
        rx.recv_timeout(Duration::from_secs(180))
            .expect("the conformance cluster started within 3 minutes")
    })
}

type Held = (
    ClusterPorts,
    Vec<(Gateway, AmqpServer, MqttServer)>,
    tempfile::TempDir,
);

async fn start(nats: &NatsCluster) -> Held {
    crate::mqtt::init_test_log();
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = format!("conf{}", std::process::id());
    let mut gws = Vec::new();
    for name in GATEWAYS {
        let mut cfg =
            JetStreamConfig::new(nats.urls(), name, RocksConfig::new(dir.path().join(name)));
        cfg.stream = stream.clone();
        cfg.lease_ttl = Duration::from_secs(6);
        let conn = Nats::connect(cfg).await.expect("connect to NATS");
        let manager = ManagerConfig {
            shards: SHARDS,
            // Generous: a test process running hundreds of scenarios at once on two
            // cores must not lose a gateway to a late heartbeat (its shards would move
            // mid-scenario); no scenario here tests failover.
            node_ttl: Duration::from_secs(6),
            tick: Duration::from_millis(150),
            move_lag: 100,
            run: 0,
        };
        let gw = Gateway::start(
            conn,
            manager,
            CoreConfig::default(),
            Arc::new(SystemClock),
            Duration::from_secs(2),
        )
        .await
        .expect("start a gateway");
        gws.push(gw);
    }
    wait_balanced(&gws).await;
    for g in &gws {
        assert!(g.ready(Duration::from_secs(60)).await, "a gateway ready");
    }
    let mut ports = ClusterPorts {
        amqp: Vec::new(),
        mqtt: Vec::new(),
    };
    let mut held = Vec::new();
    for gw in gws {
        let broker = gw.broker().clone();
        let amqp = AmqpServer::start(broker.clone(), crate::amqp::test_config())
            .await
            .expect("start AMQP");
        let mqtt = MqttServer::start(broker, MqttConfig::default())
            .await
            .expect("start MQTT");
        let a = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let m = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        ports.amqp.push(a.local_addr().expect("addr").port());
        ports.mqtt.push(m.local_addr().expect("addr").port());
        gw.broker()
            .advertise("mqtt", m.local_addr().expect("addr").to_string());
        amqp.listen(a);
        mqtt.listen(m);
        held.push((gw, amqp, mqtt));
    }
    (ports, held, dir)
}

/// Until every shard is owned by the gateway rendezvous ranks first for it.
async fn wait_balanced(gws: &[Gateway]) {
    let want = mqgate_cluster::rendezvous::assignment(&GATEWAYS, SHARDS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let owned: Vec<Vec<u16>> = gws.iter().map(|g| g.broker().owned_shards()).collect();
        let settled = (0..SHARDS).all(|s| {
            let holders: Vec<usize> = (0..gws.len()).filter(|i| owned[*i].contains(&s)).collect();
            holders.len() == 1 && Some(GATEWAYS[holders[0]]) == want[usize::from(s)].0
        });
        if settled {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the conformance cluster did not settle: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
