//! Connection admission on the real `mqgate` binary: `limits.max_connections` holds
//! exactly under concurrent connects and refused clients get their protocol's refusal
//! (AMQP connection.close 530 at connection.open, MQTT CONNACK 3 / 0x97); sockets that
//! never finish their handshake count only against `limits.max_pending_handshakes` (the
//! oldest is closed for a new one), so they cannot lock real clients out.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Broker;

fn broker(limits: &str) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mqgate.toml");
    std::fs::write(&cfg, format!("[limits]\n{limits}\n")).unwrap();
    let b = Broker::start_with(&["--config", cfg.to_str().unwrap()]);
    (b, dir)
}

/// CONNECT (3.1.1 level 4, or 5) with client id `id`; the CONNACK's return / reason
/// code, or `Err` when the socket closed without one. The socket is kept open.
fn mqtt_connect(port: u16, id: &str, v5: bool) -> (Result<u8, String>, TcpStream) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut var = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        if v5 { 5 } else { 4 },
        0x02,
        0,
        60,
    ];
    if v5 {
        var.push(0); // no properties
    }
    var.extend_from_slice(&(id.len() as u16).to_be_bytes());
    var.extend_from_slice(id.as_bytes());
    let mut pkt = vec![0x10, var.len() as u8];
    pkt.extend_from_slice(&var);
    let r = (|| {
        s.write_all(&pkt).map_err(|e| e.to_string())?;
        let mut head = [0u8; 2];
        s.read_exact(&mut head)
            .map_err(|e| format!("no CONNACK: {e}"))?;
        let mut rest = vec![0u8; usize::from(head[1])];
        s.read_exact(&mut rest).map_err(|e| e.to_string())?;
        if head[0] != 0x20 {
            return Err(format!("packet {:#04x} instead of CONNACK", head[0]));
        }
        Ok(rest[1])
    })();
    (r, s)
}

fn amqp_url(b: &Broker) -> String {
    b.amqp_url()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_lock_real_clients_out() {
    let (b, _cfg) = broker("max_connections = 10\nmax_pending_handshakes = 20");
    // 50 sockets on each protocol that never say a word.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(("127.0.0.1", b.amqp)).unwrap());
        silent.push(TcpStream::connect(("127.0.0.1", b.mqtt)).unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Real clients still get in, on both protocols, several times over.
    let mut conns = Vec::new();
    for i in 0..5 {
        let c = tokio::time::timeout(
            Duration::from_secs(10),
            lapin::Connection::connect(&amqp_url(&b), Default::default()),
        )
        .await
        .expect("AMQP connect timed out")
        .unwrap_or_else(|e| panic!("AMQP client {i} refused: {e}"));
        conns.push(c);
        let (r, s) = mqtt_connect(b.mqtt, &format!("real-{i}"), false);
        assert_eq!(r, Ok(0), "MQTT client {i} refused");
        silent.push(s);
    }
    // The pending ones are bounded: the metric says at most the cap per protocol.
    let (_, text) = common::http_get(b.admin, "/metrics", None);
    for l in text
        .lines()
        .filter(|l| l.starts_with("mqgate_handshakes_pending{"))
    {
        let v: f64 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(v <= 20.0, "{l}");
    }
    drop(silent);
    for c in conns {
        let _ = c.close(200, "bye".into()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_admits_exactly_the_limit_and_refuses_with_the_protocol() {
    let (b, _cfg) = broker("max_connections = 10");

    // AMQP: 30 at once, exactly 10 open; the others get connection.close 530.
    let url = amqp_url(&b);
    let tries: Vec<_> = (0..30)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(15),
                    lapin::Connection::connect(&url, Default::default()),
                )
                .await
                .expect("AMQP connect timed out")
            })
        })
        .collect();
    let mut open = Vec::new();
    let mut refused = Vec::new();
    for t in tries {
        match t.await.unwrap() {
            Ok(c) => open.push(c),
            Err(e) => refused.push(format!("{e:?} {e}")),
        }
    }
    assert_eq!(
        open.len(),
        10,
        "AMQP connections admitted (refusals: {refused:?})"
    );
    assert_eq!(refused.len(), 20);
    for r in &refused {
        assert!(
            r.contains("NOT_ALLOWED") || r.contains("NotAllowed") || r.contains("530"),
            "not the AMQP refusal: {r}"
        );
    }

    // MQTT 3.1.1: 30 at once, exactly 10 CONNACK 0, the others CONNACK 3.
    let port = b.mqtt;
    let tries: Vec<_> = (0..30)
        .map(|i| std::thread::spawn(move || mqtt_connect(port, &format!("c{i}"), false)))
        .collect();
    let mut kept = Vec::new();
    let mut codes = Vec::new();
    for t in tries {
        let (r, s) = t.join().unwrap();
        codes.push(r.clone().expect("a CONNACK"));
        kept.push(s);
    }
    assert_eq!(codes.iter().filter(|c| **c == 0).count(), 10, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 3).count(), 20, "{codes:?}");
    // MQTT 5 over the limit: Quota exceeded.
    let (r, _s) = mqtt_connect(b.mqtt, "v5-over", true);
    assert_eq!(r, Ok(0x97));

    // A slot freed is a slot usable.
    let c = open.pop().unwrap();
    c.close(200, "bye".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = lapin::Connection::connect(&url, Default::default()).await;
    assert!(again.is_ok(), "a freed slot was not given out again");
    drop(kept);
}
