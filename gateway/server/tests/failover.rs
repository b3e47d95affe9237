//! High availability, end to end: two `mqgate` gateways on the jetstream backend over a
//! 3-node NATS cluster on loopback (all started here). The owner is SIGKILLed while an
//! AMQP publisher (confirms) and an MQTT QoS 1 publisher run through it; the standby
//! takes over, the clients move to it as a client with an address list would, and every
//! confirmed message is delivered from the new owner (duplicates allowed, counted).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::gateway::Gateway;
use lapin::options::*;
use lapin::BasicProperties;
use mqgate_store::jetstream::testing::NatsCluster;
use rumqttc::{Event, Packet, QoS};

const AMQP_QUEUE: &str = "ha-amqp";
const MQTT_TOPIC: &str = "ha/mqtt";

/// The AMQP port of whichever gateway listens (clients with an address list try each).
async fn amqp_connect(ports: &[u16]) -> (lapin::Connection, lapin::Channel) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for p in ports {
            let url = format!("amqp://guest:guest@127.0.0.1:{p}/%2f");
            // A gateway that is stepping down may accept the connection and then close
            // it (CONNECTION_FORCED): any failure while setting up means try the next.
            let setup = async {
                let conn = lapin::Connection::connect(&url, Default::default()).await?;
                let ch = conn.create_channel().await?;
                common::try_durable_queue(&ch, AMQP_QUEUE).await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, lapin::Error>((conn, ch))
            };
            // A paused gateway's kernel still accepts the socket: bound the handshake.
            if let Ok(Ok(pair)) = tokio::time::timeout(Duration::from_secs(5), setup).await {
                return pair;
            }
        }
        assert!(Instant::now() < deadline, "no gateway takes AMQP clients");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// AMQP: publish `n` persistent messages one at a time with confirms, paced; on an
/// error, reconnect to whichever gateway listens and publish the unconfirmed one again.
/// Returns the confirmed bodies and when the first confirm after `kill_at` came.
async fn amqp_publisher(
    ports: Vec<u16>,
    n: usize,
    killed: tokio::sync::watch::Receiver<Option<Instant>>,
) -> (BTreeSet<usize>, Option<Duration>) {
    let (mut conn, mut ch) = amqp_connect(&ports).await;
    let mut confirmed = BTreeSet::new();
    let mut first_after_kill = None;
    let mut i = 0;
    while i < n {
        let r = async {
            ch.basic_publish(
                "".into(),
                AMQP_QUEUE.into(),
                BasicPublishOptions::default(),
                format!("{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await
        };
        match tokio::time::timeout(Duration::from_secs(5), r).await {
            Ok(Ok(c)) if c.is_ack() => {
                confirmed.insert(i);
                if let (None, Some(at)) = (first_after_kill, *killed.borrow()) {
                    first_after_kill = Some(at.elapsed());
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            _ => {
                let _ = conn.close(200, "bye".into()).await;
                (conn, ch) = amqp_connect(&ports).await;
            }
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    (confirmed, first_after_kill)
}

/// MQTT: publish `n` QoS 1 messages one at a time (each PUBACK awaited), paced; on an
/// error, reconnect and publish the unacknowledged one again.
async fn mqtt_publisher(ports: Vec<u16>, n: usize) -> BTreeSet<usize> {
    let (mut c, mut el) = common::mqtt_connect(&ports, "ha-pub", true).await;
    let mut acked = BTreeSet::new();
    let mut i = 0;
    'next: while i < n {
        if c.publish(MQTT_TOPIC, QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .is_ok()
        {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                        acked.insert(i);
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue 'next;
                    }
                    Ok(Ok(_)) => {}
                    _ => break,
                }
            }
        }
        (c, el) = common::mqtt_connect(&ports, "ha-pub", true).await;
    }
    acked
}

/// A persistent MQTT session subscribed to the test topic, made on `port` before the
/// load: it collects its messages at the end from whichever gateway owns the log.
async fn make_subscriber(port: u16) {
    let (c, mut el) = common::mqtt_connect(&[port], "ha-sub", false).await;
    c.subscribe(MQTT_TOPIC, QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    c.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
}

/// Every confirmed AMQP message is in the queue and every acknowledged MQTT message
/// reaches the persistent session, read through the given gateway; returns the
/// duplicates (AMQP, MQTT).
async fn check_delivered(
    amqp_port: u16,
    mqtt_port: u16,
    amqp_confirmed: &BTreeSet<usize>,
    mqtt_acked: &BTreeSet<usize>,
) -> (usize, usize) {
    let (conn, ch) = amqp_connect(&[amqp_port]).await;
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(AMQP_QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(
            String::from_utf8(m.delivery.data)
                .unwrap()
                .parse::<usize>()
                .unwrap(),
        );
    }
    let _ = conn.close(200, "bye".into()).await;
    let distinct: BTreeSet<usize> = got.iter().copied().collect();
    let missing: Vec<_> = amqp_confirmed.difference(&distinct).collect();
    assert!(
        missing.is_empty(),
        "confirmed AMQP messages lost: {missing:?}"
    );

    let (_c, mut el) = common::mqtt_connect(&[mqtt_port], "ha-sub", false).await;
    let mut mqtt_got = Vec::new();
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(3), el.poll()).await {
        if let Event::Incoming(Packet::Publish(p)) = ev {
            mqtt_got.push(
                String::from_utf8(p.payload.to_vec())
                    .unwrap()
                    .parse::<usize>()
                    .unwrap(),
            );
        }
    }
    let mqtt_distinct: BTreeSet<usize> = mqtt_got.iter().copied().collect();
    let mqtt_missing: Vec<_> = mqtt_acked.difference(&mqtt_distinct).collect();
    assert!(
        mqtt_missing.is_empty(),
        "acknowledged MQTT messages lost: {mqtt_missing:?}"
    );
    (
        got.len() - distinct.len(),
        mqtt_got.len() - mqtt_distinct.len(),
    )
}

const N: usize = 600;

type AmqpRun = (BTreeSet<usize>, Option<Duration>);

/// Wait for both publishers (4 minutes at most); each got all `N` confirmed.
async fn both_done(
    amqp: tokio::task::JoinHandle<AmqpRun>,
    mqtt: tokio::task::JoinHandle<BTreeSet<usize>>,
) -> (BTreeSet<usize>, Option<Duration>, BTreeSet<usize>) {
    let (amqp_confirmed, first) = tokio::time::timeout(Duration::from_secs(240), amqp)
        .await
        .expect("the AMQP publisher finished")
        .unwrap();
    let mqtt_acked = tokio::time::timeout(Duration::from_secs(240), mqtt)
        .await
        .expect("the MQTT publisher finished")
        .unwrap();
    assert_eq!((amqp_confirmed.len(), mqtt_acked.len()), (N, N));
    (amqp_confirmed, first, mqtt_acked)
}

/// Two gateways on a fresh 3-node cluster: gw1 owns the log and listens, gw2 is a
/// standby without listeners; the MQTT subscriber's session exists.
async fn two_gateways(dir: &Path, urls: &[String]) -> (Gateway, Gateway) {
    let mut gw1 = Gateway::new(dir, "gw1", urls, "");
    let mut gw2 = Gateway::new(dir, "gw2", urls, "");
    gw1.spawn();
    gw1.wait_listening(Duration::from_secs(60));
    gw2.spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !gw2.any_protocol_listening(),
        "a standby opened its listeners"
    );
    make_subscriber(gw1.mqtt).await;
    (gw1, gw2)
}

/// Fault 1: SIGKILL of the owner under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_killed_under_load_standby_takes_over_nothing_confirmed_lost() {
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut gw1, mut gw2) = two_gateways(dir.path(), &cluster.urls()).await;

    let (kill_tx, kill_rx) = tokio::sync::watch::channel(None);
    let amqp = tokio::spawn(amqp_publisher(vec![gw1.amqp, gw2.amqp], N, kill_rx));
    let mqtt = tokio::spawn(mqtt_publisher(vec![gw1.mqtt, gw2.mqtt], N));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw1.sigkill();
    let killed_at = Instant::now();
    kill_tx.send_replace(Some(killed_at));
    gw2.wait_listening(Duration::from_secs(30));
    let takeover = killed_at.elapsed();

    let (amqp_confirmed, first_confirm, mqtt_acked) = both_done(amqp, mqtt).await;
    let (amqp_dups, mqtt_dups) =
        check_delivered(gw2.amqp, gw2.mqtt, &amqp_confirmed, &mqtt_acked).await;
    eprintln!(
        "failover: listeners on the standby {:.2} s after SIGKILL, first AMQP confirm through it \
         after {:.2} s; {N} AMQP and {N} MQTT confirmed, all delivered; duplicates: AMQP \
         {amqp_dups}, MQTT {mqtt_dups}",
        takeover.as_secs_f64(),
        first_confirm.map_or(f64::NAN, |d| d.as_secs_f64()),
    );
    assert!(
        takeover < Duration::from_secs(15),
        "failover took {takeover:?}"
    );

    // `GET /api/mqgate/cluster` (what `mqgate cluster status` shows) on the new owner.
    let (code, body) = common::http_get(gw2.admin, "/api/mqgate/cluster", Some("Z3Vlc3Q6Z3Vlc3Q="));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["replicated"], true);
    assert_eq!(v["owner"]["node"], "gw2");
    assert_eq!(v["this_node"]["role"], "owner");
    let replicas = v["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3, "{body}");
    assert_eq!(replicas.iter().filter(|r| r["leader"] == true).count(), 1);
    assert!(v["last_seq"].as_u64().unwrap() > 0);
    let nodes = v["nodes"].as_array().unwrap();
    assert!(
        nodes
            .iter()
            .any(|n| n["node"] == "gw2" && n["role"] == "owner"),
        "{body}"
    );
}

/// Fault 2: SIGKILL of the NATS server that leads the stream, under load: writes pause
/// while JetStream elects another leader, then resume; nothing confirmed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_writes_pause_and_resume() {
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut gw1 = Gateway::new(dir.path(), "gw1", &cluster.urls(), "");
    gw1.spawn();
    gw1.wait_listening(Duration::from_secs(60));
    make_subscriber(gw1.mqtt).await;

    let (_tx, rx) = tokio::sync::watch::channel(None);
    let amqp = tokio::spawn(amqp_publisher(vec![gw1.amqp], N, rx));
    let mqtt = tokio::spawn(mqtt_publisher(vec![gw1.mqtt], N));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let nats = async_nats::connect(cluster.urls()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let mut stream = js.get_stream("mqgate").await.unwrap();
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .unwrap()
        .leader
        .unwrap();
    let i = cluster.nodes.iter().position(|n| n.name == leader).unwrap();
    let mut cluster = tokio::task::spawn_blocking(move || {
        let mut c = cluster;
        c.kill(i);
        c
    })
    .await
    .unwrap();
    let killed = Instant::now();
    let (amqp_confirmed, _, mqtt_acked) = both_done(amqp, mqtt).await;
    let (amqp_dups, mqtt_dups) =
        check_delivered(gw1.amqp, gw1.mqtt, &amqp_confirmed, &mqtt_acked).await;
    eprintln!(
        "stream leader {leader} killed: both publishers done {:.1} s later; all confirmed \
         delivered; duplicates: AMQP {amqp_dups}, MQTT {mqtt_dups}",
        killed.elapsed().as_secs_f64()
    );
    tokio::task::spawn_blocking(move || cluster.restart(i))
        .await
        .unwrap();
}

/// Fault 3: the owner is paused (SIGSTOP) past its lease; the standby takes over and
/// the clients move to it; the old owner, resumed (SIGCONT), writes nothing: it steps
/// down and exits non-zero, and no record after the new owner's fence is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_owner_is_fenced_when_it_resumes() {
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut gw1, mut gw2) = two_gateways(dir.path(), &cluster.urls()).await;

    let (_tx, rx) = tokio::sync::watch::channel(None);
    let amqp = tokio::spawn(amqp_publisher(vec![gw1.amqp, gw2.amqp], N, rx));
    let mqtt = tokio::spawn(mqtt_publisher(vec![gw1.mqtt, gw2.mqtt], N));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw1.signal("-STOP");
    gw2.wait_listening(Duration::from_secs(30));
    // Let the clients move and write through the new owner, then wake the old one.
    tokio::time::sleep(Duration::from_secs(6)).await;
    gw1.signal("-CONT");
    let exit = gw1.wait_exit(Duration::from_secs(30));
    assert!(!exit.success(), "a fenced owner exits non-zero: {exit:?}");

    let (amqp_confirmed, _, mqtt_acked) = both_done(amqp, mqtt).await;
    check_delivered(gw2.amqp, gw2.mqtt, &amqp_confirmed, &mqtt_acked).await;

    // The log: after gw2's fence, every record is gw2's.
    let nats = async_nats::connect(cluster.urls()).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    let mut stream = js.get_stream("mqgate").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut fence = None;
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        if m.headers
            .get("Mqgate-Fence")
            .is_some_and(|v| v.as_str().starts_with("gw2/"))
        {
            fence = Some(seq);
        } else if fence.is_some() {
            let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_string();
            assert!(
                id.starts_with("gw2."),
                "record {seq} after gw2's fence is {id}"
            );
        }
    }
    assert!(fence.is_some(), "gw2 fenced the log");
}
