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
    dir: PathBuf,
    nats: Vec<String>,
    extra: String,
}

impl Gateway {
    /// Gateway `name` over the NATS servers `nats`, its view under `dir/name`, with
    /// `extra` appended to its config file (more sections, such as `[cluster]`).
    pub fn new(dir: &Path, name: &str, nats: &[String], extra: &str) -> Self {
        let g = Self {
            name: name.into(),
            config: dir.join(format!("{name}.toml")),
            amqp: free_port(),
            mqtt: free_port(),
            admin: free_port(),
            child: None,
            dir: dir.to_owned(),
            nats: nats.to_vec(),
            extra: extra.to_owned(),
        };
        g.write_config();
        g
    }

    fn write_config(&self) {
        let (amqp, mqtt, admin) = (self.amqp, self.mqtt, self.admin);
        let servers = self
            .nats
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &self.config,
            format!(
                "[listeners]\namqp = \"127.0.0.1:{amqp}\"\nmqtt = \"127.0.0.1:{mqtt}\"\n\
                 admin = \"127.0.0.1:{admin}\"\n\n[store]\nbackend = \"jetstream\"\n\
                 path = \"{}\"\n\n[store.jetstream]\nservers = [{servers}]\nnode_id = \"{}\"\n\
                 lease_ttl = \"3s\"\n\n{}\n",
                self.dir.join(&self.name).display(),
                self.name,
                self.extra
            ),
        )
        .unwrap();
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

    /// Whether its AMQP, MQTT and admin ports accept connections (the admin API binds
    /// last: the tests ask it for the cluster's view as soon as this is true).
    pub fn listening(&self) -> bool {
        [self.amqp, self.mqtt, self.admin]
            .iter()
            .all(|&p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok())
    }

    /// Whether its AMQP or its MQTT port accepts connections (a standby opens neither).
    pub fn any_protocol_listening(&self) -> bool {
        [self.amqp, self.mqtt]
            .iter()
            .any(|&p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok())
    }

    /// Wait until it listens. A gateway that exits first (a port [`free_port`] found
    /// free was taken before it bound it: an outgoing connection of another test can
    /// get the same ephemeral port) is started again on new ports, a few times.
    pub fn wait_listening(&mut self, limit: Duration) {
        let start = Instant::now();
        let mut restarts = 0;
        while !self.listening() {
            assert!(
                start.elapsed() < limit,
                "{} did not start listening within {limit:?}",
                self.name
            );
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                assert!(
                    restarts < 5,
                    "{} exited at start {restarts} times",
                    self.name
                );
                restarts += 1;
                eprintln!("{} exited at start; trying again on new ports", self.name);
                (self.amqp, self.mqtt, self.admin) = (free_port(), free_port(), free_port());
                self.write_config();
                self.spawn();
            }
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
