//! Does the number of connected clients on other topics slow a publish down?
//!
//! Connects `--small` idle MQTT clients, each subscribed to its own topic, measures one
//! publisher → one subscriber on another topic (throughput, latency percentiles, the
//! broker's CPU time per message), then grows the idle clients to `--large` and
//! measures again, then shrinks back to `--small` and measures a third time. Each
//! measurement is repeated `--rounds` times; the small figure is the mean of the medians
//! before and after, and the large/small ratio is printed. Run the broker in its own process (the idle clients'
//! sockets would otherwise count twice against the open-file limit):
//!
//! ```sh
//! cargo build --release --workspace --bins
//! ./target/release/mqgate serve --memory --mqtt 127.0.0.1:1883 &
//! ./target/release/mqtt_many_topics --addr 127.0.0.1:1883 --broker-pid $!
//! ```

use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use mqgate_bench::{median, percentile, process_cpu, process_rss};
use mqgate_mqtt_codec::{
    self as codec, Connect, Packet, Properties, QoS, SubOptions, Subscribe, Version,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as RPacket, QoS as RQoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
struct Args {
    /// The broker (host:port).
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: String,
    /// The broker's process id, for its CPU time and memory.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Idle clients in the first measurement.
    #[arg(long, default_value_t = 10)]
    small: usize,
    /// Idle clients in the second measurement.
    #[arg(long, default_value_t = 10_000)]
    large: usize,
    /// Messages per measurement.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// QoS of the measured publisher and subscriber.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Measurements per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Debug, Clone, Copy)]
struct Measure {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_msg: f64,
    lost: usize,
}

async fn idle_client(addr: &str, i: usize) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = BytesMut::new();
    let c = Connect {
        version: Version::V311,
        clean_start: true,
        keep_alive: 0,
        properties: Properties::default(),
        client_id: format!("idle-{i}"),
        will: None,
        username: None,
        password: None,
    };
    codec::encode(&Packet::Connect(Box::new(c)), Version::V311, &mut out);
    let sub = Subscribe {
        pkid: 1,
        properties: Properties::default(),
        filters: vec![(
            format!("idle/{i}"),
            SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
        )],
    };
    codec::encode(&Packet::Subscribe(sub), Version::V311, &mut out);
    s.write_all(&out).await?;
    // CONNACK and SUBACK.
    let mut buf = BytesMut::new();
    let mut got = 0;
    while got < 2 {
        if s.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        while let Ok(Some(_)) = codec::decode(&mut buf, Some(Version::V311), codec::MAX_PACKET_SIZE)
        {
            got += 1;
        }
    }
    Ok(s)
}

async fn grow(addr: &str, idle: &mut Vec<TcpStream>, to: usize) {
    while idle.len() < to {
        let start = idle.len();
        let n = (to - start).min(500);
        let mut tasks = Vec::new();
        for i in start..start + n {
            let a = addr.to_owned();
            tasks.push(tokio::spawn(async move { idle_client(&a, i).await }));
        }
        for t in tasks {
            idle.push(t.await.expect("task").expect("idle client"));
        }
    }
}

async fn measure(args: &Args, round: usize) -> Measure {
    let (host, port) = args.addr.rsplit_once(':').expect("host:port");
    let port: u16 = port.parse().expect("port");
    let qos = match args.qos {
        0 => RQoS::AtMostOnce,
        2 => RQoS::ExactlyOnce,
        _ => RQoS::AtLeastOnce,
    };
    let topic = format!("bench/{round}");
    let mut so = MqttOptions::new(format!("bench-sub-{round}"), host, port);
    so.set_keep_alive(Duration::from_secs(60));
    so.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut sub_el) = AsyncClient::new(so, 1000);
    sub.subscribe(&topic, qos).await.expect("subscribe");
    // Wait for the SUBACK.
    loop {
        if let Event::Incoming(RPacket::SubAck(_)) = sub_el.poll().await.expect("sub") {
            break;
        }
    }
    let n = args.messages;
    let t0 = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        let mut seen = 0usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen < n && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), sub_el.poll()).await {
                Ok(Ok(Event::Incoming(RPacket::Publish(p)))) => {
                    let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                    lat.push(t0.elapsed().saturating_sub(Duration::from_nanos(sent)));
                    seen += 1;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("subscriber: {e}"),
                Err(_) => break,
            }
        }
        (lat, Instant::now())
    });
    let mut po = MqttOptions::new(format!("bench-pub-{round}"), host, port);
    po.set_keep_alive(Duration::from_secs(60));
    po.set_max_packet_size(1 << 20, 1 << 20);
    let (publisher, mut pub_el) = AsyncClient::new(po, 1000);
    let pump = tokio::spawn(async move {
        loop {
            if pub_el.poll().await.is_err() {
                return;
            }
        }
    });
    let cpu0 = args.broker_pid.and_then(process_cpu);
    let start = Instant::now();
    let mut payload = vec![0u8; args.size.max(16)];
    for i in 0..n {
        payload[..8].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_be_bytes());
        payload[8..16].copy_from_slice(&(i as u64).to_be_bytes());
        publisher
            .publish(&topic, qos, false, payload.clone())
            .await
            .expect("publish");
    }
    let (mut lat, end) = receiver.await.expect("receiver");
    let cpu1 = args.broker_pid.and_then(process_cpu);
    pump.abort();
    let _ = sub.disconnect().await;
    let elapsed = end.duration_since(start).as_secs_f64();
    lat.sort();
    let got = lat.len();
    Measure {
        rate: got as f64 / elapsed,
        p50_us: percentile(&lat, 50.0).as_secs_f64() * 1e6,
        p99_us: percentile(&lat, 99.0).as_secs_f64() * 1e6,
        cpu_us_per_msg: match (cpu0, cpu1) {
            (Some(a), Some(b)) if got > 0 => (b - a).as_secs_f64() * 1e6 / got as f64,
            _ => f64::NAN,
        },
        lost: n - got,
    }
}

/// Wait until the broker has finished tearing down the sessions that went away (its
/// CPU use over a second falls under 5%), at most two minutes.
async fn wait_idle(pid: Option<u32>) {
    let Some(pid) = pid else {
        tokio::time::sleep(Duration::from_secs(10)).await;
        return;
    };
    for _ in 0..120 {
        let a = process_cpu(pid);
        tokio::time::sleep(Duration::from_secs(1)).await;
        match (a, process_cpu(pid)) {
            (Some(a), Some(b)) if (b - a) < Duration::from_millis(50) => return,
            (None, _) | (_, None) => return,
            _ => {}
        }
    }
}

async fn phase(args: &Args, label: usize, round_base: usize) -> Measure {
    let mut ms = Vec::new();
    for r in 0..args.rounds {
        let m = measure(args, round_base + r).await;
        eprintln!(
            "  {label:>6} idle clients, round {r}: {:>9.0} msg/s  p50 {:>7.0} us  p99 {:>7.0} us  broker {:>6.2} us/msg  lost {}",
            m.rate, m.p50_us, m.p99_us, m.cpu_us_per_msg, m.lost
        );
        ms.push(m);
    }
    let pick = |f: fn(&Measure) -> f64| median(&mut ms.iter().map(f).collect::<Vec<_>>());
    Measure {
        rate: pick(|m| m.rate),
        p50_us: pick(|m| m.p50_us),
        p99_us: pick(|m| m.p99_us),
        cpu_us_per_msg: pick(|m| m.cpu_us_per_msg),
        lost: ms.iter().map(|m| m.lost).sum(),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut idle = Vec::new();
    grow(&args.addr, &mut idle, args.small).await;
    // Warm up.
    let warm = Args {
        messages: args.messages / 4,
        rounds: 1,
        ..Args::parse()
    };
    let _ = measure(&warm, 1000).await;
    let small = phase(&args, args.small, 0).await;
    wait_idle(args.broker_pid).await;
    let rss_small = args.broker_pid.and_then(process_rss);
    let t = Instant::now();
    grow(&args.addr, &mut idle, args.large).await;
    wait_idle(args.broker_pid).await;
    let rss = args.broker_pid.and_then(process_rss);
    let per_conn = rss
        .zip(rss_small)
        .map(|(l, s)| l.saturating_sub(s) as f64 / (args.large - args.small).max(1) as f64);
    eprintln!(
        "connected {} idle clients in {:.1} s; broker RSS {}",
        idle.len(),
        t.elapsed().as_secs_f64(),
        rss.map_or("?".into(), |r| format!("{:.0} MiB", r as f64 / 1048576.0))
    );
    let large = phase(&args, args.large, 100).await;
    // Back to the small count, so drift over the run (the store growing, the heap
    // warming) shows up on both sides of the comparison instead of counting against
    // the large one.
    idle.truncate(args.small);
    wait_idle(args.broker_pid).await;
    let small_after = phase(&args, args.small, 200).await;
    let small = Measure {
        rate: (small.rate + small_after.rate) / 2.0,
        p50_us: (small.p50_us + small_after.p50_us) / 2.0,
        p99_us: (small.p99_us + small_after.p99_us) / 2.0,
        cpu_us_per_msg: (small.cpu_us_per_msg + small_after.cpu_us_per_msg) / 2.0,
        lost: small.lost + small_after.lost,
    };
    println!("| idle clients | msg/s | p50 µs | p99 µs | broker CPU µs/msg | lost |");
    println!("|---|---|---|---|---|---|");
    for (n, m) in [(args.small, small), (args.large, large)] {
        println!(
            "| {n} | {:.0} | {:.0} | {:.0} | {:.2} | {} |",
            m.rate, m.p50_us, m.p99_us, m.cpu_us_per_msg, m.lost
        );
    }
    println!(
        "ratio {} / {}: throughput {:.2}, p50 {:.2}, broker CPU per message {:.2} (QoS {}, {} B, {} messages x {} rounds, medians)",
        args.large,
        args.small,
        large.rate / small.rate,
        large.p50_us / small.p50_us,
        large.cpu_us_per_msg / small.cpu_us_per_msg,
        args.qos,
        args.size,
        args.messages,
        args.rounds
    );
    if let Some(b) = per_conn {
        println!(
            "broker memory per idle connection (subscribed to its own topic): {:.1} KiB",
            b / 1024.0
        );
    }
    println!(
        "RESULT rate={:.0} p50_us={:.0} p99_us={:.0} p999_us=0 cpu_us={:.2} lost={} dup=0 small_rate={:.0} small_cpu_us={:.2} kib_per_conn={:.1}",
        large.rate,
        large.p50_us,
        large.p99_us,
        large.cpu_us_per_msg,
        large.lost + small.lost,
        small.rate,
        small.cpu_us_per_msg,
        per_conn.unwrap_or(0.0) / 1024.0
    );
    drop(idle);
}
