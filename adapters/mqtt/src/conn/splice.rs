//! A session lives on the gateway owning its shard (issue 16): a client that connects
//! to another gateway of a cluster is spliced there. The accepting gateway checks the
//! login (its throttle sees the real peer), opens a connection to the owner's MQTT
//! listener, sends a preamble line naming the real peer, the CONNECT again and whatever
//! the client sent after it, then copies bytes both ways until either side closes. The
//! owner serves the session as if the client had come to it, so takeover, wills, QoS 2
//! state and the session's deliveries have one place; when the shard moves, the owner
//! closes the session, the splice ends with it, and the client's reconnect lands on
//! the next owner.
//!
//! The preamble (`MQGATE-SPLICE <peer>\r\n`, never a valid MQTT packet: no packet type
//! starts with `M`) only stops the owner from splicing the connection again and names
//! the peer in its connection list; the owner authenticates the CONNECT itself and
//! throttles logins by the TCP peer, so a client sending it gains nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::codec::{self, Connect, Packet};
use crate::server::Shared;

/// What starts a spliced connection.
pub(crate) const PREAMBLE: &[u8] = b"MQGATE-SPLICE ";
/// The preamble's longest line.
const PREAMBLE_MAX: usize = 128;
/// How long reaching the owner may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `buf` (what a connection sent first) may be, or is, a preamble; `Some(n)`
/// once a whole line of `n` bytes is there, with the peer it names.
pub(crate) enum Preamble {
    /// Not one: an MQTT connection.
    No,
    /// Not enough bytes to tell.
    Partial,
    /// A preamble `len` bytes long naming `peer`.
    Line { len: usize, peer: String },
    /// Starts like one but is not well formed.
    Bad,
}

/// Read a preamble at the start of `buf`.
pub(crate) fn preamble(buf: &[u8]) -> Preamble {
    let n = buf.len().min(PREAMBLE.len());
    if buf[..n] != PREAMBLE[..n] {
        return Preamble::No;
    }
    match buf.iter().take(PREAMBLE_MAX).position(|b| *b == b'\n') {
        Some(i) if i > PREAMBLE.len() && buf[i - 1] == b'\r' => {
            match std::str::from_utf8(&buf[PREAMBLE.len()..i - 1]) {
                Ok(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_graphic()) => {
                    Preamble::Line {
                        len: i + 1,
                        peer: p.to_owned(),
                    }
                }
                _ => Preamble::Bad,
            }
        }
        Some(_) => Preamble::Bad,
        None if buf.len() >= PREAMBLE_MAX => Preamble::Bad,
        None => Preamble::Partial,
    }
}

/// Splice the client to the owner at `addr`: `Err` with a reason when the owner could
/// not be reached (nothing was sent to the client yet: the caller refuses it).
#[allow(clippy::too_many_arguments)]
pub(super) async fn splice<S>(
    shared: Arc<Shared>,
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    inbuf: BytesMut,
    peer: SocketAddr,
    c: Connect,
    addr: &str,
    admitted: mqgate_core::net::Admitted,
) -> Result<(), (WriteHalf<S>, String)>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let up = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err((wr, format!("the session's gateway {addr}: {e}"))),
        Err(_) => return Err((wr, format!("the session's gateway {addr}: no answer"))),
    };
    let _ = up.set_nodelay(true);
    let mut up = up;
    let mut head = BytesMut::with_capacity(PREAMBLE_MAX + 256 + inbuf.len());
    head.extend_from_slice(PREAMBLE);
    head.extend_from_slice(format!("{peer}\r\n").as_bytes());
    let version = c.version;
    let client = c.client_id.clone();
    codec::encode(&Packet::Connect(Box::new(c)), version, &mut head);
    head.extend_from_slice(&inbuf);
    drop(inbuf);
    if let Err(e) = up.write_all(&head).await {
        return Err((wr, format!("the session's gateway {addr}: {e}")));
    }
    drop(head);
    tracing::debug!(%peer, %client, owner = %addr, "MQTT: spliced to the gateway owning the session");
    let mut down = rd.unsplit(wr);
    let mut stop = shared.shutdown.subscribe();
    drop(shared);
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut down, &mut up) => {
            if let Err(e) = r {
                tracing::debug!(%peer, %client, error = %e, "MQTT: a spliced connection ended");
            }
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    let _ = down.shutdown().await;
    drop(admitted);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preambles() {
        assert!(matches!(preamble(b"\x10\x0c\x00\x04MQTT"), Preamble::No));
        assert!(matches!(preamble(b""), Preamble::Partial));
        assert!(matches!(preamble(b"MQGATE"), Preamble::Partial));
        assert!(matches!(
            preamble(b"MQGATE-SPLICE 1.2.3.4:5"),
            Preamble::Partial
        ));
        match preamble(b"MQGATE-SPLICE 1.2.3.4:5\r\n\x10") {
            Preamble::Line { len, peer } => {
                assert_eq!(len, 25);
                assert_eq!(peer, "1.2.3.4:5");
            }
            _ => panic!("a preamble"),
        }
        assert!(matches!(preamble(b"MQGATE-SPLICE \r\n"), Preamble::Bad));
        assert!(matches!(preamble(b"MQGATE-SPLICE a b\r\n"), Preamble::Bad));
        assert!(matches!(preamble(b"MQGATE-SPLICE ab\n"), Preamble::Bad));
        assert!(matches!(preamble(&[b'M'; 200]), Preamble::No));
        let mut long = PREAMBLE.to_vec();
        long.extend([b'1'; 200]);
        assert!(matches!(preamble(&long), Preamble::Bad));
    }
}
