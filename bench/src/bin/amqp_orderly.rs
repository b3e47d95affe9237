//! Per-key strict order with competing consumers (an mqgate orderly queue,
//! `x-orderly: true`): a backlog of `--messages` over `--keys` ordering keys
//! (`x-sharding-key`), drained by 1, 2, 4 ... consumers (`--consumers 1,2,4`), each
//! acknowledging every message on its own after `--work-us` of simulated work (a sleep:
//! an I/O-bound handler). Prints per consumer count: the drain rate, the order
//! violations per key (a message not the key's next, or two of a key at once: must be
//! 0), and the broker's CPU time per message. Throughput should grow with consumers.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ./target/release/mqgate serve --data /tmp/orderly-data --amqp 127.0.0.1:25672 --mqtt 127.0.0.1:21883 &
//! ./target/release/amqp_orderly --url amqp://guest:guest@127.0.0.1:25672/%2f --broker-pid $! \
//!     --messages 100000 --keys 1000 --consumers 1,2,4 --work-us 1000
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mqgate_bench::process_cpu;

#[derive(Debug, Parser)]
struct Args {
    /// The broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// The broker's process id, for its CPU time.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Messages per run.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Ordering keys.
    #[arg(long, default_value_t = 1_000)]
    keys: u64,
    /// The queue's logs (`x-queues`).
    #[arg(long, default_value_t = 16)]
    queues: i32,
    /// Consumer counts to run, one run each.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    consumers: Vec<usize>,
    /// Simulated work per message, in microseconds (a sleep).
    #[arg(long, default_value_t = 1_000)]
    work_us: u64,
    /// Prefetch of each consumer.
    #[arg(long, default_value_t = 100)]
    prefetch: u16,
}

#[derive(Default)]
struct Log {
    last: HashMap<u64, u64>,
    busy: HashSet<u64>,
    done: u64,
    violations: u64,
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}

async fn run(
    a: &Args,
    consumers: usize,
) -> Result<(f64, u64, Option<f64>), Box<dyn std::error::Error + Send + Sync>> {
    let conn = Connection::connect(&a.url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let q = format!("orderly-bench-{}-{consumers}", std::process::id());
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await?;
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[
            ("x-orderly", AMQPValue::Boolean(true)),
            ("x-queues", AMQPValue::LongInt(a.queues)),
        ]),
    )
    .await?;
    // The backlog: key i % keys, each key's sequence numbers in publish order.
    let mut pending = Vec::with_capacity(1_000);
    for i in 0..a.messages {
        let key = i % a.keys;
        let seq = i / a.keys;
        let confirm = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                format!("{key}:{seq}").as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(table(&[(
                        "x-sharding-key",
                        AMQPValue::LongString(LongString::from(format!("k{key}"))),
                    )])),
            )
            .await?;
        pending.push(confirm);
        if pending.len() == 1_000 {
            for c in pending.drain(..) {
                c.await?;
            }
        }
    }
    for c in pending {
        c.await?;
    }
    let log = Arc::new(Mutex::new(Log::default()));
    let cpu0 = a.broker_pid.and_then(process_cpu);
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..consumers {
        let cconn = Connection::connect(&a.url, ConnectionProperties::default()).await?;
        let cch = cconn.create_channel().await?;
        cch.basic_qos(a.prefetch, BasicQosOptions::default())
            .await?;
        let mut c = cch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        conns.push(cconn);
        let log = Arc::clone(&log);
        let n = a.messages;
        let work = Duration::from_micros(a.work_us);
        tasks.push(tokio::spawn(async move {
            loop {
                let d = match tokio::time::timeout(Duration::from_millis(500), c.next()).await {
                    Ok(Some(Ok(d))) => d,
                    _ => {
                        if log.lock().unwrap().done >= n {
                            return;
                        }
                        continue;
                    }
                };
                let text = String::from_utf8_lossy(&d.data).into_owned();
                let (k, s) = text.split_once(':').expect("key:seq");
                let (key, seq): (u64, u64) = (k.parse().unwrap(), s.parse().unwrap());
                {
                    let mut l = log.lock().unwrap();
                    let want = l.last.get(&key).map_or(0, |x| x + 1);
                    if !l.busy.insert(key) || seq != want {
                        l.violations += 1;
                    }
                }
                if !work.is_zero() {
                    tokio::time::sleep(work).await;
                }
                {
                    let mut l = log.lock().unwrap();
                    l.busy.remove(&key);
                    l.last.insert(key, seq);
                    l.done += 1;
                }
                d.ack(BasicAckOptions::default()).await.expect("ack");
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = match (cpu0, a.broker_pid.and_then(process_cpu)) {
        (Some(a0), Some(a1)) => Some((a1 - a0).as_secs_f64() * 1e6 / a.messages as f64),
        _ => None,
    };
    let violations = log.lock().unwrap().violations;
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await?;
    for c in conns {
        c.close(200, "done".into()).await.ok();
    }
    conn.close(200, "done".into()).await.ok();
    Ok((a.messages as f64 / secs, violations, cpu))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let a = Args::parse();
    println!(
        "orderly queue: {} messages, {} keys, {} logs, {} µs of work per message",
        a.messages, a.keys, a.queues, a.work_us
    );
    println!("consumers | drained msg/s | vs 1 consumer | order violations | broker CPU µs/msg");
    let mut base = None;
    for &c in &a.consumers {
        let (rate, violations, cpu) = run(&a, c).await?;
        let b = *base.get_or_insert(rate);
        println!(
            "{c:>9} | {rate:>13.0} | {:>13.2} | {violations:>16} | {}",
            rate / b,
            cpu.map_or("-".into(), |c| format!("{c:.1}"))
        );
    }
    Ok(())
}
