//! One AMQP publisher → one consumer through one queue, with lapin, against any broker:
//! throughput, end-to-end latency (timestamps in the payload), loss and duplicates
//! (sequence numbers), and the broker's CPU time per message.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ./target/release/mqgate serve --memory --amqp 127.0.0.1:25672 --mqtt 127.0.0.1:21883 &
//! ./target/release/amqp_pubsub --url amqp://guest:guest@127.0.0.1:25672/%2f --broker-pid $! --durable
//! ```
//! `--durable`: durable queue, persistent messages, publisher confirms (a window of
//! `--window` unconfirmed), manual acks with prefetch `--prefetch` (acked with
//! multiple=true every `--ack-every`). Without it: transient queue, no confirms, auto-ack.
//! `--fanout N`: publish to a fanout exchange bound to N queues, one consumer (and
//! connection) each; rates and CPU are then per delivery. `--publish-only`: no consumer
//! (for `bench_sink`, which delivers nothing): the rate is of publishes (confirmed ones
//! with `--durable`).

use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mqgate_bench::{print_medians, process_cpu, stamp, Receipts, Round};

#[derive(Debug, Parser)]
struct Args {
    /// The broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// The broker's process id, for its CPU time.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Messages per round.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Durable queue, persistent messages, confirms, manual acks.
    #[arg(long)]
    durable: bool,
    /// Unconfirmed publishes allowed in flight (durable mode).
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Consumer prefetch (durable mode).
    #[arg(long, default_value_t = 100)]
    prefetch: u16,
    /// Ack with multiple=true every this many deliveries (durable mode).
    #[arg(long, default_value_t = 10)]
    ack_every: u64,
    /// Hand each ack to lapin and go on consuming, instead of awaiting it before the
    /// next delivery (durable mode): an ack has no reply in AMQP, and pika / py-amqp
    /// (Celery) write it and go on; lapin's awaited ack is a round trip through its I/O
    /// loop per message, which bounds the consumer whatever the broker.
    #[arg(long)]
    ack_nowait: bool,
    /// Fixed offered rate in messages per second (0: flat out).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Publish to a fanout exchange bound to this many queues (0: the default exchange,
    /// one queue).
    #[arg(long, default_value_t = 0)]
    fanout: usize,
    /// Publish only: no queue consumer (against a sink that delivers nothing).
    #[arg(long)]
    publish_only: bool,
    /// Publishes handed to lapin at once when flat out (each is awaited only as part
    /// of its chunk; order is kept).
    #[arg(long, default_value_t = 32)]
    pipeline: usize,
    /// Bodies of random bytes, different for every message (as most real payloads,
    /// which compress poorly), instead of zeros after the stamp.
    #[arg(long)]
    random: bool,
}

/// Consume `total` messages (or until 10 s of silence): latencies, distinct, duplicates.
async fn consume(
    mut consumer: lapin::Consumer,
    total: u64,
    manual_ack: bool,
    ack_every: u64,
    ack_nowait: bool,
) -> (Vec<Duration>, u64, u64) {
    let mut r = Receipts::new(total);
    let mut acks = futures_util::stream::FuturesUnordered::new();
    while r.got < total {
        let next = tokio::select! {
            biased;
            Some(done) = acks.next(), if !acks.is_empty() => {
                let done: lapin::Result<bool> = done;
                done.expect("ack");
                continue;
            }
            next = tokio::time::timeout(Duration::from_secs(10), consumer.next()) => next,
        };
        let Ok(Some(Ok(d))) = next else {
            break;
        };
        r.record(&d.data);
        if manual_ack && (r.got.is_multiple_of(ack_every) || r.got == total) {
            // multiple=false: with an ack for every delivery, the protocol's per-message
            // ack; every `ack_every` > 1 deliveries, one ack for all of them.
            let multiple = ack_every > 1;
            if ack_nowait {
                let acker = d.acker;
                acks.push(async move { acker.ack(BasicAckOptions { multiple }).await });
            } else {
                d.acker
                    .ack(BasicAckOptions { multiple })
                    .await
                    .expect("ack");
            }
        }
    }
    while let Some(done) = acks.next().await {
        done.expect("ack");
    }
    r.into_parts()
}

async fn round(a: &Args, n: usize) -> Round {
    let base = format!("bench.{}.{n}", std::process::id());
    let queues: Vec<String> = if a.fanout == 0 {
        vec![base.clone()]
    } else {
        (0..a.fanout).map(|i| format!("{base}.q{i}")).collect()
    };
    let exchange = if a.fanout == 0 {
        String::new()
    } else {
        format!("{base}.fx")
    };
    let pc = Connection::connect(&a.url, ConnectionProperties::default())
        .await
        .expect("connect");
    let pch = pc.create_channel().await.expect("channel");
    if a.fanout > 0 {
        pch.exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: a.durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange declare");
    }
    if a.durable {
        pch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
    }
    let mut consumers = Vec::new();
    let mut conns = Vec::new();
    for q in &queues {
        let cc = Connection::connect(&a.url, ConnectionProperties::default())
            .await
            .expect("connect");
        let cch = cc.create_channel().await.expect("channel");
        cch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: a.durable,
                auto_delete: false,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        if a.fanout > 0 {
            cch.queue_bind(
                q.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        }
        if !a.publish_only {
            if a.durable {
                cch.basic_qos(a.prefetch, BasicQosOptions::default())
                    .await
                    .expect("qos");
            }
            let consumer = cch
                .basic_consume(
                    q.as_str().into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: !a.durable,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("consume");
            consumers.push(consumer);
        }
        conns.push((cc, cch));
    }
    let total = a.messages;
    let cpu0 = a.broker_pid.and_then(process_cpu);
    let steal0 = mqgate_bench::machine_steal();
    let start = Instant::now();
    let receivers: Vec<_> = consumers
        .into_iter()
        .map(|c| tokio::spawn(consume(c, total, a.durable, a.ack_every, a.ack_nowait)))
        .collect();
    let props = BasicProperties::default().with_delivery_mode(if a.durable { 2 } else { 1 });
    let mut pending = std::collections::VecDeque::new();
    let interval = (a.rate > 0).then(|| Duration::from_secs_f64(1.0 / a.rate as f64));
    let routing_key = if a.fanout == 0 { base.as_str() } else { "" };
    // lapin answers each basic.publish only once its IO loop has written it: awaiting
    // one publish at a time makes the client the ceiling, so flat out a chunk of
    // publishes is handed over at once (in order) and awaited together.
    let chunk = if a.rate > 0 {
        1
    } else {
        a.pipeline.max(1) as u64
    };
    let mut bodies = vec![vec![0u8; a.size.max(16)]; chunk as usize];
    let pool = a.random.then(|| mqgate_bench::random_pool(a.size.max(16)));
    let mut seq = 0u64;
    while seq < total {
        if let Some(iv) = interval {
            let due = start + iv * seq as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        let n = chunk.min(total - seq);
        let publishes = bodies
            .iter_mut()
            .take(n as usize)
            .enumerate()
            .map(|(i, body)| {
                if let Some(pool) = &pool {
                    pool.fill(body, seq + i as u64);
                }
                stamp(body, seq + i as u64);
                pch.basic_publish(
                    exchange.as_str().into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    props.clone(),
                )
            });
        for c in futures_util::future::join_all(publishes).await {
            let c = c.expect("publish");
            if a.durable {
                pending.push_back(c);
            }
        }
        while pending.len() > a.window {
            pending.pop_front().unwrap().await.expect("confirm");
        }
        seq += n;
    }
    for c in pending {
        c.await.expect("confirm");
    }
    let published_in = start.elapsed();
    let (mut lat, mut got, mut dup) = (Vec::new(), 0u64, 0u64);
    for r in receivers {
        let (l, g, d) = r.await.expect("receiver");
        lat.extend(l);
        got += g;
        dup += d;
    }
    let expected = if a.publish_only {
        got = total;
        total
    } else {
        total * queues.len() as u64
    };
    let elapsed = start.elapsed();
    // Whether the consumers kept up: the rate they delivered at against the rate the
    // publisher was confirmed at (1.0: no backlog left when the publisher finished).
    let kept_up = (!a.publish_only).then(|| {
        let published = total as f64 / published_in.as_secs_f64();
        let delivered = got as f64 / elapsed.as_secs_f64() / queues.len() as f64;
        println!(
            "published {published:.0} msg/s, delivered {delivered:.0} msg/s per queue: {:.2} of it",
            delivered / published
        );
        delivered / published
    });
    let cpu = a
        .broker_pid
        .and_then(process_cpu)
        .zip(cpu0)
        .map(|(b, a)| (b - a).as_secs_f64() * 1e6 / got.max(1) as f64);
    lat.sort_unstable();
    for ((cc, cch), q) in conns.into_iter().zip(&queues) {
        let _ = cch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = cc.close(200, "bye".into()).await;
    }
    if a.fanout > 0 {
        let _ = pch
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = pc.close(200, "bye".into()).await;
    let mut round = Round::new(
        got as f64 / elapsed.as_secs_f64(),
        &lat,
        cpu,
        expected - got,
        dup,
    )
    .steal_since(steal0);
    round.kept_up = kept_up;
    round
}

fn unit(a: &Args) -> &'static str {
    if a.fanout > 0 {
        "delivery"
    } else {
        "msg"
    }
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let mut rounds = Vec::new();
    for n in 0..a.rounds {
        let r = round(&a, n).await;
        r.print(n, unit(&a));
        rounds.push(r);
    }
    print_medians(&rounds, unit(&a));
}
