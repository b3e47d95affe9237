//! MQTT publishers → subscribers with rumqttc, against any broker: throughput,
//! end-to-end latency (timestamps in the payload), loss and duplicates (sequence numbers
//! per publisher), and the broker's CPU time per delivered message.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ./target/release/mqgate serve --memory --mqtt 127.0.0.1:21883 --amqp 127.0.0.1:35672 &
//! ./target/release/mqtt_pubsub --addr 127.0.0.1:21883 --broker-pid $! --qos 1 --pairs 1
//! ```
//! `--pairs N`: N publishers, each to its own topic with its own subscriber (N→N).
//! `--fanout M`: M subscribers on one publisher's topic (1→M; `--pairs` must be 1).
//! `--publish-only`: no subscribers (for `bench_sink`): the rate is of publishes
//! acknowledged (QoS 1/2) or written (QoS 0).

use std::time::{Duration, Instant};

use clap::Parser;
use mqgate_bench::{print_medians, process_cpu, stamp, Receipts, Round};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

#[derive(Debug, Parser)]
struct Args {
    /// The broker (host:port).
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: String,
    /// The broker's process id, for its CPU time.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Messages per publisher per round.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// QoS for publishing and subscribing.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Publisher/subscriber pairs, each on its own topic.
    #[arg(long, default_value_t = 1)]
    pairs: usize,
    /// Subscribers of the (single) publisher's topic.
    #[arg(long, default_value_t = 1)]
    fanout: usize,
    /// Offered rate per publisher in messages per second (0: flat out).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Publish only: no subscribers (against a sink that delivers nothing).
    #[arg(long)]
    publish_only: bool,
    /// QoS 1/2 publishes a client keeps in flight (rumqttc's default is 100, paho's
    /// 20; 1,000 is the tuned row).
    #[arg(long, default_value_t = 1000)]
    inflight: u16,
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn options(a: &Args, id: String) -> MqttOptions {
    let (host, port) = a.addr.rsplit_once(':').expect("host:port");
    let mut o = MqttOptions::new(id, host, port.parse().expect("port"));
    o.set_keep_alive(Duration::from_secs(60));
    o.set_inflight(a.inflight);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_clean_session(true);
    o
}

async fn round(a: &Args, n: usize) -> Round {
    let q = qos(a.qos);
    let tag = format!("{}-{n}", std::process::id());
    let subs_per_topic = match (a.publish_only, a.pairs) {
        (true, _) => 0,
        (false, 1) => a.fanout,
        (false, _) => 1,
    };
    let expect_per_sub = a.messages;
    let mut receivers = Vec::new();
    for p in 0..a.pairs {
        for s in 0..subs_per_topic {
            let (client, mut ev) =
                AsyncClient::new(options(a, format!("sub-{tag}-{p}-{s}")), 10_000);
            let topic = format!("bench/{tag}/{p}");
            client.subscribe(&topic, q).await.expect("subscribe");
            // Wait for the SUBACK before publishing starts.
            loop {
                match ev.poll().await.expect("subscriber connection") {
                    Event::Incoming(Packet::SubAck(_)) => break,
                    _ => continue,
                }
            }
            let total = expect_per_sub;
            receivers.push(tokio::spawn(async move {
                let _client = client;
                let mut r = Receipts::new(total);
                while r.got < total {
                    match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => r.record(&p.payload),
                        Ok(Ok(_)) => {}
                        _ => break,
                    }
                }
                r.into_parts()
            }));
        }
    }
    let cpu0 = a.broker_pid.and_then(process_cpu);
    let steal0 = mqgate_bench::machine_steal();
    let start = Instant::now();
    let mut publishers = Vec::new();
    for p in 0..a.pairs {
        let (client, mut ev) = AsyncClient::new(options(a, format!("pub-{tag}-{p}")), 10_000);
        let topic = format!("bench/{tag}/{p}");
        let (total, size, rate) = (a.messages, a.size.max(16), a.rate);
        // Drives the connection; counts publishes done (acknowledged, or written at
        // QoS 0) and says when all are.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let driver = tokio::spawn(async move {
            let mut done_tx = Some(done_tx);
            let mut n = 0u64;
            while let Ok(e) = ev.poll().await {
                let counts = match e {
                    Event::Incoming(Packet::PubAck(_)) | Event::Incoming(Packet::PubComp(_)) => {
                        q != QoS::AtMostOnce
                    }
                    Event::Outgoing(Outgoing::Publish(_)) => q == QoS::AtMostOnce,
                    _ => false,
                };
                if counts {
                    n += 1;
                    if n == total {
                        if let Some(t) = done_tx.take() {
                            let _ = t.send(());
                        }
                    }
                }
            }
        });
        publishers.push(tokio::spawn(async move {
            let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
            let mut body = vec![0u8; size];
            for seq in 0..total {
                if let Some(iv) = interval {
                    let due = start + iv * seq as u32;
                    if let Some(w) = due.checked_duration_since(Instant::now()) {
                        tokio::time::sleep(w).await;
                    }
                }
                stamp(&mut body, seq);
                client
                    .publish(&topic, q, false, body.clone())
                    .await
                    .expect("publish");
            }
            (client, driver, done_rx)
        }));
    }
    let mut keep = Vec::new();
    for p in publishers {
        let (c, d, done) = p.await.expect("publisher");
        if a.publish_only {
            let _ = tokio::time::timeout(Duration::from_secs(30), done).await;
        }
        keep.push((c, d));
    }
    let mut lat = Vec::new();
    let (mut got, mut dup) = (0u64, 0u64);
    for r in receivers {
        let (l, g, d) = r.await.expect("receiver");
        lat.extend(l);
        got += g;
        dup += d;
    }
    let elapsed = start.elapsed();
    for (c, d) in keep {
        let _ = c.disconnect().await;
        d.abort();
    }
    let expected = a.messages * (a.pairs * subs_per_topic) as u64;
    if a.publish_only {
        // Nothing is delivered: count the publishes done.
        got = a.messages * a.pairs as u64;
    }
    let cpu = a
        .broker_pid
        .and_then(process_cpu)
        .zip(cpu0)
        .map(|(b, a)| (b - a).as_secs_f64() * 1e6 / got.max(1) as f64);
    lat.sort_unstable();
    Round::new(
        got as f64 / elapsed.as_secs_f64(),
        &lat,
        cpu,
        expected.saturating_sub(got),
        dup,
    )
    .steal_since(steal0)
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let mut rounds = Vec::new();
    for n in 0..a.rounds {
        let r = round(&a, n).await;
        r.print(n, "delivery");
        rounds.push(r);
    }
    print_medians(&rounds, "delivery");
}
