//! What `mqgate cluster status` shows: the node's role, the lease, each gateway's
//! report of itself, the stream's replicas.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use tokio::sync::watch;

use super::log::JsLog;
use super::{lease_bucket, nats, JetStreamConfig, Role, LEASE_KEY, NODE_KEY_PREFIX};
use crate::error::Result;

/// The replication side of an open jetstream store: the node's role, and the stream's
/// state for `mqgate cluster status`.
#[derive(Debug, Clone)]
pub struct Replication {
    pub(super) role: watch::Receiver<Role>,
    pub(super) js: jetstream::Context,
    pub(super) cfg: Arc<JetStreamConfig>,
    pub(super) log: Option<Arc<JsLog>>,
}

/// One replica of the stream, as JetStream reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The NATS server's name.
    pub name: String,
    /// Whether it leads the stream's Raft group.
    pub leader: bool,
    /// Whether it is caught up.
    pub current: bool,
    /// Whether the leader has lost it.
    pub offline: bool,
    /// Operations it is behind, when known.
    pub lag: u64,
}

/// What `mqgate cluster status` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The stream's name.
    pub stream: String,
    /// This node.
    pub node: String,
    /// This node's role.
    pub role: Role,
    /// The node holding the lease and the lease's current revision (it moves at each
    /// renewal; the owner's epoch is the revision it took the log with), if any.
    pub owner: Option<(String, u64)>,
    /// The stream's first and last sequence.
    pub first_seq: u64,
    /// Last sequence.
    pub last_seq: u64,
    /// Records this node's view has applied.
    pub applied: u64,
    /// The stream's replicas.
    pub replicas: Vec<ReplicaStatus>,
    /// The gateways that reported in the last `lease_ttl`: the owner and the standbys.
    pub nodes: Vec<NodeStatus>,
}

/// A gateway as it last reported itself (key `node.<id>` in the lease bucket, renewed
/// every second or so; it disappears `lease_ttl` after the node stops).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// Its node id.
    pub node: String,
    /// `owner` or `standby`.
    pub role: String,
    /// The last record its view has applied.
    pub applied: u64,
    /// Records it is behind the stream's last sequence.
    pub lag: u64,
}

impl Replication {
    /// This node's role now.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Wait until this node steps down; returns why.
    pub async fn stepped_down(&mut self) -> String {
        loop {
            if let Role::SteppedDown { reason } = &*self.role.borrow_and_update() {
                return reason.clone();
            }
            if self.role.changed().await.is_err() {
                return "the replication task ended".into();
            }
        }
    }

    /// The stream, the lease and the replicas, as JetStream reports them now.
    pub async fn status(&self) -> Result<ClusterStatus> {
        let mut stream = self
            .js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| nats("look up the stream", e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| nats("read the stream's state", e))?
            .clone();
        let mut replicas = Vec::new();
        if let Some(c) = &info.cluster {
            if let Some(l) = &c.leader {
                replicas.push(ReplicaStatus {
                    name: l.clone(),
                    leader: true,
                    current: true,
                    offline: false,
                    lag: 0,
                });
            }
            for p in &c.replicas {
                replicas.push(ReplicaStatus {
                    name: p.name.clone(),
                    leader: false,
                    current: p.current,
                    offline: p.offline,
                    lag: p.lag.unwrap_or(0),
                });
            }
        }
        let owner = match self.js.get_key_value(lease_bucket(&self.cfg)).await {
            Ok(kv) => match kv.entry(LEASE_KEY).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => {
                    Some((String::from_utf8_lossy(&e.value).into_owned(), e.revision))
                }
                _ => None,
            },
            Err(_) => None,
        };
        let role = self.role();
        let applied = match (&role, &self.log) {
            (Role::Standby { applied, .. }, _) => *applied,
            (_, Some(log)) => log.tip.load(Ordering::Acquire),
            _ => 0,
        };
        let last_seq = info.state.last_sequence;
        let mut nodes = Vec::new();
        if let Ok(kv) = self.js.get_key_value(lease_bucket(&self.cfg)).await {
            if let Ok(mut keys) = kv.keys().await {
                while let Some(Ok(k)) = keys.next().await {
                    let Some(id) = k.strip_prefix(NODE_KEY_PREFIX) else {
                        continue;
                    };
                    if let Ok(Some(v)) = kv.get(&k).await {
                        let v = String::from_utf8_lossy(&v).into_owned();
                        let (role, at) = v.split_once(' ').unwrap_or(("?", "0"));
                        let at = at.parse().unwrap_or(0);
                        nodes.push(NodeStatus {
                            node: id.to_string(),
                            role: role.to_string(),
                            applied: at,
                            lag: last_seq.saturating_sub(at),
                        });
                    }
                }
            }
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(ClusterStatus {
            stream: self.cfg.stream.clone(),
            node: self.cfg.node_id.clone(),
            role,
            owner,
            first_seq: info.state.first_sequence,
            last_seq,
            applied,
            replicas,
            nodes,
        })
    }
}
