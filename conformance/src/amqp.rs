//! The AMQP suite's harness: a broker to test (in-process mqgate on an ephemeral port on
//! either backend, with its MQTT listener for the cross-protocol scenarios, or any broker
//! named by `MQGATE_AMQP_URL`), and lapin connections to it.
//!
//! Users every target has (set them up on another broker to match): `guest`/`guest` with
//! every permission on vhosts `/` and `other`; `limited`/`limited` on `/` only, with
//! configure and write `^limited\.` and read `.*`.

pub mod raw;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mqgate_amqp::{AmqpConfig, AmqpServer, Permission};
use mqgate_core::{Broker, CoreConfig};
use mqgate_mqtt::{MqttConfig, MqttServer};
use mqgate_store::Store;

pub use crate::mqtt::Backend;

/// The environment variable naming an external broker (`amqp://user:pass@host:port/vhost`).
pub const EXTERNAL_ENV: &str = "MQGATE_AMQP_URL";

/// A broker under test.
#[derive(Debug)]
pub struct Target {
    /// Host to connect to.
    pub host: String,
    /// AMQP port.
    pub port: u16,
    /// Whether this is mqgate (extensions can be tested).
    pub mqgate: bool,
    mqtt_port: Option<u16>,
    inproc: Option<InProc>,
    /// The `cluster` variant: every gateway's AMQP port; each connection takes the
    /// next one (`port` is the first).
    spread: Option<(Vec<u16>, std::sync::atomic::AtomicUsize)>,
}

#[derive(Debug)]
struct InProc {
    /// The stores the broker runs on (the harness waits for them to be released before
    /// reopening them at a restart; the broker keeps its handles to itself).
    stores: Vec<Arc<dyn Store>>,
    broker: Broker,
    amqp: AmqpServer,
    mqtt: MqttServer,
    dir: Option<crate::mqtt::DataDir>,
    cfg: AmqpConfig,
    core: CoreConfig,
}

/// The external broker's host and port, when the suite runs against one.
fn external() -> Option<(String, u16)> {
    let v = std::env::var(EXTERNAL_ENV).ok()?;
    let rest = v.strip_prefix("amqp://")?;
    let hostport = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let hostport = hostport.split('/').next()?;
    let (h, p) = hostport.rsplit_once(':').unwrap_or((hostport, "5672"));
    Some((h.to_owned(), p.parse().ok()?))
}

/// The configuration every in-process target runs with (see the module docs).
pub fn test_config() -> AmqpConfig {
    let mut cfg = AmqpConfig {
        vhosts: vec!["/".into(), "other".into()],
        ..AmqpConfig::default()
    };
    cfg.users.insert_plain("guest", "guest", &["administrator"]);
    cfg.users.insert_plain("limited", "limited", &[]);
    cfg.permissions.insert(
        "guest".into(),
        HashMap::from([
            ("/".to_owned(), Permission::all()),
            ("other".to_owned(), Permission::all()),
        ]),
    );
    cfg.permissions.insert(
        "limited".into(),
        HashMap::from([(
            "/".to_owned(),
            Permission::new("^limited\\.", "^limited\\.", ".*").expect("valid"),
        )]),
    );
    cfg
}

impl Target {
    /// The broker for a standard-AMQP scenario: the external one for the memory variant
    /// (the rocks variant is skipped then: `None`), else an in-process mqgate.
    pub async fn standard(backend: Backend) -> Option<Target> {
        if let Some((host, port)) = external() {
            if backend != Backend::Memory {
                eprintln!("skipped: runs once against the external broker");
                return None;
            }
            let mqtt_port = crate::mqtt::external().map(|(_, p)| p);
            return Some(Target {
                host,
                port,
                mqgate: false,
                mqtt_port,
                inproc: None,
                spread: None,
            });
        }
        if backend == Backend::Cluster {
            let c = tokio::task::block_in_place(crate::cluster::shared);
            return Some(Target {
                host: "127.0.0.1".into(),
                port: c.amqp[0],
                mqgate: true,
                mqtt_port: Some(c.mqtt[1]),
                inproc: None,
                spread: Some((c.amqp.clone(), std::sync::atomic::AtomicUsize::new(0))),
            });
        }
        Some(Self::mqgate(backend, test_config()).await)
    }

    /// An in-process mqgate, for mqgate extensions (`None`, skipped, against an
    /// external broker).
    pub async fn mqgate_only(backend: Backend) -> Option<Target> {
        Self::mqgate_with(backend, test_config()).await
    }

    /// An in-process mqgate with this configuration (`None` against an external broker).
    pub async fn mqgate_with(backend: Backend, cfg: AmqpConfig) -> Option<Target> {
        Self::mqgate_with_core(backend, cfg, CoreConfig::default()).await
    }

    /// Like [`Target::mqgate_with`] with a core configuration too (short retry delays).
    pub async fn mqgate_with_core(
        backend: Backend,
        cfg: AmqpConfig,
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
        Some(Self::mqgate_core(backend, cfg, core).await)
    }

    async fn mqgate(backend: Backend, cfg: AmqpConfig) -> Target {
        Self::mqgate_core(backend, cfg, CoreConfig::default()).await
    }

    async fn mqgate_core(backend: Backend, cfg: AmqpConfig, core: CoreConfig) -> Target {
        crate::mqtt::init_test_log();
        let dir = crate::mqtt::DataDir::for_backend(backend);
        let amqp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mqtt = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = amqp.local_addr().expect("addr").port();
        let mqtt_port = mqtt.local_addr().expect("addr").port();
        let inproc = InProc::start(dir, cfg, core, amqp, mqtt).await;
        Target {
            host: "127.0.0.1".into(),
            port,
            mqgate: true,
            mqtt_port: Some(mqtt_port),
            inproc: Some(inproc),
            spread: None,
        }
    }

    /// `amqp://user:pass@host:port/<vhost, url-encoded>`.
    pub fn url_for(&self, user: &str, pass: &str, vhost: &str) -> String {
        let v: String = vhost
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!(
            "amqp://{user}:{pass}@{}:{}/{v}",
            self.host,
            self.next_port()
        )
    }

    /// The AMQP port for the next connection (the next gateway of the `cluster`
    /// variant; `port` otherwise).
    pub fn next_port(&self) -> u16 {
        match &self.spread {
            Some((ports, next)) => {
                ports[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % ports.len()]
            }
            None => self.port,
        }
    }

    /// A lapin connection as guest to vhost `/`.
    pub async fn connect(&self) -> lapin::Connection {
        lapin::Connection::connect(
            &self.url_for("guest", "guest", "/"),
            lapin::ConnectionProperties::default(),
        )
        .await
        .expect("connect")
    }

    /// The in-process broker core (`None` for an external broker).
    pub fn broker(&self) -> Option<&Broker> {
        self.inproc.as_ref().map(|i| &i.broker)
    }

    /// The in-process AMQP adapter (`None` for an external broker).
    pub fn amqp(&self) -> Option<&AmqpServer> {
        self.inproc.as_ref().map(|i| &i.amqp)
    }

    /// Whether the broker keeps its state across [`Target::restart`] (RocksDB).
    pub fn durable(&self) -> bool {
        self.inproc
            .as_ref()
            .is_some_and(|i| i.dir.as_ref().is_some_and(crate::mqtt::DataDir::durable))
    }

    /// Where the same broker's MQTT listener is (external: `MQGATE_MQTT_ADDR`).
    pub fn mqtt_addr(&self) -> Option<(String, u16)> {
        self.mqtt_port.map(|p| (self.host.clone(), p))
    }

    /// Stop the in-process broker cleanly and start it again on the same ports and data.
    pub async fn restart(&mut self) {
        let i = self
            .inproc
            .take()
            .expect("restart needs an in-process broker");
        i.amqp.shutdown(Duration::from_secs(5)).await;
        i.mqtt.shutdown(Duration::from_secs(5)).await;
        i.broker.shutdown().await;
        let stores = i.stores;
        drop(i.amqp);
        drop(i.mqtt);
        drop(i.broker);
        for store in stores {
            crate::mqtt::release_store(store).await;
        }
        let amqp = crate::mqtt::rebind(self.port).await;
        let mqtt = crate::mqtt::rebind(self.mqtt_port.expect("in-process")).await;
        self.inproc = Some(InProc::start(i.dir, i.cfg, i.core, amqp, mqtt).await);
    }
}

impl InProc {
    async fn start(
        dir: Option<crate::mqtt::DataDir>,
        cfg: AmqpConfig,
        core: CoreConfig,
        amqp_listener: tokio::net::TcpListener,
        mqtt_listener: tokio::net::TcpListener,
    ) -> InProc {
        let (stores, broker) = crate::mqtt::start_core(&dir, core.clone()).await;
        let amqp = AmqpServer::start(broker.clone(), cfg.clone())
            .await
            .expect("start amqp");
        amqp.listen(amqp_listener);
        let mqtt = MqttServer::start(broker.clone(), MqttConfig::default())
            .await
            .expect("start mqtt");
        mqtt.listen(mqtt_listener);
        InProc {
            stores,
            broker,
            amqp,
            mqtt,
            dir,
            cfg,
            core,
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(i) = self.inproc.take() {
            let InProc {
                broker,
                amqp,
                mqtt,
                dir,
                ..
            } = i;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    amqp.shutdown(Duration::from_millis(200)).await;
                    mqtt.shutdown(Duration::from_millis(200)).await;
                    broker.shutdown().await;
                    drop(dir);
                });
            }
        }
    }
}

/// Declare a server-named exclusive queue on `ch`; its name.
pub async fn exclusive_queue(ch: &lapin::Channel) -> String {
    ch.queue_declare(
        "".into(),
        lapin::options::QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("declare an exclusive queue")
    .name()
    .as_str()
    .to_owned()
}
