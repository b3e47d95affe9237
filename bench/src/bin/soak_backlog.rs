//! Backlog soak through AMQP (not run in CI): publish `--messages` persistent messages
//! into a durable queue with no consumer, with publisher confirms, reporting the publish
//! rate and the broker's RSS every `--report` messages; then drain the whole backlog from
//! its first message with one consumer (manual acks, multiple=true) and report the drain
//! rate. At the end it compares the rate of the last reporting interval with the first,
//! the peak RSS, and the drain rate with the publish rate.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ./target/release/mqgate serve --data /tmp/soak-data --amqp 127.0.0.1:35672 &
//! ./target/release/soak_backlog --url amqp://guest:guest@127.0.0.1:35672/%2f \
//!     --broker-pid $! --messages 100000000
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mqgate_bench::process_rss;

#[derive(Debug, Parser)]
struct Args {
    /// The broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// The broker's process id, for its memory.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Messages to publish before draining.
    #[arg(long, default_value_t = 100_000_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Report every this many messages.
    #[arg(long, default_value_t = 1_000_000)]
    report: u64,
    /// Unconfirmed publishes in flight.
    #[arg(long, default_value_t = 2000)]
    window: usize,
    /// Publishes handed to lapin at once.
    #[arg(long, default_value_t = 64)]
    pipeline: usize,
    /// The queue (kept afterwards only with --keep).
    #[arg(long, default_value = "soak.backlog")]
    queue: String,
    /// Keep the queue at the end.
    #[arg(long)]
    keep: bool,
}

fn mib(b: Option<u64>) -> String {
    b.map_or("?".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0))
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let conn = Connection::connect(&a.url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        a.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.queue_purge(a.queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let props = BasicProperties::default().with_delivery_mode(2);
    let body = vec![b'x'; a.size.max(8)];
    let mut pending = VecDeque::new();
    let start = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut rates = Vec::new();
    let mut peak_rss = 0u64;
    let mut seq = 0u64;
    println!("| published | rate (msg/s) | broker RSS |");
    println!("|---:|---:|---:|");
    while seq < a.messages {
        let n = (a.pipeline as u64).min(a.messages - seq);
        let publishes = (0..n).map(|_| {
            ch.basic_publish(
                "".into(),
                a.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
        });
        for c in futures_util::future::join_all(publishes).await {
            pending.push_back(c.expect("publish"));
        }
        while pending.len() > a.window {
            pending.pop_front().unwrap().await.expect("confirm");
        }
        let before = seq;
        seq += n;
        if seq / a.report != before / a.report || seq == a.messages {
            let now = Instant::now();
            let rate = (seq - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
            let rss = a.broker_pid.and_then(process_rss);
            peak_rss = peak_rss.max(rss.unwrap_or(0));
            println!("| {seq} | {rate:.0} | {} |", mib(rss));
            rates.push(rate);
            last = (now, seq);
        }
    }
    for c in pending {
        c.await.expect("confirm");
    }
    let publish_rate = a.messages as f64 / start.elapsed().as_secs_f64();
    println!(
        "published {} in {:.0} s: {publish_rate:.0} msg/s",
        a.messages,
        start.elapsed().as_secs_f64()
    );

    // Drain from the first message.
    let cch = conn.create_channel().await.expect("channel");
    cch.basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = cch
        .basic_consume(
            a.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let drain_start = Instant::now();
    let mut got = 0u64;
    while got < a.messages {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await
        else {
            break;
        };
        got += 1;
        if got.is_multiple_of(500) || got == a.messages {
            d.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
        if got.is_multiple_of(a.report) {
            let rss = a.broker_pid.and_then(process_rss);
            peak_rss = peak_rss.max(rss.unwrap_or(0));
            println!(
                "drained {got}: {:.0} msg/s so far, broker RSS {}",
                got as f64 / drain_start.elapsed().as_secs_f64(),
                mib(rss)
            );
        }
    }
    let drain_rate = got as f64 / drain_start.elapsed().as_secs_f64();
    let (first, end) = (
        rates.first().copied().unwrap_or(0.0),
        rates.last().copied().unwrap_or(0.0),
    );
    println!(
        "RESULT published={} publish_rate={publish_rate:.0} first_rate={first:.0} end_rate={end:.0} end_over_first={:.2} drained={got} drain_rate={drain_rate:.0} drain_over_publish={:.2} peak_rss_mib={:.0}",
        a.messages,
        end / first.max(1.0),
        drain_rate / publish_rate.max(1.0),
        peak_rss as f64 / 1048576.0
    );
    if !a.keep {
        let _ = cch
            .queue_delete(a.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
}
