//! Delay benchmark: N delayed messages pending in RocksStore, released on time?
//!
//! ```text
//! cargo build --release --workspace --examples
//! ./target/release/examples/delay_bench --messages 1000000 --spread-secs 60
//! ```
//!
//! Publishes `--messages` delayed messages (128 B) due uniformly over `--spread-secs`
//! seconds starting `--lead-secs` after the publishing starts, from 64 concurrent
//! publishers, then consumes them with one shared group and reports, from each message's
//! due time (`deliver_at`) to its arrival at the consumer: p50, p99, p99.9 and max
//! lateness; that every message arrived exactly once; and the process RSS while they were
//! pending and during the release.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqgate_core::{
    Broker, ConsumeMode, CoreConfig, Delay, GroupSpec, MemberOptions, Publish, StartPosition,
    SystemClock,
};
use mqgate_store::{now_millis, GroupName, Message, RocksConfig, RocksStore, Store, TopicName};

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].parse().expect("a number"))
        .unwrap_or(default)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = arg("--messages", 1_000_000);
    let spread = arg("--spread-secs", 60) * 1000;
    let lead = arg("--lead-secs", 20) * 1000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(RocksStore::open(RocksConfig::new(dir.path().join("data"))).expect("open"));
    let broker = Broker::start(store, CoreConfig::default(), Arc::new(SystemClock))
        .await
        .expect("start");
    let topic = TopicName::new("delayed").unwrap();
    broker.create_topic(&topic, Some(8)).await.unwrap();
    let mut spec = GroupSpec::new(
        GroupName::new("bench").unwrap(),
        vec![topic.clone()],
        ConsumeMode::Shared,
    );
    spec.start = StartPosition::First;

    println!(
        "delay_bench: {n} messages of 128 B, due over {} s starting {} s from now",
        spread / 1000,
        lead / 1000
    );
    println!("rss at start: {} kB", rss_kb());
    let start = now_millis();
    let first_due = start + lead;
    let published = Arc::new(AtomicU64::new(0));
    let tasks = 64u64;
    let mut handles = Vec::new();
    let t0 = Instant::now();
    for t in 0..tasks {
        let broker = broker.clone();
        let topic = topic.clone();
        let published = Arc::clone(&published);
        handles.push(tokio::spawn(async move {
            let mut i = t;
            while i < n {
                let due = first_due + i * spread / n;
                let mut m = Message::new(topic.clone(), Bytes::from(vec![b'x'; 128]));
                m.keys = vec![i.to_string()];
                let mut p = Publish::new(m);
                p.delay = Some(Delay::At(due));
                broker.publish(p).await.expect("publish");
                published.fetch_add(1, Ordering::Relaxed);
                i += tasks;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let pub_secs = t0.elapsed().as_secs_f64();
    println!(
        "published {n} delayed in {pub_secs:.1} s ({:.0} msg/s); pending {}; rss {} kB",
        n as f64 / pub_secs,
        broker.delayed_pending(),
        rss_kb()
    );
    if now_millis() > first_due {
        println!("WARNING: publishing took longer than the lead; the first messages were due before it ended");
    }

    let mut consumer = broker
        .subscribe(spec, MemberOptions::new("c", 2048))
        .await
        .unwrap();
    let mut lateness = Vec::with_capacity(n as usize);
    let mut seen = vec![false; n as usize];
    let mut dups = 0u64;
    let mut max_rss = 0;
    let mut last_report = Instant::now();
    while (lateness.len() as u64) < n {
        let d = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Ok(Some(d)) => d,
            _ => break,
        };
        let now = now_millis();
        let due = d
            .message
            .message
            .deliver_at
            .expect("released messages carry deliver_at");
        lateness.push(now.saturating_sub(due));
        let i: usize = d.message.message.keys[0].parse().unwrap();
        if std::mem::replace(&mut seen[i], true) {
            dups += 1;
        }
        consumer.ack(d.ack_token());
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            let rss = rss_kb();
            max_rss = max_rss.max(rss);
            println!(
                "  released {:>8}, pending {:>8}, rss {rss} kB",
                lateness.len(),
                broker.delayed_pending()
            );
        }
    }
    let received = lateness.len() as u64;
    lateness.sort_unstable();
    println!(
        "received {received} of {n}, duplicates {dups}, missing {}",
        seen.iter().filter(|s| !**s).count()
    );
    println!(
        "lateness ms: p50 {} p99 {} p99.9 {} max {}",
        percentile(&lateness, 0.50),
        percentile(&lateness, 0.99),
        percentile(&lateness, 0.999),
        lateness.last().copied().unwrap_or(0)
    );
    println!("max rss during release: {} kB", max_rss.max(rss_kb()));
    broker.shutdown().await;
}
