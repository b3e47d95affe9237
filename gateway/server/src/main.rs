//! `mqgate`: the broker binary. The only place a storage backend is chosen.
//!
//! `mqgate serve` (the default) runs the broker; the other subcommands talk to a running
//! broker's admin API.

// glibc's allocator gives freed buffer memory back and faults it in again under load
// (a quarter of the broker's CPU in a profile); mimalloc keeps it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// RocksDB's CRC-32C, chosen at run time (`mqgate_store::crc32c`): build.rs links this
/// binary with `--wrap` on RocksDB's function; this reference makes the linker take the
/// replacement from mqgate-store before it reaches RocksDB's objects that call it.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[used]
static ROCKSDB_CRC32C: unsafe extern "C" fn(u32, *const u8, usize) -> u32 =
    mqgate_store::crc32c::__wrap__ZN7rocksdb6crc32c6ExtendEjPKcm;

mod admin;
mod cli;
mod console;
mod listeners;
mod malloc;
mod metrics;
mod rabbit;
mod settings;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mqgate_amqp::AmqpServer;
use mqgate_core::{Broker, Password, SystemClock};
use mqgate_mqtt::MqttServer;
use mqgate_store::{MemoryStore, RocksStore, Store};

use crate::settings::{Backend, Listener, Scheduler, Settings};

/// mqgate: a message broker for AMQP 0-9-1 and MQTT clients, on RocketMQ's log model.
#[derive(Debug, Parser)]
#[command(name = "mqgate", version, after_help = CONVENTIONS)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    remote: cli::Remote,
}

/// RocketMQ features as any AMQP or MQTT client reaches them (shown by `--help`).
const CONVENTIONS: &str = "\
RocketMQ features from any client (AMQP header = MQTT 5 user property):
  x-keys: \"k1 k2\"          message keys; find with `mqgate messages key TOPIC KEY`,
                           cancel a delayed one with `mqgate delayed cancel --topic T --key K`
  x-producer-group: NAME   producer group (AMQP: also client property producer_group;
                           MQTT 5: also a CONNECT user property); see `mqgate producers`
  x-sharding-key: KEY      ordering key for orderly queues and shared subscriptions
  x-delay: MS, x-deliver-at: MS-SINCE-EPOCH   delayed delivery (MQTT: $delayed/SECONDS/topic)
  AMQP queue arguments x-orderly: true, x-queues: N   per-key strict order, competing consumers
  MQTT SUBSCRIBE $share/G/F with user property x-orderly: true   the same for a shared group
  Redeliveries carry x-delivery-count (times tried before).";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Print RabbitMQ-style salted SHA-256 of a password, for `password_hash` in the
    /// configuration (reads the password from standard input when not given).
    HashPassword {
        /// The password.
        password: Option<String>,
    },
    /// Topics: list, create, delete, offsets (talks to a running broker's admin API).
    #[command(subcommand)]
    Topics(cli::Topics),
    /// Consumer groups: list, show (offsets and lag), reset (replay).
    #[command(subcommand)]
    Groups(cli::Groups),
    /// Dead-letter queues: list, show, resend.
    #[command(subcommand)]
    Dlq(cli::Dlq),
    /// Messages: by id, by key, a queue's range.
    #[command(subcommand)]
    Messages(cli::Messages),
    /// Client connections: list, close.
    #[command(subcommand)]
    Connections(cli::Connections),
    /// Delayed messages pending: list, cancel (by id, or by topic and key).
    #[command(subcommand)]
    Delayed(cli::Delayed),
    /// What each producer group (x-producer-group) published to each topic.
    Producers,
    /// The replicated log (store.backend = "jetstream"): owner, epoch, lag, replicas.
    #[command(subcommand)]
    Cluster(cli::Cluster),
}

#[derive(Debug, Default, clap::Parser)]
struct ServeArgs {
    /// A TOML configuration file (see mqgate.toml for every setting).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// The data folder of the RocksDB store (overrides store.path).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Keep everything in memory (nothing survives a restart) instead of RocksDB.
    #[arg(long)]
    memory: bool,
    /// Where the MQTT listener binds (overrides listeners.mqtt).
    #[arg(long)]
    mqtt: Option<SocketAddr>,
    /// Where the AMQP 0-9-1 listener binds (overrides listeners.amqp).
    #[arg(long)]
    amqp: Option<SocketAddr>,
    /// Where the admin API and /metrics bind (overrides listeners.admin).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Check the configuration, print where each listener would bind, and exit.
    #[arg(long)]
    check_config: bool,
    /// The edge profile: RocksDB cache 4 MiB and memtables 8 MiB, tail cache 2 MiB,
    /// retained cache 1,000 messages / 4 MiB, QoS 0 queues 2 MiB each, freed memory
    /// given back at once: under 64 MiB under load (overrides those settings).
    #[arg(long)]
    small: bool,
}

fn main() -> std::process::ExitCode {
    // Logs go to stderr: stdout is the admin subcommands' output (`--json` pipes).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Serve(a)) => run_serve(a),
        None => run_serve(ServeArgs::default()),
        Some(Command::HashPassword { password }) => hash_password(password),
        Some(Command::Topics(c)) => cli::topics(&cli.remote, c),
        Some(Command::Groups(c)) => cli::groups(&cli.remote, c),
        Some(Command::Dlq(c)) => cli::dlq(&cli.remote, c),
        Some(Command::Messages(c)) => cli::messages(&cli.remote, c),
        Some(Command::Connections(c)) => cli::connections(&cli.remote, c),
        Some(Command::Delayed(c)) => cli::delayed(&cli.remote, c),
        Some(Command::Producers) => cli::producers(&cli.remote),
        Some(Command::Cluster(c)) => cli::cluster(&cli.remote, c),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed and why.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("mqgate: {}", chain.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}

fn hash_password(password: Option<String>) -> anyhow::Result<()> {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("read the password from standard input")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    println!("{}", Password::hash(&password).to_hash_string());
    Ok(())
}

/// `--small`: mimalloc returns freed memory to the OS at once instead of after 10 ms,
/// and does not commit its arenas up front. Its options are read from the environment
/// when the process starts, so the broker starts itself again with them set (same
/// process id: `exec`); an explicit setting in the environment is kept.
fn small_allocator() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    const PURGE: &str = "MIMALLOC_PURGE_DELAY";
    if std::env::var_os(PURGE).is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("find the mqgate binary")?;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(PURGE, "0")
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        .exec();
    Err(anyhow::anyhow!(
        "start again with the small allocator settings: {err}"
    ))
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.small {
        small_allocator()?;
    } else {
        malloc::keep_freed_memory();
    }
    let mut s = Settings::load(args.config.as_deref())?;
    if args.small {
        s.small();
    }
    if let Some(d) = &args.data {
        s.store.path = d.clone();
    }
    if args.memory {
        s.store.backend = Backend::Memory;
    }
    if let Some(a) = args.mqtt {
        s.listeners.mqtt = Listener::from(a);
    }
    if let Some(a) = args.amqp {
        s.listeners.amqp = Listener::from(a);
    }
    if let Some(a) = args.admin {
        s.listeners.admin = Listener::from(a);
    }
    malloc::transparent_huge_pages(s.runtime.transparent_huge_pages);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = s.runtime.workers(cores);
    tracing::info!(workers, cores, scheduler = %s.runtime.scheduler, "runtime: worker threads");
    if args.check_config {
        println!("configuration is valid");
        println!(
            "runtime: workers = {workers} (cores: {cores}), scheduler = {}",
            s.runtime.scheduler
        );
        println!("store: {} ({})", s.store.backend, s.store.path.display());
        for (name, addr) in s.listeners.all() {
            // An address, or "off".
            println!("{name}: {addr}");
        }
        return Ok(());
    }
    match s.runtime.scheduler {
        Scheduler::WorkStealing => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .context("start the async runtime")?
            .block_on(serve(s)),
        Scheduler::PerCore => per_core(workers, serve(s)),
    }
}

/// Run `main` on this thread's single-threaded runtime, with `workers - 1` more such
/// runtimes on threads of their own; accepted connections are spread over all of them
/// (`mqgate_core::net::set_connection_runtimes`). A connection's tasks, and the tasks
/// it starts, stay on its thread: waking one is a queue push on that thread, never a
/// hand-off to another worker, and most of what a connection allocates is freed on
/// that thread. The other runtimes stop once `main` has returned.
fn per_core(
    workers: usize,
    main: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let build = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the async runtime")
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut threads = Vec::new();
    let mut handles = Vec::new();
    for i in 1..workers.max(1) {
        let rt = build()?;
        handles.push(rt.handle().clone());
        let mut stopped = stopped.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("mqgate-worker-{i}"))
                .spawn(move || {
                    mqgate_core::net::set_home(i);
                    rt.block_on(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    });
                })
                .context("start a worker thread")?,
        );
    }
    let rt = build()?;
    handles.insert(0, rt.handle().clone());
    mqgate_core::net::set_connection_runtimes(handles);
    mqgate_core::net::set_home(0);
    let result = rt.block_on(main);
    let _ = stop.send(true);
    for t in threads {
        let _ = t.join();
    }
    result
}

/// A listening socket with `backlog` (the standard library's 128 overflowed under a
/// burst of connects: the kernel dropped the SYNs and clients retried only after 1 s).
fn listen_on(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn bind(
    what: &str,
    l: Listener,
    backlog: u32,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = l.addr() else {
        return Ok(None);
    };
    let l = match listen_on(addr, backlog) {
        Ok(l) => l,
        // `[::]` (the default) takes IPv6 and IPv4 clients alike; a machine without
        // IPv6 gets the IPv4 wildcard instead.
        Err(e)
            if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED
                && !matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied
                ) =>
        {
            let v4 = std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            let l = listen_on(v4, backlog)
                .with_context(|| format!("bind the {what} listener to {addr} or {v4}"))?;
            tracing::info!(%addr, error = %e, "{what}: no IPv6 here; listening on IPv4 only");
            l
        }
        Err(e) => {
            return Err(e).with_context(|| format!("bind the {what} listener to {addr}"));
        }
    };
    tracing::info!(%addr, "{what} listening");
    Ok(Some(l))
}

async fn serve(s: Settings) -> anyhow::Result<()> {
    // Installed before any listener opens: a SIGTERM that arrives once a client can
    // connect must stop the broker cleanly, never by the signal's default action.
    let mut stop = StopSignals::install();
    reserve_fds(s.limits.reserved_fds, s.rocks_max_open_files());
    let mut replication = None;
    let mut gateway = None;
    let broker = if s.cluster.shards > 0 {
        let Some(gw) = join_cluster(&s, &mut stop).await? else {
            return Ok(());
        };
        let broker = gw.broker().clone();
        gateway = Some(gw);
        broker
    } else {
        let store: Arc<dyn Store> = match s.store.backend {
            Backend::Memory => {
                tracing::info!("store: in memory (nothing survives a restart)");
                Arc::new(MemoryStore::new())
            }
            Backend::Jetstream => {
                let path = s.store.path.clone();
                let cfg = s.jetstream(&path);
                tracing::info!(
                    servers = ?cfg.servers,
                    stream = %cfg.stream,
                    node = %cfg.node_id,
                    view = %path.display(),
                    "store: a log replicated on NATS JetStream; no listener opens until this node holds the lease (a standby refuses connections, so clients try their next address)"
                );
                let (store, r) = tokio::select! {
                    r = mqgate_store::jetstream::open(cfg) => r.context("open the replicated log")?,
                    () = stop.recv() => {
                        tracing::info!("stopped while standby");
                        return Ok(());
                    }
                };
                let stats = store.stats();
                tracing::info!(
                    topics = stats.topics,
                    messages = stats.messages,
                    "store: this node owns the replicated log; serving"
                );
                replication = Some(r);
                Arc::new(store)
            }
            Backend::Rocksdb => {
                let path = s.store.path.clone();
                let store = RocksStore::open(s.rocks(&path))
                    .with_context(|| format!("open the store in {}", path.display()))?;
                let stats = store.stats();
                tracing::info!(
                    path = %path.display(),
                    topics = stats.topics,
                    messages = stats.messages,
                    log_bytes = stats.log_bytes,
                    delayed_pending = stats.timers,
                    "store: RocksDB opened; recovered what is listed"
                );
                tracing::info!(
                    crc32c = if !mqgate_store::crc32c::wrapped() {
                        "RocksDB's own"
                    } else if mqgate_store::crc32c::hardware() {
                        "hardware (SSE4.2)"
                    } else {
                        "table (this CPU has no SSE4.2)"
                    },
                    "store: WAL checksums"
                );
                Arc::new(store)
            }
        };
        Broker::start(store, s.core(), Arc::new(SystemClock))
            .await
            .context("start the broker core")?
    };
    let users = s.users();
    let backlog = s.limits.listen_backlog;
    let mqtt = MqttServer::start(broker.clone(), s.mqtt(&users))
        .await
        .context("start the MQTT adapter")?;
    let mut bound = admin::Listeners::default();
    if let Some(l) = bind("MQTT", s.listeners.mqtt, backlog).await? {
        bound.mqtt = l.local_addr().ok();
        if let (Some(a), true) = (bound.mqtt, broker.clustered()) {
            // Where the other gateways send the clients of sessions that live here.
            let host = advertised_host(&s.cluster.advertise_host, a.ip());
            broker.advertise("mqtt", format!("{host}:{}", a.port()));
        }
        mqtt.listen(l);
    }
    let amqp = AmqpServer::start(broker.clone(), s.amqp(&users))
        .await
        .context("start the AMQP adapter")?;
    if let Some(l) = bind("AMQP 0-9-1", s.listeners.amqp, backlog).await? {
        bound.amqp = l.local_addr().ok();
        amqp.listen(l);
    }
    let admin_stop = tokio::sync::watch::channel(false);
    let l = &s.listeners;
    let needs_tls = l.tls_wanted();
    let tls = match (&s.tls.cert_file, &s.tls.key_file) {
        (Some(c), Some(k)) if needs_tls => Some(listeners::tls_acceptor(c, k)?),
        _ => None,
    };
    if let (Some(lis), Some(t)) = (bind("AMQP 0-9-1 over TLS", l.amqps, backlog).await?, &tls) {
        listeners::serve_tls("AMQPS", lis, t.clone(), amqp.clone(), admin_stop.1.clone());
    }
    if let (Some(lis), Some(t)) = (bind("MQTT over TLS", l.mqtts, backlog).await?, &tls) {
        listeners::serve_tls("MQTTS", lis, t.clone(), mqtt.clone(), admin_stop.1.clone());
    }
    if let Some(lis) = bind("MQTT over WebSocket", l.mqtt_ws, backlog).await? {
        listeners::serve_ws("MQTT/WS", lis, None, mqtt.clone(), admin_stop.1.clone());
    }
    if let (Some(lis), Some(t)) = (
        bind("MQTT over WebSocket over TLS", l.mqtt_wss, backlog).await?,
        &tls,
    ) {
        listeners::serve_ws(
            "MQTT/WSS",
            lis,
            Some(t.clone()),
            mqtt.clone(),
            admin_stop.1.clone(),
        );
    }
    if let Some(l) = bind("admin API", s.listeners.admin, backlog).await? {
        bound.admin = l.local_addr().ok();
        let state = admin::AdminState {
            rates: Arc::default(),
            listeners: bound,
            started_at: broker.now(),
            broker: broker.clone(),
            mqtt: mqtt.clone(),
            amqp: amqp.clone(),
            users: Arc::new(users.clone()),
            replication: replication.clone(),
            sharded: gateway
                .as_ref()
                .map(|g| (g.nats().clone(), s.cluster.shards)),
            backend: s.store.backend.to_string(),
            metrics: metrics::Collector {
                handle: metrics::install().context("install the Prometheus recorder")?,
                broker: broker.clone(),
                mqtt: mqtt.clone(),
                amqp: amqp.clone(),
                cfg: s.metrics.clone(),
            },
        };
        rabbit::spawn_sampler(state.clone(), admin_stop.1.clone());
        let mut stop = admin_stop.1.clone();
        tokio::spawn(async move {
            let app = admin::router(state);
            let shutdown = async move {
                let _ = stop.wait_for(|v| *v).await;
            };
            if let Err(e) = axum::serve(
                l,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
            {
                tracing::error!(error = %e, "admin API stopped");
            }
        });
    }
    if s.users.is_empty() {
        tracing::warn!("no [[users]] configured: user guest/guest (administrator) and anonymous MQTT are on; see mqgate.toml");
    }
    tracing::info!("Ctrl-C or SIGTERM stops.");
    let mut stepped_down = None;
    let lost = async {
        match replication.as_mut() {
            Some(r) => r.stepped_down().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = stop.recv() => {}
        reason = lost => {
            tracing::error!(%reason, "this node no longer owns the replicated log: closing every connection and exiting (nothing more is confirmed; restarted, it comes back as a standby)");
            stepped_down = Some(reason);
        }
    }
    tracing::info!(
        "stopping: clients are told, groups persist their offsets, the store is flushed"
    );
    let _ = admin_stop.0.send(true);
    tokio::join!(
        mqtt.shutdown(Duration::from_secs(5)),
        amqp.shutdown(Duration::from_secs(5))
    );
    match gateway {
        // Its shards are handed to their next owners (each drained, its hand-over
        // record appended), then the core stops.
        Some(gw) => {
            if !gw.leave(Duration::from_secs(15)).await {
                tracing::warn!("stopping: not every shard was handed over in 15 s; the others take the rest over once this gateway's key expires");
            }
        }
        None => broker.shutdown().await,
    }
    if let Some(reason) = stepped_down {
        anyhow::bail!("stepped down: {reason}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Join the cluster of `[cluster]` as one of its gateways: its shards come and go as
/// the live gateways rank them; work on the others' is relayed. Returns once the
/// cluster can be served (shard 0 owned, its routing state followed here), or `None`
/// when stopped first.
async fn join_cluster(
    s: &Settings,
    stop: &mut StopSignals,
) -> anyhow::Result<Option<mqgate_cluster::gateway::Gateway>> {
    let c = &s.cluster;
    let cfg = s.jetstream(&s.store.path);
    tracing::info!(
        servers = ?cfg.servers,
        stream = %cfg.stream,
        node = %cfg.node_id,
        shards = c.shards,
        views = %s.store.path.display(),
        "cluster: joining; this gateway owns the shards rendezvous ranks it first for among the live gateways, and relays the rest"
    );
    let nats = tokio::select! {
        r = mqgate_store::jetstream::Nats::connect(cfg) => r.context("connect to the cluster's NATS servers")?,
        () = stop.recv() => return Ok(None),
    };
    let manager = mqgate_cluster::manager::ManagerConfig {
        shards: c.shards,
        node_ttl: c.node_ttl.get(),
        tick: c.tick.get(),
        move_lag: c.move_lag,
        run: 0,
    };
    let gw = mqgate_cluster::gateway::Gateway::start(
        nats,
        manager,
        s.core(),
        Arc::new(SystemClock),
        c.relay_timeout.get(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("join the cluster: {e}"))?;
    tokio::select! {
        ready = gw.ready(c.ready_timeout.get()) => {
            if ready {
                tracing::info!(owned = ?gw.broker().owned_shards(), "cluster: joined; serving");
            } else {
                tracing::warn!(waited = %c.ready_timeout, "cluster: shard 0 has no owner yet, or its routing state is not followed; serving anyway (exchange operations wait for it)");
            }
        }
        () = stop.recv() => {
            gw.leave(Duration::from_secs(15)).await;
            return Ok(None);
        }
    }
    Ok(Some(gw))
}

/// Raise the soft limit on open files to the hard one (as most servers do), then hold
/// `reserved` handles back from client sockets: the accept loops refuse a socket once
/// open sockets + `reserved` would reach the limit, so a connection flood cannot take
/// the handle RocksDB needs for its next WAL or table file (it keeps at most
/// `rocks_files` table files open, within the reserve).
fn reserve_fds(reserved: usize, rocks_files: i32) {
    if reserved == 0 {
        tracing::info!("file handles: none reserved for the store (limits.reserved_fds = 0)");
        return;
    }
    let Some(limit) = raise_fd_limit() else {
        tracing::warn!("file handles: the limit is unknown; client sockets are not bounded by it");
        return;
    };
    let budget = limit.saturating_sub(reserved);
    mqgate_core::net::set_socket_budget(budget);
    if budget < 64 {
        tracing::warn!(
            limit,
            reserved,
            client_sockets = budget,
            "file handles: the limit leaves few client sockets; raise `ulimit -n` or lower limits.reserved_fds"
        );
    } else {
        tracing::info!(
            limit,
            reserved,
            rocksdb_open_files = rocks_files,
            client_sockets = budget,
            "file handles: reserved for the store"
        );
    }
}

/// The open-files limit after raising the soft limit to the hard one.
#[cfg(unix)]
fn raise_fd_limit() -> Option<usize> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let lim = getrlimit(Resource::Nofile);
    let current = lim.current?;
    // An unlimited hard limit cannot be the soft one for files: the kernel's nr_open is.
    let hard = lim.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let mut effective = current;
    if let Some(hard) = hard.filter(|h| *h > current) {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: lim.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => effective = hard,
            Err(e) => {
                tracing::warn!(error = %e, current, hard, "file handles: raising the soft limit failed")
            }
        }
    }
    usize::try_from(effective).ok()
}

#[cfg(not(unix))]
fn raise_fd_limit() -> Option<usize> {
    None
}

/// SIGTERM and SIGINT (Ctrl-C), listened for from the moment they are installed: a
/// signal that arrives before anyone waits is kept, not acted on by the default handler.
struct StopSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for {name}");
                    None
                }
            };
            Self {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                int: listen(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Until a stop signal arrives (one that arrived earlier returns at once).
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = one(&mut self.term) => {}
                () = one(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The host other gateways reach this one at: `cluster.advertise_host` if set, else
/// the listener's address, else (a listener on every interface) the machine's name.
fn advertised_host(configured: &Option<String>, bound: std::net::IpAddr) -> String {
    if let Some(h) = configured {
        return h.clone();
    }
    if !bound.is_unspecified() {
        return match bound {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".to_owned())
}
