//! The harness the session fuzz targets share: a fresh broker core on the in-memory
//! store per input (so a crash reproduces from its input alone), one client over an
//! in-memory pipe that writes a valid handshake and then the fuzzed bytes, and reads
//! until the broker closes or goes quiet.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mqgate_core::{Broker, CoreConfig, SystemClock};
use mqgate_store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;

/// How long the client waits for the broker to close after the input ends (a broker
/// that keeps a half-closed connection open counts as done then, not as a hang).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// A fresh broker on the in-memory store.
pub async fn broker() -> Broker {
    Broker::start(
        Arc::new(MemoryStore::new()),
        CoreConfig::default(),
        Arc::new(SystemClock),
    )
    .await
    .expect("broker")
}

/// The peer address the adapters are told.
pub fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

/// What stops an adapter (its shutdown), run before the broker's.
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Run one input: `serve` gets the broker end of a pipe and answers the broker and how to
/// stop the adapter; the client writes `handshake` and then each of `chunks`, reading
/// what comes back as it goes, and then closes.
pub fn session<F, Fut>(serve: F, handshake: &[u8], chunks: &[&[u8]])
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = (Broker, Stop)>,
{
    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (broker, stop) = serve(server).await;
        let (mut rd, mut wr) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match tokio::time::timeout(CLOSE_WAIT, rd.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
            }
        });
        let _ = wr.write_all(handshake).await;
        for c in chunks {
            if wr.write_all(c).await.is_err() {
                break;
            }
            // Let the broker read this chunk on its own before the next one.
            tokio::task::yield_now().await;
        }
        let _ = wr.shutdown().await;
        drop(wr);
        let _ = reader.await;
        stop.await;
        broker.shutdown().await;
    });
}

/// Split fuzz input into chunks: each starts with a length octet (so the fuzzer controls
/// where reads end), the rest of the input is the last chunk.
pub fn chunks(mut data: &[u8]) -> Vec<&[u8]> {
    let mut v = Vec::new();
    while let Some((&n, rest)) = data.split_first() {
        let n = usize::from(n).min(rest.len());
        v.push(&rest[..n]);
        data = &rest[n..];
        if v.len() == 64 {
            v.push(data);
            break;
        }
    }
    v
}
