//! Soak fill: append many small messages into a [`RocksStore`] and watch throughput and
//! memory over time. Not run in CI.
//!
//! ```text
//! cargo run --release -p mqgate-store --example soak_fill -- \
//!     --messages 10000000 --path /tmp/soak
//! ```
//!
//! Appends `--messages` messages of `--body` bytes (default 128) into a topic with 8
//! queues, in batches of 256 from 4 concurrent tasks, and every 1,000,000 messages
//! prints the count so far, the rate over the last million and the process RSS
//! (`VmRSS` from `/proc/self/status`). At the end prints the overall rate.
//!
//! Without `--path` the data goes to a fresh folder under /tmp, removed at the end
//! (pass `--keep` to keep it); a folder given with `--path` is always kept (and may
//! already hold data: the run appends to it). `--periodic-ms N` uses
//! `FsyncPolicy::Periodic` instead of the default fsync on every batch.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqgate_store::{
    FsyncPolicy, Message, QueueRef, RocksConfig, RocksStore, Store, TopicName, WriteBatch,
};
use parking_lot::Mutex;

const QUEUES: u32 = 8;
const TASKS: u64 = 4;
const BATCH: u64 = 256;
const REPORT_EVERY: u64 = 1_000_000;

struct Args {
    messages: u64,
    path: Option<PathBuf>,
    body: usize,
    periodic_ms: Option<u64>,
    keep: bool,
}

const USAGE: &str = "usage: soak_fill [--messages N] [--path DIR] [--body BYTES] \
                     [--periodic-ms MS] [--keep]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        messages: 10_000_000,
        path: None,
        body: 128,
        periodic_ms: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--messages" | "-n" => {
                let v = value("--messages")?.replace('_', "");
                args.messages = v.parse().map_err(|e| format!("--messages {v:?}: {e}"))?;
            }
            "--path" => args.path = Some(PathBuf::from(value("--path")?)),
            "--body" => {
                let v = value("--body")?;
                args.body = v.parse().map_err(|e| format!("--body {v:?}: {e}"))?;
            }
            "--periodic-ms" => {
                let v = value("--periodic-ms")?;
                args.periodic_ms =
                    Some(v.parse().map_err(|e| format!("--periodic-ms {v:?}: {e}"))?);
            }
            "--keep" => args.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

/// The process's resident set size, as `/proc/self/status` reports it.
fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l["VmRSS:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn rate(messages: u64, took: Duration) -> f64 {
    messages as f64 / took.as_secs_f64().max(1e-9)
}

struct Progress {
    /// Messages acknowledged.
    done: AtomicU64,
    /// When the last million was crossed.
    last: Mutex<Instant>,
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak_fill: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let (path, temporary) = match &args.path {
        Some(p) => (p.clone(), false),
        None => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            (
                std::env::temp_dir().join(format!("mqgate-soak-{}-{nanos}", std::process::id())),
                true,
            )
        }
    };
    let mut config = RocksConfig::new(&path);
    if let Some(ms) = args.periodic_ms {
        config.fsync = FsyncPolicy::Periodic {
            interval: Duration::from_millis(ms),
        };
    }
    println!(
        "soak_fill: {} messages of {} B into {} ({} queues, batches of {BATCH}, {TASKS} tasks, fsync {:?})",
        args.messages,
        args.body,
        path.display(),
        QUEUES,
        config.fsync
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let total = args.messages;
    let body = Bytes::from(vec![0x5Au8; args.body]);
    let took = rt.block_on(async {
        let store = Arc::new(RocksStore::open(config).expect("open store"));
        let topic = TopicName::new("soak").expect("topic name");
        store
            .create_topic(&topic, QUEUES)
            .await
            .expect("create topic");

        let claimed = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let progress = Arc::new(Progress {
            done: AtomicU64::new(0),
            last: Mutex::new(start),
        });
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let (store, topic, body) = (Arc::clone(&store), topic.clone(), body.clone());
            let (claimed, progress) = (Arc::clone(&claimed), Arc::clone(&progress));
            tasks.push(tokio::spawn(async move {
                let mut round = 0u64;
                loop {
                    let from = claimed.fetch_add(BATCH, Ordering::Relaxed);
                    if from >= total {
                        break;
                    }
                    let n = BATCH.min(total - from);
                    let mut batch = WriteBatch::new();
                    batch.ops.reserve(n as usize);
                    for i in 0..n {
                        // Spread every batch over the queues, each task from its own start.
                        let q = ((task + round + i) % u64::from(QUEUES)) as u32;
                        batch.append(
                            Message::new(topic.clone(), body.clone()),
                            vec![QueueRef::new(topic.clone(), q)],
                        );
                    }
                    store.write(batch).await.expect("append");
                    round += 1;

                    let before = progress.done.fetch_add(n, Ordering::AcqRel);
                    let after = before + n;
                    if before / REPORT_EVERY != after / REPORT_EVERY {
                        let now = Instant::now();
                        let since = {
                            let mut last = progress.last.lock();
                            std::mem::replace(&mut *last, now)
                        };
                        println!(
                            "{:>12} messages  {:>10.0} msg/s over the last million  rss {}",
                            after / REPORT_EVERY * REPORT_EVERY,
                            rate(REPORT_EVERY, now - since),
                            rss()
                        );
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer task");
        }
        let took = start.elapsed();
        store.flush().await.expect("flush");
        let stats = store.stats();
        println!(
            "store: {} messages, {} log bytes, {} topics",
            stats.messages, stats.log_bytes, stats.topics
        );
        took
    });
    println!(
        "done: {total} messages in {:.1} s, {:.0} msg/s overall, rss {}",
        took.as_secs_f64(),
        rate(total, took),
        rss()
    );
    if temporary && !args.keep {
        match std::fs::remove_dir_all(&path) {
            Ok(()) => println!("removed {}", path.display()),
            Err(e) => eprintln!("could not remove {}: {e}", path.display()),
        }
    } else {
        println!("data kept in {}", path.display());
    }
}
