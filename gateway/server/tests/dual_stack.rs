//! The default listeners take IPv6 and IPv4 clients alike (`[::]`), as RabbitMQ's do: a
//! client that resolves `localhost` to ::1 first connects.

mod common;

use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

/// Whether this machine has an IPv6 loopback.
fn has_ipv6() -> bool {
    std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_listeners_take_ipv6_and_ipv4_clients() {
    let (amqp, mqtt, admin) = (free_port(), free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["serve", "--memory"])
        .args(["--amqp", &format!("[::]:{amqp}")])
        .args(["--mqtt", &format!("[::]:{mqtt}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start mqgate");
    let _child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(Instant::now() < deadline, "mqgate did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut hosts = vec!["127.0.0.1".to_owned()];
    if has_ipv6() {
        hosts.push("[::1]".to_owned());
    } else {
        eprintln!("no IPv6 loopback here: only IPv4 checked");
    }
    for host in &hosts {
        let url = format!("amqp://guest:guest@{host}:{amqp}/%2f");
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("AMQP over {host}: {e}"));
        let ch = conn
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("AMQP channel over {host}: {e}"));
        ch.close(200, "bye".into()).await.expect("channel close");
        conn.close(200, "bye".into()).await.expect("close");
        let addr: SocketAddr = format!("{host}:{mqtt}").parse().expect("address");
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("MQTT listener over {host}: {e}"));
    }
}

/// The broker process, killed when the test ends (a failing test too).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
