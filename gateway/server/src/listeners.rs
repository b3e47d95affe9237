//! TLS and WebSocket listeners: they turn an accepted socket into a byte stream and hand
//! it to an adapter's `serve_stream`, so AMQP and MQTT run unchanged over TLS (5671,
//! 8883) and MQTT over WebSocket (8083) and WebSocket over TLS (8084).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use mqgate_core::sockio::QuickAck;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long a TLS or WebSocket handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS acceptor from PEM files (certificate chain, private key).
pub(crate) fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read the certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse the certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read the private key {}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not make a TLS configuration")?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Something that serves one client over a byte stream (an adapter), carried by the TCP
/// socket `quick`.
pub(crate) trait Serve: Clone + Send + Sync + 'static {
    /// Whether the adapter's connections ACK early what they read (`QuickAck`): its
    /// publishes' answers wait on I/O and its clients may leave Nagle's algorithm on.
    fn ack_early(&self) -> bool;

    fn serve<S>(&self, stream: S, peer: SocketAddr, quick: Option<QuickAck>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static;
}

impl Serve for mqgate_amqp::AmqpServer {
    /// AMQP clients turn Nagle's algorithm off (lapin, py-amqp, amqplib, the Java
    /// client): an early ACK would cost a packet for nothing.
    fn ack_early(&self) -> bool {
        false
    }

    fn serve<S>(&self, stream: S, peer: SocketAddr, _quick: Option<QuickAck>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_stream(stream, peer);
    }
}

impl Serve for mqgate_mqtt::MqttServer {
    fn ack_early(&self) -> bool {
        self.answers_wait()
    }

    fn serve<S>(&self, stream: S, peer: SocketAddr, quick: Option<QuickAck>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_tcp_stream(stream, peer, quick);
    }
}

/// Accept TLS connections and serve them until `stop` turns true.
pub(crate) fn serve_tls<A: Serve>(
    what: &'static str,
    listener: TcpListener,
    tls: TlsAcceptor,
    adapter: A,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let ack_early = adapter.ack_early();
    mqgate_core::net::accept_loop(what, listener, stop, move |tcp, peer| {
        let (tls, adapter) = (tls.clone(), adapter.clone());
        let quick = ack_early.then(|| QuickAck::of(tcp.get_ref())).flatten();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => adapter.serve(stream, peer, quick),
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "{what}: TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "{what}: TLS handshake timed out"),
            }
        });
    });
}

/// Accept MQTT-over-WebSocket connections (with TLS when `tls` is given): the
/// WebSocket handshake must offer the `mqtt` subprotocol (MQTT 3.1.1 and 5.0 say so),
/// which the answer echoes; each binary message carries MQTT bytes.
pub(crate) fn serve_ws(
    what: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mqtt: mqgate_mqtt::MqttServer,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    mqgate_core::net::accept_loop(what, listener, stop, move |tcp, peer| {
        let (tls, mqtt) = (tls.clone(), mqtt.clone());
        tokio::spawn(async move {
            // The bridge's task owns the socket, not the connection: no `QuickAck`.
            let handshake = async {
                match tls {
                    Some(tls) => {
                        let s = tls.accept(tcp).await.map_err(|e| e.to_string())?;
                        mqtt.serve_stream(bridge(ws_accept(s).await?), peer);
                    }
                    None => mqtt.serve_stream(bridge(ws_accept(tcp).await?), peer),
                }
                Ok::<(), String>(())
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "{what}: handshake failed"),
                Err(_) => tracing::info!(%peer, "{what}: handshake timed out"),
            }
        });
    });
}

#[allow(clippy::result_large_err)] // tungstenite's callback signature
async fn ws_accept<S>(stream: S) -> Result<WebSocketStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let check = |req: &Request, mut resp: Response| {
        let offered = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|p| p.eq_ignore_ascii_case("mqtt") || p.eq_ignore_ascii_case("mqttv3.1"));
        if let Some(p) = offered {
            if let Ok(v) = HeaderValue::from_str(p) {
                resp.headers_mut().insert("Sec-WebSocket-Protocol", v);
            }
        }
        Ok(resp)
    };
    tokio_tungstenite::accept_hdr_async(stream, check)
        .await
        .map_err(|e| e.to_string())
}

/// Bridge a WebSocket to a byte stream the adapter reads and writes: one task moves
/// binary messages' bytes in, and each chunk the adapter writes out as one binary
/// message (sent and flushed before the next).
fn bridge<S>(ws: WebSocketStream<S>) -> tokio::io::DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut sink, mut stream) = ws.split();
        let (mut rd, mut wr) = tokio::io::split(theirs);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                n = rd.read(&mut buf) => match n {
                    Ok(0) | Err(_) => {
                        let _ = sink.close().await;
                        return;
                    }
                    Ok(n) => {
                        if sink.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                            return;
                        }
                    }
                },
                m = stream.next() => match m {
                    Some(Ok(Message::Binary(b))) => {
                        if wr.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                    // MQTT travels in binary messages only; text, close or an error ends it.
                    Some(Ok(Message::Text(_))) | Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        let _ = wr.shutdown().await;
                        return;
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    });
    ours
}
