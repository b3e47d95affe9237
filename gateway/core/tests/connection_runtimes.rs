//! Connections spread over per-core runtimes (`net::set_connection_runtimes`): each
//! accepted socket is served on the runtime with the fewest open connections (ties in
//! turn), registered with that runtime's poller, so it reads and writes there and
//! nowhere else. Its own test binary: the runtimes are set once per process.

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

/// Write to `c` twice and expect each echo from `thread`: the second read needs the
/// served side's poller again.
async fn echo_twice(c: &mut TcpStream, i: usize, thread: &str) {
    for round in 0..2 {
        let msg = format!("c{i}r{round}");
        c.write_all(msg.as_bytes()).await.expect("write");
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert_eq!(reply, format!("{thread}:{msg}"), "connection {i}");
    }
}

#[test]
fn accepted_connections_go_to_the_least_loaded_runtime() {
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
        let main_name = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        let thread_of = |k: usize| match k {
            0 => main_name.clone(),
            k => format!("test-worker-{k}"),
        };
        let mut clients = Vec::new();
        for i in 0..6 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            echo_twice(&mut c, i, &thread_of(i % 3)).await;
            clients.push(c);
        }
        assert_eq!(net::runtime_connections(), [2, 2, 2]);
        // Both connections of worker 1 close: the next two go there, the runtime with
        // the fewest open, not on in turn.
        drop(clients.remove(4));
        drop(clients.remove(1));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while net::runtime_connections() != [2, 0, 2] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "closed connections still counted: {:?}",
                net::runtime_connections()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for i in 6..8 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            echo_twice(&mut c, i, &thread_of(1)).await;
            clients.push(c);
        }
        assert_eq!(net::runtime_connections(), [2, 2, 2]);
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
            "test-worker-2",
            "test-worker-1",
            "test-worker-1",
        ],
        "each connection on the runtime with the fewest open, ties in turn"
    );
    let _ = stop.send(true);
    t1.join().expect("worker 1");
    t2.join().expect("worker 2");
}
