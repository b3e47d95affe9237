//! TLS listeners for AMQP (amqps) and MQTT (mqtts), and MQTT over WebSocket with and
//! without TLS, with a certificate made at test time: each speaks its protocol end to
//! end through the real listener. Over amqps, bodies small, large and over frame_max
//! come back byte for byte (large ones leave the broker as shared parts of one
//! vectored write, through the TLS stream).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{free_port, Broker};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

/// MQTT 3.1.1 CONNECT (clean session, keep alive 60) for client `id`.
fn connect_packet(id: &str) -> Vec<u8> {
    let mut var = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    var.extend_from_slice(&(id.len() as u16).to_be_bytes());
    var.extend_from_slice(id.as_bytes());
    let mut p = vec![0x10, var.len() as u8];
    p.extend(var);
    p
}

const CONNACK_OK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

fn tls_connector(cert_der: Vec<u8>) -> TlsConnector {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(cert_der.into()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let cfg = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

async fn read_exact<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut b))
        .await
        .expect("in time")
        .expect("read");
    b
}

/// One AMQP frame.
async fn amqp_send<S: AsyncWrite + Unpin>(s: &mut S, ty: u8, ch: u16, payload: &[u8]) {
    let mut f = vec![ty];
    f.extend_from_slice(&ch.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    s.write_all(&f).await.unwrap();
}

/// The next AMQP frame: type, channel, payload.
async fn amqp_frame<S: AsyncRead + Unpin>(s: &mut S) -> (u8, u16, Vec<u8>) {
    let head = read_exact(s, 7).await;
    let len = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut rest = read_exact(s, len + 1).await;
    assert_eq!(rest.pop(), Some(0xCE), "frame end");
    (head[0], u16::from_be_bytes([head[1], head[2]]), rest)
}

/// A method payload: class, method, arguments.
fn amqp_method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    p
}

fn short(out: &mut Vec<u8>, v: &str) {
    out.push(v.len() as u8);
    out.extend_from_slice(v.as_bytes());
}

/// The next method frame must be `class.id`.
async fn amqp_expect<S: AsyncRead + Unpin>(s: &mut S, class: u16, id: u16, what: &str) -> Vec<u8> {
    let (ty, _, p) = amqp_frame(s).await;
    assert_eq!(ty, 1, "{what}: a method frame");
    assert_eq!(&p[..4], &amqp_method(class, id, &[])[..], "{what}");
    p
}

/// Log in as guest with frame_max 8192, open channel 1, declare a queue, publish
/// bodies of several sizes to it (two over frame_max), consume them back (no-ack) and
/// compare byte for byte.
async fn amqp_bodies_over<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    const FRAME_MAX: u32 = 8192;
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    amqp_expect(&mut s, 10, 10, "connection.start").await;
    let mut a = vec![0, 0, 0, 0]; // client properties: an empty table
    short(&mut a, "PLAIN");
    a.extend_from_slice(&12u32.to_be_bytes());
    a.extend_from_slice(b"\0guest\0guest");
    short(&mut a, "en_US");
    amqp_send(&mut s, 1, 0, &amqp_method(10, 11, &a)).await;
    amqp_expect(&mut s, 10, 30, "connection.tune").await;
    let mut a = 16u16.to_be_bytes().to_vec();
    a.extend_from_slice(&FRAME_MAX.to_be_bytes());
    a.extend_from_slice(&0u16.to_be_bytes());
    amqp_send(&mut s, 1, 0, &amqp_method(10, 31, &a)).await;
    let mut a = Vec::new();
    short(&mut a, "/");
    short(&mut a, "");
    a.push(0);
    amqp_send(&mut s, 1, 0, &amqp_method(10, 40, &a)).await;
    amqp_expect(&mut s, 10, 41, "connection.open-ok").await;
    amqp_send(&mut s, 1, 1, &amqp_method(20, 10, &[0])).await;
    amqp_expect(&mut s, 20, 11, "channel.open-ok").await;
    let mut a = vec![0, 0];
    short(&mut a, "tls.bodies");
    a.push(0);
    a.extend_from_slice(&[0, 0, 0, 0]);
    amqp_send(&mut s, 1, 1, &amqp_method(50, 10, &a)).await;
    amqp_expect(&mut s, 50, 11, "queue.declare-ok").await;
    let sizes = [
        0usize, 100, 1023, 1024, 4096, 8183, 8184, 8185, 20_000, 100_000,
    ];
    let body = |i: usize, n: usize| -> Vec<u8> { (0..n).map(|j| (j * 7 + i * 13) as u8).collect() };
    let chunk = FRAME_MAX as usize - 8;
    for (i, n) in sizes.iter().enumerate() {
        let mut a = vec![0, 0];
        short(&mut a, "");
        short(&mut a, "tls.bodies");
        a.push(0);
        amqp_send(&mut s, 1, 1, &amqp_method(60, 40, &a)).await;
        let mut h = 60u16.to_be_bytes().to_vec();
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&(*n as u64).to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes()); // no properties
        amqp_send(&mut s, 2, 1, &h).await;
        for piece in body(i, *n).chunks(chunk) {
            amqp_send(&mut s, 3, 1, piece).await;
        }
    }
    let mut a = vec![0, 0];
    short(&mut a, "tls.bodies");
    short(&mut a, "c");
    a.push(0x02); // no-ack
    a.extend_from_slice(&[0, 0, 0, 0]);
    amqp_send(&mut s, 1, 1, &amqp_method(60, 20, &a)).await;
    amqp_expect(&mut s, 60, 21, "basic.consume-ok").await;
    for (i, n) in sizes.iter().enumerate() {
        amqp_expect(&mut s, 60, 60, "basic.deliver").await;
        let (ty, _, h) = amqp_frame(&mut s).await;
        assert_eq!(ty, 2, "body {i}: a content header");
        assert_eq!(u64::from_be_bytes(h[4..12].try_into().unwrap()), *n as u64);
        let mut got = Vec::new();
        while got.len() < *n {
            let (ty, _, piece) = amqp_frame(&mut s).await;
            assert_eq!(ty, 3, "body {i}: a body frame");
            assert!(piece.len() <= chunk, "body {i}: a frame within frame_max");
            got.extend_from_slice(&piece);
        }
        assert!(got == body(i, *n), "body {i} of {n} bytes differs");
    }
}

async fn mqtt_over<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, id: &str) {
    s.write_all(&connect_packet(id)).await.unwrap();
    assert_eq!(read_exact(&mut s, 4).await, CONNACK_OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_websocket_listeners() {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let (amqps, mqtts, ws, wss) = (free_port(), free_port(), free_port(), free_port());
    let cfg = dir.path().join("mqgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listeners]\namqps = \"127.0.0.1:{amqps}\"\nmqtts = \"127.0.0.1:{mqtts}\"\nmqtt_ws = \"127.0.0.1:{ws}\"\nmqtt_wss = \"127.0.0.1:{wss}\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let b = Broker::start_with(&["--config", cfg.to_str().unwrap()]);
    for p in [amqps, mqtts, ws, wss] {
        let deadline = std::time::Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", p)).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "port {p} not listening"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let tls = tls_connector(ck.cert.der().to_vec());
    let name = ServerName::try_from("localhost").unwrap();

    // AMQP over TLS: log in, publish and consume bodies of every size.
    let tcp = TcpStream::connect(("127.0.0.1", amqps)).await.unwrap();
    amqp_bodies_over(tls.connect(name.clone(), tcp).await.expect("TLS to amqps")).await;

    // MQTT over TLS.
    let tcp = TcpStream::connect(("127.0.0.1", mqtts)).await.unwrap();
    mqtt_over(
        tls.connect(name.clone(), tcp).await.expect("TLS to mqtts"),
        "over-tls",
    )
    .await;

    // MQTT over WebSocket: subprotocol echoed; subscribe and get our own publish back.
    let mut req = format!("ws://127.0.0.1:{ws}/mqtt")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let tcp = TcpStream::connect(("127.0.0.1", ws)).await.unwrap();
    let (mut sock, resp) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("WebSocket handshake");
    assert_eq!(
        resp.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "mqtt"
    );
    sock.send(Message::Binary(connect_packet("over-ws").into()))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, sock.next())
        .await
        .expect("in time")
    {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &CONNACK_OK),
        other => panic!("no CONNACK: {other:?}"),
    }
    // SUBSCRIBE id 1 to "w/s" QoS 0, then PUBLISH QoS 0 to it.
    sock.send(Message::Binary(
        vec![0x82, 8, 0, 1, 0, 3, b'w', b'/', b's', 0].into(),
    ))
    .await
    .unwrap();
    let mut buf = Vec::new();
    let want_suback = [0x90, 3, 0, 1, 0];
    let publish = [0x30, 7, 0, 3, b'w', b'/', b's', b'h', b'i'];
    let mut sent_publish = false;
    let deadline = std::time::Instant::now() + WAIT;
    while buf.len() < want_suback.len() + publish.len() {
        assert!(std::time::Instant::now() < deadline, "got {buf:?}");
        if buf.len() >= want_suback.len() && !sent_publish {
            assert_eq!(&buf[..5], &want_suback);
            sock.send(Message::Binary(publish.to_vec().into()))
                .await
                .unwrap();
            sent_publish = true;
        }
        if let Ok(Some(Ok(Message::Binary(b)))) =
            tokio::time::timeout(Duration::from_millis(200), sock.next()).await
        {
            buf.extend_from_slice(&b);
        }
    }
    assert_eq!(
        &buf[5..],
        &publish,
        "our publish came back over the WebSocket"
    );

    // MQTT over WebSocket over TLS.
    let tcp = TcpStream::connect(("127.0.0.1", wss)).await.unwrap();
    let tls_stream = tls.connect(name, tcp).await.expect("TLS to wss");
    let mut req = format!("wss://localhost:{wss}/mqtt")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut sock, _) = tokio_tungstenite::client_async(req, tls_stream)
        .await
        .expect("WSS handshake");
    sock.send(Message::Binary(connect_packet("over-wss").into()))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, sock.next())
        .await
        .expect("in time")
    {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &CONNACK_OK),
        other => panic!("no CONNACK: {other:?}"),
    }
    drop(b);
}
