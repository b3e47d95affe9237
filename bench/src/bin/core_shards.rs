//! The CPU cost of the sharded core against the one-shard core, in one process (issue
//! 16's scaling evidence, the in-process part): the same publisher (batches of 20, 8 in
//! flight, 128-byte bodies) through `Broker::publish_submit` to
//!
//! - `1q`: one queue;
//! - `fanout8`: 8 queues (with 8 shards: one per shard, so each message is stored in
//!   its home shard and forwarded to the 7 others, each applying it once);
//!
//! on a broker of 1 shard (`local`) and of 8 shards (`sharded`), on the in-memory store
//! and on RocksDB (the default settings: every batch synced). Reports, per row, the
//! median over `--rounds` of messages per second and the process's CPU time per
//! message (user + system: publisher and broker share the process, the publisher's
//! part is the same in every row), and each sharded row's ratio to its local row.
//!
//! `cargo run --release -p mqgate-bench --bin core_shards -- --messages 20000 --rounds 3`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use mqgate_core::shard::one_name_per_shard;
use mqgate_core::{Broker, CoreConfig, Outgoing, PublishBatch, SystemClock};
use mqgate_store::{MemoryStore, Message, RocksConfig, RocksStore, Store, TopicName};

#[derive(Parser, Debug)]
struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Runs per row (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only the rows whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

const SHARDS: u16 = 8;

fn stores(shards: u16, rocks: bool, dir: &std::path::Path) -> Vec<Arc<dyn Store>> {
    (0..shards)
        .map(|s| {
            let base = u64::from(s) << 44;
            let store: Arc<dyn Store> = if rocks {
                let mut c = RocksConfig::new(dir.join(format!("s{s:02}")));
                c.id_base = base;
                Arc::new(RocksStore::open(c).expect("open rocks"))
            } else {
                Arc::new(MemoryStore::new().with_id_base(base))
            };
            store
        })
        .collect()
}

/// One queue per shard of an 8-shard broker.
fn queues() -> Vec<TopicName> {
    one_name_per_shard("bench", SHARDS)
        .into_iter()
        .map(|n| TopicName::new(n).expect("valid"))
        .collect()
}

/// Messages per second and CPU per message of one run.
async fn run(shards: u16, rocks: bool, fanout: bool, n: usize) -> (f64, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start_sharded(
        stores(shards, rocks, dir.path()),
        CoreConfig::default(),
        Arc::new(SystemClock),
    )
    .await
    .expect("start");
    let all = queues();
    let to: Vec<TopicName> = if fanout {
        all.clone()
    } else {
        all[..1].to_vec()
    };
    for q in &to {
        broker.create_topic(q, Some(1)).await.expect("topic");
    }
    let body = Bytes::from(vec![b'x'; 128]);
    let mut pipe = broker.publish_pipeline::<()>(8);
    let (t0, c0) = (Instant::now(), mqgate_bench::self_cpu());
    let mut sent = 0;
    while sent < n || !pipe.is_empty() {
        if sent < n && !pipe.must_drain() {
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
    // Every destination has every message (forwarding included).
    for q in &to {
        let queue = mqgate_store::QueueRef::new(q.clone(), 0);
        while broker.queue_range(&queue).expect("range").next.0 < n as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let (wall, used) = (t0.elapsed(), mqgate_bench::self_cpu() - c0);
    broker.shutdown().await;
    (n as f64 / wall.as_secs_f64(), used / n as u32)
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    println!("| row | msg/s | CPU/msg | sharded ÷ local (CPU/msg) |\n|---|---|---|---|");
    for rocks in [false, true] {
        for fanout in [false, true] {
            let mut local_cpu = Duration::ZERO;
            for shards in [1, SHARDS] {
                let name = format!(
                    "{} {} {}",
                    if rocks { "rocks" } else { "memory" },
                    if shards == 1 { "local" } else { "sharded" },
                    if fanout { "fanout8" } else { "1q" }
                );
                if args
                    .only
                    .as_ref()
                    .is_some_and(|o| !name.contains(o.as_str()))
                {
                    continue;
                }
                let mut rates = Vec::new();
                let mut cpus = Vec::new();
                for _ in 0..args.rounds.max(1) {
                    let (rate, per) = run(shards, rocks, fanout, args.messages).await;
                    rates.push(rate);
                    cpus.push(per);
                }
                let (rate, per) = (median(rates), median(cpus));
                let ratio = if shards == 1 {
                    local_cpu = per;
                    "1".to_owned()
                } else if local_cpu.is_zero() {
                    "-".to_owned()
                } else {
                    format!("{:.2}", per.as_secs_f64() / local_cpu.as_secs_f64())
                };
                println!(
                    "| {name} | {:.0} | {:.1} µs | {ratio} |",
                    rate,
                    per.as_secs_f64() * 1e6
                );
            }
        }
    }
}
