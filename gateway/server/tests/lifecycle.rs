//! The broker process as an operator handles it: SIGTERM stops it cleanly (clients are
//! told, exit code 0); after SIGKILL the next start recovers confirmed messages on its
//! own and logs what it recovered.

mod common;

use std::io::Read;

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::Broker;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;

async fn publish_confirmed(b: &Broker, queue: &str, n: usize) {
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    common::durable_queue(&ch, queue).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..n {
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack());
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// `queue`'s ready messages, as a passive queue.declare reports them.
async fn message_count(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// Send the broker SIGTERM.
fn sigterm(b: &Broker) {
    let pid = b.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_tells_clients() {
    let b = Broker::start();
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    // An MQTT 5.0 client, connected and idle.
    let mut mqtt = tokio::net::TcpStream::connect(("127.0.0.1", b.mqtt))
        .await
        .unwrap();
    // CONNECT: "MQTT" level 5, clean start, keep alive 60, no properties, client id "c1".
    mqtt.write_all(&[
        0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 2, b'c', b'1',
    ])
    .await
    .unwrap();
    // CONNACK (its properties fit a one-byte remaining length): flags, reason 0.
    let mut head = [0u8; 2];
    mqtt.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], 0x20, "CONNACK");
    assert!(head[1] < 128, "{head:?}");
    let mut connack = vec![0u8; usize::from(head[1])];
    mqtt.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack[1], 0, "accepted: {connack:?}");
    sigterm(&b);
    let mut b = b;
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = b.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "mqgate did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
    // The MQTT client was told: DISCONNECT, reason 0x8B (server shutting down), then
    // the connection's end.
    let mut told = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), mqtt.read_to_end(&mut told))
        .await
        .expect("the MQTT connection ends")
        .unwrap();
    assert!(
        told.len() >= 3 && told[0] == 0xE0 && told[2] == 0x8B,
        "DISCONNECT 0x8B: {told:?}"
    );
    // The AMQP client was told (connection.close 320), not cut off.
    let deadline = Instant::now() + Duration::from_secs(5);
    while conn.status().connected() {
        assert!(Instant::now() < deadline, "client still connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_then_restart_recovers_and_says_so() {
    let mut b = Broker::start();
    publish_confirmed(&b, "survivor", 50).await;
    b.child.kill().unwrap(); // SIGKILL
    b.respawn_logged();
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        message_count(&ch, "survivor").await,
        50,
        "every confirmed message survived SIGKILL"
    );
    let got = ch
        .basic_get("survivor".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.delivery.data, b"m0");
    // Stop it to read its whole log.
    b.child.kill().unwrap();
    let mut log = String::new();
    b.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("recovered what is listed") && log.contains("messages=50"),
        "{log}"
    );
    assert!(log.contains("durable_queues=1"), "{log}");
    // RocksDB's WAL checksums go through mqgate's CRC-32C, in hardware where the CPU
    // has it (build.rs links the binary with the wrap).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    assert!(
        log.contains(if std::arch::is_x86_feature_detected!("sse4.2") {
            "hardware (SSE4.2)"
        } else {
            "table (this CPU has no SSE4.2)"
        }),
        "{log}"
    );
}

/// A consumer on `queue` with prefetch `prefetch`: (connection, channel, consumer).
async fn consume(
    b: &Broker,
    queue: &str,
    prefetch: u16,
) -> (lapin::Connection, lapin::Channel, lapin::Consumer) {
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let c = ch
        .basic_consume(
            queue.into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, ch, c)
}

/// The next delivery: (index of its body `m<i>`, redelivered).
async fn next_indexed(c: &mut lapin::Consumer) -> (usize, lapin::message::Delivery) {
    use futures_util::StreamExt;
    let d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer goes on")
        .expect("a delivery");
    let i = String::from_utf8_lossy(&d.data)[1..].parse().unwrap();
    (i, d)
}

/// Consume `queue` (300 messages) with prefetch 10: 14 delivered, the first 4 acked,
/// so 10 are held unacknowledged and nothing more is sent.
async fn hold_ten_unacked(
    b: &Broker,
    queue: &str,
) -> (lapin::Connection, lapin::Channel, lapin::Consumer) {
    let (conn, ch, mut c) = consume(b, queue, 10).await;
    for want in 0..14 {
        let (i, d) = next_indexed(&mut c).await;
        assert_eq!((i, d.redelivered), (want, false));
        if i < 4 {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    (conn, ch, c)
}

/// Messages delivered and not acknowledged before a restart come back flagged
/// redelivered, as RabbitMQ flags them (before, a restart forgot they had been
/// delivered). After SIGTERM exactly those; after SIGKILL those, and at most the
/// delivered mark's stride (256) of messages past them that were never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_deliveries_come_back_flagged_redelivered_after_a_restart() {
    let mut b = Broker::start();
    for q in ["again-term", "again-kill"] {
        publish_confirmed(&b, q, 300).await;
    }
    // The first 4 acked, which lets 4 more come: 14 delivered, 10 of them unacked
    // (the prefetch: nothing more is sent); then SIGTERM.
    let (conn, _ch, _c) = hold_ten_unacked(&b, "again-term").await;
    sigterm(&b);
    drop(conn);
    b.respawn_logged();
    let (_conn, _ch, mut c) = consume(&b, "again-term", 10).await;
    let mut flagged = Vec::new();
    for want in 4..300 {
        let (i, d) = next_indexed(&mut c).await;
        assert_eq!(i, want, "in order");
        if d.redelivered {
            flagged.push(i);
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(
        flagged,
        (4..14).collect::<Vec<_>>(),
        "after SIGTERM: the unacknowledged deliveries, and only they, flagged"
    );
    // The same before SIGKILL.
    let _held = hold_ten_unacked(&b, "again-kill").await;
    b.child.kill().unwrap(); // SIGKILL
    b.respawn_logged();
    let (_conn, _ch, mut c) = consume(&b, "again-kill", 10).await;
    let mut seen = Vec::new();
    loop {
        let (i, d) = next_indexed(&mut c).await;
        seen.push((i, d.redelivered));
        d.ack(BasicAckOptions::default()).await.unwrap();
        if i == 299 {
            break;
        }
    }
    for (i, redelivered) in seen {
        if (4..14).contains(&i) {
            assert!(redelivered, "m{i} was delivered before SIGKILL: flagged");
        }
        if i >= 256 {
            assert!(!redelivered, "m{i} was never delivered: not flagged");
        }
    }
}

/// Take m0..m{n-1}, first deliveries in order: m0 held (returned), the others acked.
async fn hold_first_ack_the_rest(c: &mut lapin::Consumer, n: usize) -> lapin::message::Delivery {
    let mut first = None;
    for want in 0..n {
        let (i, d) = next_indexed(c).await;
        assert_eq!((i, d.redelivered), (want, false));
        if i == 0 {
            first = Some(d);
        } else {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    first.expect("m0 taken")
}

/// Acknowledgements out of order stay acknowledged across a clean restart: with m0 held
/// and m1..m9 acked, the restart brings back m0 and the other unacknowledged ones,
/// flagged, and not m1..m9 (the group used to commit at its first unacknowledged
/// offset, m0, and deliver everything above it again). RabbitMQ 3.10, same scenario
/// with pika: message_count 11 after the restart, then m0 and m10..m18 redelivered,
/// m19 not, m1..m9 never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_out_of_order_stay_acked_across_a_clean_restart() {
    let mut b = Broker::start();
    publish_confirmed(&b, "ooo", 20).await;
    let (conn, _ch, mut c) = consume(&b, "ooo", 10).await;
    let first = hold_first_ack_the_rest(&mut c, 10).await;
    // m10..m18 come once the acks are applied (the prefetch's room): held with m0.
    let mut held = Vec::new();
    for want in 10..19 {
        let (i, d) = next_indexed(&mut c).await;
        assert_eq!(i, want);
        held.push(d);
    }
    sigterm(&b);
    drop((first, held, conn));
    b.respawn_logged();
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(message_count(&ch, "ooo").await, 11, "m0, m10..m19");
    let (_conn, _ch, mut c) = consume(&b, "ooo", 100).await;
    let mut got = Vec::new();
    for _ in 0..11 {
        let (i, d) = next_indexed(&mut c).await;
        got.push((i, d.redelivered));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let mut want: Vec<(usize, bool)> = std::iter::once(0)
        .chain(10..19)
        .map(|i| (i, true))
        .collect();
    want.push((19, false));
    assert_eq!(
        got, want,
        "the unacknowledged ones flagged, the new one not, in order"
    );
    let more = tokio::time::timeout(
        Duration::from_millis(500),
        futures_util::StreamExt::next(&mut c),
    )
    .await;
    assert!(more.is_err(), "m1..m9 were acknowledged: {more:?}");
}

/// A consumer holds an old message (a long task) while it acknowledges hundreds after
/// it: the running group checkpoints (its commit goes past what was acknowledged, the
/// held message listed with its delivered mark), so a SIGKILL brings back the held
/// message alone, flagged, not everything acknowledged after it. RabbitMQ keeps acks
/// across a crash the same way (a queue's index records each); committing at the first
/// unacknowledged offset, as the group did while running, brought back all 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_above_a_held_message_survive_sigkill() {
    let mut b = Broker::start();
    publish_confirmed(&b, "longtask", 400).await;
    let (conn, _ch, mut c) = consume(&b, "longtask", 10).await;
    let first = hold_first_ack_the_rest(&mut c, 400).await;
    // The admin API shows the group's committed offset in memory: it is stored with
    // the group's next commit (every 200 ms), waited for below.
    let json = |out: (bool, String, String)| -> serde_json::Value {
        assert!(out.0, "mqgate CLI failed: {}", out.2);
        serde_json::from_str(&out.1).unwrap()
    };
    let list = json(b.cli(&["--json", "groups", "list"]));
    let group = list
        .as_array()
        .unwrap()
        .iter()
        .find_map(|g| {
            let name = g["name"].as_str()?;
            name.contains("longtask").then(|| name.to_owned())
        })
        .unwrap_or_else(|| panic!("no group for the queue: {list}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown = json(b.cli(&["--json", "groups", "show", &group]));
        if shown["queues"][0]["committed"] == 400 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the commit stays below the acknowledged messages: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.child.kill().unwrap(); // SIGKILL, m0 still unacknowledged
    drop((first, conn));
    b.respawn_logged();
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(message_count(&ch, "longtask").await, 1, "m0 alone");
    let (_conn, _ch, mut c) = consume(&b, "longtask", 100).await;
    let (i, d) = next_indexed(&mut c).await;
    assert_eq!((i, d.redelivered), (0, true));
    d.ack(BasicAckOptions::default()).await.unwrap();
    let more = tokio::time::timeout(
        Duration::from_millis(500),
        futures_util::StreamExt::next(&mut c),
    )
    .await;
    assert!(more.is_err(), "m1..m399 were acknowledged: {more:?}");
}

/// queue.purge drops the ready messages and keeps those delivered and not acknowledged
/// (AMQP 0-9-1: "messages that have been delivered but not yet acknowledged are not
/// affected"), and as in RabbitMQ they outlive a SIGKILL: after the restart they come
/// again, flagged redelivered, and the purged ones do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_queue_keeps_its_unacked_messages_across_sigkill() {
    use futures_util::StreamExt;
    let mut b = Broker::start();
    publish_confirmed(&b, "purged", 30).await;
    let (_conn, ch, mut c) = consume(&b, "purged", 10).await;
    for want in 0..10 {
        let (i, d) = next_indexed(&mut c).await;
        assert_eq!((i, d.redelivered), (want, false));
    }
    let purged = ch
        .queue_purge("purged".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 20, "the ready ones");
    b.child.kill().unwrap(); // SIGKILL, the 10 still unacknowledged
    b.respawn_logged();
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        message_count(&ch, "purged").await,
        10,
        "ready again, as RabbitMQ counts them"
    );
    let (_conn, _ch, mut c) = consume(&b, "purged", 100).await;
    let mut got = Vec::new();
    for _ in 0..10 {
        let (i, d) = next_indexed(&mut c).await;
        assert!(d.redelivered, "m{i} was delivered before: flagged");
        got.push(i);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    got.sort_unstable();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    let more = tokio::time::timeout(Duration::from_millis(500), c.next()).await;
    assert!(more.is_err(), "the purged messages stay purged: {more:?}");
}

/// `mqgate serve --small` (the edge profile) starts itself again, same process, with the
/// allocator settings in its environment, and serves: confirmed messages are kept.
/// `runtime.transparent_huge_pages = false` (the default): the broker's memory is never
/// backed by huge pages, whose zeroing on first touch stalled a worker for milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_huge_pages_are_off_by_default() {
    let b = Broker::start();
    publish_confirmed(&b, "thp", 10).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", b.child.id())).unwrap();
    // Kernels since 5.0 report the process's PR_SET_THP_DISABLE flag here.
    if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_profile_restarts_itself_with_the_allocator_settings_and_serves() {
    let b = Broker::start_with(&["--small"]);
    let environ = std::fs::read(format!("/proc/{}/environ", b.child.id())).unwrap();
    let vars: Vec<&[u8]> = environ.split(|c| *c == 0).collect();
    assert!(
        vars.contains(&&b"MIMALLOC_PURGE_DELAY=0"[..]),
        "the process runs with the small allocator settings"
    );
    publish_confirmed(&b, "edge", 50).await;
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut got = 0;
    while let Some(m) = ch
        .basic_get("edge".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert_eq!(m.delivery.data, format!("m{got}").as_bytes());
        got += 1;
    }
    assert_eq!(got, 50);
}

/// A persistent MQTT session's group stores its start when the session connects (a
/// clean session's waits for its first delivery: `GroupSpec::lazy_start`), so a broker
/// killed (SIGKILL) while the session is connected and idle still knows the group after
/// the restart: the admin API lists it with what waits for it, and the client coming
/// back gets every message published while it was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mqtt_session_killed_before_any_delivery_is_listed_after_restart() {
    use rumqttc::{Event, Packet, QoS};
    let mut b = Broker::start();
    let (c, mut el) = common::mqtt_connect(&[b.mqtt], "keeper", false).await;
    c.subscribe("news/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    b.child.kill().unwrap(); // SIGKILL, the session still connected
    drop((c, el));
    b.respawn_logged();

    let (p, mut pel) = common::mqtt_connect(&[b.mqtt], "writer", true).await;
    for i in 0..3 {
        p.publish("news/a", QoS::AtLeastOnce, false, format!("n{i}"))
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), pel.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("no PUBACK: {other:?}"),
            }
        }
    }

    let json = |out: (bool, String, String)| -> serde_json::Value {
        assert!(out.0, "mqgate CLI failed: {}", out.2);
        serde_json::from_str(&out.1).unwrap()
    };
    let group = "%MQTT%keeper";
    let list = json(b.cli(&["--json", "groups", "list"]));
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == group)
        .unwrap_or_else(|| panic!("{group} not listed: {list}"));
    assert_eq!(listed["lag"], 3, "{list}");
    let shown = json(b.cli(&["--json", "groups", "show", group]));
    assert_eq!(shown["lag"], 3, "{shown}");
    assert!(shown["members"].as_array().unwrap().is_empty(), "{shown}");

    let (_c, mut el) = common::mqtt_connect(&[b.mqtt], "keeper", false).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(m)))) => {
                got.push(String::from_utf8(m.payload.to_vec()).unwrap());
            }
            Ok(Ok(_)) => {}
            other => panic!("the session got {got:?}, then {other:?}"),
        }
    }
    assert_eq!(got, ["n0", "n1", "n2"]);
}
