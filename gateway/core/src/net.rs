//! The accept loop every listener shares (AMQP, MQTT, TLS, WebSocket).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Accept TCP connections (no Nagle delay) until `stop` changes, handing each to
/// `on_accept`; an accept error (out of file descriptors) is logged and retried after a
/// pause instead of ending the listener.
pub fn accept_loop<F>(
    what: &'static str,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    on_accept: F,
) -> JoinHandle<()>
where
    F: Fn(TcpStream, SocketAddr) + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        on_accept(tcp, peer);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "{what} accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    })
}
