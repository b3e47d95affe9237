//! Helpers for tests that run the `mqgate` binary: free ports, broker processes that are
//! killed on drop, the dashboards' PromQL expressions.

#![allow(dead_code, unreachable_pub)]

pub mod gateway;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `mqgate serve` with its data in `data` on loopback `amqp`, `mqtt` and `admin`, plus
/// `extra` arguments. Stdout is discarded; the log goes to the test's stderr at `warn`,
/// or (`logged`) at `info` into a pipe the caller reads.
fn spawn_mqgate(
    data: &Path,
    amqp: u16,
    mqtt: u16,
    admin: u16,
    extra: &[&str],
    logged: bool,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["serve", "--data"])
        .arg(data)
        .args(["--amqp", &format!("127.0.0.1:{amqp}")])
        .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(extra)
        .env("RUST_LOG", if logged { "info" } else { "warn" })
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(if logged {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .expect("start mqgate")
}

/// Wait (30 s at most) until every loopback port in `ports` accepts a connection.
fn wait_ports(ports: &[u16]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ports
        .iter()
        .any(|&p| std::net::TcpStream::connect(("127.0.0.1", p)).is_err())
    {
        assert!(Instant::now() < deadline, "mqgate did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawn `mqgate serve` on free loopback ports and wait until they accept. A port that
/// another test took between `free_port` and the bind makes the broker exit at once:
/// then it is started again on other ports (5 tries).
fn spawn_listening(data: &Path, extra: &[&str], logged: bool) -> (Child, u16, u16, u16) {
    for _ in 0..5 {
        let (amqp, mqtt, admin) = (free_port(), free_port(), free_port());
        let mut child = spawn_mqgate(data, amqp, mqtt, admin, extra, logged);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if [admin, amqp, mqtt]
                .iter()
                .all(|&p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok())
            {
                return (child, amqp, mqtt, admin);
            }
            if child.try_wait().ok().flatten().is_some() {
                eprintln!("mqgate exited at start (a port taken meanwhile?); new ports");
                break;
            }
            assert!(Instant::now() < deadline, "mqgate did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("mqgate did not start in 5 tries");
}

/// `mqgate serve` on loopback ports with its data in a given folder, logging to the
/// test's stderr at `warn`. It can be SIGKILLed and started again on the same data and
/// ports; killed when dropped.
pub struct Node {
    child: Child,
    pub amqp: u16,
    pub mqtt: u16,
    pub admin: u16,
    data: PathBuf,
    /// The temporary folder holding `data`, for [`Node::start_temp`]; removed after the
    /// process is killed.
    _tmp: Option<tempfile::TempDir>,
}

impl Node {
    /// Start on free ports with its data in `data`; returns once all three ports accept.
    pub fn start(data: &Path) -> Node {
        let (child, amqp, mqtt, admin) = spawn_listening(data, &[], false);
        Node {
            child,
            amqp,
            mqtt,
            admin,
            data: data.to_path_buf(),
            _tmp: None,
        }
    }

    /// Start on free ports with its data in a temporary folder that the node owns.
    pub fn start_temp() -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut n = Self::start(&tmp.path().join("data"));
        n._tmp = Some(tmp);
        n
    }

    /// Start on the given ports with its data in `data`; returns once they all accept.
    pub fn start_on(data: &Path, amqp: u16, mqtt: u16, admin: u16) -> Node {
        let n = Node {
            child: spawn_mqgate(data, amqp, mqtt, admin, &[], false),
            amqp,
            mqtt,
            admin,
            data: data.to_path_buf(),
            _tmp: None,
        };
        n.wait_listening();
        n
    }

    /// Wait (30 s at most) until the AMQP, MQTT and admin ports accept connections.
    pub fn wait_listening(&self) {
        wait_ports(&[self.admin, self.amqp, self.mqtt]);
    }

    /// The process id of the running broker.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again on the same data folder and ports.
    pub fn restart(&mut self) {
        let _ = self.child.wait();
        self.child = spawn_mqgate(&self.data, self.amqp, self.mqtt, self.admin, &[], false);
        self.wait_listening();
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// A running `mqgate serve`, killed when dropped.
pub struct Broker {
    pub child: Child,
    pub amqp: u16,
    pub mqtt: u16,
    pub admin: u16,
    pub dir: tempfile::TempDir,
}

impl Broker {
    /// Start on free ports with RocksDB in a temporary folder.
    pub fn start() -> Broker {
        Self::start_with(&[])
    }

    /// Start with extra arguments (`--config <file>`).
    pub fn start_with(extra: &[&str]) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let (child, amqp, mqtt, admin) = spawn_listening(&dir.path().join("data"), extra, false);
        Broker {
            child,
            amqp,
            mqtt,
            admin,
            dir,
        }
    }

    /// Start again on the same data and ports (after a kill), its log piped for reading.
    pub fn respawn_logged(&mut self) {
        let _ = self.child.wait();
        let data = self.dir.path().join("data");
        self.child = spawn_mqgate(&data, self.amqp, self.mqtt, self.admin, &[], true);
        self.wait_listening();
    }

    fn wait_listening(&self) {
        wait_ports(&[self.admin, self.amqp]);
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    /// Run a CLI subcommand against this broker: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_mqgate"))
            .args(args)
            .env("MQGATE_ADMIN_URL", self.admin_url())
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run mqgate");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP GET (the tests have no HTTP client crate): (status, body).
pub fn http_get(port: u16, path: &str, auth: Option<&str>) -> (u16, String) {
    http(port, "GET", path, auth, None)
}

/// A plain HTTP request with an optional JSON body: (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    auth: Option<&str>,
    json: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(a) = auth {
        req.push_str(&format!("Authorization: Basic {a}\r\n"));
    }
    if let Some(body) = json {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(json.unwrap_or(""));
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = match text.split_once("\r\n\r\n") {
        Some((head, body))
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked") =>
        {
            dechunk(body)
        }
        Some((_, body)) => body.to_owned(),
        None => String::new(),
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The repository's dashboards folder.
pub fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dashboards")
}

/// Every (dashboard file, panel title, PromQL expression).
pub fn dashboard_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dashboards_dir())
        .expect("dashboards/")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for f in files {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&f).expect("read")).expect("JSON");
        for p in v["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().expect("targets") {
                out.push((
                    f.file_name().unwrap().to_string_lossy().into_owned(),
                    p["title"].as_str().unwrap_or("").to_owned(),
                    t["expr"].as_str().expect("expr").to_owned(),
                ));
            }
        }
    }
    out
}

/// Declare a durable queue `name` (no arguments) on `ch`.
pub async fn durable_queue(ch: &lapin::Channel, name: &str) {
    try_durable_queue(ch, name).await.expect("queue.declare");
}

/// [`durable_queue`], for callers that handle a refused or closed connection.
pub async fn try_durable_queue(ch: &lapin::Channel, name: &str) -> Result<(), lapin::Error> {
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .map(|_| ())
}

/// `s` with every byte but unreserved ones percent-encoded (a path segment, a query
/// value).
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An MQTT 3.1.1 connection through the first of `ports` that takes it (trying them in
/// turn for up to 60 s), its event loop polled by the caller.
pub async fn mqtt_connect(
    ports: &[u16],
    id: &str,
    clean: bool,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for p in ports {
            let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", *p);
            o.set_clean_session(clean);
            o.set_keep_alive(Duration::from_secs(30));
            let (c, mut el) = rumqttc::AsyncClient::new(o, 100);
            if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) =
                tokio::time::timeout(Duration::from_secs(5), el.poll()).await
            {
                if a.code == rumqttc::ConnectReturnCode::Success {
                    return (c, el);
                }
            }
        }
        assert!(Instant::now() < deadline, "no gateway takes MQTT clients");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
