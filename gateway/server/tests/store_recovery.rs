//! The real `mqgate` binary with its data folder on a small tmpfs: a full disk makes
//! durable publishes fail the way each protocol says (AMQP basic.nack, MQTT 5 PUBACK
//! 0x80 on the message, the connection kept), `/api/mqgate/health` answers 503 `degraded` and
//! `mqgate_store_degraded` is 1; once space is freed the broker resumes by itself, with
//! no restart: confirms come back, health is ok (and tells the degraded period), the
//! gauge is 0, and every publish confirmed before is still there.
//!
//! Mounting needs root (tests run as root here and in CI); where it is not allowed the
//! test prints `skipped: ...` and passes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{http_get, Node};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;

/// A tmpfs mounted on a temporary folder; unmounted (lazily) when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self {
            path: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// mqgate on a 40 MiB tmpfs already holding a 24 MiB filler file (remove it to free the
/// space). Fields drop in order: the broker stops before the tmpfs is unmounted.
struct NearlyFull {
    broker: Node,
    filler: PathBuf,
    _fs: Tmpfs,
}

impl NearlyFull {
    /// `None` (after printing `skipped: ...`) where a tmpfs cannot be mounted.
    fn start() -> Option<Self> {
        let fs = match Tmpfs::mount("40m") {
            Ok(fs) => fs,
            Err(e) => {
                println!("skipped: cannot mount a tmpfs ({e})");
                return None;
            }
        };
        let filler = fs.path.join("filler");
        std::fs::write(&filler, vec![0x5a; 24 << 20]).unwrap();
        let broker = Node::start(&fs.path.join("data"));
        Some(Self {
            broker,
            filler,
            _fs: fs,
        })
    }
}

/// Bytes that do not compress, starting with `seed`.
fn body(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    v.extend_from_slice(&seed.to_le_bytes());
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// An MQTT 5 client on a raw socket: CONNECT (clean start), then QoS 1 PUBLISHes whose
/// PUBACK reason code is read back.
struct Mqtt5 {
    s: TcpStream,
}

impl Mqtt5 {
    fn connect(port: u16) -> Self {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // CONNECT: "MQTT" level 5, clean start, keep alive 120, no properties, id "p5".
        let var = [
            0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 120, 0, 0, 2, b'p', b'5',
        ];
        let mut pkt = vec![0x10, var.len() as u8];
        pkt.extend_from_slice(&var);
        s.write_all(&pkt).unwrap();
        let mut head = [0u8; 2];
        s.read_exact(&mut head).expect("CONNACK");
        let mut rest = vec![0u8; usize::from(head[1])];
        s.read_exact(&mut rest).unwrap();
        assert_eq!((head[0], rest[1]), (0x20, 0), "CONNACK success");
        Self { s }
    }

    /// Publish `payload` at QoS 1 to `t` as packet `pkid`: the PUBACK reason code, or
    /// `Err` with what came instead (a DISCONNECT, the socket closed).
    fn publish(&mut self, pkid: u16, payload: &[u8]) -> Result<u8, String> {
        let mut var = vec![0, 1, b't'];
        var.extend_from_slice(&pkid.to_be_bytes());
        var.push(0); // no properties
        var.extend_from_slice(payload);
        let mut pkt = vec![0x32];
        let mut len = var.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            pkt.push(b);
            if len == 0 {
                break;
            }
        }
        pkt.extend_from_slice(&var);
        self.s.write_all(&pkt).map_err(|e| e.to_string())?;
        let mut head = [0u8; 2];
        self.s
            .read_exact(&mut head)
            .map_err(|e| format!("no PUBACK: {e}"))?;
        let mut rest = vec![0u8; usize::from(head[1])];
        self.s.read_exact(&mut rest).map_err(|e| e.to_string())?;
        match head[0] {
            0x40 if rest[..2] == pkid.to_be_bytes() => Ok(rest.get(2).copied().unwrap_or(0)),
            0xE0 => Err(format!(
                "DISCONNECT {:#04x}",
                rest.first().copied().unwrap_or(0)
            )),
            other => Err(format!("packet {other:#04x} instead of PUBACK")),
        }
    }
}

fn metric(admin: u16, name: &str) -> Option<f64> {
    let (_, text) = http_get(admin, "/metrics", None);
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_nacks_publishes_reports_degraded_and_recovers_without_restart() {
    let Some(disk) = NearlyFull::start() else {
        return;
    };
    let (b, filler) = (&disk.broker, &disk.filler);
    let (code, health) = http_get(b.admin, "/api/mqgate/health", None);
    assert_eq!(code, 200, "{health}");
    assert!(health.contains(r#""status":"ok""#), "{health}");
    assert_eq!(metric(b.admin, "mqgate_store_degraded"), Some(0.0));

    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", b.amqp);
    let conn = lapin::Connection::connect(&url, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("full".into(), durable, FieldTable::default())
        .await
        .unwrap();
    // MQTT publishes to "t" are stored for this queue.
    ch.queue_declare("from-mqtt".into(), durable, FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        "from-mqtt".into(),
        "amq.topic".into(),
        "t".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Connected before the disk fills (a new session needs a write).
    let mut mqtt = Mqtt5::connect(b.mqtt);
    assert_eq!(mqtt.publish(1, b"before").unwrap(), 0, "PUBACK success");

    let publish = |seed: u64| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "".into(),
                "full".into(),
                BasicPublishOptions::default(),
                &body(seed, 16 << 10),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap()
            .is_ack()
        }
    };

    // Fill the disk: publishes are confirmed until one is nacked.
    let mut acked = Vec::new();
    let mut seed = 0u64;
    loop {
        seed += 1;
        if !publish(seed).await {
            break;
        }
        acked.push(seed);
        assert!(seed < 5_000, "the disk never filled up");
    }
    println!("{} publishes confirmed, then a nack", acked.len());

    // Degraded: health, metric; more publishes are nacked, the connection stays up.
    let (code, health) = http_get(b.admin, "/api/mqgate/health", None);
    assert_eq!(code, 503, "{health}");
    assert!(health.contains(r#""status":"degraded""#), "{health}");
    assert!(health.contains(r#""reason":"#) && health.contains(r#""since_ms":"#));
    assert_eq!(metric(b.admin, "mqgate_store_degraded"), Some(1.0));
    assert!(metric(b.admin, "mqgate_store_errors_total").is_some_and(|n| n >= 1.0));
    seed += 1;
    assert!(
        !publish(seed).await,
        "a publish was confirmed on a full disk"
    );
    // MQTT 5: PUBACK 0x80 for that message, and the connection goes on.
    assert_eq!(mqtt.publish(2, &body(0, 1024)), Ok(0x80));
    assert_eq!(mqtt.publish(3, &body(0, 1024)), Ok(0x80));

    // Space freed: confirms come back without a restart.
    std::fs::remove_file(filler).unwrap();
    let freed = Instant::now();
    loop {
        seed += 1;
        if publish(seed).await {
            acked.push(seed);
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(20),
            "publishes still nacked 20 s after space was freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "confirms came back {:?} after space was freed",
        freed.elapsed()
    );
    for _ in 0..10 {
        seed += 1;
        assert!(publish(seed).await, "nacked after recovery");
        acked.push(seed);
    }
    assert_eq!(
        mqtt.publish(4, b"after").unwrap(),
        0,
        "PUBACK success again"
    );
    let (code, health) = http_get(b.admin, "/api/mqgate/health", None);
    assert_eq!(code, 200, "{health}");
    assert!(health.contains(r#""status":"ok""#), "{health}");
    assert!(health.contains(r#""last_degraded":"#), "{health}");
    assert!(health.contains(r#""until_ms":"#), "{health}");
    assert_eq!(metric(b.admin, "mqgate_store_degraded"), Some(0.0));

    // Every confirmed publish is in the queue, intact.
    let mut c = ch
        .basic_consume(
            "full".into(),
            "check".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut want: std::collections::HashSet<u64> = acked.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !want.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = tokio::time::timeout(left, c.next())
            .await
            .unwrap_or_else(|_| panic!("{} confirmed publishes missing", want.len()))
            .expect("consumer open")
            .expect("delivery");
        let s = u64::from_le_bytes(d.data[..8].try_into().unwrap());
        assert_eq!(d.data, body(s, 16 << 10), "message {s} changed");
        want.remove(&s);
    }
    drop(conn);
    drop(disk);
}

/// A rejected message whose dead-letter copy cannot be stored (the disk is full) stays
/// in its queue and is delivered again; once space is back, the next reject moves it to
/// the dead-letter exchange's queue. (It used to be acked first and then lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_stored_stays_in_its_queue() {
    async fn next(c: &mut lapin::Consumer) -> lapin::message::Delivery {
        tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap()
    }
    let Some(disk) = NearlyFull::start() else {
        return;
    };
    let (b, filler) = (&disk.broker, &disk.filler);
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", b.amqp);
    let conn = lapin::Connection::connect(&url, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for q in ["dead.target", "fill"] {
        ch.queue_declare(q.into(), durable, FieldTable::default())
            .await
            .unwrap();
    }
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        lapin::types::AMQPValue::LongString("dead.target".into()),
    );
    ch.queue_declare("dead.source".into(), durable, args)
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |queue: &'static str, payload: Vec<u8>| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap()
            .is_ack()
        }
    };
    assert!(publish("dead.source", b"precious".to_vec()).await);
    // Fill the disk.
    let mut seed = 0u64;
    while publish("fill", body(seed, 16 << 10)).await {
        seed += 1;
        assert!(seed < 5_000, "the disk never filled up");
    }
    let mut c = ch
        .basic_consume(
            "dead.source".into(),
            "rejecter".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.data, b"precious");
    d.acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    // The copy could not be stored: the message comes back instead of vanishing.
    let d = next(&mut c).await;
    assert_eq!(
        d.data, b"precious",
        "redelivered after a failed dead-letter write"
    );
    assert!(d.redelivered);

    // Space back: wait for the store to recover, then reject again.
    std::fs::remove_file(filler).unwrap();
    let freed = Instant::now();
    while http_get(b.admin, "/api/mqgate/health", None).0 != 200 {
        assert!(freed.elapsed() < Duration::from_secs(20), "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let mut dead = ch
        .basic_consume(
            "dead.target".into(),
            "reader".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = next(&mut dead).await;
    assert_eq!(d.data, b"precious", "dead-lettered once the store works");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.next())
            .await
            .is_err(),
        "and no longer in its queue"
    );
}
