//! Issue 16's scaling evidence on one machine: a cluster of 1, 2 and 3 gateways (in
//! this process, each with its own NATS connection, store views and shard manager) over
//! a 3-node NATS JetStream cluster on loopback (real `nats-server` processes, R3
//! streams), 8 shards placed by rendezvous. The same clients every time: `--publishers`
//! publishers spread evenly over the gateways (publisher k on gateway k mod N), each
//! sending `--messages` messages of 128 bytes in batches of 20, 8 batches in flight,
//! through `Broker::publish_submit`:
//!
//! - `one`: each batch to one topic, the topics of the 8 shards in turn: a batch for a
//!   shard owned by another gateway goes over the publish relay (a fraction (N-1)/N);
//! - `fanout8`: each message to 8 topics in 8 shards: stored in a home shard owned by
//!   the publisher's gateway, forwarded to the 7 others (over the forward relay when
//!   owned elsewhere).
//!
//! Per row, medians over `--rounds`: messages per second, and CPU time per message of
//! this process (gateways and publishers) and of the 3 NATS servers (from /proc).
//! CPU is net of what the idle cluster spends in the same time (measured for 2 s
//! before each run). A `one-local` row (N = 2, each publisher only to topics its own
//! gateway owns) isolates the standby views' cost. Then the model of ARCHITECTURE.md
//! ("Scaling model"), fitted on N = 1 and 2, and its prediction for N = 3 beside the
//! measurement.
//!
//! `cargo run --release -p mqgate-bench --bin cluster_scale -- --messages 3000 --rounds 3`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use mqgate_cluster::gateway::Gateway;
use mqgate_cluster::manager::ManagerConfig;
use mqgate_cluster::rendezvous::assignment;
use mqgate_core::shard::one_name_per_shard;
use mqgate_core::{Broker, CoreConfig, Outgoing, PublishBatch, SystemClock};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::jetstream::{JetStreamConfig, Nats};
use mqgate_store::{Message, RocksConfig, TopicName};

#[derive(Parser, Debug)]
struct Args {
    /// Messages per publisher per run.
    #[arg(long, default_value_t = 3000)]
    messages: usize,
    /// Publishers in all.
    #[arg(long, default_value_t = 3)]
    publishers: usize,
    /// Runs per row (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Gateway counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    gateways: Vec<usize>,
    /// Only the rows whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

const SHARDS: u16 = 8;
const BODY: usize = 128;

async fn start_gateway(
    cluster: &NatsCluster,
    stream: &str,
    name: &str,
    dir: &std::path::Path,
) -> Gateway {
    let mut cfg = JetStreamConfig::new(cluster.urls(), name, RocksConfig::new(dir.join(name)));
    cfg.stream = stream.into();
    cfg.lease_ttl = Duration::from_secs(3);
    let nats = Nats::connect(cfg).await.expect("connect to NATS");
    Gateway::start(
        nats,
        ManagerConfig {
            shards: SHARDS,
            node_ttl: Duration::from_millis(1500),
            tick: Duration::from_millis(150),
            move_lag: 100,
            run: 0,
        },
        CoreConfig::default(),
        Arc::new(SystemClock),
        Duration::from_secs(5),
    )
    .await
    .expect("start a gateway")
}

/// Wait until every shard is owned where rendezvous puts it.
async fn wait_balanced(gws: &[(String, Gateway)]) {
    let names: Vec<&str> = gws.iter().map(|(n, _)| n.as_str()).collect();
    let want = assignment(&names, SHARDS);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = (0..SHARDS).all(|s| {
            let holders: Vec<&str> = gws
                .iter()
                .filter(|(_, g)| g.broker().owned_shards().contains(&s))
                .map(|(n, _)| n.as_str())
                .collect();
            holders.len() == 1 && Some(holders[0]) == want[usize::from(s)].0
        });
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "shards not placed within 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn owner(gws: &[(String, Gateway)], s: u16) -> &Broker {
    gws.iter()
        .map(|(_, g)| g.broker())
        .find(|b| b.owned_shards().contains(&s))
        .expect("an owner")
}

/// What a run's publishers send.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Each batch to one topic, the 8 shards' topics in turn.
    One,
    /// The same, only to the topics of shards the publisher's gateway owns (nothing
    /// relayed: isolates what the standby views cost).
    OneLocal,
    /// Each message to the 8 topics.
    Fanout8,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::One => "one",
            Kind::OneLocal => "one-local",
            Kind::Fanout8 => "fanout8",
        }
    }
}

async fn publisher(b: Broker, k: usize, topics: Vec<TopicName>, fanout: bool, n: usize) {
    let body = Bytes::from(vec![b'x'; BODY]);
    let mut pipe = b.publish_pipeline::<()>(8);
    let mut sent = 0;
    let mut batches = k;
    while sent < n || !pipe.is_empty() {
        if sent < n && !pipe.must_drain() {
            let to: Vec<TopicName> = if fanout {
                topics.clone()
            } else {
                vec![topics[batches % topics.len()].clone()]
            };
            batches += 1;
            let mut batch = PublishBatch::new();
            for _ in 0..20.min(n - sent) {
                batch.push(Outgoing::routed(
                    Message::new(to[0].clone(), body.clone()),
                    to.clone(),
                ));
                sent += 1;
            }
            pipe.submit(batch, ()).await.expect("submit");
            continue;
        }
        pipe.next().await.1.expect("stored");
    }
}

/// One run: messages per second, CPU per message of this process and of NATS (each
/// less what the idle cluster of that many gateways spends in the same time: lease
/// renewals, status reports, heartbeats).
async fn run(
    cluster: &NatsCluster,
    n: usize,
    kind: Kind,
    round: usize,
    args: &Args,
) -> (f64, Duration, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let stream = format!("scale{n}{}{round}", kind.name().replace('-', ""));
    let mut gws = Vec::new();
    for i in 0..n {
        let name = format!("g{i}");
        let g = start_gateway(cluster, &stream, &name, dir.path()).await;
        gws.push((name, g));
    }
    wait_balanced(&gws).await;
    let topics: Vec<TopicName> = one_name_per_shard("t", SHARDS)
        .into_iter()
        .map(|t| TopicName::new(t).expect("valid"))
        .collect();
    for (s, t) in topics.iter().enumerate() {
        owner(&gws, s as u16)
            .create_topic(t, Some(1))
            .await
            .expect("topic");
    }
    // The idle cluster's own spending, per second.
    let idle = Duration::from_secs(2);
    let (c0, nc0) = (
        mqgate_bench::self_cpu(),
        mqgate_bench::children_cpu("nats-server"),
    );
    tokio::time::sleep(idle).await;
    let idle_self = (mqgate_bench::self_cpu() - c0).as_secs_f64() / idle.as_secs_f64();
    let idle_nats =
        (mqgate_bench::children_cpu("nats-server") - nc0).as_secs_f64() / idle.as_secs_f64();

    let total = args.publishers * args.messages;
    let (t0, c0, nc0) = (
        Instant::now(),
        mqgate_bench::self_cpu(),
        mqgate_bench::children_cpu("nats-server"),
    );
    let mut tasks = Vec::new();
    for k in 0..args.publishers {
        let g = k % n;
        let b = gws[g].1.broker().clone();
        let mine: Vec<TopicName> = match kind {
            Kind::OneLocal => {
                let owned = b.owned_shards();
                topics
                    .iter()
                    .enumerate()
                    .filter(|(s, _)| owned.contains(&(*s as u16)))
                    .map(|(_, t)| t.clone())
                    .collect()
            }
            _ => topics.clone(),
        };
        tasks.push(tokio::spawn(publisher(
            b,
            k,
            mine,
            kind == Kind::Fanout8,
            args.messages,
        )));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    // Every destination has its messages (forwarding included).
    if kind == Kind::Fanout8 {
        for (s, t) in topics.iter().enumerate() {
            let b = owner(&gws, s as u16);
            let q = mqgate_store::QueueRef::new(t.clone(), 0);
            while b.queue_range(&q).expect("range").next.0 < total as u64 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let wall = t0.elapsed();
    let secs = wall.as_secs_f64();
    let net = |used: Duration, idle: f64| {
        Duration::from_secs_f64((used.as_secs_f64() - idle * secs).max(0.0) / total as f64)
    };
    let (c, nc) = (
        net(mqgate_bench::self_cpu() - c0, idle_self),
        net(mqgate_bench::children_cpu("nats-server") - nc0, idle_nats),
    );
    for (_, g) in gws {
        g.abort();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    (total as f64 / secs, c, nc)
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let cluster = NatsCluster::start(3);
    println!(
        "| row | msg/s | gateways' CPU/msg | NATS CPU/msg | total CPU/msg |\n|---|---|---|---|---|"
    );
    let rows: Vec<(Kind, usize)> = [Kind::One, Kind::OneLocal, Kind::Fanout8]
        .into_iter()
        .flat_map(|k| args.gateways.iter().map(move |n| (k, *n)))
        .filter(|(k, n)| *k != Kind::OneLocal || *n == 2)
        .collect();
    let mut measured: Vec<(Kind, usize, f64, f64)> = Vec::new();
    for (kind, n) in rows {
        let name = format!("{} N={n}", kind.name());
        if args
            .only
            .as_ref()
            .is_some_and(|o| !name.contains(o.as_str()))
        {
            continue;
        }
        let mut rates = Vec::new();
        let mut cpus = Vec::new();
        let mut ncpus = Vec::new();
        for round in 0..args.rounds.max(1) {
            let (r, c, nc) = run(&cluster, n, kind, round, &args).await;
            rates.push(r);
            cpus.push(c);
            ncpus.push(nc);
        }
        let (r, c, nc) = (median(rates), median(cpus), median(ncpus));
        println!(
            "| {name} | {r:.0} | {:.1} µs | {:.1} µs | {:.1} µs |",
            us(c),
            us(nc),
            us(c + nc)
        );
        measured.push((kind, n, r, us(c + nc)));
    }
    // The model (ARCHITECTURE.md, "Scaling model"): CPU per message
    //   c(N) = c1 + s(N)·k_s + p(N)·k_x
    // with s(N) = min(N, 2) - 1 (a warm standby view replays every record once there
    // is a second gateway), p(N) = (N-1)/N (the share of work that crosses gateways
    // when clients and shards are spread evenly); k_s from one-local N=2 (nothing
    // relayed), scaled by each kind's c1 for the fan-out; k_x from N = 2. Throughput is
    // CPU-bound on the shared cores: X(N) = X(1)·c1/c(N).
    let at = |k: Kind, n: usize| {
        measured
            .iter()
            .find(|m| m.0 == k && m.1 == n)
            .map(|m| (m.2, m.3))
    };
    let standby = match (at(Kind::One, 1), at(Kind::OneLocal, 2)) {
        (Some((_, c1)), Some((_, cl))) => Some((cl - c1) / c1),
        _ => None,
    };
    for kind in [Kind::One, Kind::Fanout8] {
        let (Some((x1, c1)), Some((_, c2)), Some(share)) = (at(kind, 1), at(kind, 2), standby)
        else {
            continue;
        };
        let k_s = share * c1;
        let k_x = (c2 - c1 - k_s) / 0.5;
        println!(
            "model {}: c1 {c1:.1} µs, k_s {k_s:.1} µs ({:.0}% of c1), k_x {k_x:.1} µs",
            kind.name(),
            share * 100.0
        );
        for &(k, n, x, c) in &measured {
            if k != kind {
                continue;
            }
            let s = if n >= 2 { 1.0 } else { 0.0 };
            let p = (n as f64 - 1.0) / n as f64;
            let cm = c1 + s * k_s + p * k_x;
            let xm = x1 * c1 / cm;
            println!(
                "model {} N={n}: CPU/msg {cm:.1} µs (measured {c:.1}, {:+.0}%), msg/s {xm:.0} (measured {x:.0}, {:+.0}%)",
                kind.name(),
                (c / cm - 1.0) * 100.0,
                (x / xm - 1.0) * 100.0
            );
        }
    }
}
