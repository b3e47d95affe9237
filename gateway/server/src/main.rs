//! `mqgate`: the broker binary. The only place a storage backend is chosen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mqgate_amqp::{AmqpConfig, AmqpServer};
use mqgate_core::{Broker, CoreConfig, SystemClock};
use mqgate_mqtt::{MqttConfig, MqttServer};
use mqgate_store::{MemoryStore, RocksConfig, RocksStore, Store};

// glibc's allocator gives freed buffer memory back and faults it in again under load
// (a quarter of the broker's CPU in a profile); mimalloc keeps it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mqgate: a message broker for AMQP 0-9-1 and MQTT clients, on RocketMQ's log model.
#[derive(Debug, Parser)]
#[command(name = "mqgate", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default when no subcommand is given).
    Serve(ServeArgs),
}

#[derive(Debug, clap::Parser)]
struct ServeArgs {
    /// The data folder of the RocksDB store.
    #[arg(long, default_value = "./data")]
    data: PathBuf,
    /// Keep everything in memory (nothing survives a restart) instead of RocksDB.
    #[arg(long)]
    memory: bool,
    /// Where the MQTT listener binds.
    #[arg(long, default_value = "0.0.0.0:1883")]
    mqtt: SocketAddr,
    /// Where the AMQP 0-9-1 listener binds.
    #[arg(long, default_value = "0.0.0.0:5672")]
    amqp: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(a)) => a,
        None => ServeArgs::parse_from(["serve"]),
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = if args.memory {
        tracing::info!("store: in memory (nothing survives a restart)");
        Arc::new(MemoryStore::new())
    } else {
        let store = RocksStore::open(RocksConfig::new(&args.data))
            .with_context(|| format!("open the store in {}", args.data.display()))?;
        let stats = store.stats();
        tracing::info!(
            path = %args.data.display(),
            topics = stats.topics,
            messages = stats.messages,
            log_bytes = stats.log_bytes,
            delayed_pending = stats.timers,
            "store: RocksDB opened; recovered what is listed"
        );
        Arc::new(store)
    };
    let broker = Broker::start(store, CoreConfig::default(), Arc::new(SystemClock))
        .await
        .context("start the broker core")?;
    let mqtt = MqttServer::start(broker.clone(), MqttConfig::default())
        .await
        .context("start the MQTT adapter")?;
    let listener = tokio::net::TcpListener::bind(args.mqtt)
        .await
        .with_context(|| format!("bind the MQTT listener to {}", args.mqtt))?;
    tracing::info!(addr = %args.mqtt, "MQTT listening");
    mqtt.listen(listener);
    let amqp = AmqpServer::start(broker.clone(), AmqpConfig::default())
        .await
        .context("start the AMQP adapter")?;
    let listener = tokio::net::TcpListener::bind(args.amqp)
        .await
        .with_context(|| format!("bind the AMQP listener to {}", args.amqp))?;
    tracing::info!(addr = %args.amqp, "AMQP 0-9-1 listening (user guest/guest, vhost /)");
    amqp.listen(listener);
    tracing::info!("Ctrl-C or SIGTERM stops.");
    shutdown_signal().await;
    tracing::info!(
        "stopping: clients are told, groups persist their offsets, the store is flushed"
    );
    tokio::join!(
        mqtt.shutdown(Duration::from_secs(5)),
        amqp.shutdown(Duration::from_secs(5))
    );
    broker.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
