//! Connections spread over per-core runtimes (`net::set_connection_runtimes`): each
//! accepted socket is served on the next runtime in turn, registered with that
//! runtime's poller, so it reads and writes there and nowhere else. Its own test
//! binary: the runtimes are set once per process.

use std::sync::Arc;
use std::time::Duration;

use mqgate_core::net;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A single-threaded runtime on a thread of its own, as `mqgate serve` starts one per
/// core; it runs until `stop` turns true.
fn worker(
    index: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (tokio::runtime::Handle, std::thread::JoinHandle<()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handle = rt.handle().clone();
    let thread = std::thread::Builder::new()
        .name(format!("test-worker-{index}"))
        .spawn(move || {
            net::set_home(index);
            let mut stop = stop;
            rt.block_on(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        })
        .expect("thread");
    (handle, thread)
}

#[test]
fn accepted_connections_run_on_each_runtime_in_turn() {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (h1, t1) = worker(1, stopped.clone());
    let (h2, t2) = worker(2, stopped.clone());
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    net::set_connection_runtimes(vec![main.handle().clone(), h1, h2]);
    net::set_home(0);
    // Which thread served each connection, in the order they were accepted.
    let served: Arc<Mutex<Vec<String>>> = Arc::default();
    main.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_quit, quit) = tokio::sync::watch::channel(false);
        let log = Arc::clone(&served);
        let _accept = net::accept_loop("test", listener, quit, move |mut tcp, _peer| {
            let name = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_owned();
            log.lock().push(name.clone());
            // An echo that names its thread: the socket must read and write on the
            // runtime it was handed to (its poller wakes that thread).
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                    if tcp.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        });
        for i in 0..6 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            // Twice, so the second read needs the served side's poller again.
            for round in 0..2 {
                let msg = format!("c{i}r{round}");
                c.write_all(msg.as_bytes()).await.expect("write");
                let mut buf = [0u8; 64];
                let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
                    .await
                    .expect("echo in time")
                    .expect("read");
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                let expected_thread = match i % 3 {
                    0 => std::thread::current()
                        .name()
                        .unwrap_or("unnamed")
                        .to_owned(),
                    k => format!("test-worker-{k}"),
                };
                assert_eq!(reply, format!("{expected_thread}:{msg}"), "connection {i}");
            }
        }
    });
    let served = served.lock().clone();
    let main_name = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    assert_eq!(
        served,
        [
            main_name.as_str(),
            "test-worker-1",
            "test-worker-2",
            main_name.as_str(),
            "test-worker-1",
            "test-worker-2"
        ],
        "each connection on the next runtime in turn"
    );
    let _ = stop.send(true);
    t1.join().expect("worker 1");
    t2.join().expect("worker 2");
}
