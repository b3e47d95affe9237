//! A gateway of a replicated (and maybe sharded) cluster: the `mqgate` binary on the
//! jetstream backend, its config written here, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// One gateway: its config, ports and process.
pub struct Gateway {
    pub name: String,
    pub config: PathBuf,
    pub amqp: u16,
    pub mqtt: u16,
    pub admin: u16,
    child: Option<Child>,
}

impl Gateway {
    /// Gateway `name` over the NATS servers `nats`, its view under `dir/name`, with
    /// `extra` appended to its config file (more sections, such as `[cluster]`).
    pub fn new(dir: &Path, name: &str, nats: &[String], extra: &str) -> Self {
        let (amqp, mqtt, admin) = (free_port(), free_port(), free_port());
        let servers = nats
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[listeners]\namqp = \"127.0.0.1:{amqp}\"\nmqtt = \"127.0.0.1:{mqtt}\"\n\
                 admin = \"127.0.0.1:{admin}\"\n\n[store]\nbackend = \"jetstream\"\n\
                 path = \"{}\"\n\n[store.jetstream]\nservers = [{servers}]\nnode_id = \"{name}\"\n\
                 lease_ttl = \"3s\"\n\n{extra}\n",
                dir.join(name).display()
            ),
        )
        .unwrap();
        Self {
            name: name.into(),
            config,
            amqp,
            mqtt,
            admin,
            child: None,
        }
    }

    pub fn spawn(&mut self) {
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_mqgate"))
                .args(["serve", "--config"])
                .arg(&self.config)
                .env("RUST_LOG", "warn,mqgate_store=info")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start mqgate"),
        );
    }

    pub fn listening(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.amqp)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", self.mqtt)).is_ok()
    }

    pub fn wait_listening(&self, limit: Duration) {
        let start = Instant::now();
        while !self.listening() {
            assert!(
                start.elapsed() < limit,
                "{} did not start listening within {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig} {pid}");
    }

    /// Wait until the process exits by itself; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().expect("running").try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                start.elapsed() < limit,
                "{} did not exit within {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.sigkill();
    }
}
