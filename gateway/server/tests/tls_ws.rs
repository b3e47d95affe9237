//! TLS listeners for AMQP (amqps) and MQTT (mqtts), and MQTT over WebSocket with and
//! without TLS, with a certificate made at test time: each speaks its protocol end to
//! end through the real listener.

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

    // AMQP over TLS: the protocol header gets connection.start (class 10, method 10).
    let tcp = TcpStream::connect(("127.0.0.1", amqps)).await.unwrap();
    let mut s = tls.connect(name.clone(), tcp).await.expect("TLS to amqps");
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let head = read_exact(&mut s, 11).await;
    assert_eq!(head[0], 1, "a method frame");
    assert_eq!(&head[7..11], &[0, 10, 0, 10], "connection.start");

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
