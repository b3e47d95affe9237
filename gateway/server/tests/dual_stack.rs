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
    let (_child, amqp, mqtt) = start("[::]", None);
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

/// The backlog a listening socket was given, as the kernel reports it (`ss`'s Send-Q
/// column for a listener).
fn listen_backlog(port: u16) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|q| q.parse().ok())
}

/// A burst of connects is queued by the kernel instead of dropped: each listener gets
/// `limits.listen_backlog` (4096 unless set; the standard library's 128 overflowed when
/// thousands of clients connected at once, and each dropped SYN cost its client a
/// 1 s retry).
#[test]
fn listeners_get_the_configured_backlog() {
    if Command::new("ss").arg("-V").output().is_err() {
        eprintln!("no `ss` here (iproute2): skipped");
        return;
    }
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    for (setting, want) in [(None, 4096u32), (Some("512"), 512)] {
        let (_child, amqp, mqtt) = start("127.0.0.1", setting);
        for (what, port) in [("AMQP", amqp), ("MQTT", mqtt)] {
            assert_eq!(
                listen_backlog(port),
                Some(want.min(somaxconn)),
                "{what} listener's backlog with listen_backlog = {setting:?}"
            );
        }
    }
}

/// Start the broker (in memory) with its AMQP and MQTT listeners on `host` (free ports),
/// with `limits.listen_backlog` when given, and wait until its admin port answers.
/// Returns the process and the AMQP and MQTT ports.
fn start(host: &str, listen_backlog: Option<&str>) -> (KillOnDrop, u16, u16) {
    let (amqp, mqtt, admin) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqgate"));
    cmd.args(["serve", "--memory"])
        .args(["--amqp", &format!("{host}:{amqp}")])
        .args(["--mqtt", &format!("{host}:{mqtt}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(v) = listen_backlog {
        cmd.env("MQGATE__LIMITS__LISTEN_BACKLOG", v);
    }
    let child = KillOnDrop(cmd.spawn().expect("start mqgate"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(Instant::now() < deadline, "mqgate did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, amqp, mqtt)
}

/// The broker process, killed when the test ends (a failing test too).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
