//! The MQTT suite's harness: a broker to test (in-process mqgate on an ephemeral port on
//! either backend, or any broker named by `MQGATE_MQTT_ADDR=host:port`), rumqttc
//! clients for both protocol versions, and a raw client built on mqgate's codec for the
//! packets real clients never send.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mqgate_core::{Broker, CoreConfig, SystemClock};
use mqgate_mqtt::codec::{self, Connect, DecodeError, Packet, Properties, Version};
use mqgate_mqtt::{MqttConfig, MqttServer};
use mqgate_store::{MemoryStore, RocksConfig, RocksStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which storage backend an in-process broker runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    /// MemoryStore.
    Memory,
    /// RocksStore in a temporary folder.
    Rocks,
    /// The jetstream backend: RocksStore in a temporary folder as the view of a log
    /// replicated on a 3-node NATS cluster (one per test process, each target with
    /// its own stream).
    JetStream,
    /// A broker over 8 in-memory shard stores in one process: topics spread over the
    /// shards by name, publishes reaching several shards forwarded from their home.
    Shards,
    /// Three gateways of one sharded cluster (8 shards, the shared NATS cluster), one
    /// per test process (`crate::cluster`); each client connects to the next gateway.
    /// Standard scenarios only.
    Cluster,
}

/// How many shards the `shards` variant runs with.
pub const SHARDS: u16 = 8;

/// Where an in-process broker keeps its data (none: MemoryStore).
#[derive(Debug)]
pub(crate) struct DataDir {
    dir: tempfile::TempDir,
    backend: Backend,
}

impl DataDir {
    /// Whether a restart finds the data again (the `shards` variant is in memory).
    pub(crate) fn durable(&self) -> bool {
        self.backend != Backend::Shards
    }
}

impl DataDir {
    pub(crate) fn for_backend(backend: Backend) -> Option<Self> {
        let dir = || tempfile::tempdir().expect("tempdir");
        match backend {
            Backend::Memory => None,
            Backend::Cluster => unreachable!("the cluster variant shares one cluster"),
            backend => Some(Self {
                dir: dir(),
                backend,
            }),
        }
    }
}

/// Start the core of an in-process broker over its stores (again, at a restart: same
/// folder, same stream); the stores, to wait for their release at a restart.
pub(crate) async fn start_core(
    dir: &Option<DataDir>,
    core: CoreConfig,
) -> (Vec<Arc<dyn Store>>, Broker) {
    let stores = match dir {
        Some(d) if d.backend == Backend::Shards => (0..SHARDS)
            .map(|s| {
                let store: Arc<dyn Store> =
                    Arc::new(MemoryStore::new().with_id_base(u64::from(s) << 44));
                store
            })
            .collect(),
        _ => vec![open_store(dir).await],
    };
    let broker = Broker::start_sharded(stores.clone(), core, Arc::new(SystemClock))
        .await
        .expect("start core");
    (stores, broker)
}

/// Open the store of an in-process broker (again, at a restart: same folder, same
/// stream).
pub(crate) async fn open_store(dir: &Option<DataDir>) -> Arc<dyn Store> {
    match dir {
        None => Arc::new(MemoryStore::new()),
        Some(d) if d.backend == Backend::Rocks => {
            Arc::new(RocksStore::open(RocksConfig::new(d.dir.path())).expect("open rocks"))
        }
        Some(d) if d.backend == Backend::Shards => unreachable!("start_core opens the shards"),
        Some(d) => {
            use mqgate_store::jetstream::{open, testing::NatsCluster, JetStreamConfig};
            let cluster = tokio::task::block_in_place(NatsCluster::shared);
            // A stream per target, named after its folder.
            let name: String = d
                .dir
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect();
            let mut cfg = JetStreamConfig::new(
                cluster.urls(),
                "conformance",
                RocksConfig::new(d.dir.path().join("view")),
            );
            cfg.stream = format!("c{name}");
            cfg.lease_ttl = Duration::from_secs(2);
            let (store, _replication) = open(cfg).await.expect("open the jetstream store");
            Arc::new(store)
        }
    }
}

/// The environment variable naming an external broker (`host:port`).
pub const EXTERNAL_ENV: &str = "MQGATE_MQTT_ADDR";

/// A broker under test.
#[derive(Debug)]
pub struct Target {
    /// Host to connect to.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// Whether this is mqgate (extensions and mqgate-only configuration can be tested).
    pub mqgate: bool,
    inproc: Option<InProc>,
    /// The `cluster` variant: every gateway's port, and which one the next client gets.
    spread: Option<(Vec<u16>, std::sync::atomic::AtomicUsize)>,
}

#[derive(Debug)]
struct InProc {
    /// The store the broker runs on (the harness waits for it to be released before
    /// reopening it at a restart; the broker keeps its handle to itself).
    stores: Vec<Arc<dyn Store>>,
    broker: Broker,
    server: MqttServer,
    dir: Option<DataDir>,
    cfg: MqttConfig,
    core: CoreConfig,
}

/// Wait until the last handle on a stopped broker's store is gone (connection and
/// listener tasks let go as they end; RocksDB can only be reopened then), and drop it.
pub(crate) async fn release_store(store: Arc<dyn Store>) {
    for _ in 0..200 {
        if Arc::strong_count(&store) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "the store is still in use after shutdown"
    );
}

/// Bind loopback `port` again once the stopped broker has let go of it.
pub(crate) async fn rebind(port: u16) -> tokio::net::TcpListener {
    loop {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Broker logs in test output when `MQGATE_TEST_LOG` holds a filter
/// (`mqgate_mqtt=debug`).
pub(crate) fn init_test_log() {
    if let Ok(filter) = std::env::var("MQGATE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// The external broker's address, when the suite runs against one.
pub fn external() -> Option<(String, u16)> {
    let v = std::env::var(EXTERNAL_ENV).ok()?;
    let (h, p) = v.rsplit_once(':')?;
    Some((h.to_owned(), p.parse().ok()?))
}

impl Target {
    /// The broker for a standard-MQTT scenario: the external one for the memory variant
    /// (the rocks variant is skipped then: `None`), else an in-process mqgate.
    pub async fn standard(backend: Backend) -> Option<Target> {
        if let Some((host, port)) = external() {
            if backend != Backend::Memory {
                eprintln!("skipped: runs once against the external broker");
                return None;
            }
            return Some(Target {
                host,
                port,
                mqgate: false,
                inproc: None,
                spread: None,
            });
        }
        if backend == Backend::Cluster {
            let c = tokio::task::block_in_place(crate::cluster::shared);
            return Some(Target {
                host: "127.0.0.1".into(),
                port: c.mqtt[0],
                mqgate: true,
                inproc: None,
                spread: Some((c.mqtt.clone(), std::sync::atomic::AtomicUsize::new(0))),
            });
        }
        Some(Self::mqgate(backend, MqttConfig::default(), CoreConfig::default()).await)
    }

    /// An in-process mqgate with this configuration, for mqgate extensions and
    /// configuration-dependent scenarios (`None`, skipped, against an external broker).
    pub async fn mqgate_only(backend: Backend, cfg: MqttConfig) -> Option<Target> {
        if external().is_some() {
            eprintln!("skipped: an mqgate extension or mqgate configuration");
            return None;
        }
        if backend == Backend::Cluster {
            eprintln!("skipped: the cluster variant runs the standard scenarios");
            return None;
        }
        Some(Self::mqgate(backend, cfg, CoreConfig::default()).await)
    }

    /// Like [`Target::mqgate_only`] with a core configuration too.
    pub async fn mqgate_with_core(
        backend: Backend,
        cfg: MqttConfig,
        core: CoreConfig,
    ) -> Option<Target> {
        if external().is_some() {
            eprintln!("skipped: an mqgate extension or mqgate configuration");
            return None;
        }
        if backend == Backend::Cluster {
            eprintln!("skipped: the cluster variant runs the standard scenarios");
            return None;
        }
        Some(Self::mqgate(backend, cfg, core).await)
    }

    async fn mqgate(backend: Backend, cfg: MqttConfig, core: CoreConfig) -> Target {
        init_test_log();
        let dir = DataDir::for_backend(backend);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let inproc = InProc::start(dir, cfg, core, listener).await;
        Target {
            host: "127.0.0.1".into(),
            port,
            mqgate: true,
            inproc: Some(inproc),
            spread: None,
        }
    }

    /// The port for the next connection (the next gateway of the `cluster` variant;
    /// `port` otherwise).
    pub fn next_port(&self) -> u16 {
        match &self.spread {
            Some((ports, next)) => {
                ports[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % ports.len()]
            }
            None => self.port,
        }
    }

    /// The in-process broker core (`None` for an external broker).
    pub fn broker(&self) -> Option<&Broker> {
        self.inproc.as_ref().map(|i| &i.broker)
    }

    /// The stores of the in-process broker, one per shard (none for an external one).
    pub fn stores(&self) -> &[Arc<dyn Store>] {
        self.inproc.as_ref().map_or(&[], |i| &i.stores)
    }

    /// The in-process MQTT adapter (`None` for an external broker).
    pub fn mqtt(&self) -> Option<&MqttServer> {
        self.inproc.as_ref().map(|i| &i.server)
    }

    /// Whether the broker keeps its state across [`Target::restart`] (RocksDB).
    pub fn durable(&self) -> bool {
        self.inproc
            .as_ref()
            .is_some_and(|i| i.dir.as_ref().is_some_and(DataDir::durable))
    }

    /// Stop the in-process broker cleanly and start it again on the same port and data.
    pub async fn restart(&mut self) {
        let i = self
            .inproc
            .take()
            .expect("restart needs an in-process broker");
        i.server.shutdown(Duration::from_secs(5)).await;
        i.broker.shutdown().await;
        let stores = i.stores;
        drop(i.server);
        drop(i.broker);
        for store in stores {
            release_store(store).await;
        }
        let listener = rebind(self.port).await;
        self.inproc = Some(InProc::start(i.dir, i.cfg, i.core, listener).await);
    }
}

impl InProc {
    async fn start(
        dir: Option<DataDir>,
        cfg: MqttConfig,
        core: CoreConfig,
        listener: tokio::net::TcpListener,
    ) -> InProc {
        let (stores, broker) = start_core(&dir, core.clone()).await;
        let server = MqttServer::start(broker.clone(), cfg.clone())
            .await
            .expect("start mqtt");
        server.listen(listener);
        InProc {
            stores,
            broker,
            server,
            dir,
            cfg,
            core,
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(i) = self.inproc.take() {
            // Stop accepting and end the broker's tasks without blocking the test.
            let InProc {
                broker,
                server,
                dir,
                ..
            } = i;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    server.shutdown(Duration::from_millis(200)).await;
                    broker.shutdown().await;
                    drop(dir);
                });
            }
        }
    }
}

/// How a raw read ended without a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum RawEnd {
    /// The server closed the connection (or the read failed: see [`Raw::read_error`]).
    Closed,
    /// Nothing arrived in time.
    Timeout,
    /// Bytes that are not a packet.
    Bad(DecodeError),
}

/// A client that writes and reads exact packets, for protocol-level scenarios.
#[derive(Debug)]
pub struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    /// The version packets are encoded and decoded with.
    pub version: Version,
    /// Why the last read failed, when it did (a reset, rather than the server's orderly
    /// close, which reads as the end of the stream).
    pub read_error: Option<std::io::ErrorKind>,
}

impl Raw {
    /// Open a TCP connection (no CONNECT sent).
    pub async fn open(t: &Target, version: Version) -> Raw {
        let stream = TcpStream::connect((t.host.as_str(), t.next_port()))
            .await
            .expect("connect");
        stream.set_nodelay(true).ok();
        Raw {
            stream,
            buf: BytesMut::new(),
            version,
            read_error: None,
        }
    }

    /// Open and CONNECT with `c`; returns the CONNACK's code and properties.
    pub async fn connect(t: &Target, c: Connect) -> (Raw, codec::ConnAck) {
        let mut raw = Raw::open(t, c.version).await;
        raw.send(&Packet::Connect(Box::new(c))).await;
        match raw.recv(Duration::from_secs(5)).await {
            Ok(Packet::ConnAck(a)) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// A CONNECT with the usual defaults.
    pub fn connect_packet(version: Version, client_id: &str, clean: bool) -> Connect {
        Connect {
            version,
            clean_start: clean,
            keep_alive: 30,
            properties: Properties::default(),
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
        }
    }

    /// Send one packet.
    pub async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        self.encode(p, &mut out);
        self.send_bytes(&out).await;
    }

    /// Encode one packet onto `out` (to send many in one write).
    pub fn encode(&self, p: &Packet, out: &mut BytesMut) {
        codec::encode(p, self.version, out);
    }

    /// Send raw bytes (ignoring a closed connection).
    pub async fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.try_send_bytes(b).await;
    }

    /// Send raw bytes; the write's error (a reset, a broken pipe) when it failed.
    pub async fn try_send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(b).await
    }

    /// The next packet.
    pub async fn recv(&mut self, within: Duration) -> Result<Packet, RawEnd> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match codec::decode(&mut self.buf, Some(self.version), codec::MAX_PACKET_SIZE) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(RawEnd::Bad(e)),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => return Err(RawEnd::Closed),
                Ok(Err(e)) => {
                    self.read_error = Some(e.kind());
                    return Err(RawEnd::Closed);
                }
                Ok(Ok(_)) => {}
                Err(_) => return Err(RawEnd::Timeout),
            }
        }
    }

    /// Read until the server closes; returns the DISCONNECT reason if one came first.
    pub async fn expect_close(&mut self, within: Duration) -> Option<u8> {
        let mut reason = None;
        loop {
            match self.recv(within).await {
                Ok(Packet::Disconnect(d)) => reason = Some(d.reason),
                Ok(_) => {}
                Err(RawEnd::Closed) => return reason,
                Err(e) => panic!("expected the server to close the connection, got {e:?}"),
            }
        }
    }
}

/// A name unique to this run and call (`prefix-<time>-<n>`): an external broker keeps
/// what earlier runs left.
pub fn uniq(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{prefix}-{}-{n}", t % 1_000_000_000)
}
